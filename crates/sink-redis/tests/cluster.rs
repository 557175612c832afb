//! The Redis sink against a Redis Cluster of its own: three `redis-server` primaries on
//! free ports, joined by `redis-cli --cluster create`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use shapesync_core::{Change, ShapeInfo, Sink, SinkConfig, SinkContext, async_trait};
use shapesync_sink_redis::{RedisSink, RedisSinkConfig};
use shapesync_testkit::compliance::{SinkUnderTest, StoredRows, check_sink};
use shapesync_testkit::fixtures::{batch, checkpoint, item, items_schema};

struct OwnCluster {
    ports: Vec<u16>,
    dir: PathBuf,
    children: Vec<Child>,
}

impl OwnCluster {
    async fn start() -> OwnCluster {
        let dir = std::env::temp_dir().join(format!("shapesync-cluster-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Each node also listens on its port + 10000 (the cluster bus), so both must be
        // free and the port at most 55535.
        let free = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
        let mut ports: Vec<u16> = Vec::new();
        while ports.len() < 3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            if port <= 55_535 && free(port + 10_000) && !ports.contains(&port) {
                ports.push(port);
            }
        }
        let children = ports
            .iter()
            .map(|port| {
                Command::new("redis-server")
                    .args([
                        "--port",
                        &port.to_string(),
                        "--cluster-enabled",
                        "yes",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                    ])
                    .args(["--cluster-config-file", &format!("nodes-{port}.conf"), "--bind", "127.0.0.1"])
                    .current_dir(&dir)
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("redis-server is on PATH")
            })
            .collect();
        let cluster = OwnCluster { ports, dir, children };
        let deadline = Instant::now() + Duration::from_secs(30);
        for port in &cluster.ports {
            while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
                assert!(Instant::now() < deadline, "redis-server on {port} did not come up");
                tokio::time::sleep(Duration::from_millis(20)).await; // poll interval
            }
        }
        let nodes: Vec<String> = cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli is on PATH");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        for port in &cluster.ports {
            let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
            loop {
                let mut con = client.get_connection().unwrap();
                let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut con).unwrap();
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "the cluster did not settle: {info}");
                tokio::time::sleep(Duration::from_millis(50)).await; // poll interval
            }
        }
        cluster
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.ports[0])
    }

    async fn connection(&self) -> ClusterConnection {
        ClusterClient::new(vec![self.url()]).unwrap().get_async_connection().await.unwrap()
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ctx() -> SinkContext {
    SinkContext {
        pipeline: "compliance".into(),
        shape: ShapeInfo { table: "items".into(), ..Default::default() },
    }
}

struct OnCluster {
    config: RedisSinkConfig,
    con: tokio::sync::Mutex<ClusterConnection>,
}

#[async_trait]
impl SinkUnderTest for OnCluster {
    async fn open(&self) -> Arc<dyn Sink> {
        Arc::new(RedisSink::connect(self.config.clone(), ctx()).await.unwrap())
    }

    fn reads_atomically(&self) -> bool {
        false // KEYS, then one read per key
    }

    async fn rows(&self) -> StoredRows {
        let mut con = self.con.lock().await;
        let pattern = format!("{}{{compliance}}:items:*", self.config.prefix);
        let keys: Vec<String> = redis::cmd("KEYS").arg(&pattern).query_async(&mut *con).await.unwrap();
        let mut rows = StoredRows::new();
        for key in keys {
            let row: BTreeMap<String, String> =
                redis::cmd("HGETALL").arg(&key).query_async(&mut *con).await.unwrap();
            // A row deleted between KEYS and HGETALL (the suite reads during applies) reads empty.
            if let Some(id) = row.get("id").cloned() {
                rows.insert(id, row);
            }
        }
        rows
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_the_sink_passes_the_compliance_suite_and_sweeps_in_parts() {
    let cluster = OwnCluster::start().await;
    let mut config = RedisSinkConfig::new(cluster.url());
    config.cluster = true;
    config.hash_tag = true;
    config.prefix = format!("cluster:{}:", std::process::id());
    config.part_size = 100;
    let target =
        OnCluster { config: config.clone(), con: tokio::sync::Mutex::new(cluster.connection().await) };
    check_sink(&target).await;

    // A snapshot of many parts, then a resync that keeps half: plain pipelines and
    // sweep steps on the cluster, every key in the pipeline's slot.
    let sink = RedisSink::connect(config.clone(), ctx()).await.unwrap();
    let rows = |n: i64, g: u64| {
        batch(
            (1..=n).map(|i| Change::insert(format!("k{i}"), item(i, "x"))).collect(),
            checkpoint(items_schema(), "0_inf", g),
        )
    };
    sink.apply(&rows(1_000, 1)).await.unwrap();
    assert_eq!(target.rows().await.len(), 1_000);
    let mut resync = rows(500, 2);
    resync.sweep = true;
    sink.apply(&resync).await.unwrap();
    assert_eq!(target.rows().await.len(), 500);
    assert_eq!(sink.checkpoint().await.unwrap(), Some(resync.checkpoint));

    // Cluster mode needs the hash tag.
    config.hash_tag = false;
    assert_eq!(config.check(&ctx()).unwrap_err().key, "cluster");
}
