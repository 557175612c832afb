//! What a [`crate::ShapeStream`] streams and how it behaves: the shape definition,
//! where to start, and the retry/timeout policy.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use shapesync_core::Offset;
use url::Url;

use crate::ShapeError;
use crate::request::{REDACTED, redact_url};

mod keys;

pub use keys::ParamValue;

/// Defaults, in one place.
pub mod defaults {
    use std::time::Duration;

    /// Request timeout: above the server's 20 s long-poll hold (as the TS client's 45 s).
    pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(45);
    /// Longest wait for a TCP (and TLS) connection to the server.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
    /// Longest silence while a non-live body downloads: a 10 MiB chunk over a slow
    /// link may take minutes, but bytes keep coming.
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
    /// 401/403 answers retried (with backoff, re-reading credential files) before the
    /// stream fails.
    pub const AUTH_RETRIES: u32 = 5;
    /// First backoff ceiling (TS: 1 s).
    pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
    /// Largest backoff ceiling (TS: 32 s).
    pub const BACKOFF_CAP: Duration = Duration::from_secs(32);
    /// Longest `retry-after` honoured (TS: 1 h).
    pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(3600);
    /// Consecutive malformed bodies retried before giving up with a protocol error.
    pub const MALFORMED_BODY_RETRIES: u32 = 3;
    /// Largest response body (or SSE event) read: 64 MiB, several times Electric's
    /// 10 MiB chunk threshold (a chunk closes after the fragment that passes it).
    pub const MAX_RESPONSE_BYTES: u64 = 64 * 1024 * 1024;
}

/// `replica`: what updates and deletes carry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Replica {
    /// Updates carry the key and changed columns; deletes the key.
    #[default]
    Default,
    /// Updates carry the full row plus `old_value`; deletes the full old row.
    Full,
}

impl Replica {
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            Replica::Default => "default",
            Replica::Full => "full",
        }
    }
}

/// `log`: whether the shape starts with a snapshot of existing rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogMode {
    /// Snapshot, then changes.
    #[default]
    Full,
    /// Changes only, no snapshot rows.
    ChangesOnly,
}

impl LogMode {
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            LogMode::Full => "full",
            LogMode::ChangesOnly => "changes_only",
        }
    }
}

/// Where a fresh stream (one without a resume point) starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StartFrom {
    /// `offset=-1`: the whole shape, snapshot first.
    #[default]
    Beginning,
    /// `offset=now`: skip existing data, stream only changes from now on.
    Now,
}

/// Full-jitter exponential backoff for transient faults (5xx, 429, network).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackoffConfig {
    /// Ceiling of the first wait; doubles on each consecutive failure.
    pub base: Duration,
    /// Largest ceiling.
    pub cap: Duration,
    /// Longest `retry-after` honoured; longer ones are cut to this.
    pub retry_after_cap: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            base: defaults::BACKOFF_BASE,
            cap: defaults::BACKOFF_CAP,
            retry_after_cap: defaults::RETRY_AFTER_CAP,
        }
    }
}

