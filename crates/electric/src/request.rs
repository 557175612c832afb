//! Building request URLs, and printing them without secrets.

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
}

/// The URL of one shape request: the base URL's own parameters, then the shape
/// definition, then the stream position.
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
    if let Some(s) = &options.secret {
        shape.push(("secret".into(), s.clone()));
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
    {
        let mut q = url.query_pairs_mut();
        q.clear();
        q.extend_pairs(kept);
        q.extend_pairs(shape);
        match state.offset {
            Some(o) => q.append_pair("offset", &o.to_string()),
            None => q.append_pair("offset", "now"),
        };
        if let Some(h) = state.handle {
            q.append_pair("handle", h);
        }
        if state.live {
            q.append_pair("live", "true");
            if state.live_sse {
                q.append_pair("live_sse", "true");
            }
            if let Some(c) = state.cursor {
                q.append_pair("cursor", c);
            }
        }
        if let Some(e) = state.expired_handle {
            q.append_pair("expired_handle", e);
        }
        if let Some(b) = state.cache_buster {
            q.append_pair("cache-buster", b);
        }
    }
    url
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
