//! Scripted subquery shapes: tags, active conditions, move-out / move-in events.

mod common;

use common::*;
use serde_json::{Value, json};
use shapesync_shape_server::{Column, ShapeServer, TableDef, TableHandle, tag_hash};

const WHERE: &str = "project_id IN (SELECT id FROM projects WHERE active)";

fn h(v: &str) -> String {
    tag_hash(Some(v))
}

/// `items(id int8 pk, project_id text, owner_id text, title text)` with rows
/// 1 (p1, u1), 2 (p1, u2), 3 (p3, u1).
async fn issues_server() -> (ShapeServer, TableHandle) {
    let server = ShapeServer::start(fast_options()).await.unwrap();
    let items = server.create_table(
        TableDef::new("items")
            .column(Column::new("id", "int8").primary_key())
            .column(Column::new("project_id", "text"))
            .column(Column::new("owner_id", "text"))
            .column(Column::new("title", "text")),
    );
    items.seed([
        json!({"id": "1", "project_id": "p1", "owner_id": "u1", "title": "a"}),
        json!({"id": "2", "project_id": "p1", "owner_id": "u2", "title": "b"}),
        json!({"id": "3", "project_id": "p3", "owner_id": "u1", "title": "c"}),
    ]);
    (server, items)
}

fn row(id: &str, project: &str, owner: &str, title: &str) -> Value {
    json!({"id": id, "project_id": project, "owner_id": owner, "title": title})
}

fn key(id: &str) -> String {
    format!(r#""public"."items"/"{id}""#)
}

/// The snapshot's change messages and the head response.
async fn snapshot(server: &ShapeServer, where_clause: &str) -> (Vec<Value>, Resp) {
    let mut responses = sync_to_head(server, &[("where", where_clause)]).await;
    let head = responses.pop().unwrap();
    let snapshot = responses.iter().chain([&head]).flat_map(|r| r.changes()).collect();
    (snapshot, head)
}

/// The messages after `head`, up to the head of the log.
async fn log_after(server: &ShapeServer, where_clause: &str, head: &Resp) -> Vec<Value> {
    let r = get(
        server,
        &[("table", "items"), ("where", where_clause), ("offset", head.offset()), ("handle", head.handle())],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.ends_up_to_date(), "{}", r.text);
    let mut messages = r.messages();
    messages.pop();
    messages
}

#[tokio::test]
async fn snapshot_rows_carry_flat_tags_and_active_conditions_and_move_out_is_only_an_event() {
    let (server, items) = issues_server().await;
    items.register_subquery_where(WHERE, &["project_id"], &[&["p1", "p2"]]);
    let (rows, head) = snapshot(&server, WHERE).await;
    assert_eq!(
        rows,
        vec![
            json!({"key": key("1"), "value": row("1", "p1", "u1", "a"), "headers": {"operation": "insert",
                "relation": ["public", "items"], "tags": [h("p1")], "active_conditions": [true]}}),
            json!({"key": key("2"), "value": row("2", "p1", "u2", "b"), "headers": {"operation": "insert",
                "relation": ["public", "items"], "tags": [h("p1")], "active_conditions": [true]}}),
        ]
    );
    let offset = items.move_out(WHERE, 0, &["p1"]);
    let log = log_after(&server, WHERE, &head).await;
    assert_eq!(
        log,
        vec![
            json!({"headers": {"event": "move-out", "patterns": [{"pos": 0, "value": h("p1")}], "txids": [751]}})
        ]
    );
    let lsn = offset.to_string().split('_').next().unwrap().to_string();
    assert_eq!(offset.to_string(), format!("{lsn}_0"));
    // Another shape of the table sees nothing of the move.
    let plain = sync_to_head(&server, &[]).await;
    assert!(plain.iter().all(|r| !r.text.contains("move-out")));
    // A new snapshot (rotation) has the current members only.
    items.rotate();
    let (rows, _) = snapshot(&server, WHERE).await;
    assert!(rows.is_empty(), "{rows:?}");
}

#[tokio::test]
async fn move_in_sends_the_event_then_inserts_of_entering_rows_then_snapshot_end() {
    let (server, items) = issues_server().await;
    items.register_subquery_where(WHERE, &["project_id"], &[&["p1"]]);
    let (_, head) = snapshot(&server, WHERE).await;
    items.move_in(WHERE, 0, &["p3", "p9"]);
    let log = log_after(&server, WHERE, &head).await;
    assert_eq!(log.len(), 3, "{log:?}");
    assert_eq!(
        log[0],
        json!({"headers": {"event": "move-in", "patterns": [{"pos": 0, "value": h("p3")}, {"pos": 0, "value": h("p9")}],
            "txids": [751]}})
    );
    assert_eq!(
        log[1],
        json!({"key": key("3"), "value": row("3", "p3", "u1", "c"), "headers": {"operation": "insert",
            "relation": ["public", "items"], "is_move_in": true, "tags": [h("p3")], "active_conditions": [true]}})
    );
    assert_eq!(log[2]["headers"]["control"], "snapshot-end");
    // A move-in that brings no row in is the event alone.
    let (_, head) = snapshot(&server, WHERE).await;
    items.move_in(WHERE, 0, &["p7"]);
    let log = log_after(&server, WHERE, &head).await;
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["headers"]["event"], "move-in");
}