/// Everything a [`crate::ShapeStream`] needs, and the `source:` mapping of a
/// `type: electric` pipeline (see [`crate::ElectricSourceConfig`]): the one model of
/// the options.
///
/// In code, build it with [`ShapeOptions::new`] and set the public fields you need.
/// From a pipeline file it deserializes directly: the YAML keys are the field names,
/// but for `where` ([`ShapeOptions::where_clause`]) and the timeouts, which are whole
/// seconds (`timeout_secs`, `connect_timeout_secs`, `idle_timeout_secs`); fields
/// without a key stay at their [`defaults`]. Each key is checked as it is read, and
/// its error names it (`params.x`, `columns.1`, `headers.Bad Name`). Its `Debug`
/// output hides the secret, header values and URL credentials.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapeOptions {
    /// The full shape endpoint, e.g. `http://localhost:3000/v1/shape`. Query
    /// parameters already on it are kept.
    #[serde(deserialize_with = "keys::http_url")]
    pub url: Url,
    /// `table` or `schema.table` (quote names with capitals: `"MyTable"`).
    #[serde(deserialize_with = "keys::table")]
    pub table: String,
    /// SQL `where` filter, with `$1`, `$2`, … placeholders. YAML: `where`.
    #[serde(default, rename = "where")]
    pub where_clause: Option<String>,
    /// Placeholder values by number, sent as `params[1]=…`. In YAML a mapping from
    /// the number (`1: open`); numbers and booleans are sent as text.
    #[serde(default, deserialize_with = "keys::params")]
    pub params: BTreeMap<u32, String>,
    /// Selected columns (must include the primary key); quoted on the wire when needed.
    #[serde(default, deserialize_with = "keys::columns")]
    pub columns: Option<Vec<String>>,
    /// `replica` mode.
    #[serde(default)]
    pub replica: Replica,
    /// `log` mode. A pipeline whose sink mirrors the shape needs `full`; one that keeps an
    /// existing cache honest (Redis `mode: invalidate` / `refresh`) may use `changes_only`.
    #[serde(default)]
    pub log: LogMode,
    /// API secret (`secret` parameter). Never logged.
    #[serde(default)]
    pub secret: Option<String>,
    /// Extra request headers (e.g. `Authorization`). Never logged.
    #[serde(default, deserialize_with = "keys::headers")]
    pub headers: HeaderMap,
    /// A file of `Name: value` lines (blank lines and `#` comments skipped), re-read
    /// before every request so a mounted secret or a sidecar can rotate a token. Its
    /// headers replace same-named ones of [`ShapeOptions::headers`]. Never logged.
    #[serde(default)]
    pub headers_file: Option<PathBuf>,
    /// A file holding the API secret (surrounding whitespace trimmed), re-read before
    /// every request; it replaces [`ShapeOptions::secret`]. Never logged.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// 401/403 answers (and unreadable credential files) retried in a row, with
    /// backoff and re-reading the credential files, before the stream fails with
    /// [`ShapeError::Rejected`] (or [`ShapeError::InvalidOptions`] for a file).
    #[serde(default = "keys::default_auth_retries", deserialize_with = "keys::auth_retries")]
    pub auth_retries: u32,
    /// Where to start when not resuming (a pipeline resumes from its sink's checkpoint,
    /// so this applies to its first sync). YAML: `offset`, `-1` (default) or `now`.
    #[serde(default, rename = "offset", deserialize_with = "keys::start")]
    pub start: StartFrom,
    /// Bounds a live long-poll (headers and body; keep it above the server's 20 s
    /// hold) and the wait for a non-live response's headers. For SSE it bounds the wait
    /// for headers and the silence between messages. Non-live bodies are bounded by
    /// [`ShapeOptions::idle_timeout`] instead, so a large chunk on a slow link completes.
    /// YAML: `timeout_secs`.
    #[serde(
        rename = "timeout_secs",
        default = "keys::default_request_timeout",
        deserialize_with = "keys::request_timeout_secs"
    )]
    pub request_timeout: Duration,
    /// Longest wait for a connection. Applies to the client [`crate::ShapeStream::new`]
    /// builds; with your own client, set `connect_timeout` on it. YAML:
    /// `connect_timeout_secs`.
    #[serde(
        rename = "connect_timeout_secs",
        default = "keys::default_connect_timeout",
        deserialize_with = "keys::connect_timeout_secs"
    )]
    pub connect_timeout: Duration,
    /// Longest silence (no body bytes) while a non-live response body downloads; the
    /// download as a whole has no time limit. YAML: `idle_timeout_secs`.
    #[serde(
        rename = "idle_timeout_secs",
        default = "keys::default_idle_timeout",
        deserialize_with = "keys::idle_timeout_secs"
    )]
    pub idle_timeout: Duration,
    /// Follow live changes over Server-Sent Events instead of long-polling. A
    /// connection that ends having delivered nothing is followed by one long-poll;
    /// after 3 in a row that close within a second the stream long-polls for 5 minutes
    /// or 20 good long-polls, then tries SSE again.
    #[serde(default, deserialize_with = "keys::null_as_false")]
    pub live_sse: bool,
    /// Retry policy for transient faults. Not a YAML key.
    #[serde(skip)]
    pub backoff: BackoffConfig,
    /// Consecutive malformed (non-JSON) bodies retried before a protocol error. Not a
    /// YAML key.
    #[serde(skip, default = "keys::default_malformed_body_retries")]
    pub malformed_body_retries: u32,
    /// Largest response body read, in bytes; for SSE, the largest single event. A
    /// body that declares more (`content-length`) is refused before it is read, one
    /// that sends more (or never ends) is cut off at this size, and either is a
    /// transient server fault: retried with backoff at the same offset. Raise it if
    /// the shape holds rows this large.
    #[serde(default = "keys::default_max_response_bytes", deserialize_with = "keys::max_response_bytes")]
    pub max_response_bytes: u64,
    /// Pipeline id to label metrics with; `None` records no metrics. Not a YAML key
    /// (the pipeline's id is used).
    #[serde(skip)]
    pub metrics_pipeline: Option<String>,
}

