//! Building request URLs, and printing them without secrets.

use std::path::Path;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use shapesync_core::Offset;
use url::Url;

use crate::{LogMode, Replica, ShapeOptions};

/// Protocol parameters the stream always owns: any copy on the base URL is dropped.
const PROTOCOL_PARAMS: &[&str] = &[
    "offset",
    "handle",
    "live",
    "live_sse",
    "experimental_live_sse",
    "cursor",
    "cache-buster",
    "expired_handle",
];

/// What `Debug` output shows instead of a secret value.
pub(crate) const REDACTED: &str = "<redacted>";

/// Parameters whose values are secret.
const SECRET_PARAMS: &[&str] = &["secret", "api_secret"];

/// The stream position a request is made from.
#[derive(Debug, Clone, Default)]
pub(crate) struct RequestState<'a> {
    /// `None` means `offset=now`.
    pub offset: Option<Offset>,
    pub handle: Option<&'a str>,
    pub live: bool,
    pub live_sse: bool,
    pub cursor: Option<&'a str>,
    pub cache_buster: Option<&'a str>,
    pub expired_handle: Option<&'a str>,
    /// Replaces [`ShapeOptions::secret`] (read from `secret_file`).
    pub secret: Option<&'a str>,
}

/// The URL of one shape request: the base URL's own parameters, the shape definition
/// and the stream position, sorted by name (stably: a repeated name keeps its order) so
/// that equal requests have equal URLs and CDNs can collapse them, as the TS client does
/// (`client.ts` `#constructUrl`/`#requestShape`: `fetchUrl.searchParams.sort()`).
pub(crate) fn shape_url(options: &ShapeOptions, state: &RequestState<'_>) -> Url {
    let columns = options.columns_param();
    let mut shape: Vec<(String, String)> = vec![("table".into(), options.table.clone())];
    if let Some(w) = &options.where_clause {
        shape.push(("where".into(), w.clone()));
    }
    for (n, v) in &options.params {
        shape.push((format!("params[{n}]"), v.clone()));
    }
    if let Some(c) = columns {
        shape.push(("columns".into(), c));
    }
    if options.replica != Replica::Default {
        shape.push(("replica".into(), options.replica.as_str().into()));
    }
    if options.log != LogMode::Full {
        shape.push(("log".into(), options.log.as_str().into()));
    }
    if let Some(s) = state.secret.or(options.secret.as_deref()) {
        shape.push(("secret".into(), s.to_owned()));
    }
    let sets_params = !options.params.is_empty();
    let mut url = options.url.clone();
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| {
            let ours = PROTOCOL_PARAMS.contains(&k.as_ref())
                || shape.iter().any(|(s, _)| s == k)
                || (sets_params && k.starts_with("params["));
            !ours
        })
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let mut pairs = kept;
    pairs.extend(shape);
    let offset = match state.offset {
        Some(o) => o.to_string(),
        None => "now".to_owned(),
    };
    pairs.push(("offset".into(), offset));
    if let Some(h) = state.handle {
        pairs.push(("handle".into(), h.into()));
    }
    if state.live {
        pairs.push(("live".into(), "true".into()));
        if state.live_sse {
            pairs.push(("live_sse".into(), "true".into()));
        }
        if let Some(c) = state.cursor {
            pairs.push(("cursor".into(), c.into()));
        }
    }
    if let Some(e) = state.expired_handle {
        pairs.push(("expired_handle".into(), e.into()));
    }
    if let Some(b) = state.cache_buster {
        pairs.push(("cache-buster".into(), b.into()));
    }
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    url.query_pairs_mut().clear().extend_pairs(pairs);
    url
}

/// Reads a `headers_file`: `Name: value` lines; blank lines and lines starting with `#`
/// are skipped. Errors name the file and line, never a value.
pub(crate) async fn read_headers_file(path: &Path) -> Result<HeaderMap, String> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| format!("cannot read headers_file {}: {e}", path.display()))?;
    let mut headers = HeaderMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || format!("headers_file {} line {}: expected `Name: value`", path.display(), i + 1);
        let (name, value) = line.split_once(':').ok_or_else(bad)?;
        let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| bad())?;
        let value = HeaderValue::from_str(value.trim()).map_err(|_| bad())?;
        headers.insert(name, value);
    }
    Ok(headers)
}

/// Reads a `secret_file`: its whole content, surrounding whitespace trimmed.
pub(crate) async fn read_secret_file(path: &Path) -> Result<String, String> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| format!("cannot read secret_file {}: {e}", path.display()))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(format!("secret_file {} is empty", path.display()));
    }
    Ok(secret.to_owned())
}

