//! `type: electric` in pipeline files.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use shapesync_core::registry::SourceConfig;
use shapesync_core::{ConfigError, ShapeInfo, Source, SourceContext, SourceError};
use url::Url;

use crate::options::redacted_headers;
use crate::request::{REDACTED, redact_url};
use crate::{LogMode, Replica, ShapeOptions, ShapeStream};

/// The `source:` mapping of an Electric pipeline. Its `Debug` output hides the secret,
/// header values and URL credentials.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ElectricSourceConfig {
    /// The full shape endpoint, e.g. `http://localhost:3000/v1/shape`.
    pub url: String,
    /// `table` or `schema.table`.
    pub table: String,
    /// SQL filter with `$n` placeholders.
    #[serde(default, rename = "where")]
    pub where_clause: Option<String>,
    /// Placeholder values by number (`1: open`); numbers and booleans are sent as text.
    #[serde(default)]
    pub params: BTreeMap<String, ParamValue>,
    /// Selected columns (must include the primary key).
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    /// `default` or `full`.
    #[serde(default)]
    pub replica: Replica,
    /// `full`; `changes_only` is rejected by [`SourceConfig::check`] (pipelines cannot
    /// rebuild a cache without a snapshot; the [`ShapeStream`] API supports it).
    #[serde(default)]
    pub log: LogMode,
    /// Electric API secret.
    #[serde(default)]
    pub secret: Option<String>,
    /// Extra request headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// A file of `Name: value` header lines, re-read before every request (rotating
    /// tokens); its headers replace same-named `headers`.
    #[serde(default)]
    pub headers_file: Option<PathBuf>,
    /// A file holding the Electric API secret, re-read before every request; not
    /// together with `secret`.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// 401/403 answers retried (with backoff, re-reading the files) before the
    /// pipeline fails (default 5).
    #[serde(default)]
    pub auth_retries: Option<u32>,
    /// Bound on a live long-poll and on the wait for response headers, in seconds
    /// (default 45; keep it above the server's 20 s hold).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Longest wait for a connection, in seconds (default 10).
    #[serde(default)]
    pub connect_timeout_secs: Option<u64>,
    /// Longest silence while a non-live body downloads, in seconds (default 30).
    #[serde(default)]
    pub idle_timeout_secs: Option<u64>,
    /// Follow live changes over Server-Sent Events (default: long-polling).
    #[serde(default)]
    pub live_sse: Option<bool>,
    /// Largest response body (or SSE event) read, in bytes (default 64 MiB); a larger
    /// or endless one is retried as a server fault.
    #[serde(default)]
    pub max_response_bytes: Option<u64>,
}

impl std::fmt::Debug for ElectricSourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let url = match self.url.parse::<Url>() {
            Ok(url) => redact_url(&url),
            Err(_) => format!("{REDACTED} (not a URL)"),
        };
        f.debug_struct("ElectricSourceConfig")
            .field("url", &url)
            .field("table", &self.table)
            .field("where_clause", &self.where_clause)
            .field("params", &self.params)
            .field("columns", &self.columns)
            .field("replica", &self.replica)
            .field("log", &self.log)
            .field("secret", &self.secret.as_ref().map(|_| REDACTED))
            .field("headers", &redacted_headers(self.headers.keys().map(String::as_str)))
            .field("headers_file", &self.headers_file)
            .field("secret_file", &self.secret_file)
            .field("auth_retries", &self.auth_retries)
            .field("timeout_secs", &self.timeout_secs)
            .field("connect_timeout_secs", &self.connect_timeout_secs)
            .field("idle_timeout_secs", &self.idle_timeout_secs)
            .field("live_sse", &self.live_sse)
            .field("max_response_bytes", &self.max_response_bytes)
            .finish()
    }
}

