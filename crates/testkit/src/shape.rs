//! Request validation and the protocol logic: which entries a request gets, offsets,
//! chunking, up-to-date, 409s. Pure functions over [`State`]; no I/O.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use serde::Serialize;
use serde::ser::SerializeMap;
use shapesync_core::{Offset, OpPart};

use crate::store::{Data, Entry, Generation, Op, Predicate, Row, Snapshot, State, Table, TableKey};
use crate::synthetic;
use crate::table::{RowView, TableDef};

/// What a client asked for, after validation.
#[derive(Clone)]
pub(crate) struct ShapeRequest {
    pub offset: RequestOffset,
    pub handle: Option<String>,
    pub live: bool,
    /// `live_sse=true` (with `live`): stream Server-Sent Events.
    pub sse: bool,
    pub cursor: Option<u64>,
    pub def: ShapeDef,
    /// `subset__*` parameters (or a POST body): a subset snapshot request (§4.4).
    pub subset: Option<Subset>,
}

/// A subset snapshot request.
#[derive(Clone, Debug)]
pub(crate) struct Subset {
    pub where_clause: Option<String>,
    pub params: Vec<(String, String)>,
    /// (column index, descending)
    pub order_by: Vec<(usize, bool)>,
    pub limit: Option<usize>,
    pub offset: usize,
}

/// The `offset` parameter.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum RequestOffset {
    Start,
    Now,
    At(Offset),
}

impl std::fmt::Display for RequestOffset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestOffset::Start => f.write_str("-1"),
            RequestOffset::Now => f.write_str("now"),
            RequestOffset::At(o) => write!(f, "{o}"),
        }
    }
}

/// Shape identity: everything that makes two requests the same shape.
#[derive(Hash, Clone, Debug)]
pub(crate) struct ShapeDef {
    pub table: TableKey,
    pub where_clause: Option<String>,
    pub params: Vec<(String, String)>,
    /// Selected column indexes in table order; `None` = all.
    pub columns: Option<Vec<usize>>,
    pub replica_full: bool,
    pub changes_only: bool,
}

impl ShapeDef {
    /// `<hash of the definition>-<generation id>`, like Electric's `<phash2>-<µs>`.
    pub fn handle(&self, generation_id: u64) -> String {
        let mut h = DefaultHasher::new();
        self.hash(&mut h);
        format!("{}-{generation_id}", h.finish() % 100_000_000)
    }
}