#[tokio::test]
async fn a_disjunction_has_a_tag_per_disjunct_and_moves_of_rows_still_in_the_shape_send_only_events() {
    let (server, items) = issues_server().await;
    let w = "project_id IN (SELECT …) OR owner_id IN (SELECT …)";
    items.register_subquery_where(w, &["project_id", "owner_id"], &[&["p1"], &["u2"]]);
    let (rows, head) = snapshot(&server, w).await;
    let headers: Vec<&Value> = rows.iter().map(|r| &r["headers"]).collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(headers[0]["tags"], json!([format!("{}/", h("p1")), format!("/{}", h("u1"))]));
    assert_eq!(headers[0]["active_conditions"], json!([true, false]));
    assert_eq!(headers[1]["tags"], json!([format!("{}/", h("p1")), format!("/{}", h("u2"))]));
    assert_eq!(headers[1]["active_conditions"], json!([true, true]));
    // Row 1 is in through p1: u1 entering position 1 sends no insert for it, only for row 3.
    items.move_in(w, 1, &["u1"]);
    let log = log_after(&server, w, &head).await;
    let keys: Vec<&Value> = log.iter().filter_map(|m| m.get("key")).collect();
    assert_eq!(keys, vec![&json!(key("3"))]);
    assert_eq!(log[1]["headers"]["active_conditions"], json!([false, true]));
    assert_eq!(log[0]["headers"]["patterns"], json!([{"pos": 1, "value": h("u1")}]));
}

#[tokio::test]
async fn a_conjunction_has_one_composite_tag_and_needs_every_position() {
    let (server, items) = issues_server().await;
    let w = "project_id IN (SELECT …) AND owner_id IN (SELECT …)";
    items.register_subquery_where_all(w, &["project_id", "owner_id"], &[&["p1"], &["u1"]]);
    let (rows, head) = snapshot(&server, w).await;
    assert_eq!(rows.len(), 1, "only row 1 has both: {rows:?}");
    assert_eq!(
        rows[0]["headers"],
        json!({"operation": "insert", "relation": ["public", "items"],
            "tags": [format!("{}/{}", h("p1"), h("u1"))], "active_conditions": [true, true]})
    );
    items.move_in(w, 1, &["u2"]);
    let log = log_after(&server, w, &head).await;
    assert_eq!(log.len(), 3, "{log:?}");
    assert_eq!(log[1]["key"], key("2"));
    assert_eq!(log[1]["headers"]["tags"], json!([format!("{}/{}", h("p1"), h("u2"))]));
    assert_eq!(log[1]["headers"]["active_conditions"], json!([true, true]));
}

