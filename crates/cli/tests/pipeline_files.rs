//! The pipeline files shipped in `pipelines/` run as documented, through the real binary,
//! against the testkit server, the local Redis and Postgres, and SQLite files of their own.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::json;
use shapesync_testkit::{Column, ServerOptions, TableDef, TableHandle, TestServer};

const REDIS: &str = "redis://127.0.0.1:6379";
const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/test";

fn shapesync(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shapesync"));
    cmd.args(args).current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run shapesync")
}

fn redis() -> redis::Connection {
    redis::Client::open(REDIS).unwrap().get_connection().expect("local Redis on 6379")
}

fn keys(con: &mut redis::Connection, prefix: &str) -> Vec<String> {
    let mut keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}*")).query(con).unwrap();
    keys.sort();
    keys
}

/// The `projects` table the shipped pipeline files read (`where: archived = false`):
/// projects 1 and 3 are open, project 1 has no owner.
/// A testkit server whose live requests answer within 200 ms.
async fn fast_server() -> TestServer {
    TestServer::start(ServerOptions { long_poll_timeout: Duration::from_millis(200), ..Default::default() })
        .await
        .unwrap()
}

async fn projects_server() -> (TestServer, TableHandle) {
    let server = fast_server().await;
    let projects = server.create_table(
        TableDef::new("projects")
            .column(Column::new("id", "int8").primary_key().not_null())
            .column(Column::new("name", "text"))
            .column(Column::new("owner", "text"))
            .column(Column::new("archived", "bool")),
    );
    projects.register_where("archived = false", |row| row.get("archived") == Some("f"));
    projects.seed([
        json!({"id": "1", "name": "alpha", "owner": null, "archived": "f"}),
        json!({"id": "2", "name": "beta", "owner": "ann", "archived": "t"}),
        json!({"id": "3", "name": "gamma", "owner": "bob", "archived": "f"}),
    ]);
    (server, projects)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cache_pipeline_runs_as_documented() {
    let (server, projects) = projects_server().await;
    let prefix = format!("test:{}:files:", std::process::id());
    let env = [
        ("ELECTRIC_URL", server.url()),
        ("REDIS_URL", REDIS.to_owned()),
        ("REDIS_PREFIX", prefix.clone()),
        ("SHAPESYNC_METRICS_LISTEN", "127.0.0.1:0".to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let file = "pipelines/redis-cache.yaml";

    let out = shapesync(&["validate", file], &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let out = shapesync(&["run", "--once", file], &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut con = redis();
    let p = |k: &str| format!("{prefix}{k}");
    assert_eq!(
        keys(&mut con, &prefix),
        vec![
            p("project:1"),
            p("project:3"),
            p("shapesync:projects:checkpoint"),
            p("shapesync:projects:lease"),
            p("shapesync:projects:members")
        ]
    );
    let alpha: Vec<(String, String)> = redis::cmd("HGETALL").arg(p("project:1")).query(&mut con).unwrap();
    let mut alpha = alpha;
    alpha.sort();
    assert_eq!(
        alpha,
        vec![("archived".into(), "false".into()), ("id".into(), "1".into()), ("name".into(), "alpha".into())],
        "NULL owner is an absent field"
    );

    // A later run picks up from the stored checkpoint.
    projects.transaction().update(json!({"id": "3", "name": "gamma 2"})).commit();
    let out = shapesync(&["run", "--once", file], &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let name: String = redis::cmd("HGET").arg(p("project:3")).arg("name").query(&mut con).unwrap();
    assert_eq!(name, "gamma 2");
    let requests = server.requests();
    let resumed = requests.iter().filter(|r| r.param("offset") != Some("-1")).count();
    assert!(resumed > 0, "the second run resumed instead of starting over");

    // `checkpoints` shows the stored position.
    let out = shapesync(&["checkpoints", "--json", file], &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["pipeline"], "projects");
    assert!(line["handle"].as_str().is_some_and(|h| !h.is_empty()), "{line}");
    assert_eq!(line["resyncing"], false);
    assert!(line["owner"].as_str().is_some_and(|o| !o.is_empty()), "the lease names its last owner: {line}");
    assert!(line["lease_expires_in_ms"].as_i64().is_some_and(|ms| ms <= 0), "run --once released it: {line}");

    // `reset` refuses without confirmation, then removes everything with --yes.
    let out = shapesync(&["reset", file, "--pipeline", "projects"], &env);
    assert!(!out.status.success());
    assert_eq!(keys(&mut con, &prefix).len(), 5, "nothing removed without confirmation");
    let out = shapesync(&["reset", file, "--pipeline", "projects", "--yes"], &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        keys(&mut con, &prefix),
        vec![p("shapesync:projects:lease")],
        "only the (released) lease stays"
    );
    let _: () = redis::cmd("DEL").arg(p("shapesync:projects:lease")).query(&mut con).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_cache_pipeline_runs_as_documented() {
    let (server, projects) = projects_server().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("cache.db");
    let env = [
        ("ELECTRIC_URL", server.url()),
        ("SQLITE_PATH", db.display().to_string()),
        ("SHAPESYNC_METRICS_LISTEN", "127.0.0.1:0".to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let file = "pipelines/sqlite-cache.yaml";
    let rows = || -> Vec<(i64, String, Option<String>, i64)> {
        let conn = rusqlite::Connection::open(&db).unwrap();
        let mut stmt = conn.prepare("SELECT id, name, owner, archived FROM projects ORDER BY id").unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };

    let out = shapesync(&["run", "--once", file], &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(rows(), vec![(1, "alpha".into(), None, 0), (3, "gamma".into(), Some("bob".into()), 0)]);

    // A later run picks up from the stored checkpoint.
    projects.transaction().update(json!({"id": "3", "name": "gamma 2"})).commit();
    let out = shapesync(&["run", "--once", file], &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(rows()[1], (3, "gamma 2".into(), Some("bob".into()), 0), "partial update merged");
    let resumed = server.requests().iter().filter(|r| r.param("offset") != Some("-1")).count();
    assert!(resumed > 0, "the second run resumed instead of starting over");

    let out = shapesync(&["checkpoints", "--json", file], &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["pipeline"], "projects");

    let out = shapesync(&["reset", file, "--pipeline", "projects", "--yes"], &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(rows().is_empty());
    let out = shapesync(&["checkpoints", "--json", file], &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(line["handle"].is_null(), "no checkpoint after reset: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replica_pipeline_runs_as_documented() {
    use sqlx::AssertSqlSafe;
    let (server, projects) = projects_server().await;
    let url = "postgres://postgres@127.0.0.1:5432/test";
    let pool = sqlx::PgPool::connect(url).await.expect("local Postgres, database `test`");
    let schema = format!("shapesync_files_{}", std::process::id());
    let sql = format!("DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}");
    sqlx::raw_sql(AssertSqlSafe(sql)).execute(&pool).await.unwrap();
    let env = [
        ("ELECTRIC_URL", server.url()),
        ("TARGET_DATABASE_URL", url.to_owned()),
        ("TARGET_SCHEMA", schema.clone()),
        ("SHAPESYNC_METRICS_LISTEN", "127.0.0.1:0".to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let file = "pipelines/postgres-replica.yaml";
    let rows = || {
        let (pool, schema) = (pool.clone(), schema.clone());
        async move {
            let sql = format!("SELECT id, name, owner, archived FROM {schema}.projects ORDER BY id");
            let rows: Vec<(i64, String, Option<String>, bool)> =
                sqlx::query_as(AssertSqlSafe(sql)).fetch_all(&pool).await.unwrap();
            rows
        }
    };

    let out = shapesync(&["run", "--once", file], &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        rows().await,
        vec![(1, "alpha".into(), None, false), (3, "gamma".into(), Some("bob".into()), false)]
    );

    projects.transaction().update(json!({"id": "3", "name": "gamma 2"})).commit();
    let out = shapesync(&["run", "--once", file], &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(rows().await[1], (3, "gamma 2".into(), Some("bob".into()), false), "partial update merged");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!log.contains("already exists"), "Postgres' notices about existing tables are not logged: {log}");
    let resumed = server.requests().iter().filter(|r| r.param("offset") != Some("-1")).count();
    assert!(resumed > 0, "the second run resumed instead of starting over");

    let out = shapesync(&["reset", file, "--pipeline", "projects", "--yes"], &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(rows().await.is_empty());
    sqlx::raw_sql(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&pool).await.unwrap();
}

#[test]
fn every_shipped_pipeline_file_validates() {
    // The examples in `pipelines/`, and the embedded demo this crate ships.
    let dirs = [
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../pipelines"),
        concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines"),
    ];
    let env = [("SHAPESYNC_DEMO_URL", "http://127.0.0.1:3000/v1/shape")];
    let mut seen = 0;
    for entry in dirs.iter().flat_map(|dir| std::fs::read_dir(dir).unwrap()) {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            seen += 1;
            let out = shapesync(&["validate", path.to_str().unwrap()], &env);
            assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
        }
    }
    assert!(seen >= 4, "the three examples and the demo");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_connect_checks_that_source_and_sink_answer_without_writing() {
    let server = TestServer::start(ServerOptions::default()).await.unwrap();
    server.create_table(TableDef::new("vc_items").column(Column::new("id", "int8").primary_key()));
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let prefix = format!("test:{}:vc:", std::process::id());
    let file = std::env::temp_dir().join(format!("shapesync-vc-{}.yaml", std::process::id()));
    let write = |table: &str, redis_port: u16| {
        std::fs::write(
            &file,
            format!(
                "pipelines:\n  vc:\n    source: {{type: electric, url: '{}', table: {table}}}\n    sink: {{type: redis, url: 'redis://127.0.0.1:{redis_port}', prefix: '{prefix}'}}\n",
                server.url()
            ),
        )
        .unwrap();
    };
    let path = file.to_str().unwrap().to_owned();

    write("vc_items", 6379);
    let out = shapesync(&["validate", "--connect", &path], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("vc: source answers, sink connects"));
    assert!(keys(&mut redis(), &prefix).is_empty(), "validate writes nothing");

    write("no_such_table", 6379);
    let out = shapesync(&["validate", "--connect", &path], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("pipelines.vc: source") && stderr.contains("table"), "{stderr}");

    write("vc_items", closed_port);
    let out = shapesync(&["validate", "--connect", &path], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("pipelines.vc: sink"), "{stderr}");
    let _ = std::fs::remove_file(&file);
}

/// `validate --connect` is a dry run of the start: the shape's columns (from the server)
/// go through the transforms and the sink's own checks, so what the first batch would
/// refuse fails validation, naming the file, the pipeline and the part — and nothing is
/// written anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_connect_catches_what_the_first_batch_would_refuse() {
    let server = TestServer::start(ServerOptions::default()).await.unwrap();
    server.create_table(
        TableDef::new("dry_items")
            .column(Column::new("id", "int8").primary_key().not_null())
            .column(Column::new("title", "text")),
    );
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("test:{}:dry:", std::process::id());
    let url = server.url();
    let source = format!("{{type: electric, url: '{url}', table: dry_items}}");
    let redis_sink = format!("{{type: redis, url: '{REDIS}', prefix: '{prefix}'}}");
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, "").unwrap();
    let cases = [
        (
            "select_drops_key",
            format!(
                "    source: {source}\n    transforms: [{{type: select, columns: [title]}}]\n    sink: {redis_sink}\n"
            ),
            "transforms[0]",
        ),
        (
            "rename_missing",
            format!(
                "    source: {source}\n    transforms: [{{type: rename, columns: {{nope: other}}}}]\n    sink: {redis_sink}\n"
            ),
            "transforms[0]",
        ),
        (
            "template_non_key",
            format!(
                "    source: {source}\n    sink: {{type: redis, url: '{REDIS}', prefix: '{prefix}t:', key: 'item:{{title}}'}}\n"
            ),
            "replica: full",
        ),
        (
            "invalidate_non_key",
            format!(
                "    source: {{type: electric, url: '{url}', table: dry_items, log: changes_only}}\n    sink: {{type: redis, url: '{REDIS}', prefix: '{prefix}i:', mode: invalidate, keys: ['item:{{id}}', 'title:{{title}}:items']}}\n"
            ),
            "template `title:{title}:items` uses `title`",
        ),
        (
            "pg_schema_missing",
            format!(
                "    source: {source}\n    sink: {{type: postgres, url: '{POSTGRES}', schema: no_such_schema_{}}}\n",
                std::process::id()
            ),
            "does not exist",
        ),
        (
            "sqlite_unwritable",
            format!(
                "    source: {source}\n    sink: {{type: sqlite, path: '{}/x.db'}}\n",
                not_a_dir.display()
            ),
            "fix `path`",
        ),
    ];
    for (id, pipeline, says) in cases {
        let file = dir.path().join(format!("{id}.yaml"));
        std::fs::write(&file, format!("pipelines:\n  {id}:\n{pipeline}")).unwrap();
        let out = shapesync(&["validate", "--connect", file.to_str().unwrap()], &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{id}: {stderr}");
        let named = format!("{}: pipelines.{id}:", file.display());
        assert!(
            stderr.contains(&named) && stderr.contains(says),
            "{id}: expected `{named}` … `{says}` in: {stderr}"
        );
    }
    assert!(keys(&mut redis(), &prefix).is_empty(), "validate writes nothing");
    assert!(!not_a_dir.with_file_name("x.db").exists());

    // Two pipelines writing the same key space are refused before anything connects.
    let file = dir.path().join("shared.yaml");
    std::fs::write(
        &file,
        format!("pipelines:\n  one:\n    source: {source}\n    sink: {redis_sink}\n  two:\n    source: {source}\n    sink: {redis_sink}\n"),
    )
    .unwrap();
    let out = shapesync(&["validate", "--connect", file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}

/// One templated pipeline expanded over three tenants syncs each tenant's rows (its
/// `where` with the tenant as a parameter) into a prefix of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_syncs_each_tenant_into_its_own_prefix() {
    let server = fast_server().await;
    let projects = server.create_table(
        TableDef::new("tenant_projects")
            .column(Column::new("id", "int8").primary_key().not_null())
            .column(Column::new("tenant", "text"))
            .column(Column::new("name", "text")),
    );
    projects.register_where("tenant = $1", |row| {
        row.get("tenant").is_some() && row.get("tenant") == row.param("1")
    });
    projects.seed((1..=9).map(|i| {
        let tenant = ["acme", "globex", "initech"][i % 3];
        json!({"id": i.to_string(), "tenant": tenant, "name": format!("p{i}")})
    }));
    let base = format!("test:{}:tenants:", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tenants.yaml");
    std::fs::write(
        &file,
        format!(
            "templates:
  tenant_projects:
    for_each: {{tenant: [acme, globex, initech]}}
    pipeline:
      source: {{type: electric, url: '{}', table: tenant_projects, where: 'tenant = $1', params: {{1: '${{tenant}}'}}}}
      sink: {{type: redis, url: '{REDIS}', prefix: '{base}${{tenant}}:', key: 'project:{{id}}'}}
",
            server.url()
        ),
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let out = shapesync(&["validate", path], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("tenant_projects.acme, tenant_projects.globex, tenant_projects.initech"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = shapesync(&["run", "--once", path], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut con = redis();
    for (t, tenant) in ["acme", "globex", "initech"].iter().enumerate() {
        let prefix = format!("{base}{tenant}:");
        let rows: Vec<String> = keys(&mut con, &format!("{prefix}project:"))
            .into_iter()
            .filter(|k| !k.contains("shapesync:"))
            .collect();
        let want: Vec<String> =
            (1..=9).filter(|i| i % 3 == t).map(|i| format!("{prefix}project:{i}")).collect();
        assert_eq!(rows, want, "{tenant}'s rows, and only them, under its prefix");
        let owner: String = redis::cmd("HGET").arg(&want[0]).arg("tenant").query(&mut con).unwrap();
        assert_eq!(owner, *tenant);
    }
    let _: () = redis::cmd("EVAL")
        .arg("for _, k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('UNLINK', k) end")
        .arg(0)
        .arg(format!("{base}*"))
        .query(&mut con)
        .unwrap();
}