impl std::fmt::Debug for ShapeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShapeOptions")
            .field("url", &redact_url(&self.url))
            .field("table", &self.table)
            .field("where_clause", &self.where_clause)
            .field("params", &self.params)
            .field("columns", &self.columns)
            .field("replica", &self.replica)
            .field("log", &self.log)
            .field("secret", &self.secret.as_ref().map(|_| REDACTED))
            .field("headers", &redacted_headers(self.headers.keys().map(HeaderName::as_str)))
            .field("headers_file", &self.headers_file)
            .field("secret_file", &self.secret_file)
            .field("auth_retries", &self.auth_retries)
            .field("start", &self.start)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("live_sse", &self.live_sse)
            .field("backoff", &self.backoff)
            .field("malformed_body_retries", &self.malformed_body_retries)
            .field("max_response_bytes", &self.max_response_bytes)
            .field("metrics_pipeline", &self.metrics_pipeline)
            .finish()
    }
}

/// Header names with every value shown as [`REDACTED`], for `Debug` output.
pub(crate) fn redacted_headers<'a>(names: impl Iterator<Item = &'a str>) -> BTreeMap<&'a str, &'static str> {
    names.map(|name| (name, REDACTED)).collect()
}

impl ShapeOptions {
    /// Options for `table` at `url`, everything else default.
    pub fn new(url: Url, table: impl Into<String>) -> Self {
        ShapeOptions {
            url,
            table: table.into(),
            where_clause: None,
            params: BTreeMap::new(),
            columns: None,
            replica: Replica::Default,
            log: LogMode::Full,
            secret: None,
            headers: HeaderMap::new(),
            headers_file: None,
            secret_file: None,
            auth_retries: defaults::AUTH_RETRIES,
            start: StartFrom::Beginning,
            request_timeout: defaults::REQUEST_TIMEOUT,
            connect_timeout: defaults::CONNECT_TIMEOUT,
            idle_timeout: defaults::IDLE_TIMEOUT,
            live_sse: false,
            backoff: BackoffConfig::default(),
            malformed_body_retries: defaults::MALFORMED_BODY_RETRIES,
            max_response_bytes: defaults::MAX_RESPONSE_BYTES,
            metrics_pipeline: None,
        }
    }

    /// Adds a request header; fails (without echoing the value) when the name or
    /// value is not valid HTTP.
    pub fn header(mut self, name: &str, value: &str) -> Result<Self, ShapeError> {
        let (n, v) = parse_header(name, value)?;
        self.headers.insert(n, v);
        Ok(self)
    }

    /// The checks of a pipeline's `source:` mapping that involve more than one key
    /// (each key's own are made as it is read), then [`ShapeOptions::validate`]; the
    /// error names the key at fault.
    pub(crate) fn check_keys(&self) -> Result<(), shapesync_core::ConfigError> {
        use shapesync_core::ConfigError;
        if self.secret.is_some() && self.secret_file.is_some() {
            return Err(ConfigError::new("secret_file", "set `secret` or `secret_file`, not both"));
        }
        self.validate().map_err(|e| ConfigError::new("", e.to_string()))
    }

