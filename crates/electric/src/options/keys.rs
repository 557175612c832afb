//! Reading [`super::ShapeOptions`] from a pipeline's `source:` mapping: the keys that
//! need more than serde's own reading, each checked as it is read. Errors say what is
//! wrong but never echo a value (URLs and headers may hold credentials); the
//! configuration loader (figment) prefixes them with the key path, down to the entry
//! (`params.x`, `columns.1`, `headers.Bad Name`). Missing keys take [`defaults`].

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use url::Url;

use super::{defaults, parse_header};

/// `url`: an http(s) URL with a host, reachable by this build (https needs TLS).
pub(super) fn http_url<'de, D: Deserializer<'de>>(d: D) -> Result<Url, D::Error> {
    let text = String::deserialize(d)?;
    let url: Url = text
        .parse()
        .map_err(|_| de::Error::custom("expected an http:// or https:// URL (it does not parse)"))?;
    if !matches!(url.scheme(), "http" | "https") || !url.has_host() {
        return Err(de::Error::custom("expected an http:// or https:// URL with a host"));
    }
    if url.scheme() == "https" && !cfg!(any(feature = "rustls", feature = "native-tls")) {
        return Err(de::Error::custom(
            "https needs TLS, which this build of shapesync-electric lacks (enable its `rustls` feature)",
        ));
    }
    Ok(url)
}

/// `offset`: where a stream without a stored checkpoint starts: `-1` (the whole shape,
/// snapshot first) or `now` (only changes from now on). A YAML `-1` may be a number.
pub(super) fn start<'de, D: Deserializer<'de>>(d: D) -> Result<super::StartFrom, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Text {
        Number(i64),
        Text(String),
    }
    match Text::deserialize(d)? {
        Text::Number(-1) => Ok(super::StartFrom::Beginning),
        Text::Text(t) if t == "-1" => Ok(super::StartFrom::Beginning),
        Text::Text(t) if t == "now" => Ok(super::StartFrom::Now),
        _ => Err(de::Error::custom(
            "expected `-1` (the whole shape, snapshot first) or `now` (only changes from now on); a pipeline resumes from its sink's checkpoint, so other offsets are not set here",
        )),
    }
}

/// `table`: not blank.
pub(super) fn table<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let table = String::deserialize(d)?;
    if table.trim().is_empty() {
        return Err(de::Error::custom("must not be empty"));
    }
    Ok(table)
}

/// `params`: placeholder numbers (from 1) to [`ParamValue`]s.
pub(super) fn params<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<u32, String>, D::Error> {
    struct Params;
    impl<'de> Visitor<'de> for Params {
        type Value = BTreeMap<u32, String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a mapping from placeholder numbers to values")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut params = BTreeMap::new();
            while let Some(number) = map.next_key_seed(PlaceholderNumber)? {
                let ParamValue(value) = map.next_value()?;
                params.insert(number, value);
            }
            Ok(params)
        }
    }
    d.deserialize_map(Params)
}

/// A `params` key: `1`, `2`, …
struct PlaceholderNumber;

impl<'de> DeserializeSeed<'de> for PlaceholderNumber {
    type Value = u32;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<u32, D::Error> {
        let key = String::deserialize(d)?;
        key.parse::<u32>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| de::Error::custom("parameter keys are placeholder numbers: 1, 2, …"))
    }
}

/// A `params` value: a string, or a number or boolean written without quotes.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamValue(pub String);