impl ElectricSourceConfig {
    /// The stream options these settings describe; errors name the key at fault.
    pub fn to_options(&self) -> Result<ShapeOptions, ConfigError> {
        let url: Url = self.url.parse().map_err(|_| {
            ConfigError::new("url", "expected an http:// or https:// URL (it does not parse)")
        })?;
        if !matches!(url.scheme(), "http" | "https") || !url.has_host() {
            return Err(ConfigError::new("url", "expected an http:// or https:// URL with a host"));
        }
        if url.scheme() == "https" && !cfg!(any(feature = "rustls", feature = "native-tls")) {
            return Err(ConfigError::new(
                "url",
                "https needs TLS, which this build of shapesync-electric lacks (enable its `rustls` feature)",
            ));
        }
        if self.table.trim().is_empty() {
            return Err(ConfigError::new("table", "must not be empty"));
        }
        let mut options = ShapeOptions::new(url, self.table.clone());
        options.where_clause = self.where_clause.clone();
        for (n, value) in &self.params {
            let number = n.parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(|| {
                ConfigError::new(format!("params.{n}"), "parameter keys are placeholder numbers: 1, 2, …")
            })?;
            options.params.insert(number, value.0.clone());
        }
        if let Some(columns) = &self.columns {
            if columns.is_empty() {
                return Err(ConfigError::new("columns", "list at least the primary-key columns, or omit it"));
            }
            if let Some(i) = columns.iter().position(|c| c.is_empty()) {
                return Err(ConfigError::new(format!("columns.{i}"), "must not be empty"));
            }
        }
        options.columns = self.columns.clone();
        options.replica = self.replica;
        options.log = self.log;
        options.secret = self.secret.clone();
        for (name, value) in &self.headers {
            options = options.header(name, value).map_err(|_| {
                ConfigError::new(format!("headers.{name}"), "not a valid HTTP header name and value")
            })?;
        }
        if self.secret.is_some() && self.secret_file.is_some() {
            return Err(ConfigError::new("secret_file", "set `secret` or `secret_file`, not both"));
        }
        options.headers_file = self.headers_file.clone();
        options.secret_file = self.secret_file.clone();
        if let Some(n) = self.auth_retries {
            options.auth_retries = n;
        }
        let seconds = |key: &str, value: Option<u64>, default: Duration| match value {
            Some(0) => {
                Err(ConfigError::new(key, format!("must be at least 1 (default {})", default.as_secs())))
            }
            Some(secs) => Ok(Duration::from_secs(secs)),
            None => Ok(default),
        };
        options.request_timeout = seconds("timeout_secs", self.timeout_secs, options.request_timeout)?;
        options.connect_timeout =
            seconds("connect_timeout_secs", self.connect_timeout_secs, options.connect_timeout)?;
        options.idle_timeout = seconds("idle_timeout_secs", self.idle_timeout_secs, options.idle_timeout)?;
        options.live_sse = self.live_sse.unwrap_or(false);
        if let Some(bytes) = self.max_response_bytes {
            if bytes == 0 {
                return Err(ConfigError::new(
                    "max_response_bytes",
                    "must be at least 1 (default 67108864, 64 MiB)",
                ));
            }
            options.max_response_bytes = bytes;
        }
        options.validate().map_err(|e| ConfigError::new("", e.to_string()))?;
        Ok(options)
    }
}

/// A `params` value: a string, or a number or boolean written without quotes.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamValue(pub String);