#[tokio::test]
async fn transactions_carry_tags_as_of_their_commit_and_updates_carry_removed_tags() {
    let (server, items) = issues_server().await;
    items.register_subquery_where(WHERE, &["project_id"], &[&["p1", "p2"]]);
    let (_, head) = snapshot(&server, WHERE).await;
    let last = items
        .transaction()
        .update(json!({"id": "1", "project_id": "p2"}))
        .update(json!({"id": "2", "title": "b2"}))
        .update(json!({"id": "3", "title": "not in the shape"}))
        .commit();
    items.transaction().update(json!({"id": "2", "project_id": "p3"})).commit();
    items.insert(row("4", "p1", "u1", "d"));
    items.move_out(WHERE, 0, &["p1"]);
    let log = log_after(&server, WHERE, &head).await;
    let lsn = last.to_string().split('_').next().unwrap().to_string();
    let tx = |op: u64, last: bool| {
        let mut h = json!({"relation": ["public", "items"], "txids": [751], "lsn": lsn, "op_position": op});
        if last {
            h["last"] = json!(true);
        }
        h
    };
    let mut h0 = tx(0, false);
    h0["operation"] = json!("update");
    h0["tags"] = json!([h("p2")]);
    h0["removed_tags"] = json!([h("p1")]);
    h0["active_conditions"] = json!([true]);
    assert_eq!(log[0], json!({"key": key("1"), "value": {"id": "1", "project_id": "p2"}, "headers": h0}));
    // The filtered-out update of row 3 leaves the update of row 2 as the last of this shape.
    let mut h1 = tx(2, true);
    h1["operation"] = json!("update");
    h1["tags"] = json!([h("p1")]);
    h1["removed_tags"] = json!([]);
    h1["active_conditions"] = json!([true]);
    assert_eq!(log[1], json!({"key": key("2"), "value": {"id": "2", "title": "b2"}, "headers": h1}));
    // Leaving the shape: a delete with the old row's tags.
    assert_eq!(log[2]["headers"]["operation"], "delete");
    assert_eq!(log[2]["value"], json!({"id": "2"}));
    assert_eq!(log[2]["headers"]["tags"], json!([h("p1")]));
    assert_eq!(log[2]["headers"]["active_conditions"], json!([true]));
    // The insert committed before the move-out keeps its active condition.
    assert_eq!(log[3]["headers"]["operation"], "insert");
    assert_eq!(log[3]["headers"]["active_conditions"], json!([true]));
    assert_eq!(log[4]["headers"]["event"], "move-out");
    assert_eq!(log.len(), 5, "{log:?}");
    // After the move-out, p1 rows are outside: an update of row 4 is invisible.
    let (_, head) = snapshot(&server, WHERE).await;
    items.update(json!({"id": "4", "title": "d2"}));
    items.update(json!({"id": "1", "title": "a2"}));
    let log = log_after(&server, WHERE, &head).await;
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["key"], key("1"));
}

#[tokio::test]
async fn a_key_change_in_a_subquery_shape_splits_with_tags_on_both_halves() {
    let (server, items) = issues_server().await;
    items.register_subquery_where(WHERE, &["project_id"], &[&["p1", "p2"]]);
    let (_, head) = snapshot(&server, WHERE).await;
    items.transaction().change_key(json!({"id": "1"}), json!({"id": "9", "project_id": "p2"})).commit();
    // Key change out of the shape: a plain delete (Electric converts the update first).
    items.transaction().change_key(json!({"id": "2"}), json!({"id": "8", "project_id": "p3"})).commit();
    let log = log_after(&server, WHERE, &head).await;
    assert_eq!(log.len(), 3, "{log:?}");
    assert_eq!(log[0]["headers"]["key_change_to"], key("9"));
    assert_eq!(log[0]["headers"]["tags"], json!([h("p2"), h("p1")]));
    assert!(log[0]["headers"].get("removed_tags").is_none());
    assert!(log[0]["headers"].get("last").is_none());
    assert_eq!(log[1]["headers"]["key_change_from"], key("1"));
    assert_eq!(log[1]["headers"]["tags"], json!([h("p2")]));
    assert_eq!(log[1]["headers"]["last"], json!(true));
    assert_eq!(log[2]["headers"]["operation"], "delete");
    assert!(log[2]["headers"].get("key_change_to").is_none());
    assert_eq!(log[2]["headers"]["last"], json!(true));
}