impl<'de> Deserialize<'de> for ParamValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ParamValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ParamValue, E> {
                Ok(ParamValue(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ParamValue, E> {
                Ok(ParamValue(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ParamValue, E> {
                Ok(ParamValue(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<ParamValue, E> {
                Ok(ParamValue(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<ParamValue, E> {
                Ok(ParamValue(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// `columns`: absent, or a non-empty list of non-empty names.
pub(super) fn columns<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    struct Columns(Vec<String>);
    impl<'de> Deserialize<'de> for Columns {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_seq(ColumnList)
        }
    }
    struct ColumnList;
    impl<'de> Visitor<'de> for ColumnList {
        type Value = Columns;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a list of column names")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Columns, A::Error> {
            let mut names = Vec::new();
            while let Some(name) = seq.next_element_seed(ColumnName)? {
                names.push(name);
            }
            if names.is_empty() {
                return Err(de::Error::custom("list at least the primary-key columns, or omit it"));
            }
            Ok(Columns(names))
        }
    }
    Ok(Option::<Columns>::deserialize(d)?.map(|c| c.0))
}

/// One `columns` entry: not empty.
struct ColumnName;

impl<'de> DeserializeSeed<'de> for ColumnName {
    type Value = String;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        let name = String::deserialize(d)?;
        if name.is_empty() {
            return Err(de::Error::custom("must not be empty"));
        }
        Ok(name)
    }
}

/// `headers`: names to values, each pair valid HTTP. Same-named headers (HTTP names
/// ignore case) are applied in the order of their names, the last winning.
pub(super) fn headers<'de, D: Deserializer<'de>>(d: D) -> Result<HeaderMap, D::Error> {
    struct Headers;
    impl<'de> Visitor<'de> for Headers {
        type Value = HeaderMap;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a mapping from header names to values")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<HeaderMap, A::Error> {
            let mut by_name = BTreeMap::new();
            while let Some(name) = map.next_key::<String>()? {
                let header = map.next_value_seed(HeaderSeed { name: &name })?;
                by_name.insert(name, header);
            }
            let mut headers = HeaderMap::new();
            for (name, value) in by_name.into_values() {
                headers.insert(name, value);
            }
            Ok(headers)
        }
    }
    d.deserialize_map(Headers)
}

/// The value of the header `name`, checked together with the name.
struct HeaderSeed<'a> {
    name: &'a str,
}

impl<'de> DeserializeSeed<'de> for HeaderSeed<'_> {
    type Value = (HeaderName, HeaderValue);
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        let value = String::deserialize(d)?;
        parse_header(self.name, &value)
            .map_err(|_| de::Error::custom("not a valid HTTP header name and value"))
    }
}

/// A whole number of seconds (or a duration with a unit that comes to whole seconds,
/// `2m`: [`shapesync_core::config::duration`]), at least 1; absent (or null): `default`.
fn positive_secs<'de, D: Deserializer<'de>>(d: D, default: Duration) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    struct Secs(#[serde(deserialize_with = "shapesync_core::config::duration::secs")] u64);
    match Option::<Secs>::deserialize(d)? {
        Some(Secs(0)) => {
            Err(de::Error::custom(format!("must be at least 1 (default {})", default.as_secs())))
        }
        Some(Secs(secs)) => Ok(Duration::from_secs(secs)),
        None => Ok(default),
    }
}

/// `timeout_secs` → [`super::ShapeOptions::request_timeout`].
pub(super) fn request_timeout_secs<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    positive_secs(d, defaults::REQUEST_TIMEOUT)
}

/// `connect_timeout_secs` → [`super::ShapeOptions::connect_timeout`].
pub(super) fn connect_timeout_secs<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    positive_secs(d, defaults::CONNECT_TIMEOUT)
}

/// `idle_timeout_secs` → [`super::ShapeOptions::idle_timeout`].
pub(super) fn idle_timeout_secs<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    positive_secs(d, defaults::IDLE_TIMEOUT)
}

/// `auth_retries`; null: the default.
pub(super) fn auth_retries<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    Ok(Option::<u32>::deserialize(d)?.unwrap_or(defaults::AUTH_RETRIES))
}

/// `live_sse`; null: off.
pub(super) fn null_as_false<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

/// `max_response_bytes`: at least 1; null: the default.
pub(super) fn max_response_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match Option::<u64>::deserialize(d)? {
        Some(0) => Err(de::Error::custom(format!(
            "must be at least 1 (default {}, {} MiB)",
            defaults::MAX_RESPONSE_BYTES,
            defaults::MAX_RESPONSE_BYTES / (1024 * 1024)
        ))),
        Some(bytes) => Ok(bytes),
        None => Ok(defaults::MAX_RESPONSE_BYTES),
    }
}

// The values of absent keys (serde's `default = "…"` takes a function).

pub(super) fn default_auth_retries() -> u32 {
    defaults::AUTH_RETRIES
}

pub(super) fn default_request_timeout() -> Duration {
    defaults::REQUEST_TIMEOUT
}

pub(super) fn default_connect_timeout() -> Duration {
    defaults::CONNECT_TIMEOUT
}

pub(super) fn default_idle_timeout() -> Duration {
    defaults::IDLE_TIMEOUT
}

pub(super) fn default_malformed_body_retries() -> u32 {
    defaults::MALFORMED_BODY_RETRIES
}

pub(super) fn default_max_response_bytes() -> u64 {
    defaults::MAX_RESPONSE_BYTES
}
