//! The sink's connection to Redis: one server (plain or TLS) or a Redis Cluster.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Client, Cmd, ConnectionInfo, Pipeline, RedisError, RedisFuture, Value};
use shapesync_core::SinkError;

use crate::error::classify;

/// How long to wait for a TCP connection before calling Redis unavailable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The sink's connection: to one server (reconnecting by itself), or to a Redis Cluster
/// (connected on first use, then following slot moves). Cheap to clone.
#[derive(Clone)]
pub(crate) enum Connection {
    /// One server, plain or TLS, reconnecting by itself.
    Single(ConnectionManager),
    /// A cluster, reached through the node in the URL on first use.
    Cluster(Arc<ClusterClient>, Arc<tokio::sync::OnceCell<ClusterConnection>>),
}

impl Connection {
    /// A connection that connects on first use: to a cluster when `cluster`, else to one
    /// server; `ca_file` is the PEM file of a private CA for `rediss://` URLs. Every
    /// command fails after `timeout` without an answer.
    pub(crate) fn lazy(
        info: ConnectionInfo,
        cluster: bool,
        ca_file: Option<&Path>,
        timeout: Duration,
    ) -> Result<Self, SinkError> {
        #[cfg(feature = "tls")]
        let _ = rustls::crypto::ring::default_provider().install_default();
        let root_cert = match ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                SinkError::rejected(format!("cannot read `ca_file` {}: {e}", path.display())).with_source(e)
            })?),
            None => None,
        };
        let bad_ca = |e: RedisError| {
            let path = ca_file.unwrap_or(Path::new("")).display();
            SinkError::rejected(format!("`ca_file` {path} holds no usable certificate: {e}")).with_source(e)
        };
        if cluster {
            let builder = ClusterClient::builder([info])
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(timeout)
                .retries(1);
            #[cfg(feature = "tls")]
            let builder = match &root_cert {
                Some(pem) => {
                    builder.certs(redis::TlsCertificates { client_tls: None, root_cert: Some(pem.clone()) })
                }
                None => builder,
            };
            let client =
                builder.build().map_err(|e| if root_cert.is_some() { bad_ca(e) } else { classify(e) })?;
            return Ok(Connection::Cluster(Arc::new(client), Arc::default()));
        }
        let client = match root_cert {
            #[cfg(feature = "tls")]
            Some(pem) => {
                let certs = redis::TlsCertificates { client_tls: None, root_cert: Some(pem) };
                Client::build_with_tls(info, certs).map_err(bad_ca)?
            }
            _ => Client::open(info).map_err(classify)?,
        };
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1);
        Ok(Connection::Single(
            ConnectionManager::new_lazy_with_config(client, manager_config).map_err(classify)?,
        ))
    }

    async fn cluster(
        client: &ClusterClient,
        cell: &tokio::sync::OnceCell<ClusterConnection>,
    ) -> redis::RedisResult<ClusterConnection> {
        cell.get_or_try_init(|| client.get_async_connection()).await.cloned()
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(conn) => conn.req_packed_command(cmd),
            Connection::Cluster(client, cell) => {
                Box::pin(async move { Self::cluster(client, cell).await?.req_packed_command(cmd).await })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(client, cell) => Box::pin(async move {
                Self::cluster(client, cell).await?.req_packed_commands(pipeline, offset, count).await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(conn) => conn.get_db(),
            Connection::Cluster(..) => 0,
        }
    }
}
