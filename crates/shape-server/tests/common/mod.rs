//! Helpers shared by the protocol tests: a small reqwest wrapper and a standard table.

#![allow(dead_code)]

use std::time::Duration;

use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use shapesync_shape_server::{Column, ServerOptions, ShapeServer, TableDef, TableHandle};

/// A decoded response.
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub text: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    pub fn handle(&self) -> &str {
        self.header("electric-handle").expect("electric-handle header")
    }

    pub fn offset(&self) -> &str {
        self.header("electric-offset").expect("electric-offset header")
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text))
    }

    /// The body's messages.
    pub fn messages(&self) -> Vec<Value> {
        self.json().as_array().expect("body is an array").clone()
    }

    /// Change messages only (no control messages).
    pub fn changes(&self) -> Vec<Value> {
        self.messages().into_iter().filter(|m| m.get("key").is_some()).collect()
    }

    pub fn controls(&self) -> Vec<String> {
        self.messages().iter().filter_map(|m| m["headers"]["control"].as_str().map(str::to_string)).collect()
    }

    pub fn ends_up_to_date(&self) -> bool {
        self.controls().last().map(String::as_str) == Some("up-to-date")
    }
}

/// GET `server.url()` with `params`.
pub async fn get(server: &ShapeServer, params: &[(&str, &str)]) -> Resp {
    let r = reqwest::Client::new().get(server.url()).query(params).send().await.expect("request");
    Resp { status: r.status().as_u16(), headers: r.headers().clone(), text: r.text().await.expect("body") }
}

/// Options with short timeouts for tests.
pub fn fast_options() -> ServerOptions {
    ServerOptions {
        long_poll_timeout: Duration::from_millis(200),
        out_of_bounds_wait: Duration::from_millis(200),
        ..ServerOptions::default()
    }
}

/// `items(id int8 pk, title text, n int4, tags text[])`.
pub fn items_def() -> TableDef {
    TableDef::new("items")
        .column(Column::new("id", "int8").primary_key())
        .column(Column::new("title", "text"))
        .column(Column::new("n", "int4"))
        .column(Column::new("tags", "text").dims(1))
}

/// A server with the `items` table seeded with `rows` rows (`id` 1..=rows).
pub async fn items_server(options: ServerOptions, rows: u64) -> (ShapeServer, TableHandle) {
    let server = ShapeServer::start(options).await.expect("server starts");
    let items = server.create_table(items_def());
    items.seed((1..=rows).map(|i| json!({"id": i.to_string(), "title": format!("title {i}"), "n": "1"})));
    (server, items)
}

/// Follows non-live requests from `-1` until up-to-date; returns all responses.
pub async fn sync_to_head(server: &ShapeServer, extra: &[(&str, &str)]) -> Vec<Resp> {
    let mut responses: Vec<Resp> = Vec::new();
    loop {
        let mut params: Vec<(&str, &str)> = vec![("table", "items")];
        params.extend_from_slice(extra);
        let (offset, handle) = match responses.last() {
            None => ("-1".to_string(), None),
            Some(r) => (r.offset().to_string(), Some(r.handle().to_string())),
        };
        params.push(("offset", &offset));
        if let Some(h) = &handle {
            params.push(("handle", h));
        }
        let r = get(server, &params).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let done = r.ends_up_to_date();
        responses.push(r);
        if done {
            return responses;
        }
        assert!(responses.len() < 10_000, "never reached up-to-date");
    }
}
