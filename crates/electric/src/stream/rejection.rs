//! Responses with an error status: which are retried, which reset the stream, and the
//! typed [`ShapeError::Rejected`] built from a 4xx body.

use std::collections::BTreeMap;

use reqwest::StatusCode;
use reqwest::header::HeaderMap;

use super::long_poll::header_str;
use super::{ShapeEvent, ShapeStream, headers};
use crate::ShapeError;

impl ShapeStream {
    /// Handles a response whose status is neither 2xx nor 304 (redirects are refused
    /// earlier). `None` means "request again" (a fault was waited out).
    pub(super) async fn on_error_status(
        &mut self,
        status: StatusCode,
        header_map: &HeaderMap,
        body: &[u8],
    ) -> Result<Option<ShapeEvent>, ShapeError> {
        match status.as_u16() {
            401 | 403 if self.credentials.auth_failures < self.options.auth_retries => {
                // Credentials may be rotating: retry, re-reading the credential files.
                self.credentials.auth_failures += 1;
                let retry_after = self.retry_after(header_map);
                let what = format!("HTTP {}: credentials refused", status.as_u16());
                self.wait_after_fault(&what, retry_after).await;
                Ok(None)
            }
            401 | 403 => {
                // A caller may fix the credentials and call again: a fresh budget.
                self.credentials.auth_failures = 0;
                Err(self.rejection(status.as_u16(), body))
            }
            409 => {
                let new_handle = header_str(header_map, headers::HANDLE).map(str::to_owned);
                tracing::info!("shape must be refetched (HTTP 409)");
                Ok(Some(self.reset(new_handle, true)))
            }
            408 | 429 | 500..=599 => {
                let retry_after = self.retry_after(header_map);
                self.wait_after_fault(&format!("HTTP {}", status.as_u16()), retry_after).await;
                Ok(None)
            }
            400..=499 => {
                let rejection = self.rejection(status.as_u16(), body);
                if offset_out_of_bounds(&rejection) {
                    tracing::warn!("offset is out of bounds for this shape; refetching it");
                    return Ok(Some(self.reset(None, false)));
                }
                Err(rejection)
            }
            other => Err(ShapeError::protocol(format!("unexpected HTTP status {other}"))),
        }
    }

    /// A typed rejection from a 4xx body, naming the parameter the server blamed. The
    /// secrets (configured or read from `secret_file`) are masked in every text.
    pub(super) fn rejection(&self, status: u16, body: &[u8]) -> ShapeError {
        #[derive(serde::Deserialize)]
        struct ErrorBody {
            message: Option<String>,
            errors: Option<BTreeMap<String, serde_json::Value>>,
        }
        let hide = |mut s: String| {
            for secret in self.credentials.secrets(&self.options) {
                if !secret.is_empty() {
                    s = s.replace(secret, "***");
                }
            }
            s
        };
        let parsed: Option<ErrorBody> = serde_json::from_slice(body).ok();
        let errors: BTreeMap<String, Vec<String>> = parsed
            .as_ref()
            .and_then(|b| b.errors.as_ref())
            .map(|errs| {
                errs.iter()
                    .map(|(k, v)| {
                        let msgs = match v {
                            serde_json::Value::Array(items) => items.iter().map(json_text).collect(),
                            other => vec![json_text(other)],
                        };
                        (k.clone(), msgs.into_iter().map(hide).collect())
                    })
                    .collect()
            })
            .unwrap_or_default();
        let param = errors.keys().next().cloned().or_else(|| (status == 401).then(|| "secret".to_owned()));
        let message = if errors.len() == 1 {
            errors.values().flatten().cloned().collect::<Vec<_>>().join(", ")
        } else if !errors.is_empty() {
            errors.iter().map(|(k, v)| format!("{k}: {}", v.join(", "))).collect::<Vec<_>>().join("; ")
        } else if let Some(m) = parsed.and_then(|b| b.message) {
            m
        } else {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if text.is_empty() {
                StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("").to_owned()
            } else {
                text.chars().take(300).collect()
            }
        };
        ShapeError::Rejected { status, param, message: hide(message), errors }
    }
}

/// A JSON value as text: strings without their quotes.
fn json_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A rejection that means the request's offset is out of bounds for the shape.
///
/// Electric answers 400 with `errors` naming `offset` in two cases only
/// (packages/sync-service, electric-sql/electric@dc07a1e):
/// - `Api.Params.cast_offset/1` (lib/electric/shapes/api/params.ex) when
///   `LogOffset.from_string/1` cannot parse the offset; the other parameter checks
///   (`validate_handle_with_offset/1`, `validate_live_with_offset/1`) put their errors
///   on `handle` and `live`, and the subset's own `offset` is nested under `subset`;
/// - `Api` (lib/electric/shapes/api.ex) with `@offset_out_of_bounds`
///   (`%{offset: ["out of bounds for this shape"]}`) once an out-of-bounds request's
///   wait for the log to reach it times out (`:out_of_bounds_timeout`).
///
/// The stream builds every offset it sends from a parsed [`shapesync_core::Offset`],
/// so the first case cannot happen: a 400 naming `offset` is the second, whatever its
/// words.
fn offset_out_of_bounds(rejection: &ShapeError) -> bool {
    matches!(rejection, ShapeError::Rejected { status: 400, errors, .. } if errors.contains_key("offset"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_400_naming_offset_is_out_of_bounds_whatever_its_words() {
        let rejected = |status: u16, param: &str, words: &str| ShapeError::Rejected {
            status,
            param: Some(param.to_owned()),
            message: words.to_owned(),
            errors: [(param.to_owned(), vec![words.to_owned()])].into(),
        };
        assert!(offset_out_of_bounds(&rejected(400, "offset", "out of bounds for this shape")));
        assert!(offset_out_of_bounds(&rejected(400, "offset", "beyond the end of the log")));
        assert!(!offset_out_of_bounds(&rejected(400, "handle", "can't be blank when offset != -1")));
        assert!(!offset_out_of_bounds(&rejected(404, "offset", "out of bounds for this shape")));
        assert!(!offset_out_of_bounds(&ShapeError::protocol("offset out of bounds")));
    }
}