    /// Checks the options without I/O.
    pub fn validate(&self) -> Result<(), ShapeError> {
        if !matches!(self.url.scheme(), "http" | "https") {
            return Err(ShapeError::InvalidOptions("url must be an http:// or https:// URL".into()));
        }
        if self.url.scheme() == "https" && !cfg!(any(feature = "rustls", feature = "native-tls")) {
            return Err(ShapeError::InvalidOptions(
                "url is https but shapesync-electric was built without TLS; enable its `rustls` feature"
                    .into(),
            ));
        }
        if self.table.trim().is_empty() {
            return Err(ShapeError::InvalidOptions("table must not be empty".into()));
        }
        if self.params.contains_key(&0) {
            return Err(ShapeError::InvalidOptions("params are numbered from 1 ($1, $2, …)".into()));
        }
        if let Some(cols) = &self.columns
            && (cols.is_empty() || cols.iter().any(|c| c.is_empty()))
        {
            return Err(ShapeError::InvalidOptions("columns must be a non-empty list of names".into()));
        }
        if self.request_timeout.is_zero() {
            return Err(ShapeError::InvalidOptions("request_timeout must be positive".into()));
        }
        if self.connect_timeout.is_zero() || self.idle_timeout.is_zero() {
            return Err(ShapeError::InvalidOptions(
                "connect_timeout and idle_timeout must be positive".into(),
            ));
        }
        if self.secret.is_some() && self.secret_file.is_some() {
            return Err(ShapeError::InvalidOptions("set secret or secret_file, not both".into()));
        }
        if self.backoff.base.is_zero() || self.backoff.cap < self.backoff.base {
            return Err(ShapeError::InvalidOptions("backoff needs 0 < base <= cap".into()));
        }
        if self.max_response_bytes == 0 {
            return Err(ShapeError::InvalidOptions("max_response_bytes must be positive".into()));
        }
        Ok(())
    }

    /// The `columns` parameter: identifiers joined by commas, quoted when they are
    /// not plain lower-case names (already-quoted names are kept).
    pub fn columns_param(&self) -> Option<String> {
        self.columns
            .as_ref()
            .map(|cols| cols.iter().map(|c| quote_identifier(c)).collect::<Vec<_>>().join(","))
    }

    /// Stable hash of the shape's identity (table, where, params, columns, replica,
    /// log): a stored resume point only holds for the same hash. Where a fresh stream
    /// starts (`start`) is not identity: it only matters without a resume point.
    pub fn definition_hash(&self) -> String {
        let params: Vec<String> = self.params.iter().map(|(n, v)| format!("{n}={v}")).collect();
        let params = serde_json::to_string(&params).expect("strings serialize");
        let columns = self.columns_param().unwrap_or_default();
        shapesync_core::definition_hash(&[
            ("table", &self.table),
            ("where", self.where_clause.as_deref().unwrap_or("")),
            ("params", &params),
            ("columns", &columns),
            ("replica", self.replica.as_str()),
            ("log", self.log.as_str()),
        ])
    }

    /// The stream sends no snapshot of existing rows: `log: changes_only`, or a fresh
    /// start at `offset: now` (after a must-refetch a `changes_only` stream again skips
    /// the snapshot; a `full` one starting at `now` gets it).
    pub fn changes_only(&self) -> bool {
        self.log == LogMode::ChangesOnly || self.start == StartFrom::Now
    }

    /// Where a fresh stream starts, as a request offset.
    pub(crate) fn start_offset(&self) -> Option<Offset> {
        match self.start {
            StartFrom::Beginning => Some(Offset::Start),
            StartFrom::Now => None,
        }
    }
}

/// A request header from text; the error names the header but never echoes its value.
fn parse_header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), ShapeError> {
    let n = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| ShapeError::InvalidOptions(format!("header name {name:?} is not valid HTTP")))?;
    let v = HeaderValue::from_str(value)
        .map_err(|_| ShapeError::InvalidOptions(format!("the value of header {name:?} is not valid HTTP")))?;
    Ok((n, v))
}