/// A 400 error: field name and message.
pub(crate) type Invalid = (&'static str, String);

/// Validates query parameters in Electric's order (§9.7): offset, handle, live, live_sse,
/// table/columns/where.
pub(crate) fn parse_request(state: &State, query: &[(String, String)]) -> Result<ShapeRequest, Invalid> {
    let get = |name: &str| query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let offset = match get("offset") {
        None => return Err(("offset", "can't be blank".into())),
        Some("-1") => RequestOffset::Start,
        Some("now") => RequestOffset::Now,
        Some(s) => match s.parse::<Offset>() {
            Ok(o) => RequestOffset::At(o),
            Err(_) => return Err(("offset", "has invalid format".into())),
        },
    };
    let handle = get("handle").filter(|h| !h.is_empty()).map(str::to_string);
    if handle.is_none() && matches!(offset, RequestOffset::At(_)) {
        return Err(("handle", "can't be blank when offset != -1".into()));
    }
    let live = get("live").is_some_and(|v| v != "false");
    if live && offset == RequestOffset::Start {
        return Err(("live", "can't be true when offset == -1".into()));
    }
    if live && offset == RequestOffset::Now {
        return Err(("live", "can't be true when offset is 'now'".into()));
    }
    let live_sse = get("live_sse").or(get("experimental_live_sse")).is_some_and(|v| v != "false");
    if live_sse && !live {
        return Err(("live_sse", "can't be true unless live is also true".into()));
    }
    let table_param = match get("table") {
        None | Some("") => return Err(("table", "can't be blank".into())),
        Some(t) => t,
    };
    let key = parse_table(table_param).ok_or(("table", format!("Invalid table name {table_param:?}")))?;
    let table = state.tables.get(&key).ok_or_else(|| {
        let msg = format!(
            "Table \"{}\".\"{}\" does not exist. If the table name contains capitals or special characters you must quote it.",
            key.0, key.1
        );
        ("table", msg)
    })?;
    let columns = match get("columns") {
        None => None,
        Some(list) => Some(parse_columns(&table.def, list)?),
    };
    let replica_full = match get("replica") {
        None | Some("default") => false,
        Some("full") => true,
        Some(_) => return Err(("replica", "is invalid".into())),
    };
    let changes_only = match get("log") {
        None | Some("full") => false,
        Some("changes_only") => true,
        Some(_) => return Err(("log", "is invalid".into())),
    };
    let where_clause = get("where").filter(|w| !w.is_empty()).map(str::to_string);
    if let Some(w) = &where_clause
        && table.strict_where
        && !table.predicates.contains_key(w)
    {
        return Err(("where", "is not supported by this server, which serves whole tables".into()));
    }
    let mut params: Vec<(String, String)> = query
        .iter()
        .filter(|(k, _)| k.starts_with("params[") && k.ends_with(']'))
        .map(|(k, v)| (k["params[".len()..k.len() - 1].to_string(), v.clone()))
        .collect();
    params.sort();
    let cursor = get("cursor").and_then(|c| c.parse().ok());
    let subset = parse_subset(&table.def, query)?;
    let def = ShapeDef { table: key, where_clause, params, columns, replica_full, changes_only };
    Ok(ShapeRequest { offset, handle, live, sse: live_sse, cursor, def, subset })
}

/// Reads `subset__where`, `subset__params` (JSON object), `subset__order_by`, `subset__limit`,
/// `subset__offset`. Errors are reported under `subset.<field>`.
fn parse_subset(def: &TableDef, query: &[(String, String)]) -> Result<Option<Subset>, Invalid> {
    if !query.iter().any(|(k, _)| k.starts_with("subset__")) {
        return Ok(None);
    }
    let get = |name: &str| query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    if get("subset__invalid_body").is_some() {
        return Err(("subset", "the request body must be a JSON object".into()));
    }
    let number = |field: &'static str, min: usize| -> Result<Option<usize>, Invalid> {
        match get(&format!("subset__{field}")) {
            None => Ok(None),
            Some(v) => match v.parse::<usize>() {
                Ok(n) if n >= min => Ok(Some(n)),
                Ok(_) if min == 1 => Err((field_path(field), "must be greater than 0".into())),
                Ok(_) => Err((field_path(field), "must be greater than or equal to 0".into())),
                Err(_) => Err((field_path(field), "is invalid".into())),
            },
        }
    };
    let limit = number("limit", 1)?;
    let offset = number("offset", 0)?;
    let order_by = match get("subset__order_by").filter(|o| !o.trim().is_empty()) {
        None if limit.is_some() || offset.is_some() => {
            return Err(("subset.order_by", "order_by is required when limit or offset is present".into()));
        }
        None => Vec::new(),
        Some(list) => list
            .split(',')
            .map(|term| {
                let mut words = term.split_whitespace();
                let column = words.next().unwrap_or("").trim_matches('"');
                let descending = words.next().is_some_and(|d| d.eq_ignore_ascii_case("desc"));
                def.column_index(column)
                    .map(|i| (i, descending))
                    .ok_or(("subset.order_by", format!("unknown column {column:?}")))
            })
            .collect::<Result<_, _>>()?,
    };
    let params = match get("subset__params") {
        None => Vec::new(),
        Some(json) => match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(json) {
            Ok(map) => map
                .into_iter()
                .map(|(k, v)| (k, v.as_str().map_or_else(|| v.to_string(), str::to_string)))
                .collect(),
            Err(_) => return Err(("subset.params", "params must be valid JSON".into())),
        },
    };
    let where_clause = get("subset__where").filter(|w| !w.is_empty()).map(str::to_string);
    Ok(Some(Subset { where_clause, params, order_by, limit, offset: offset.unwrap_or(0) }))
}

