//! `type: electric` in pipeline files: the [`ShapeOptions`] a `source:` mapping
//! deserializes to, and the pipeline rules on top of them.

use async_trait::async_trait;
use serde::Deserialize;
use shapesync_core::registry::SourceConfig;
use shapesync_core::{ConfigError, ShapeInfo, Source, SourceContext, SourceError};

use crate::{Replica, ShapeOptions, ShapeStream};

/// The `source:` mapping of an Electric pipeline: the stream's [`ShapeOptions`], read
/// from the mapping's keys (see [`ShapeOptions`] for how each key is read and its
/// default; docs/CONFIG.md lists them). Its `Debug` output hides the secret, header
/// values and URL credentials.
///
/// A source that sends no snapshot (`log: changes_only`, `offset: now`) says so in its
/// [`ShapeInfo::changes_only`]; the pipeline refuses it unless the sink keeps an
/// existing cache rather than mirroring the shape
/// ([`shapesync_core::SinkConfig::accepts_changes_only`]).
#[derive(Clone, Debug, Deserialize)]
#[serde(transparent)]
pub struct ElectricSourceConfig {
    /// The stream options, as read.
    pub options: ShapeOptions,
}

impl From<ShapeOptions> for ElectricSourceConfig {
    fn from(options: ShapeOptions) -> Self {
        ElectricSourceConfig { options }
    }
}

impl ElectricSourceConfig {
    /// The stream options these settings describe, once the checks that involve
    /// more than one key pass; errors name the key at fault.
    pub fn to_options(&self) -> Result<ShapeOptions, ConfigError> {
        self.options.check_keys()?;
        Ok(self.options.clone())
    }
}

#[async_trait]
impl SourceConfig for ElectricSourceConfig {
    fn check(&self) -> Result<(), ConfigError> {
        self.options.check_keys()
    }

    fn shape(&self) -> ShapeInfo {
        ShapeInfo {
            table: self.options.table.clone(),
            columns: self.options.columns.clone(),
            full_rows: self.options.replica == Replica::Full,
            changes_only: self.options.changes_only(),
        }
    }

    async fn build(self, ctx: SourceContext) -> Result<Box<dyn Source>, SourceError> {
        self.check().map_err(|e| SourceError::setup(e.to_string()).with_source(e))?;
        let mut options = self.options;
        options.metrics_pipeline = Some(ctx.pipeline);
        Ok(Box::new(ShapeStream::new(options)?))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use shapesync_core::Registry;
    use shapesync_core::config::extract_node;

    use super::*;
    use crate::request::REDACTED;

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
        assert_eq!(o.log, crate::LogMode::Full);
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
                full_rows: true,
                changes_only: false,
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
        let e = from_yaml("url: http://h/v1/shape\ntable: t\ncolumns: [id, '']\n").unwrap_err();
        assert_eq!(e.key, "columns.1", "{e}");
        let e = from_yaml("url: http://h/v1/shape\ntable: ' '\n").unwrap_err();
        assert_eq!(e.key, "table", "{e}");
        let e = from_yaml("url: http://h/v1/shape\ntable: t\nstart: now\n").unwrap_err();
        assert_eq!(e.key, "start", "library-only options are no keys: {e}");
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
    fn changes_only_and_offset_now_say_the_source_sends_no_snapshot() {
        let shape = |yaml: &str| from_yaml(yaml).unwrap().shape();
        assert!(!shape(MINIMAL).changes_only);
        assert!(shape("url: http://h/v1/shape\ntable: t\nlog: changes_only\n").changes_only);
        let now = from_yaml("url: http://h/v1/shape\ntable: t\noffset: now\n").unwrap();
        assert_eq!(now.options.start, crate::StartFrom::Now);
        assert!(now.shape().changes_only);
        for beginning in ["-1", "'-1'"] {
            let c = from_yaml(&format!("url: http://h/v1/shape\ntable: t\noffset: {beginning}\n")).unwrap();
            assert_eq!(c.options.start, crate::StartFrom::Beginning, "{beginning}");
        }
        let e = from_yaml("url: http://h/v1/shape\ntable: t\noffset: 12_3\n").unwrap_err();
        assert_eq!(e.key, "offset", "{e}");
        assert!(e.message.contains("`now`"), "{e}");
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
        // Header names are shown as HTTP holds them, in lower case.
        for kept in ["authorization", REDACTED, "tenant=acme"] {
            assert!(shown.contains(kept), "{kept} missing: {shown}");
        }
        // A URL that does not parse is refused as it is read, without echoing it.
        let e = from_yaml("url: \"http://bob:pa55@[bad\"\ntable: t\n").unwrap_err();
        assert_eq!(e.key, "url", "{e}");
        assert!(!e.to_string().contains("pa55"), "{e}");
    }

    const MINIMAL: &str = "url: http://h/v1/shape\ntable: t\n";

    #[test]
    fn timeouts_take_units() {
        let o = from_yaml("url: http://h/v1/shape\ntable: t\ntimeout_secs: 2m\nidle_timeout_secs: 90s\n")
            .unwrap()
            .to_options()
            .unwrap();
        assert_eq!(o.request_timeout, Duration::from_secs(120));
        assert_eq!(o.idle_timeout, Duration::from_secs(90));
        let e = from_yaml("url: http://h/v1/shape\ntable: t\ntimeout_secs: 1500ms\n").unwrap_err();
        assert_eq!(e.key, "timeout_secs", "{e}");
        assert!(e.message.contains("whole seconds"), "{e}");
    }

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
    fn the_library_options_read_the_same_keys() {
        let o: ShapeOptions = serde_json::from_value(serde_json::json!({
            "url": "http://h/v1/shape",
            "table": "t",
            "where": "a = $1",
            "params": {"1": 5},
            "timeout_secs": 7,
            "headers": {"X-Tenant": "acme"},
        }))
        .unwrap();
        assert_eq!(o.where_clause.as_deref(), Some("a = $1"));
        assert_eq!(o.params[&1], "5");
        assert_eq!(o.request_timeout, Duration::from_secs(7));
        assert_eq!(o.headers["x-tenant"], "acme");
        let defaults = ShapeOptions::new(o.url.clone(), "t");
        assert_eq!(o.idle_timeout, defaults.idle_timeout);
        assert_eq!(o.malformed_body_retries, defaults.malformed_body_retries);
        assert_eq!(o.backoff, defaults.backoff);
        assert_eq!((o.start, o.metrics_pipeline), (defaults.start, None));
    }

    #[test]
    fn registers_in_a_registry() {
        let mut r = Registry::new();
        r.source::<ElectricSourceConfig>("electric");
    }
}