impl<'de> Deserialize<'de> for ParamValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ParamValue;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ParamValue, E> {
                Ok(ParamValue(v.to_owned()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ParamValue, E> {
                Ok(ParamValue(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ParamValue, E> {
                Ok(ParamValue(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<ParamValue, E> {
                Ok(ParamValue(v.to_string()))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<ParamValue, E> {
                Ok(ParamValue(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

#[async_trait]
impl SourceConfig for ElectricSourceConfig {
    fn check(&self) -> Result<(), ConfigError> {
        if self.log == LogMode::ChangesOnly {
            return Err(ConfigError::new(
                "log",
                "pipelines do not support `changes_only` yet (after a must-refetch there is no snapshot to rebuild the cache from); use `full`, or the `ShapeStream` library API of shapesync-electric, which supports it",
            ));
        }
        self.to_options().map(|_| ())
    }

    fn shape(&self) -> ShapeInfo {
        ShapeInfo {
            table: self.table.clone(),
            columns: self.columns.clone(),
            full_rows: self.replica == Replica::Full,
        }
    }

    async fn build(self, ctx: SourceContext) -> Result<Box<dyn Source>, SourceError> {
        self.check().map_err(|e| SourceError::setup(e.to_string()).with_source(e))?;
        let mut options = self.to_options().map_err(|e| SourceError::setup(e.to_string()).with_source(e))?;
        options.metrics_pipeline = Some(ctx.pipeline);
        Ok(Box::new(ShapeStream::new(options)?))
    }
}

#[cfg(test)]
mod tests {
    use shapesync_core::Registry;
    use shapesync_core::config::extract_node;

    use super::*;

    fn from_yaml(yaml: &str) -> Result<ElectricSourceConfig, ConfigError> {
        use figment::providers::Format;
        let node: figment::value::Value =
            figment::Figment::from(figment::providers::Yaml::string(yaml)).extract().unwrap();
        let config: ElectricSourceConfig = extract_node(&node, "")?;
        config.check()?;
        Ok(config)
    }

    #[test]
    fn reads_every_key() {
        let c = from_yaml(
            r#"
url: http://localhost:3000/v1/shape
table: public.items
where: "status = $1"
params: {1: open, 2: 5, 3: true}
columns: [id, Status-Check]
replica: full
log: full
secret: s3cret
headers: {Authorization: Bearer x}
headers_file: /run/secrets/electric-headers
auth_retries: 9
timeout_secs: 30
connect_timeout_secs: 3
idle_timeout_secs: 120
live_sse: true
max_response_bytes: 1048576
"#,
        )
        .unwrap();
        let o = c.to_options().unwrap();
        assert_eq!(o.params[&1], "open");
        assert_eq!(o.params[&2], "5", "numbers are read as their text");
        assert_eq!(o.params[&3], "true");
        assert_eq!(o.replica, Replica::Full);
        assert_eq!(o.log, LogMode::Full);
        assert_eq!(o.request_timeout, Duration::from_secs(30));
        assert_eq!(o.connect_timeout, Duration::from_secs(3));
        assert_eq!(o.idle_timeout, Duration::from_secs(120));
        assert_eq!(o.headers_file.as_deref(), Some(std::path::Path::new("/run/secrets/electric-headers")));
        assert_eq!(o.secret_file, None);
        assert_eq!(o.auth_retries, 9);
        assert!(o.live_sse);
        assert_eq!(o.max_response_bytes, 1_048_576);
        assert_eq!(o.headers["authorization"], "Bearer x");
        assert_eq!(o.columns_param().unwrap(), "id,\"Status-Check\"");
        assert_eq!(
            c.shape(),
            ShapeInfo {
                table: "public.items".into(),
                columns: Some(vec!["id".into(), "Status-Check".into()]),
                full_rows: true
            }
        );
    }

    #[test]
    fn bad_urls_are_reported_without_echoing_them() {
        for url in ["not a url s3cret", "ftp://u:s3cret@h/x", "redis://u:s3cret@h"] {
            let e = from_yaml(&format!("url: \"{url}\"\ntable: t\n")).unwrap_err();
            assert_eq!(e.key, "url", "{e}");
            assert!(!e.to_string().contains("s3cret"), "{e}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_name_their_key() {
        let e = from_yaml("url: http://h/v1/shape\ntable: t\ntabel: x\n").unwrap_err();
        assert_eq!(e.key, "tabel", "{e}");
        let e = from_yaml("url: http://h/v1/shape\ntable: t\nreplica: half\n").unwrap_err();
        assert_eq!(e.key, "replica", "{e}");
        let e = from_yaml("url: http://h/v1/shape\ntable: t\nparams: {x: 1}\n").unwrap_err();
        assert_eq!(e.key, "params.x", "{e}");
        let e = from_yaml("url: http://h/v1/shape\ntable: t\nparams: {1: [a]}\n").unwrap_err();
        assert_eq!(e.key, "params.1", "{e}");
        assert!(e.message.contains("string, number or boolean"), "{e}");
        let e = from_yaml("url: http://h/v1/shape\ntable: t\ncolumns: []\n").unwrap_err();
        assert_eq!(e.key, "columns", "{e}");
        let e = from_yaml("url: http://h/v1/shape\ntable: t\ntimeout_secs: 0\n").unwrap_err();
        assert_eq!(e.key, "timeout_secs", "{e}");
        let e = from_yaml("url: http://h/v1/shape\ntable: t\nidle_timeout_secs: 0\n").unwrap_err();
        assert_eq!(e.key, "idle_timeout_secs", "{e}");
        let e = from_yaml("url: http://h/v1/shape\ntable: t\nconnect_timeout_secs: 0\n").unwrap_err();
        assert_eq!(e.key, "connect_timeout_secs", "{e}");
        let e = from_yaml("url: http://h/v1/shape\ntable: t\nsecret: a\nsecret_file: /s\n").unwrap_err();
        assert_eq!(e.key, "secret_file", "{e}");
        let e = from_yaml("url: http://h/v1/shape\ntable: t\nauth_retries: -1\n").unwrap_err();
        assert_eq!(e.key, "auth_retries", "{e}");
        let e = from_yaml("url: http://h/v1/shape\ntable: t\nmax_response_bytes: 0\n").unwrap_err();
        assert_eq!(e.key, "max_response_bytes", "{e}");
        let e = from_yaml("url: http://h/v1/shape\ntable: t\nmax_response_bytes: 64MiB\n").unwrap_err();
        assert_eq!(e.key, "max_response_bytes", "{e}");
        let e = from_yaml("url: http://h/v1/shape\ntable: t\nheaders: {\"bad name\": v}\n").unwrap_err();
        assert_eq!(e.key, "headers.bad name", "{e}");
        let e = from_yaml("table: t\n").unwrap_err();
        assert_eq!(e.key, "url", "{e}");
    }

    #[test]
    fn changes_only_is_rejected_for_pipelines() {
        let e = from_yaml("url: http://h/v1/shape\ntable: t\nlog: changes_only\n").unwrap_err();
        assert_eq!(e.key, "log", "{e}");
        assert!(e.message.contains("pipelines do not support"), "{e}");
        assert!(e.message.contains("ShapeStream"), "{e}");
        let config = ElectricSourceConfig { log: LogMode::ChangesOnly, ..from_yaml(MINIMAL).unwrap() };
        assert!(config.to_options().is_ok(), "the library options still carry it");
    }

    #[test]
    fn debug_output_redacts_the_secret_headers_and_url_credentials() {
        let c = from_yaml(
            "url: \"http://bob:pa55@h/v1/shape?api_secret=q-s3cret&tenant=acme\"\ntable: t\nsecret: s3cret\nheaders: {Authorization: Bearer t0ken}\n",
        )
        .unwrap();
        let shown = format!("{c:?}");
        for leak in ["t0ken", "pa55", "s3cret"] {
            assert!(!shown.contains(leak), "{leak} leaked: {shown}");
        }
        for kept in ["Authorization", REDACTED, "tenant=acme"] {
            assert!(shown.contains(kept), "{kept} missing: {shown}");
        }
        let unparsable = ElectricSourceConfig { url: "http://bob:pa55@[bad".into(), ..c };
        assert!(!format!("{unparsable:?}").contains("pa55"));
    }

    const MINIMAL: &str = "url: http://h/v1/shape\ntable: t\n";

    #[test]
    fn max_response_bytes_defaults_to_64_mib() {
        let o = from_yaml(MINIMAL).unwrap().to_options().unwrap();
        assert_eq!(o.max_response_bytes, crate::defaults::MAX_RESPONSE_BYTES);
        assert_eq!(o.max_response_bytes, 64 * 1024 * 1024);
    }

    #[test]
    fn timeouts_and_credential_settings_default_in_one_place() {
        let o = from_yaml(MINIMAL).unwrap().to_options().unwrap();
        assert_eq!(o.request_timeout, crate::defaults::REQUEST_TIMEOUT);
        assert_eq!(o.connect_timeout, crate::defaults::CONNECT_TIMEOUT);
        assert_eq!(o.idle_timeout, crate::defaults::IDLE_TIMEOUT);
        assert_eq!(o.auth_retries, crate::defaults::AUTH_RETRIES);
        assert_eq!((o.headers_file, o.secret_file), (None, None));
        let o = from_yaml("url: http://h/v1/shape\ntable: t\nsecret_file: /run/s\n")
            .unwrap()
            .to_options()
            .unwrap();
        assert_eq!(o.secret_file.as_deref(), Some(std::path::Path::new("/run/s")));
    }

    #[test]
    fn registers_in_a_registry() {
        let mut r = Registry::new();
        r.source::<ElectricSourceConfig>("electric");
    }
}