/// The URL with its password, user name and `secret` values replaced by `***`,
/// fit for logs and errors.
pub fn redact_url(url: &Url) -> String {
    let mut u = url.clone();
    if u.password().is_some() {
        let _ = u.set_password(Some("***"));
    }
    if !u.username().is_empty() {
        let _ = u.set_username("***");
    }
    if u.query_pairs().any(|(k, _)| SECRET_PARAMS.contains(&k.as_ref())) {
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let v = if SECRET_PARAMS.contains(&k.as_ref()) { "***".into() } else { v.into_owned() };
                (k.into_owned(), v)
            })
            .collect();
        u.query_pairs_mut().clear().extend_pairs(pairs);
    }
    u.to_string()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn query(url: &Url) -> HashMap<String, String> {
        url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
    }

    #[test]
    fn carries_every_shape_parameter() {
        let mut o =
            ShapeOptions::new("http://h:3000/v1/shape?tenant=a&offset=9_9".parse().unwrap(), "public.items");
        o.where_clause = Some("status = $1 and n > $2".into());
        o.params.insert(1, "open & shut".into());
        o.params.insert(2, "5".into());
        o.columns = Some(vec!["id".into(), "Status-Check".into()]);
        o.replica = Replica::Full;
        o.log = LogMode::ChangesOnly;
        o.secret = Some("s3cret".into());
        let url = shape_url(
            &o,
            &RequestState {
                offset: Some(Offset::new(5, 2)),
                handle: Some("h-1"),
                live: true,
                live_sse: true,
                cursor: Some("123"),
                cache_buster: Some("cb"),
                expired_handle: None,
                secret: None,
            },
        );
        let q = query(&url);
        assert_eq!(q["tenant"], "a", "foreign parameters are kept");
        assert_eq!(q["table"], "public.items");
        assert_eq!(q["where"], "status = $1 and n > $2");
        assert_eq!(q["params[1]"], "open & shut");
        assert_eq!(q["params[2]"], "5");
        assert_eq!(q["columns"], "id,\"Status-Check\"");
        assert_eq!(q["replica"], "full");
        assert_eq!(q["log"], "changes_only");
        assert_eq!(q["secret"], "s3cret");
        assert_eq!(q["offset"], "5_2", "the base URL's offset is replaced");
        assert_eq!(q["handle"], "h-1");
        assert_eq!(q["live"], "true");
        assert_eq!(q["live_sse"], "true");
        assert_eq!(q["cursor"], "123");
        assert_eq!(q["cache-buster"], "cb");
        assert_eq!(url.query_pairs().filter(|(k, _)| k == "offset").count(), 1);
        let names: Vec<String> = url.query_pairs().map(|(k, _)| k.into_owned()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "parameters are in sorted order");
        assert_eq!(names.first().map(String::as_str), Some("cache-buster"));
    }

    #[test]
    fn equal_requests_have_equal_urls_whatever_the_base_url_order() {
        let state = RequestState { offset: Some(Offset::new(1, 0)), handle: Some("h"), ..Default::default() };
        let a = ShapeOptions::new("http://h/v1/shape?b=2&a=1".parse().unwrap(), "items");
        let b = ShapeOptions::new("http://h/v1/shape?a=1&b=2".parse().unwrap(), "items");
        assert_eq!(shape_url(&a, &state), shape_url(&b, &state));
        assert_eq!(shape_url(&a, &state).query(), Some("a=1&b=2&handle=h&offset=1_0&table=items"));
    }

    #[tokio::test]
    async fn credential_files_are_read_without_echoing_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("headers");
        std::fs::write(&path, "# rotated by a sidecar\n\nAuthorization: Bearer t0ken\nX-Tenant:acme\n")
            .unwrap();
        let h = read_headers_file(&path).await.unwrap();
        assert_eq!(h["authorization"], "Bearer t0ken");
        assert_eq!(h["x-tenant"], "acme");
        std::fs::write(&path, "Authorization: Bearer t0ken\nno colon s3cret\n").unwrap();
        let e = read_headers_file(&path).await.unwrap_err();
        assert!(e.contains("line 2") && !e.contains("s3cret") && !e.contains("t0ken"), "{e}");
        std::fs::write(&path, "X-Bad: v\u{7f}s3cret\n").unwrap();
        let e = read_headers_file(&path).await.unwrap_err();
        assert!(e.contains("line 1") && !e.contains("s3cret"), "{e}");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "  s3cret\n").unwrap();
        assert_eq!(read_secret_file(&secret).await.unwrap(), "s3cret");
        std::fs::write(&secret, "\n").unwrap();
        assert!(read_secret_file(&secret).await.unwrap_err().contains("empty"));
        assert!(read_secret_file(&dir.path().join("missing")).await.unwrap_err().contains("cannot read"));
    }

    #[test]
    fn initial_and_now_requests() {
        let o = ShapeOptions::new("http://h/v1/shape".parse().unwrap(), "items");
        let q = query(&shape_url(&o, &RequestState { offset: Some(Offset::Start), ..Default::default() }));
        assert_eq!(q["offset"], "-1");
        for absent in ["handle", "live", "cursor", "replica", "log", "secret", "cache-buster", "where"] {
            assert!(!q.contains_key(absent), "{absent}");
        }
        let q =
            query(&shape_url(&o, &RequestState { offset: None, cursor: Some("1"), ..Default::default() }));
        assert_eq!(q["offset"], "now");
        assert!(!q.contains_key("cursor"), "cursor only on live requests");
    }

    #[test]
    fn redaction_hides_passwords_users_and_secrets() {
        let url: Url = "http://bob:pa55@h/v1/shape?table=t&secret=s3cret&api_secret=old".parse().unwrap();
        let shown = redact_url(&url);
        for leak in ["pa55", "bob", "s3cret", "old"] {
            assert!(!shown.contains(leak), "{shown}");
        }
        assert!(shown.contains("table=t"), "{shown}");
    }
}
