//! How Redis failures map to the runner's error kinds, by the store's error kind and
//! structure, never by text.

use redis::{ErrorKind, RedisError, ServerErrorKind};
use shapesync_core::{ErrorCode, SinkError};

/// A setting the sink refuses.
pub(crate) fn rejected(e: shapesync_core::ConfigError) -> SinkError {
    SinkError::rejected(e.to_string()).with_source(e)
}

/// Maps a Redis failure to the runner's retry classes.
pub(crate) fn classify(e: RedisError) -> SinkError {
    let transient = e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ReadOnly
            )
        )
        || matches!(e.code(), Some("BUSY" | "OOM" | "MISCONF" | "NOREPLICAS"));
    let code = ErrorCode::Redis(e.code().map_or_else(|| format!("{:?}", e.kind()), str::to_owned));
    let error = if certificate_refused(&e) {
        // A TLS handshake that failed verification: retrying cannot fix it.
        SinkError::rejected(format!(
            "redis: {e}; check that the server's certificate matches the host in `url`, or set `ca_file` to the CA that signed it"
        ))
    } else if transient {
        SinkError::unavailable(format!("redis: {e}"))
    } else {
        SinkError::rejected(format!("redis refused a command: {e}"))
    };
    error.with_code(code).with_source(e)
}

/// The TLS handshake failed on the server's certificate (unverifiable, for another
/// host, revoked, or none sent), as rustls reports it somewhere in `e`'s chain.
#[cfg(feature = "tls")]
fn certificate_refused(e: &RedisError) -> bool {
    // tokio-rustls returns the handshake's error inside an `io::Error`, which redis may
    // share behind an `Arc`: `find_cause` looks inside both.
    shapesync_core::find_cause::<rustls::Error>(e).is_some_and(|tls| {
        matches!(
            tls,
            rustls::Error::InvalidCertificate(_)
                | rustls::Error::NoCertificatesPresented
                | rustls::Error::InvalidCertRevocationList(_)
        )
    })
}

/// Without TLS no handshake fails.
#[cfg(not(feature = "tls"))]
fn certificate_refused(_: &RedisError) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use shapesync_core::SinkErrorKind;

    use super::*;

    #[cfg(feature = "tls")]
    #[test]
    fn a_refused_certificate_is_recognised_by_its_rustls_error_not_its_words() {
        use rustls::{CertificateError, Error as TlsError};
        // tokio-rustls hands the handshake's error back inside an `io::Error`.
        let handshake =
            |tls: TlsError| RedisError::from(std::io::Error::new(std::io::ErrorKind::InvalidData, tls));
        for tls in [
            TlsError::InvalidCertificate(CertificateError::UnknownIssuer),
            TlsError::InvalidCertificate(CertificateError::NotValidForName),
            TlsError::NoCertificatesPresented,
        ] {
            let e = classify(handshake(tls.clone()));
            assert_eq!(e.kind(), SinkErrorKind::Rejected, "{tls:?}: {e}");
            assert!(e.message().contains("ca_file"), "{e}");
            assert!(std::error::Error::source(&e).is_some_and(|s| s.is::<RedisError>()));
        }
        // Another TLS failure, and an I/O error that merely mentions a certificate, are
        // network faults: retried.
        let other = classify(handshake(TlsError::DecryptError));
        assert_eq!(other.kind(), SinkErrorKind::Unavailable, "{other}");
        let words = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "certificate");
        assert_eq!(classify(RedisError::from(words)).kind(), SinkErrorKind::Unavailable);
    }

    #[test]
    fn a_server_error_reply_keeps_its_code() {
        let reply = RedisError::from((ErrorKind::Server(ServerErrorKind::ReadOnly), "read only replica"));
        let e = classify(reply);
        assert_eq!(e.kind(), SinkErrorKind::Unavailable, "{e}");
        assert!(matches!(e.code(), Some(ErrorCode::Redis(_))), "{e:?}");
    }
}
