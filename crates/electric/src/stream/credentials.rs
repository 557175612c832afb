//! The credential files (`headers_file`, `secret_file`), re-read before every request
//! so a mounted secret or a sidecar can rotate a token, and the count of 401/403s.

use reqwest::header::HeaderMap;

use super::ShapeStream;
use crate::request::{read_headers_file, read_secret_file};
use crate::{ShapeError, ShapeOptions};

/// What the credential files held before the latest request.
#[derive(Debug, Default)]
pub(super) struct Credentials {
    /// Headers read from `headers_file`.
    file_headers: HeaderMap,
    /// The secret read from `secret_file`.
    pub(super) file_secret: Option<String>,
    /// 401/403 answers (or unreadable credential files) in a row.
    pub(super) auth_failures: u32,
}

impl Credentials {
    /// Re-reads `headers_file` and `secret_file`, when set; the error says which file
    /// could not be read (without its contents).
    async fn reload(&mut self, options: &ShapeOptions) -> Result<(), String> {
        if let Some(path) = &options.headers_file {
            self.file_headers = read_headers_file(path).await?;
        }
        if let Some(path) = &options.secret_file {
            self.file_secret = Some(read_secret_file(path).await?);
        }
        Ok(())
    }

    /// The headers of a request: `configured`, with `headers_file` entries replacing
    /// same-named ones.
    pub(super) fn request_headers(&self, configured: &HeaderMap) -> HeaderMap {
        let mut headers = configured.clone();
        headers.extend(self.file_headers.clone());
        headers
    }

    /// The secrets a rejection's text must not show: the configured one and the
    /// file's.
    pub(super) fn secrets<'a>(&'a self, options: &'a ShapeOptions) -> impl Iterator<Item = &'a str> {
        [options.secret.as_deref(), self.file_secret.as_deref()].into_iter().flatten()
    }
}

impl ShapeStream {
    /// Re-reads the credential files before a request. `Ok(false)`: a file could not
    /// be read and the stream waited with backoff (ask again); after
    /// [`ShapeOptions::auth_retries`] such failures in a row it is
    /// [`ShapeError::InvalidOptions`].
    pub(super) async fn refresh_credentials(&mut self) -> Result<bool, ShapeError> {
        let Err(what) = self.credentials.reload(&self.options).await else { return Ok(true) };
        self.credentials.auth_failures += 1;
        if self.credentials.auth_failures > self.options.auth_retries {
            self.credentials.auth_failures = 0;
            return Err(ShapeError::InvalidOptions(format!(
                "{what}, {} times in a row; make the file readable with valid contents",
                self.options.auth_retries + 1
            )));
        }
        self.wait_after_fault(&what, None).await;
        Ok(false)
    }
}
