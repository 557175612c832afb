//! Redirects are never followed: a followed redirect would carry the shape URL (with
//! its `secret`) and the request headers to whatever host the `location` names.

mod support;

use shapesync_electric::{ShapeError, ShapeStream};
use support::scripted::{Reply, scripted};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// Another host on 127.0.0.1 that records the head of every request it receives.
struct OtherHost {
    url: String,
    received: watch::Receiver<Vec<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OtherHost {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl OtherHost {
    async fn start() -> OtherHost {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (record, received) = watch::channel(Vec::new());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else { return };
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                record.send_modify(|log| log.push(String::from_utf8_lossy(&head).into_owned()));
                let _ =
                    socket.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n").await;
            }
        });
        OtherHost { url, received, task }
    }

    /// The first request's head, once one arrives.
    async fn first_request(&self) -> String {
        let mut received = self.received.clone();
        let log = received.wait_for(|log| !log.is_empty()).await.expect("the other host runs");
        log[0].clone()
    }

    fn request_count(&self) -> usize {
        self.received.borrow().len()
    }
}

#[tokio::test]
async fn a_redirect_to_another_host_is_not_followed_and_stops_the_stream() {
    for status in [301, 302, 303, 307, 308] {
        let other = OtherHost::start().await;
        let location = format!("{}/v1/shape?stolen=1", other.url);
        let server = scripted(vec![Reply::new(status, &[("location", &location)], "moved")]).await;
        let mut options = fast_options(&server.url, "items");
        options.secret = Some("s3cret".into());
        let options = options.header("x-api-key", "k3y").unwrap();
        let mut s = ShapeStream::new(options).unwrap();

        let result = tokio::select! {
            leaked = other.first_request() => {
                panic!("HTTP {status}: the redirect was followed; the other host received:\n{leaked}")
            }
            result = try_next(&mut s) => result,
        };
        let error = match result {
            Err(e @ ShapeError::Redirected { .. }) => e,
            other => panic!("HTTP {status}: expected a redirect error, got {other:?}"),
        };
        assert_eq!(error, ShapeError::Redirected { status });
        let message = error.to_string();
        assert!(message.contains(&format!("HTTP {status}")) && message.contains("`url`"), "{message}");
        for leak in ["s3cret", "stolen", other.url.as_str()] {
            assert!(!message.contains(leak), "{leak} in the error: {message}");
        }
        assert_eq!(other.request_count(), 0, "HTTP {status}: the other host received nothing");
        assert_eq!(server.script.request_count(), 1, "HTTP {status}: a misconfiguration is not retried");
    }
}

#[tokio::test]
async fn a_redirect_on_the_same_host_is_not_followed_either() {
    let server = scripted(vec![Reply::new(302, &[("location", "/v1/shape?table=other")], "")]).await;
    let mut s = ShapeStream::new(fast_options(&server.url, "items")).unwrap();
    match try_next(&mut s).await {
        Err(ShapeError::Redirected { status: 302 }) => {}
        other => panic!("expected a redirect error, got {other:?}"),
    }
    assert_eq!(server.script.request_count(), 1);
}