fn field_path(field: &'static str) -> &'static str {
    match field {
        "limit" => "subset.limit",
        _ => "subset.offset",
    }
}

fn parse_table(s: &str) -> Option<TableKey> {
    let (schema, table) = shapesync_core::table::parse_relation(s)?;
    Some((schema.unwrap_or_else(|| "public".into()), table))
}

fn parse_columns(def: &TableDef, list: &str) -> Result<Vec<usize>, Invalid> {
    let names = shapesync_core::table::split_identifiers(list, ',')
        .ok_or(("columns", "has invalid format".to_string()))?;
    let unknown: Vec<&str> =
        names.iter().filter(|n| def.column_index(n).is_none()).map(String::as_str).collect();
    if !unknown.is_empty() {
        return Err(("columns", format!("The following columns could not be found: {}", unknown.join(", "))));
    }
    let mut selected: Vec<usize> = names.iter().filter_map(|n| def.column_index(n)).collect();
    selected.sort_unstable();
    selected.dedup();
    let missing: Vec<&str> = (0..def.columns.len())
        .filter(|i| def.columns[*i].primary_key && !selected.contains(i))
        .map(|i| def.columns[i].name.as_str())
        .collect();
    if !missing.is_empty() {
        return Err((
            "columns",
            format!(
                "The list of columns must include all primary key columns, missing: {}",
                missing.join(", ")
            ),
        ));
    }
    Ok(selected)
}

/// The outcome of evaluating a request against the current state.
pub(crate) enum Eval {
    Reply(Reply),
    /// Nothing to send yet: a live request at the head, or an offset beyond the log end.
    Wait {
        out_of_bounds: bool,
    },
    /// 409 must-refetch, with the current handle if there is one.
    Conflict(Option<String>),
    /// 400 `errors.offset: ["out of bounds for this shape"]`.
    OutOfBounds,
}

/// A 200 response.
pub(crate) struct Reply {
    pub handle: String,
    pub offset: Offset,
    pub schema: String,
    pub body: Body,
    pub up_to_date: bool,
    pub has_data: bool,
}

/// A response body, rendered under the state lock or (large synthetic chunks) after it.
pub(crate) enum Body {
    Ready(Vec<u8>),
    Synthetic(SyntheticChunk),
}

/// Generated snapshot rows `ids` of a synthetic table, rendered outside the lock.
pub(crate) struct SyntheticChunk {
    def: TableDef,
    selected: Vec<usize>,
    ids: std::ops::RangeInclusive<u64>,
    snapshot_end: Option<String>,
}

impl Body {
    /// The JSON array bytes.
    pub fn render(self) -> Vec<u8> {
        match self {
            Body::Ready(bytes) => bytes,
            Body::Synthetic(chunk) => {
                let mut body = Messages::default();
                let mut buf = Vec::new();
                for id in chunk.ids {
                    let row = synthetic::row(id);
                    buf.clear();
                    let value = Values { def: &chunk.def, row: &row, columns: &chunk.selected };
                    write_message(&mut buf, &chunk.def.key_of(&row), "insert", value, None, None, &chunk.def);
                    body.push(&buf);
                }
                if let Some(end) = chunk.snapshot_end {
                    body.push(end.as_bytes());
                }
                body.finish()
            }
        }
    }
}

/// Flags that change how a request is evaluated.
pub(crate) struct EvalFlags {
    pub live_expired: bool,
    pub out_of_bounds_expired: bool,
    /// Fault: end the response before the last op of a multi-op transaction.
    pub cut_mid_transaction: bool,
    pub chunk_bytes: usize,
}

/// Decides the response for `req` (creating a shape generation for `-1`/`now` if needed).
pub(crate) fn evaluate(state: &mut State, req: &ShapeRequest, flags: &EvalFlags) -> Eval {
    let key = &req.def.table;
    let has_generation = state.tables.get(key).is_some_and(|t| t.generation.is_some());
    if !has_generation {
        if matches!(req.offset, RequestOffset::At(_)) {
            return Eval::Conflict(None);
        }
        state.new_generation(key);
    }
    let global_lsn = state.last_lsn;
    let table = &state.tables[key];
    let generation = table.generation.as_ref().expect("generation exists");
    let handle = req.def.handle(generation.id);
    if let RequestOffset::At(_) = req.offset
        && req.handle.as_deref() != Some(handle.as_str())
    {
        return Eval::Conflict(Some(handle));
    }
    let view = ShapeView::new(table, generation, &req.def);
    let reply = |offset: Offset, body: Body, up_to_date: bool, has_data: bool| {
        Eval::Reply(Reply {
            handle: handle.clone(),
            offset,
            schema: view.schema(),
            body,
            up_to_date,
            has_data,
        })
    };
    let utd_lsn = |end: Offset| {
        let tx = match end {
            Offset::At { tx, .. } => tx,
            Offset::Start => 0,
        };
        if req.live { tx } else { tx.max(global_lsn) }
    };
    let after = match req.offset {
        RequestOffset::Now => {
            let latest = view.latest_offset();
            let mut body = Messages::default();
            body.up_to_date(global_lsn);
            return reply(latest, Body::Ready(body.finish()), true, false);
        }
        RequestOffset::Start => return view.snapshot_chunk(0, flags.chunk_bytes, reply),
        RequestOffset::At(o @ Offset::At { tx: 0, op: OpPart::Num(k) }) => {
            let chunks = view.snapshot_chunk_count(flags.chunk_bytes);
            if (k as usize) + 1 < chunks {
                return view.snapshot_chunk(k as usize + 1, flags.chunk_bytes, reply);
            }
            if k as usize + 1 > chunks {
                return if flags.out_of_bounds_expired {
                    Eval::OutOfBounds
                } else {
                    Eval::Wait { out_of_bounds: true }
                };
            }
            o
        }
        RequestOffset::At(o) => o,
    };
    let latest = view.latest_offset();
    if after > latest {
        return if flags.out_of_bounds_expired {
            Eval::OutOfBounds
        } else {
            Eval::Wait { out_of_bounds: true }
        };
    }
    let chunk = view.log_chunk(after, flags.chunk_bytes, flags.cut_mid_transaction);
    match chunk {
        None => {
            if req.live && !flags.live_expired {
                return Eval::Wait { out_of_bounds: false };
            }
            let end = after.max(Offset::SNAPSHOT_END);
            let mut body = Messages::default();
            // Nothing new: Electric's no-change response carries the global LSN.
            body.up_to_date(global_lsn);
            reply(end, Body::Ready(body.finish()), true, false)
        }
        Some((mut body, end)) => {
            let up_to_date = end == latest;
            if up_to_date {
                body.up_to_date(utd_lsn(end));
            }
            reply(end, Body::Ready(body.finish()), up_to_date, true)
        }
    }
}

/// A subset snapshot response: body `{"metadata":…,"data":[…]}` plus the shape's handle,
/// latest offset and schema.
pub(crate) struct SubsetReply {
    pub handle: String,
    pub offset: Offset,
    pub schema: String,
    pub body: Vec<u8>,
}

/// Answers a subset snapshot from the table's current rows; `Err` is a 409 (handle mismatch).
pub(crate) fn subset_snapshot(
    state: &mut State,
    req: &ShapeRequest,
    subset: &Subset,
) -> Result<SubsetReply, Option<String>> {
    let key = &req.def.table;
    if state.tables.get(key).is_some_and(|t| t.generation.is_none()) {
        if req.handle.is_some() {
            return Err(None);
        }
        state.new_generation(key);
    }
    let (next_txid, last_lsn) = (state.next_txid, state.last_lsn);
    let table = &state.tables[key];
    let generation = table.generation.as_ref().expect("generation exists");
    let handle = req.def.handle(generation.id);
    if req.handle.as_ref().is_some_and(|h| *h != handle) {
        return Err(Some(handle));
    }
    let view = ShapeView::new(table, generation, &req.def);
    let subset_predicate = subset.where_clause.as_ref().and_then(|w| table.predicates.get(w));
    let in_subset = |row: &[Option<String>]| {
        view.matches(row)
            && subset_predicate.is_none_or(|p| p(&RowView { def: &table.def, row, params: &subset.params }))
    };
    let mut rows: Vec<Row> = match &table.data {
        Data::Stored { rows, .. } => rows.values().map(|(_, r)| r.clone()).filter(|r| in_subset(r)).collect(),
        Data::Synthetic { count } => (1..=*count).map(synthetic::row).filter(|r| in_subset(r)).collect(),
    };
    rows.sort_by(|a, b| {
        subset.order_by.iter().fold(std::cmp::Ordering::Equal, |acc, &(i, desc)| {
            acc.then_with(|| {
                let ord = compare_values(a[i].as_deref(), b[i].as_deref());
                if desc { ord.reverse() } else { ord }
            })
        })
    });
    let mark: u32 = rand::random::<u32>() >> 1;
    let mut data = Messages::default();
    for row in rows.iter().skip(subset.offset).take(subset.limit.unwrap_or(usize::MAX)) {
        let mut msg = view.render(&table.def.key_of(row), "insert", row, None, None);
        // Add `snapshot_mark` to the headers object, which the message ends with.
        msg.truncate(msg.len() - 2);
        msg.extend_from_slice(format!(r#","snapshot_mark":{mark}}}}}"#).as_bytes());
        data.push(&msg);
    }
    let body = format!(
        r#"{{"metadata":{{"xmin":"{next_txid}","xmax":"{next_txid}","xip_list":[],"snapshot_mark":{mark},"database_lsn":"{last_lsn}"}},"data":{}}}"#,
        String::from_utf8(data.finish()).expect("JSON is UTF-8")
    );
    Ok(SubsetReply { handle, offset: view.latest_offset(), schema: view.schema(), body: body.into_bytes() })
}

/// Orders text values like numbers when both parse as numbers; NULLs last.
fn compare_values(a: Option<&str>, b: Option<&str>) -> std::cmp::Ordering {
    use std::cmp::Ordering::{Greater, Less};
    match (a, b) {
        (None, None) => std::cmp::Ordering::Equal,
        (None, _) => Greater,
        (_, None) => Less,
        (Some(a), Some(b)) => match (a.parse::<f64>(), b.parse::<f64>()) {
            (Ok(x), Ok(y)) => x.total_cmp(&y),
            _ => a.cmp(b),
        },
    }
}

/// A table generation seen through one shape definition.
struct ShapeView<'a> {
    def: &'a TableDef,
    generation: &'a Generation,
    shape: &'a ShapeDef,
    selected: Vec<usize>,
    predicate: Option<&'a Predicate>,
}

impl<'a> ShapeView<'a> {
    fn new(table: &'a Table, generation: &'a Generation, shape: &'a ShapeDef) -> Self {
        let selected = shape.columns.clone().unwrap_or_else(|| (0..table.def.columns.len()).collect());
        let predicate = shape.where_clause.as_ref().and_then(|w| table.predicates.get(w));
        ShapeView { def: &table.def, generation, shape, selected, predicate }
    }

    fn schema(&self) -> String {
        self.def.schema_json(&self.selected)
    }

    fn matches(&self, row: &[Option<String>]) -> bool {
        self.predicate.is_none_or(|p| p(&RowView { def: self.def, row, params: &self.shape.params }))
    }

    /// The offset of the last entry this shape sees, or `0_inf`.
    fn latest_offset(&self) -> Offset {
        self.generation.log.iter().rev().find(|e| self.visible(e)).map_or(Offset::SNAPSHOT_END, |e| e.offset)
    }

    fn visible(&self, e: &Entry) -> bool {
        let matched = |r: &Option<Row>| r.as_ref().is_some_and(|r| self.matches(r));
        matched(&e.old) || matched(&e.new)
    }

    /// Rendered snapshot rows of this shape cut into chunks (stored tables only), cached per
    /// generation, shape definition and threshold.
    fn stored_chunks(&self, rows: &[(String, Row)], chunk_bytes: usize) -> Arc<StoredChunks> {
        let mut h = DefaultHasher::new();
        (self.shape, chunk_bytes).hash(&mut h);
        let mut cache = self.generation.rendered.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry(h.finish())
            .or_insert_with(|| {
                let messages: Vec<Vec<u8>> = if self.shape.changes_only {
                    Vec::new()
                } else {
                    rows.iter()
                        .filter(|(_, r)| self.matches(r))
                        .map(|(key, r)| self.render(key, "insert", r, None, None))
                        .collect()
                };
                let ranges = chunk_ranges(&messages, chunk_bytes);
                Arc::new(StoredChunks { messages, ranges })
            })
            .clone()
    }

    /// Synthetic snapshot chunks hold a fixed number of rows, estimated from the byte threshold.
    fn synthetic_rows_per_chunk(&self, chunk_bytes: usize) -> u64 {
        let sample: usize = (1..=64u64)
            .map(|id| {
                let row = synthetic::row(id);
                self.render(&self.def.key_of(&row), "insert", &row, None, None).len() + 1
            })
            .sum();
        ((chunk_bytes * 64 / sample) as u64).max(1)
    }

    fn snapshot_chunk_count(&self, chunk_bytes: usize) -> usize {
        match &self.generation.snapshot {
            Snapshot::Rows(rows) => self.stored_chunks(rows, chunk_bytes).ranges.len(),
            Snapshot::Synthetic { count } => {
                let n = if self.shape.changes_only { 0 } else { *count };
                n.div_ceil(self.synthetic_rows_per_chunk(chunk_bytes)).max(1) as usize
            }
        }
    }

    /// Snapshot chunk `n` (offset `0_n`); the last one ends with `snapshot-end`. Never up-to-date.
    fn snapshot_chunk(
        &self,
        n: usize,
        chunk_bytes: usize,
        reply: impl Fn(Offset, Body, bool, bool) -> Eval,
    ) -> Eval {
        let snapshot_end = format!(
            r#"{{"headers":{{"control":"snapshot-end","xmin":"{0}","xmax":"{0}","xip_list":[]}}}}"#,
            self.generation.xmin
        );
        let body = match &self.generation.snapshot {
            Snapshot::Rows(rows) => {
                let chunks = self.stored_chunks(rows, chunk_bytes);
                let mut body = Messages::default();
                for msg in &chunks.messages[chunks.ranges[n].clone()] {
                    body.push(msg);
                }
                if n + 1 == chunks.ranges.len() {
                    body.push(snapshot_end.as_bytes());
                }
                Body::Ready(body.finish())
            }
            Snapshot::Synthetic { count } => {
                let count = if self.shape.changes_only { 0 } else { *count };
                let per_chunk = self.synthetic_rows_per_chunk(chunk_bytes);
                let first = n as u64 * per_chunk + 1;
                let end = (first + per_chunk - 1).min(count);
                Body::Synthetic(SyntheticChunk {
                    def: self.def.clone(),
                    selected: self.selected.clone(),
                    ids: first..=end,
                    snapshot_end: (end >= count).then_some(snapshot_end),
                })
            }
        };
        reply(Offset::new(0, n as u64), body, false, true)
    }

    /// Visible log entries after `after`, cut by bytes. `None` if there are none.
    fn log_chunk(
        &self,
        after: Offset,
        chunk_bytes: usize,
        cut_mid_transaction: bool,
    ) -> Option<(Messages, Offset)> {
        let log = &self.generation.log;
        let start = log.partition_point(|e| e.offset <= after);
        let visible: Vec<&Entry> = log[start..].iter().filter(|e| self.visible(e)).collect();
        if visible.is_empty() {
            return None;
        }
        let mut body = Messages::default();
        let mut end = after;
        let mut ops_of_tx = 0;
        for (i, e) in visible.iter().enumerate() {
            let last_of_tx = visible.get(i + 1).is_none_or(|next| next.lsn != e.lsn);
            if cut_mid_transaction && last_of_tx && ops_of_tx > 0 {
                break;
            }
            ops_of_tx = if last_of_tx { 0 } else { ops_of_tx + 1 };
            body.push(&self.render_entry(e, last_of_tx));
            end = e.offset;
            if body.bytes >= chunk_bytes {
                break;
            }
        }
        Some((body, end))
    }

    fn render_entry(&self, e: &Entry, last: bool) -> Vec<u8> {
        let tx = TxHeaders { e, last };
        let old_match = e.old.as_ref().is_some_and(|r| self.matches(r));
        let new_match = e.new.as_ref().is_some_and(|r| self.matches(r));
        let (old, new) = (e.old.as_deref(), e.new.as_deref());
        match (e.op, old_match, new_match) {
            (Op::Update, true, true) => {
                let (old, new) = (old.expect("update has old"), new.expect("update has new"));
                let changed: Vec<usize> =
                    self.selected.iter().copied().filter(|&i| old[i] != new[i]).collect();
                if self.shape.replica_full {
                    let old_value = Values { def: self.def, row: old, columns: &changed };
                    self.render(&e.key, "update", new, Some(old_value), Some(tx))
                } else {
                    let mut columns = self.def.key_columns();
                    columns.retain(|i| self.selected.contains(i));
                    columns.extend(&changed);
                    columns.sort_unstable();
                    columns.dedup();
                    let value = Values { def: self.def, row: new, columns: &columns };
                    render_message(&e.key, "update", value, None, Some(tx), self.def)
                }
            }
            (_, _, true) => self.render(&e.key, "insert", new.expect("row"), None, Some(tx)),
            _ => {
                let old = old.expect("delete has old row");
                if self.shape.replica_full || !self.def.has_primary_key() {
                    self.render(&e.key, "delete", old, None, Some(tx))
                } else {
                    let mut columns = self.def.key_columns();
                    columns.retain(|i| self.selected.contains(i));
                    let value = Values { def: self.def, row: old, columns: &columns };
                    render_message(&e.key, "delete", value, None, Some(tx), self.def)
                }
            }
        }
    }

    /// A message whose value is the selected columns of `row`.
    fn render(
        &self,
        key: &str,
        op: &str,
        row: &[Option<String>],
        old: Option<Values>,
        tx: Option<TxHeaders>,
    ) -> Vec<u8> {
        let mut buf = Vec::new();
        self.render_into(&mut buf, key, op, row, old, tx);
        buf
    }

    fn render_into(
        &self,
        buf: &mut Vec<u8>,
        key: &str,
        op: &str,
        row: &[Option<String>],
        old: Option<Values>,
        tx: Option<TxHeaders>,
    ) {
        let value = Values { def: self.def, row, columns: &self.selected };
        write_message(buf, key, op, value, old, tx, self.def);
    }
}

/// A stored snapshot rendered for one shape: its messages and chunk boundaries.
pub(crate) struct StoredChunks {
    messages: Vec<Vec<u8>>,
    ranges: Vec<std::ops::Range<usize>>,
}

/// Splits rendered messages into chunks: a chunk closes after the message that reaches
/// `chunk_bytes`. Always at least one (possibly empty) chunk.
fn chunk_ranges(messages: &[Vec<u8>], chunk_bytes: usize) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, m) in messages.iter().enumerate() {
        bytes += m.len() + 1;
        if bytes >= chunk_bytes && i + 1 < messages.len() {
            ranges.push(start..i + 1);
            start = i + 1;
            bytes = 0;
        }
    }
    ranges.push(start..messages.len());
    ranges
}

