//! `shapesync validate` and `run` on bad input: one clear message naming the file and
//! key path, a non-zero exit, no secret echoed, nothing written.

use std::path::PathBuf;
use std::process::{Command, Output};

fn shapesync(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shapesync"));
    cmd.args(args).env_remove("SHAPESYNC_LOG").env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run shapesync")
}

struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn file(name: &str, text: &str) -> TempFile {
    let path = std::env::temp_dir().join(format!("shapesync-validate-{}-{name}.yaml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    TempFile(path)
}

const GOOD: &str = "
pipelines:
  projects:
    source:
      type: electric
      url: http://localhost:3000/v1/shape
      table: projects
      where: archived = false
    sink:
      type: memory
";

/// Runs `validate` on `text` and returns (exit code, stderr, path).
fn validate(name: &str, text: &str, env: &[(&str, &str)]) -> (i32, String, String) {
    let f = file(name, text);
    let out = shapesync(&["validate", f.0.to_str().unwrap()], env);
    (out.status.code().unwrap(), String::from_utf8_lossy(&out.stderr).into_owned(), f.0.display().to_string())
}

fn assert_error(name: &str, text: &str, key: &str, expect: &str) -> String {
    let (code, stderr, path) = validate(name, text, &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains(&format!("{path}: {key}: ")), "expected file and key `{key}` in: {stderr}");
    assert!(stderr.contains(expect), "expected `{expect}` in: {stderr}");
    stderr
}

#[test]
fn a_good_file_validates() {
    let f = file("good", GOOD);
    let out = shapesync(&["validate", f.0.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok: 1 pipeline(s): projects");
}

#[test]
fn malformed_yaml_names_the_file() {
    let (code, stderr, path) = validate("malformed", "pipelines:\n  projects: [unclosed\n", &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains(&path), "{stderr}");
}

#[test]
fn an_unknown_key_names_its_path() {
    assert_error(
        "unknown-key",
        &GOOD.replace("type: memory", "type: memory\n      colour: red"),
        "pipelines.projects.sink.colour",
        "unknown key",
    );
    assert_error(
        "unknown-src-key",
        &GOOD.replace("table: projects", "table: projects\n      tabel: x"),
        "pipelines.projects.source.tabel",
        "unknown key",
    );
}

#[test]
fn a_wrong_type_names_its_path() {
    assert_error(
        "wrong-type",
        &GOOD.replace("    sink:", "    buffer: lots\n    sink:"),
        "pipelines.projects.buffer",
        "expected",
    );
}

#[test]
fn an_unknown_sink_type_lists_the_known_ones() {
    let err = assert_error(
        "unknown-sink",
        &GOOD.replace("type: memory", "type: mongo"),
        "pipelines.projects.sink.type",
        "unknown sink type `mongo`",
    );
    assert!(err.contains("memory") && err.contains("redis"), "{err}");
}

#[test]
fn a_missing_env_var_without_default_is_named() {
    let text = GOOD.replace("http://localhost:3000/v1/shape", "${SHAPESYNC_TEST_UNSET_URL}");
    assert_error("missing-env", &text, "pipelines.projects.source.url", "SHAPESYNC_TEST_UNSET_URL");
    // With a default, or with the variable set, it validates.
    let with_default =
        GOOD.replace("http://localhost:3000/v1/shape", "${SHAPESYNC_TEST_UNSET_URL:-http://h:1/v1/shape}");
    assert_eq!(validate("env-default", &with_default, &[]).0, 0);
    let (code, stderr, _) =
        validate("env-set", &text, &[("SHAPESYNC_TEST_UNSET_URL", "http://e:3000/v1/shape")]);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn an_unparseable_url_is_rejected_without_echoing_secrets() {
    let text = GOOD.replace("http://localhost:3000/v1/shape", "http://admin:hunter2@[::1/v1/shape");
    let err = assert_error("bad-url", &text, "pipelines.projects.source.url", "URL");
    assert!(!err.contains("hunter2"), "password leaked: {err}");
    let text = GOOD.replace("type: memory", "type: redis\n      url: \"rediss://:hunter2@bad host:6379\"");
    let err = assert_error("bad-redis-url", &text, "pipelines.projects.sink.url", "");
    assert!(!err.contains("hunter2"), "password leaked: {err}");
}

#[test]
fn every_problem_in_every_pipeline_is_reported() {
    let text = format!(
        "{GOOD}  second:\n    source: {{type: electric, url: 'nope', table: t}}\n    sink: {{type: memory}}\n  third:\n    source: {{type: electric, url: 'http://h/v1/shape', table: t}}\n    sink: {{type: nosuch}}\n"
    );
    let (code, stderr, _) = validate("several", &text, &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("pipelines.second.source.url"), "{stderr}");
    assert!(stderr.contains("pipelines.third.sink.type"), "{stderr}");
}

#[test]
fn run_refuses_a_bad_file_before_starting_anything() {
    let text = format!(
        "{GOOD}  broken:\n    source: {{type: electric, url: 'http://127.0.0.1:9/v1/shape', table: t}}\n    sink: {{type: nosuch}}\n"
    );
    let f = file("run-bad", &text);
    let out = shapesync(&["run", "--once", f.0.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("pipelines.broken.sink.type"), "{stderr}");
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let out = shapesync(&["validate", "/nonexistent/pipeline.yaml"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/pipeline.yaml") && stderr.contains("cannot read"), "{stderr}");
}

#[test]
fn every_verb_has_useful_help() {
    for verb in ["run", "validate", "checkpoints", "reset"] {
        let out = shapesync(&[verb, "--help"], &[]);
        assert!(out.status.success());
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("Usage: shapesync") && help.len() > 200, "{verb}: {help}");
    }
}

/// Two pipelines in one file, each `source: {table: <table>}` and the given `sink`.
fn two_pipelines(a: (&str, &str), b: (&str, &str)) -> String {
    let pipeline = |id: &str, (table, sink): (&str, &str)| {
        format!(
            "  {id}:\n    source: {{type: electric, url: 'http://localhost:3000/v1/shape', table: '{table}'}}\n    sink: {sink}\n"
        )
    };
    format!("pipelines:\n{}{}", pipeline("first", a), pipeline("second", b))
}

#[test]
fn two_pipelines_writing_one_sqlite_table_are_refused_and_schemas_get_tables_of_their_own() {
    let sqlite = "{type: sqlite, path: /tmp/shared-cache.db}";
    // The same table, written twice (once schema-qualified): refused, naming both.
    let stderr = assert_error(
        "same-sqlite-table",
        &two_pipelines(("items", sqlite), ("public.items", sqlite)),
        "pipelines.second.sink.table",
        "pipeline `first`",
    );
    assert!(stderr.contains("`items`") && stderr.contains("own `table`"), "{stderr}");
    // Same-named tables of two schemas: two tables by default, no clash.
    let (code, stderr, _) =
        validate("two-schemas", &two_pipelines(("s1.items", sqlite), ("s2.items", sqlite)), &[]);
    assert_eq!(code, 0, "{stderr}");
    // The same in Postgres, where the target is schema.table of one database.
    let postgres = "{type: postgres, url: 'postgres://u:secret@db:5432/app'}";
    let stderr = assert_error(
        "same-postgres-table",
        &two_pipelines(("items", postgres), ("items", postgres)),
        "pipelines.second.sink.table",
        "`public.items`",
    );
    assert!(!stderr.contains("secret"), "{stderr}");
    let other_db = "{type: postgres, url: 'postgres://u@db:5432/other'}";
    assert_eq!(validate("other-db", &two_pipelines(("items", postgres), ("items", other_db)), &[]).0, 0);
}

#[test]
fn two_pipelines_writing_overlapping_redis_keys_are_refused() {
    let redis = |extra: &str| format!("{{type: redis, url: 'redis://127.0.0.1:6379'{extra}}}");
    let stderr = assert_error(
        "same-redis-keys",
        &two_pipelines(("items", &redis("")), ("items", &redis(""))),
        "pipelines.second.sink.prefix",
        "keys starting with `items:`",
    );
    assert!(stderr.contains("pipeline `first`"), "{stderr}");
    assert_error(
        "nested-redis-keys",
        &two_pipelines(("items", &redis(", key: 'item:{id}'")), ("items", &redis(", key: 'item:{id}:v2'"))),
        "pipelines.second.sink.key",
        "keys starting with `item:`",
    );
    // Apart by prefix, by table, by database or by hash tag: fine.
    for (a, b) in [
        (redis(", prefix: 'a:'"), redis(", prefix: 'b:'")),
        (redis(", database: 1"), redis(", database: 2")),
        (redis(", hash_tag: true"), redis(", hash_tag: true")),
    ] {
        let (code, stderr, _) = validate("apart-redis", &two_pipelines(("items", &a), ("items", &b)), &[]);
        assert_eq!(code, 0, "{a} / {b}: {stderr}");
    }
    let (code, stderr, _) =
        validate("tables-redis", &two_pipelines(("items", &redis("")), ("orders", &redis(""))), &[]);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn a_key_template_that_could_render_the_sinks_own_keys_is_refused() {
    // `{k}` could render `shapesync:<pipeline>:checkpoint`, overwriting the checkpoint.
    let pipeline = |sink: &str| {
        format!(
            "pipelines:\n  p:\n    source: {{type: electric, url: 'http://localhost:3000/v1/shape', table: items}}\n    sink: {sink}\n"
        )
    };
    assert_error(
        "template-internal",
        &pipeline("{type: redis, url: 'redis://127.0.0.1:6379', key: '{k}'}"),
        "pipelines.p.sink.key",
        "keys starting with `shapesync:p:`",
    );
    assert_error(
        "template-internal-prefix",
        &pipeline("{type: redis, url: 'redis://127.0.0.1:6379', prefix: 'app:', key: 'shapes{k}'}"),
        "pipelines.p.sink.key",
        "start the key template with fixed text",
    );
    let (code, stderr, _) = validate(
        "template-ok",
        &pipeline("{type: redis, url: 'redis://127.0.0.1:6379', key: 'item:{k}'}"),
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn a_source_without_a_snapshot_needs_a_sink_that_keeps_a_cache() {
    let pipeline = |source: &str, sink: &str| {
        format!(
            "pipelines:\n  p:\n    source: {{type: electric, url: 'http://localhost:3000/v1/shape', table: projects{source}}}\n    sink: {sink}\n"
        )
    };
    for source in [", log: changes_only", ", offset: now"] {
        for sink in [
            "{type: memory}",
            "{type: redis, url: 'redis://127.0.0.1:6379'}",
            "{type: sqlite, path: /tmp/x.db}",
        ] {
            assert_error(
                "changes-only-mirror",
                &pipeline(source, sink),
                "pipelines.p.source",
                "mirrors the shape",
            );
        }
        let invalidate =
            "{type: redis, url: 'redis://127.0.0.1:6379', mode: invalidate, keys: ['project:{id}']}";
        let (code, stderr, _) = validate("changes-only-invalidate", &pipeline(source, invalidate), &[]);
        assert_eq!(code, 0, "{source}: {stderr}");
    }
    // A template over a column outside the primary key needs `replica: full`, and says which.
    let sink = "{type: redis, url: 'redis://127.0.0.1:6379', mode: invalidate, primary_key: [id], keys: ['project:{id}', 'org:{org_id}:projects']}";
    let stderr = assert_error(
        "invalidate-non-key",
        &pipeline(", log: changes_only", sink),
        "pipelines.p.sink.keys.1",
        "replica: full",
    );
    assert!(stderr.contains("`org:{org_id}:projects`") && stderr.contains("`org_id`"), "{stderr}");
    let (code, stderr, _) =
        validate("invalidate-full", &pipeline(", log: changes_only, replica: full", sink), &[]);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn a_missing_ca_file_is_refused_by_validate() {
    assert_error(
        "missing-ca",
        "pipelines:\n  p:\n    source: {type: electric, url: 'http://localhost:3000/v1/shape', table: items}\n    sink: {type: redis, url: 'rediss://127.0.0.1:6380', ca_file: /nonexistent/ca.pem}\n",
        "pipelines.p.sink.ca_file",
        "cannot read the file",
    );
}

#[test]
fn an_invalid_log_filter_and_an_unknown_pipeline_to_reset_are_usage_errors() {
    let f = file("usage", GOOD);
    let path = f.0.to_str().unwrap();
    let out = shapesync(&["--log", "shapesync=loud", "validate", path], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--log"));
    let out = shapesync(&["reset", path, "--pipeline", "nope", "--yes"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no pipeline `nope`") && stderr.contains("known: projects"), "{stderr}");
}

#[test]
fn shell_completions_and_the_man_page_cover_every_verb() {
    for shell in ["bash", "zsh", "fish"] {
        let out = shapesync(&["completions", shell], &[]);
        assert!(out.status.success(), "{shell}: {}", String::from_utf8_lossy(&out.stderr));
        let script = String::from_utf8_lossy(&out.stdout);
        for verb in ["run", "validate", "checkpoints", "status", "reset"] {
            assert!(script.contains(verb), "{shell} completes `{verb}`");
        }
    }
    let out = shapesync(&["man"], &[]);
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && page.contains(".TH shapesync 1") && page.contains("status"), "{page}");
    assert_eq!(
        shapesync(&["completions", "tcsh"], &[]).status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}
