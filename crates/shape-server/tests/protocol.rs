//! The server side of the Electric protocol, checked with plain HTTP requests.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use shapesync_shape_server::{Column, ServerOptions, ShapeServer, TableDef};

#[tokio::test]
async fn snapshot_is_cut_into_byte_chunks_with_offsets_0_n_ending_in_snapshot_end() {
    let (server, _items) = items_server(ServerOptions { chunk_bytes: 600, ..fast_options() }, 40).await;
    let responses = sync_to_head(&server, &[]).await;
    let (snapshot, rest) = responses.split_at(responses.len() - 1);
    assert!(snapshot.len() >= 3, "40 rows at 600 bytes should take several chunks");
    for (n, r) in snapshot.iter().enumerate() {
        assert_eq!(r.offset(), format!("0_{n}"));
        assert!(r.header("electric-schema").is_some());
        assert!(r.header("electric-up-to-date").is_none());
        let is_last = n + 1 == snapshot.len();
        assert_eq!(r.controls(), if is_last { vec!["snapshot-end"] } else { vec![] });
        if !is_last {
            assert!(r.text.len() >= 600, "a non-final chunk reaches the threshold");
        }
    }
    let ids: Vec<String> = snapshot
        .iter()
        .flat_map(|r| r.changes())
        .map(|c| c["value"]["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, (1..=40).map(|i| i.to_string()).collect::<Vec<_>>());
    let first = &snapshot[0].changes()[0];
    assert_eq!(first["key"], r#""public"."items"/"1""#);
    assert_eq!(first["headers"], json!({"operation": "insert", "relation": ["public", "items"]}));
    assert_eq!(first["value"], json!({"id": "1", "title": "title 1", "n": "1", "tags": null}));
    let head = &rest[0];
    assert_eq!(head.offset(), "0_inf");
    assert_eq!(head.controls(), vec!["up-to-date"]);
    assert_eq!(head.header("electric-up-to-date"), Some(""));
}

#[tokio::test]
async fn offset_minus_one_never_gets_up_to_date_even_for_an_empty_shape() {
    let (server, items) = items_server(fast_options(), 0).await;
    let r = get(&server, &[("table", "items"), ("offset", "-1")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.offset(), "0_0");
    assert_eq!(r.controls(), vec!["snapshot-end"]);
    assert!(r.header("electric-up-to-date").is_none());
    assert_eq!(r.header("electric-handle"), items.handle().as_deref());
    assert_eq!(
        r.header("cache-control"),
        Some("public, max-age=604800, s-maxage=3600, stale-while-revalidate=2629746")
    );
    assert_eq!(r.json()[0]["headers"]["xip_list"], json!([]));
    let schema: serde_json::Value = serde_json::from_str(r.header("electric-schema").unwrap()).unwrap();
    assert_eq!(schema["id"], json!({"type": "int8", "pk_index": 0, "not_null": true}));
    assert_eq!(schema["tags"], json!({"type": "text", "dims": 1}));
}

#[tokio::test]
async fn requests_are_exclusive_of_their_offset() {
    let (server, items) = items_server(fast_options(), 1).await;
    let last = items
        .transaction()
        .insert(json!({"id": "2"}))
        .insert(json!({"id": "3"}))
        .insert(json!({"id": "4"}))
        .commit();
    let lsn = items.next_lsn() - 8;
    assert_eq!(last.to_string(), format!("{lsn}_4"));
    let handle = items.handle().unwrap();
    let first_op = format!("{lsn}_0");
    let r = get(&server, &[("table", "items"), ("offset", &first_op), ("handle", &handle)]).await;
    let ids: Vec<String> =
        r.changes().iter().map(|c| c["value"]["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, vec!["3", "4"]);
    let positions: Vec<u64> =
        r.changes().iter().map(|c| c["headers"]["op_position"].as_u64().unwrap()).collect();
    assert_eq!(positions, vec![2, 4]);
    assert_eq!(r.offset(), last.to_string());
}

#[tokio::test]
async fn log_chunks_end_by_bytes_and_only_the_head_chunk_is_up_to_date() {
    let (server, items) = items_server(ServerOptions { chunk_bytes: 700, ..fast_options() }, 0).await;
    for i in 0..20 {
        items.insert(json!({"id": i.to_string(), "title": "some text to take up space"}));
    }
    let responses = sync_to_head(&server, &[]).await;
    let log: Vec<&Resp> = responses.iter().skip(1).collect();
    assert!(log.len() >= 3, "20 inserts at 700 bytes span several chunks");
    for r in &log[..log.len() - 1] {
        assert!(!r.ends_up_to_date());
        assert!(r.header("electric-up-to-date").is_none());
        assert_eq!(r.header("electric-has-data"), Some("true"));
    }
    let head = log.last().unwrap();
    assert!(head.ends_up_to_date());
    let lsn = head.offset().split('_').next().unwrap().to_string();
    assert_eq!(head.messages().last().unwrap()["headers"]["global_last_seen_lsn"], json!(lsn));
    let total: usize = log.iter().map(|r| r.changes().len()).sum();
    assert_eq!(total, 20);
    let change = &log[0].changes()[0];
    assert_eq!(change["headers"]["txids"], json!([751]));
    assert_eq!(change["headers"]["last"], json!(true));
    assert!(change["headers"]["lsn"].is_string());
}

#[tokio::test]
async fn multi_op_transaction_marks_only_its_last_op() {
    let (server, items) = items_server(fast_options(), 2).await;
    items.transaction().update(json!({"id": "1", "title": "x"})).delete(json!({"id": "2"})).commit();
    let responses = sync_to_head(&server, &[]).await;
    let changes = responses.last().unwrap().changes();
    assert_eq!(changes.len(), 2);
    assert!(changes[0]["headers"].get("last").is_none());
    assert_eq!(changes[1]["headers"]["last"], json!(true));
    assert_eq!(changes[0]["headers"]["lsn"], changes[1]["headers"]["lsn"]);
}

#[tokio::test]
async fn live_long_poll_wakes_when_a_transaction_is_appended() {
    let (server, items) =
        items_server(ServerOptions { long_poll_timeout: Duration::from_secs(30), ..fast_options() }, 1).await;
    let head = sync_to_head(&server, &[]).await.pop().unwrap();
    let (offset, handle) = (head.offset().to_string(), head.handle().to_string());
    let url = server.url();
    let poll = tokio::spawn(async move {
        let r = reqwest::Client::new()
            .get(url)
            .query(&[
                ("table", "items"),
                ("offset", &offset),
                ("handle", &handle),
                ("live", "true"),
                ("cursor", "0"),
            ])
            .send()
            .await
            .unwrap();
        Resp { status: r.status().as_u16(), headers: r.headers().clone(), text: r.text().await.unwrap() }
    });
    server
        .wait_for("a pending live request", Duration::from_secs(10), |log| {
            log.iter().any(|r| r.is_live() && r.status.is_none())
        })
        .await
        .unwrap();
    let appended = items.update(json!({"id": "1", "title": "changed"}));
    let r = poll.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.offset(), appended.to_string());
    assert_eq!(r.controls(), vec!["up-to-date"]);
    assert_eq!(r.changes()[0]["value"], json!({"id": "1", "title": "changed"}));
    assert_eq!(r.changes()[0]["headers"]["operation"], "update");
    assert!(r.header("electric-cursor").unwrap().parse::<u64>().unwrap() > 0);
    assert!(r.header("electric-schema").is_none(), "no schema on live responses");
    assert_eq!(r.header("cache-control"), Some("public, max-age=5, stale-while-revalidate=5"));
    assert_eq!(r.header("electric-has-data"), Some("true"));
}

#[tokio::test]
async fn live_timeout_returns_up_to_date_at_the_same_offset_with_increasing_cursors() {
    let (server, _items) = items_server(fast_options(), 1).await;
    let head = sync_to_head(&server, &[]).await.pop().unwrap();
    let (offset, handle) = (head.offset().to_string(), head.handle().to_string());
    let mut cursor = "0".to_string();
    for _ in 0..3 {
        let params = [
            ("table", "items"),
            ("offset", &offset),
            ("handle", &handle),
            ("live", "true"),
            ("cursor", &cursor),
        ];
        let r = get(&server, &params).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.offset(), offset);
        assert_eq!(r.controls(), vec!["up-to-date"]);
        assert_eq!(r.header("electric-has-data"), Some("false"));
        assert_eq!(r.header("electric-up-to-date"), Some(""));
        let next = r.header("electric-cursor").unwrap().to_string();
        assert!(next.parse::<u64>().unwrap() > cursor.parse::<u64>().unwrap(), "{next} > {cursor}");
        cursor = next;
    }
}

#[tokio::test]
async fn rotate_answers_409_with_the_new_handle_to_old_handles_and_live_waiters() {
    let (server, items) =
        items_server(ServerOptions { long_poll_timeout: Duration::from_secs(30), ..fast_options() }, 2).await;
    let head = sync_to_head(&server, &[]).await.pop().unwrap();
    let (offset, old) = (head.offset().to_string(), head.handle().to_string());
    let url = server.url();
    let (o, h) = (offset.clone(), old.clone());
    let poll = tokio::spawn(async move {
        let r = reqwest::Client::new()
            .get(url)
            .query(&[("table", "items"), ("offset", &o), ("handle", &h), ("live", "true")])
            .send()
            .await
            .unwrap();
        Resp { status: r.status().as_u16(), headers: r.headers().clone(), text: r.text().await.unwrap() }
    });
    server
        .wait_for("a pending live request", Duration::from_secs(10), |log| {
            log.iter().any(|r| r.status.is_none())
        })
        .await
        .unwrap();
    items.rotate();
    let new = items.handle().unwrap();
    assert_ne!(new, old);
    let waiter = poll.await.unwrap();
    assert_eq!(waiter.status, 409);
    assert_eq!(waiter.header("electric-handle"), Some(new.as_str()));
    assert_eq!(waiter.json(), json!([{"headers": {"control": "must-refetch"}}]));
    let stale = get(&server, &[("table", "items"), ("offset", &offset), ("handle", &old)]).await;
    assert_eq!(stale.status, 409);
    assert_eq!(stale.header("electric-handle"), Some(new.as_str()));
    assert_eq!(stale.header("cache-control"), Some("public, max-age=60, must-revalidate"));
    let fresh = sync_to_head(&server, &[]).await;
    assert_eq!(fresh[0].handle(), new);
    assert_eq!(fresh[0].changes().len(), 2);
}

#[tokio::test]
async fn a_handle_of_another_shape_gets_409_with_the_current_handle() {
    let (server, items) = items_server(fast_options(), 1).await;
    let r = get(&server, &[("table", "items"), ("offset", "0_inf"), ("handle", "123-456")]).await;
    assert_eq!(r.status, 409);
    assert_eq!(r.header("electric-handle"), items.handle().as_deref());
    let filtered = get(&server, &[("table", "items"), ("offset", "-1"), ("where", "id > 0")]).await;
    assert_ne!(Some(filtered.handle()), items.handle().as_deref(), "a where clause is another shape");
    let crossed = get(&server, &[("table", "items"), ("offset", "0_0"), ("handle", filtered.handle())]).await;
    assert_eq!(crossed.status, 409);
    assert_eq!(crossed.header("electric-handle"), items.handle().as_deref());
}

#[tokio::test]
async fn truncate_answers_409_without_a_handle_then_minus_one_gets_a_new_empty_shape() {
    let (server, items) = items_server(fast_options(), 3).await;
    let head = sync_to_head(&server, &[]).await.pop().unwrap();
    items.truncate();
    assert_eq!(items.handle(), None);
    let r = get(&server, &[("table", "items"), ("offset", head.offset()), ("handle", head.handle())]).await;
    assert_eq!(r.status, 409);
    assert_eq!(r.header("electric-handle"), None);
    assert_eq!(r.header("cache-control"), Some("public, max-age=1, must-revalidate"));
    let fresh = get(&server, &[("table", "items"), ("offset", "-1")]).await;
    assert_eq!(fresh.status, 200);
    assert_ne!(fresh.handle(), head.handle());
    assert!(fresh.changes().is_empty());
    assert_eq!(fresh.controls(), vec!["snapshot-end"]);
}

#[tokio::test]
async fn each_validation_error_of_case_15_is_a_400_naming_the_field() {
    /// Query, error field, part of the message.
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
    let (server, _items) = items_server(fast_options(), 1).await;
    let cases: &[Case] = &[
        (&[("offset", "-1")], "table", "can't be blank"),
        (&[("table", "nope"), ("offset", "-1")], "table", "does not exist"),
        (&[("table", "items"), ("offset", "10")], "offset", "has invalid format"),
        (&[("table", "items")], "offset", "can't be blank"),
        (&[("table", "items"), ("offset", "5_0")], "handle", "can't be blank when offset != -1"),
        (
            &[("table", "items"), ("offset", "-1"), ("live", "true")],
            "live",
            "can't be true when offset == -1",
        ),
        (&[("table", "items"), ("offset", "now"), ("live", "")], "live", "can't be true"),
        (&[("table", "items"), ("offset", "-1"), ("live_sse", "true")], "live_sse", "unless live"),
        (&[("table", "items"), ("offset", "-1"), ("columns", "title,n")], "columns", "missing: id"),
        (
            &[("table", "items"), ("offset", "-1"), ("columns", "id,nope")],
            "columns",
            "could not be found: nope",
        ),
        (&[("table", "items"), ("offset", "-1"), ("replica", "half")], "replica", "is invalid"),
        // Validation order: offset before handle before table.
        (&[("table", "nope"), ("offset", "x")], "offset", "has invalid format"),
        (&[("offset", "1_0")], "handle", "can't be blank"),
    ];
    for (params, field, message) in cases {
        let r = get(&server, params).await;
        assert_eq!(r.status, 400, "{params:?}");
        let body = r.json();
        assert_eq!(body["message"], "Invalid request", "{params:?}");
        let errors = body["errors"][field].as_array().unwrap_or_else(|| panic!("{params:?}: {body}"));
        assert!(errors[0].as_str().unwrap().contains(message), "{params:?}: {body}");
        assert_eq!(r.header("cache-control"), Some("no-store"));
        assert_eq!(r.header("surrogate-control"), Some("no-store"));
    }
}

#[tokio::test]
async fn a_wrong_or_missing_secret_is_401() {
    let (server, _items) =
        items_server(ServerOptions { secret: Some("s3cret".into()), ..fast_options() }, 1).await;
    for params in [
        vec![("table", "items"), ("offset", "-1")],
        vec![("table", "items"), ("offset", "-1"), ("secret", "nope")],
    ] {
        let r = get(&server, &params).await;
        assert_eq!(r.status, 401);
        assert_eq!(r.json(), json!({"message": "Unauthorized - Invalid API secret"}));
    }
    let ok = get(&server, &[("table", "items"), ("offset", "-1"), ("secret", "s3cret")]).await;
    assert_eq!(ok.status, 200);
    assert!(server.requests().iter().all(|r| r.param("secret") != Some("s3cret")), "secrets are redacted");
}

#[tokio::test]
async fn replica_default_sends_pk_and_changed_columns_and_full_sends_rows_and_old_values() {
    let (server, items) = items_server(fast_options(), 2).await;
    items
        .transaction()
        .update(json!({"id": "1", "title": "new", "n": "1"}))
        .delete(json!({"id": "2"}))
        .commit();
    let default = sync_to_head(&server, &[]).await.pop().unwrap().changes();
    assert_eq!(default[0]["value"], json!({"id": "1", "title": "new"}), "n did not change");
    assert!(default[0].get("old_value").is_none());
    assert_eq!(default[1]["value"], json!({"id": "2"}));
    assert_eq!(default[1]["headers"]["operation"], "delete");

    let full = sync_to_head(&server, &[("replica", "full")]).await;
    assert!(
        full[0].changes().iter().all(|c| c.get("old_value").is_none()),
        "snapshot rows carry no old_value"
    );
    let full = full.last().unwrap().changes();
    assert_eq!(full[0]["value"], json!({"id": "1", "title": "new", "n": "1", "tags": null}));
    assert_eq!(full[0]["old_value"], json!({"title": "title 1"}));
    assert_eq!(full[1]["value"], json!({"id": "2", "title": "title 2", "n": "1", "tags": null}));
}

#[tokio::test]
async fn columns_project_values_and_schema() {
    let (server, items) = items_server(fast_options(), 1).await;
    items.update(json!({"id": "1", "n": "5", "title": "t"}));
    let responses = sync_to_head(&server, &[("columns", "id,\"n\"")]).await;
    let schema: serde_json::Value =
        serde_json::from_str(responses[0].header("electric-schema").unwrap()).unwrap();
    assert_eq!(schema.as_object().unwrap().keys().collect::<Vec<_>>(), vec!["id", "n"]);
    assert_eq!(responses[0].changes()[0]["value"], json!({"id": "1", "n": "1"}));
    assert_eq!(responses.last().unwrap().changes()[0]["value"], json!({"id": "1", "n": "5"}));
}

#[tokio::test]
async fn changes_only_has_no_snapshot_rows_but_gets_later_changes() {
    let (server, items) = items_server(fast_options(), 5).await;
    items.insert(json!({"id": "9"}));
    let responses = sync_to_head(&server, &[("log", "changes_only")]).await;
    assert!(responses[0].changes().is_empty());
    assert_eq!(responses[0].controls(), vec!["snapshot-end"]);
    let later: Vec<_> = responses[1..].iter().flat_map(|r| r.changes()).collect();
    assert_eq!(later.len(), 1);
    assert_eq!(later[0]["value"]["id"], "9");
}

#[tokio::test]
async fn offset_now_is_an_immediate_up_to_date_at_the_latest_offset() {
    let (server, items) = items_server(fast_options(), 5).await;
    let latest = items.insert(json!({"id": "9"}));
    let r = get(&server, &[("table", "items"), ("offset", "now"), ("log", "changes_only")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.offset(), latest.to_string());
    assert_eq!(r.controls(), vec!["up-to-date"]);
    assert!(r.changes().is_empty());
    assert_eq!(r.header("electric-has-data"), Some("false"));
    let live = get(
        &server,
        &[
            ("table", "items"),
            ("offset", r.offset()),
            ("handle", r.handle()),
            ("live", "true"),
            ("log", "changes_only"),
        ],
    )
    .await;
    assert_eq!(live.status, 200);
    assert_eq!(live.offset(), latest.to_string());
}

#[tokio::test]
async fn an_offset_past_the_end_is_400_out_of_bounds_after_the_wait() {
    let (server, items) = items_server(fast_options(), 1).await;
    let handle = items.handle().unwrap();
    for offset in ["999999999_0", "0_7"] {
        let r = get(&server, &[("table", "items"), ("offset", offset), ("handle", &handle)]).await;
        assert_eq!(r.status, 400);
        assert_eq!(r.json()["errors"]["offset"], json!(["out of bounds for this shape"]));
    }
}

#[tokio::test]
async fn primary_key_change_is_a_delete_then_an_insert_at_the_next_op() {
    let (server, items) = items_server(fast_options(), 1).await;
    let last =
        items.transaction().change_key(json!({"id": "1"}), json!({"id": "2", "title": "moved"})).commit();
    let changes = sync_to_head(&server, &[]).await.pop().unwrap().changes();
    let lsn = last.to_string().split('_').next().unwrap().to_string();
    assert_eq!(last.to_string(), format!("{lsn}_1"));
    assert_eq!(changes[0]["headers"]["operation"], "delete");
    assert_eq!(changes[0]["headers"]["key_change_to"], r#""public"."items"/"2""#);
    assert_eq!(changes[0]["headers"]["op_position"], 0);
    assert_eq!(changes[1]["headers"]["operation"], "insert");
    assert_eq!(changes[1]["headers"]["key_change_from"], r#""public"."items"/"1""#);
    assert_eq!(changes[1]["headers"]["op_position"], 1);
    assert_eq!(changes[1]["value"]["title"], "moved");
}

#[tokio::test]
async fn a_registered_where_filters_the_snapshot_and_turns_crossing_updates_into_moves() {
    let (server, items) = items_server(fast_options(), 3).await;
    items.register_where("n = '1'", |row| row.get("n") == Some("1"));
    items.update(json!({"id": "2", "n": "0"}));
    items.insert(json!({"id": "7", "n": "0"}));
    items.update(json!({"id": "7", "n": "1"}));
    let responses = sync_to_head(&server, &[("where", "n = '1'")]).await;
    assert_eq!(responses[0].changes().len(), 3, "the snapshot is taken before the updates");
    let log: Vec<_> = responses[1..].iter().flat_map(|r| r.changes()).collect();
    assert_eq!(log.len(), 2, "the insert of a non-matching row is invisible: {log:?}");
    assert_eq!(log[0]["headers"]["operation"], "delete");
    assert_eq!(log[0]["value"], json!({"id": "2"}));
    assert_eq!(log[1]["headers"]["operation"], "insert");
    assert_eq!(log[1]["value"], json!({"id": "7", "title": null, "n": "1", "tags": null}));
}

#[tokio::test]
async fn keys_escape_slashes_and_composite_keys_have_one_segment_per_column() {
    let server = ShapeServer::start(fast_options()).await.unwrap();
    let t = server.create_table(
        TableDef::new("t")
            .column(Column::new("a", "text").primary_key())
            .column(Column::new("b", "int4").primary_key()),
    );
    t.seed([json!({"a": "x/y", "b": "1"})]);
    let r = get(&server, &[("table", "t"), ("offset", "-1")]).await;
    assert_eq!(r.changes()[0]["key"], r#""public"."t"/"x//y"/"1""#);
}

#[tokio::test]
async fn if_none_match_with_the_etag_gives_304() {
    let (server, _items) = items_server(fast_options(), 1).await;
    let r = get(&server, &[("table", "items"), ("offset", "-1")]).await;
    let etag = r.header("etag").unwrap().to_string();
    assert_eq!(etag, format!("\"{}:-1:0_0\"", r.handle()));
    let again = reqwest::Client::new()
        .get(server.url())
        .query(&[("table", "items"), ("offset", "-1")])
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status().as_u16(), 304);
    assert!(again.text().await.unwrap().is_empty());
}

#[tokio::test]
async fn the_request_log_records_parameters_status_and_order() {
    let (server, _items) = items_server(fast_options(), 1).await;
    sync_to_head(&server, &[("cache-buster", "abc")]).await;
    let log = server.requests();
    assert_eq!(log.len(), 2);
    assert_eq!(log[0].param("offset"), Some("-1"));
    assert_eq!(log[0].param("cache-buster"), Some("abc"));
    assert_eq!(log[1].param("offset"), Some("0_0"));
    assert!(log[1].param("handle").is_some());
    assert!(log.iter().all(|r| r.status == Some(200) && r.method == "GET"));
    assert!(log[0].received_at <= log[1].received_at);
}

#[tokio::test]
async fn post_subset_returns_metadata_and_marked_rows_in_order_with_limit() {
    let (server, items) = items_server(fast_options(), 0).await;
    items.seed((1..=5).map(|i| json!({"id": i.to_string(), "title": if i % 2 == 0 { "a" } else { "b" }})));
    items.register_where("title = $1", |row| row.get("title") == row.param("1"));
    let r = reqwest::Client::new()
        .post(server.url())
        .query(&[("table", "items"), ("offset", "-1")])
        .json(&json!({"where": "title = $1", "params": {"1": "b"}, "order_by": "id desc", "limit": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["electric-snapshot"], "true");
    assert_eq!(r.headers()["cache-control"], "no-cache");
    assert_eq!(r.headers()["electric-handle"].to_str().unwrap(), items.handle().unwrap());
    assert!(r.headers().get("electric-offset").is_some());
    let body: serde_json::Value = r.json().await.unwrap();
    let mark = body["metadata"]["snapshot_mark"].as_u64().unwrap();
    assert!(body["metadata"]["database_lsn"].is_string());
    assert_eq!(body["metadata"]["xip_list"], json!([]));
    let data = body["data"].as_array().unwrap();
    let ids: Vec<&str> = data.iter().map(|m| m["value"]["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["5", "3"]);
    assert_eq!(
        data[0]["headers"],
        json!({"operation": "insert", "relation": ["public", "items"], "snapshot_mark": mark})
    );
    assert!(server.requests()[0].body.as_deref().unwrap().contains("order_by"));
}

#[tokio::test]
async fn subset_limit_without_order_by_is_400() {
    let (server, _items) = items_server(fast_options(), 3).await;
    let r = get(&server, &[("table", "items"), ("offset", "-1"), ("subset__limit", "10")]).await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["errors"],
        json!({"subset": {"order_by": ["order_by is required when limit or offset is present"]}})
    );
    let ok = get(
        &server,
        &[("table", "items"), ("offset", "-1"), ("subset__limit", "2"), ("subset__order_by", "id")],
    )
    .await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json()["data"].as_array().unwrap().len(), 2);
}

/// A server that cannot evaluate SQL refuses a subset `where` it has no predicate for,
/// instead of answering every row.
#[tokio::test]
async fn an_unregistered_subset_where_is_refused_by_a_strict_server() {
    let (server, items) = items_server(fast_options(), 3).await;
    items.refuse_unregistered_where();
    let r = get(&server, &[("table", "items"), ("offset", "-1"), ("subset__where", "id = 1")]).await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["errors"],
        json!({"subset": {"where": ["is not supported by this server, which serves whole tables"]}})
    );
}

#[tokio::test]
async fn seeding_again_refreshes_the_snapshot_under_the_same_handle() {
    let (server, items) = items_server(ServerOptions { chunk_bytes: 300, ..fast_options() }, 3).await;
    let before = sync_to_head(&server, &[]).await;
    items.seed([json!({"id": "4"})]);
    let after = sync_to_head(&server, &[]).await;
    assert_eq!(after[0].handle(), before[0].handle());
    let count = |rs: &[Resp]| rs.iter().map(|r| r.changes().len()).sum::<usize>();
    assert_eq!(count(&before), 3);
    assert_eq!(count(&after), 4);
}

#[tokio::test]
async fn shutdown_ends_pending_long_polls_and_stops_listening() {
    let (server, items) =
        items_server(ServerOptions { long_poll_timeout: Duration::from_secs(60), ..fast_options() }, 1).await;
    let handle = items.handle().unwrap();
    let url = server.url();
    let poll = tokio::spawn(async move {
        reqwest::Client::new()
            .get(url)
            .query(&[("table", "items"), ("offset", "0_inf"), ("handle", &handle), ("live", "true")])
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    server
        .wait_for("a pending live request", Duration::from_secs(10), |log| {
            log.iter().any(|r| r.status.is_none())
        })
        .await
        .unwrap();
    let url = server.url();
    server.shutdown().await;
    assert_eq!(poll.await.unwrap().unwrap(), 200, "the long-poll is answered, not left hanging");
    assert!(reqwest::get(url).await.is_err(), "nothing listens after shutdown");
}

#[tokio::test]
async fn log_chunk_boundaries_are_fixed_whatever_the_request_offset() {
    let (server, items) = items_server(ServerOptions { chunk_bytes: 700, ..fast_options() }, 0).await;
    let offsets: Vec<String> = (0..20)
        .map(|i| {
            items.insert(json!({"id": i.to_string(), "title": "some text to take up space"})).to_string()
        })
        .collect();
    let responses = sync_to_head(&server, &[]).await;
    let first_chunk_end = responses[1].offset().to_string();
    let handle = responses[1].handle().to_string();
    assert_ne!(first_chunk_end, offsets[19], "the first log chunk ends short of the head");
    // From inside the first chunk, the response still ends at its fixed end.
    let r = get(&server, &[("table", "items"), ("offset", &offsets[0]), ("handle", &handle)]).await;
    assert_eq!(r.offset(), first_chunk_end);
    assert!(!r.ends_up_to_date());
    assert!(r.header("electric-up-to-date").is_none());
    assert_eq!(r.changes()[0]["key"], r#""public"."items"/"1""#);
}

#[tokio::test]
async fn last_marks_the_last_change_of_the_transaction_in_this_shape() {
    let (server, items) = items_server(fast_options(), 0).await;
    items.register_where("n = '1'", |row| row.get("n") == Some("1"));
    items
        .transaction()
        .insert(json!({"id": "1", "n": "1"}))
        .insert(json!({"id": "2", "n": "1"}))
        .insert(json!({"id": "3", "n": "0"}))
        .update(json!({"id": "1", "title": "t"}))
        .commit();
    let log = sync_to_head(&server, &[("where", "n = '1'"), ("columns", "id,n")]).await.pop().unwrap();
    let changes = log.changes();
    // The insert of row 3 is outside the shape and the update changes no selected column.
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert!(changes[0]["headers"].get("last").is_none());
    assert_eq!(changes[1]["key"], r#""public"."items"/"2""#);
    assert_eq!(changes[1]["headers"]["last"], json!(true));
}

/// A browser can use the server: every answer allows the request's origin and exposes
/// Electric's headers, and a preflight gets a 204 (`plug/utils.ex` `CORSHeaderPlug`,
/// `shapes/api/options.ex`).
#[tokio::test]
async fn answers_carry_cors_headers_and_preflights_get_a_204() {
    let server = ShapeServer::start(fast_options()).await.unwrap();
    server.create_table(TableDef::new("items").column(Column::new("id", "int8").primary_key()));
    let http = reqwest::Client::new();
    let response = http
        .get(server.url())
        .query(&[("table", "items"), ("offset", "-1")])
        .header("origin", "http://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let h = response.headers();
    assert_eq!(h["access-control-allow-origin"], "http://app.example");
    let exposed = h["access-control-expose-headers"].to_str().unwrap();
    for name in
        ["electric-offset", "electric-handle", "electric-schema", "electric-cursor", "electric-up-to-date"]
    {
        assert!(exposed.split(',').any(|e| e == name), "{name} is exposed: {exposed}");
    }
    // Without an Origin, any; errors carry them too.
    let response = http.get(server.url()).query(&[("offset", "-1")]).send().await.unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(response.headers()["access-control-allow-origin"], "*");

    let preflight = http
        .request(reqwest::Method::OPTIONS, server.url())
        .header("origin", "http://app.example")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "if-none-match, x-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 204);
    let h = preflight.headers();
    assert_eq!(h["access-control-max-age"], "86400");
    assert_eq!(h["access-control-allow-headers"], "if-none-match");
    assert!(h["access-control-allow-methods"].to_str().unwrap().contains("GET"));
}

/// A server started out of service (the devserver while it loads its tables) answers
/// 503 naming why, which clients retry, and serves once restored.
#[tokio::test]
async fn a_server_out_of_service_answers_503_until_restored() {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let server = ShapeServer::start_out_of_service(addr, fast_options(), Some("loading its tables".into()))
        .await
        .unwrap();
    server.create_table(TableDef::new("items").column(Column::new("id", "int8").primary_key()));
    let r = get(&server, &[("table", "items"), ("offset", "-1")]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("5"));
    assert_eq!(r.json()["message"], "loading its tables");
    server.availability().restore();
    assert_eq!(get(&server, &[("table", "items"), ("offset", "-1")]).await.status, 200);
}

/// With `max_log_entries`, a shape whose log grows past it is rotated: a new handle whose
/// snapshot holds every current row, and a 409 for clients of the old one — memory holds
/// the rows and a bounded log.
#[tokio::test]
async fn a_bounded_log_rotates_the_shape_and_clients_refetch() {
    let (server, items) = items_server(ServerOptions { max_log_entries: Some(5), ..fast_options() }, 2).await;
    let head = sync_to_head(&server, &[]).await.pop().unwrap();
    let (old_handle, offset) = (head.handle().to_owned(), head.offset().to_owned());
    for i in 3..=8 {
        items.insert(json!({"id": i.to_string(), "title": format!("title {i}"), "n": "1"}));
    }
    let r = get(&server, &[("table", "items"), ("offset", &offset), ("handle", &old_handle)]).await;
    assert_eq!(r.status, 409, "the old handle is gone");
    let rows: usize = sync_to_head(&server, &[]).await.iter().map(|r| r.changes().len()).sum();
    let new_head = sync_to_head(&server, &[]).await.pop().unwrap();
    assert_ne!(new_head.handle(), old_handle);
    assert_eq!(rows, 8, "the new shape's snapshot holds every row");
    // Unbounded (the default), the same writes keep the handle.
    let (server, items) = items_server(fast_options(), 2).await;
    let head = sync_to_head(&server, &[]).await.pop().unwrap();
    for i in 3..=8 {
        items.insert(json!({"id": i.to_string(), "title": format!("title {i}"), "n": "1"}));
    }
    let r = get(&server, &[("table", "items"), ("offset", head.offset()), ("handle", head.handle())]).await;
    assert_eq!(r.status, 200);
}