/// Quotes `name` for the `columns` parameter unless it is a plain lower-case
/// identifier or already quoted.
pub fn quote_identifier(name: &str) -> String {
    let plain = name.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'$');
    let quoted = name.len() >= 2 && name.starts_with('"') && name.ends_with('"');
    if plain || quoted { name.to_owned() } else { format!("\"{}\"", name.replace('"', "\"\"")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> ShapeOptions {
        ShapeOptions::new("http://localhost:3000/v1/shape".parse().unwrap(), "items")
    }

    #[test]
    fn quotes_only_identifiers_that_need_it() {
        assert_eq!(quote_identifier("id"), "id");
        assert_eq!(quote_identifier("_a1$"), "_a1$");
        assert_eq!(quote_identifier("Status-Check"), "\"Status-Check\"");
        assert_eq!(quote_identifier("Name"), "\"Name\"");
        assert_eq!(quote_identifier("a,b"), "\"a,b\"");
        assert_eq!(quote_identifier("1st"), "\"1st\"");
        assert_eq!(quote_identifier("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(quote_identifier("\"Kept\""), "\"Kept\"");
        let mut o = opts();
        o.columns = Some(vec!["id".into(), "Status-Check".into()]);
        assert_eq!(o.columns_param().unwrap(), "id,\"Status-Check\"");
    }

    #[test]
    fn definition_hash_covers_every_identity_field() {
        let base = opts().definition_hash();
        let mut o = opts();
        o.where_clause = Some("x = $1".into());
        let with_where = o.definition_hash();
        assert_ne!(base, with_where);
        o.params.insert(1, "a".into());
        assert_ne!(with_where, o.definition_hash());
        let mut o = opts();
        o.columns = Some(vec!["id".into()]);
        assert_ne!(base, o.definition_hash());
        let mut o = opts();
        o.replica = Replica::Full;
        assert_ne!(base, o.definition_hash());
        let mut o = opts();
        o.log = LogMode::ChangesOnly;
        assert_ne!(base, o.definition_hash());
        let mut o = opts();
        o.secret = Some("s".into());
        o.request_timeout = Duration::from_secs(1);
        assert_eq!(base, o.definition_hash(), "secret and timeouts are not identity");
    }

    #[test]
    fn validation_rejects_bad_options_without_echoing_values() {
        assert!(opts().validate().is_ok());
        let mut o = opts();
        o.url = "ftp://user:pw@host/x".parse().unwrap();
        let e = o.validate().unwrap_err().to_string();
        assert!(!e.contains("pw"), "{e}");
        let mut o = opts();
        o.table = " ".into();
        assert!(o.validate().is_err());
        let mut o = opts();
        o.params.insert(0, "x".into());
        assert!(o.validate().is_err());
        let e = opts().header("x-token", "bad\nvalue-s3cret").unwrap_err().to_string();
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[cfg(feature = "rustls")]
    #[test]
    fn https_urls_work_with_the_rustls_feature() {
        let mut o = opts();
        o.url = "https://electric.example/v1/shape".parse().unwrap();
        assert!(crate::ShapeStream::new(o).is_ok());
        // The stream installed a crypto provider, so other reqwest clients build too.
        assert!(reqwest::Client::builder().build().is_ok());
    }

    #[test]
    fn debug_output_redacts_the_secret_headers_and_url_credentials() {
        let mut o = opts().header("authorization", "Bearer t0ken").unwrap();
        o.url = "http://bob:pa55@h/v1/shape?secret=q-s3cret&tenant=acme".parse().unwrap();
        o.secret = Some("s3cret".into());
        let shown = format!("{o:?}");
        for leak in ["t0ken", "pa55", "s3cret"] {
            assert!(!shown.contains(leak), "{leak} leaked: {shown}");
        }
        for kept in ["authorization", REDACTED, "tenant=acme", "items"] {
            assert!(shown.contains(kept), "{kept} missing: {shown}");
        }
    }
}