/// A JSON array being built from pre-rendered messages.
#[derive(Default)]
pub(crate) struct Messages {
    buf: Vec<u8>,
    bytes: usize,
}

impl Messages {
    fn push(&mut self, msg: &[u8]) {
        self.buf.push(if self.buf.is_empty() { b'[' } else { b',' });
        self.buf.extend_from_slice(msg);
        self.bytes += msg.len() + 1;
    }

    fn up_to_date(&mut self, lsn: u64) {
        self.push(
            format!(r#"{{"headers":{{"control":"up-to-date","global_last_seen_lsn":"{lsn}"}}}}"#).as_bytes(),
        );
    }

    fn finish(mut self) -> Vec<u8> {
        if self.buf.is_empty() {
            self.buf.push(b'[');
        }
        self.buf.push(b']');
        self.buf
    }
}

/// The body of a 409.
pub(crate) const MUST_REFETCH: &str = r#"[{"headers":{"control":"must-refetch"}}]"#;

/// Selected columns of a row, serialized as a JSON object in table order.
#[derive(Clone, Copy)]
struct Values<'a> {
    def: &'a TableDef,
    row: &'a [Option<String>],
    columns: &'a [usize],
}

impl Serialize for Values<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.columns.len()))?;
        for &i in self.columns {
            map.serialize_entry(&self.def.columns[i].name, &self.row[i])?;
        }
        map.end()
    }
}

/// Replication headers of a log entry.
#[derive(Clone, Copy)]
struct TxHeaders<'a> {
    e: &'a Entry,
    last: bool,
}

#[derive(Serialize)]
struct Headers<'a> {
    operation: &'a str,
    relation: [&'a str; 2],
    #[serde(skip_serializing_if = "Option::is_none")]
    txids: Option<[u64; 1]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lsn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    op_position: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_change_to: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_change_from: Option<&'a str>,
}

#[derive(Serialize)]
struct Message<'a> {
    key: &'a str,
    value: Values<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    old_value: Option<Values<'a>>,
    headers: Headers<'a>,
}

fn render_message(
    key: &str,
    op: &str,
    value: Values,
    old: Option<Values>,
    tx: Option<TxHeaders>,
    def: &TableDef,
) -> Vec<u8> {
    let mut buf = Vec::new();
    write_message(&mut buf, key, op, value, old, tx, def);
    buf
}

fn write_message(
    buf: &mut Vec<u8>,
    key: &str,
    op: &str,
    value: Values,
    old: Option<Values>,
    tx: Option<TxHeaders>,
    def: &TableDef,
) {
    let headers = Headers {
        operation: op,
        relation: [&def.schema, &def.name],
        txids: tx.map(|t| [t.e.txid]),
        lsn: tx.map(|t| t.e.lsn.to_string()),
        op_position: tx.map(|t| match t.e.offset {
            Offset::At { op: OpPart::Num(n), .. } => n,
            _ => 0,
        }),
        last: tx.and_then(|t| t.last.then_some(true)),
        key_change_to: tx.and_then(|t| t.e.key_change_to.as_deref()),
        key_change_from: tx.and_then(|t| t.e.key_change_from.as_deref()),
    };
    let msg = Message { key, value, old_value: old, headers };
    serde_json::to_writer(&mut *buf, &msg).expect("serializing to a Vec cannot fail");
}
