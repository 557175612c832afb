//! Request validation and the protocol logic: which entries a request gets, offsets,
//! chunking, up-to-date, 409s. Pure functions over [`State`]; no I/O.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use serde::Serialize;
use serde::ser::SerializeMap;
use shapesync_core::{Offset, OpPart};

use crate::store::{
    Data, Entry, EntryKind, Generation, Op, Predicate, Row, Snapshot, State, Table, TableKey,
};
use crate::subquery::{RowMeta, SubqueryWhere};
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
        && !table.subqueries.contains_key(w)
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
    if let Some(w) = subset.as_ref().and_then(|s| s.where_clause.as_ref())
        && table.strict_where
        && !table.predicates.contains_key(w)
    {
        // Ignoring it would answer every row of the shape: refuse, as for `where`.
        return Err(("subset.where", "is not supported by this server, which serves whole tables".into()));
    }
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
    let (schema, table) = shapesync_core::relation::parse_relation(s)?;
    Some((schema.unwrap_or_else(|| "public".into()), table))
}

fn parse_columns(def: &TableDef, list: &str) -> Result<Vec<usize>, Invalid> {
    let names = shapesync_core::relation::split_identifiers(list, ',')
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
                    let key = chunk.def.key_of(&row);
                    write_message(&mut buf, &key, "insert", value, None, None, Extra::default(), &chunk.def);
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

/// The handle and latest offset of `def`'s shape, or `None` if the table has no shape
/// generation (after a truncate).
pub(crate) fn latest_offset(state: &State, def: &ShapeDef) -> Option<(String, Offset)> {
    let table = state.tables.get(&def.table)?;
    let generation = table.generation.as_ref()?;
    let view = ShapeView::new(table, generation, def);
    Some((def.handle(generation.id), view.latest_offset()))
}

/// Decides the response for `req` (creating a shape generation for `-1`/`now` if needed).
pub(crate) fn evaluate(state: &mut State, req: &ShapeRequest, flags: &EvalFlags) -> Eval {
    let key = &req.def.table;
    let Some(table) = state.tables.get(key) else {
        return Eval::Conflict(None); // removed since the request was read: its shape is gone
    };
    let has_generation = table.generation.is_some();
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
    if !state.tables.contains_key(key) {
        return Err(None);
    }
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
        view.matches_now(row)
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
        let extra = Extra::of(view.meta_now(row).as_ref());
        let mut msg = view.render(&table.def.key_of(row), "insert", row, None, None, extra);
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

/// How a shape filters rows.
enum Filter<'a> {
    /// No `where`, or a `where` without a registered predicate.
    All,
    /// A `where` registered with [`crate::TableHandle::register_where`].
    Predicate(&'a Predicate),
    /// A subquery `where`: members when the snapshot was taken and now.
    Subquery { name: &'a str, at_snapshot: &'a SubqueryWhere, current: &'a SubqueryWhere },
}

/// A table generation seen through one shape definition.
struct ShapeView<'a> {
    def: &'a TableDef,
    generation: &'a Generation,
    shape: &'a ShapeDef,
    selected: Vec<usize>,
    filter: Filter<'a>,
}

/// Extra headers of a message beyond operation/relation and the transaction headers.
#[derive(Default)]
struct Extra<'a> {
    key_change_to: Option<&'a str>,
    key_change_from: Option<&'a str>,
    tags: Option<Vec<String>>,
    removed_tags: Option<Vec<String>>,
    active_conditions: Option<Vec<bool>>,
    is_move_in: bool,
}

impl Extra<'_> {
    /// `tags` and `active_conditions` of a row in a subquery shape (log_items.ex
    /// `from_change`: both only when non-empty).
    fn of(meta: Option<&RowMeta>) -> Self {
        match meta {
            Some(m) => Extra {
                tags: (!m.tags.is_empty()).then(|| m.tags.clone()),
                active_conditions: (!m.active_conditions.is_empty()).then(|| m.active_conditions.clone()),
                ..Extra::default()
            },
            None => Extra::default(),
        }
    }
}

impl<'a> ShapeView<'a> {
    fn new(table: &'a Table, generation: &'a Generation, shape: &'a ShapeDef) -> Self {
        let selected = shape.columns.clone().unwrap_or_else(|| (0..table.def.columns.len()).collect());
        let filter = match &shape.where_clause {
            None => Filter::All,
            Some(w) => match (table.subqueries.get_key_value(w), generation.subqueries.get(w)) {
                (Some((name, current)), Some(at_snapshot)) => Filter::Subquery { name, at_snapshot, current },
                (Some((name, current)), None) => Filter::Subquery { name, at_snapshot: current, current },
                _ => table.predicates.get(w).map_or(Filter::All, Filter::Predicate),
            },
        };
        ShapeView { def: &table.def, generation, shape, selected, filter }
    }

    fn schema(&self) -> String {
        self.def.schema_json(&self.selected)
    }

    fn predicate_matches(&self, p: &Predicate, row: &[Option<String>]) -> bool {
        p(&RowView { def: self.def, row, params: &self.shape.params })
    }

    /// Is `row` in the shape now (subset snapshots read the current rows)?
    fn matches_now(&self, row: &[Option<String>]) -> bool {
        match &self.filter {
            Filter::All => true,
            Filter::Predicate(p) => self.predicate_matches(p, row),
            Filter::Subquery { current, .. } => current.meta(row).included,
        }
    }

    /// The row's subquery metadata now, for subset rows.
    fn meta_now(&self, row: &[Option<String>]) -> Option<RowMeta> {
        match &self.filter {
            Filter::Subquery { current, .. } => Some(current.meta(row)),
            _ => None,
        }
    }

    /// Is `row` of the generation's snapshot in the shape, and its metadata then.
    fn snapshot_row(&self, row: &[Option<String>]) -> (bool, Option<RowMeta>) {
        match &self.filter {
            Filter::All => (true, None),
            Filter::Predicate(p) => (self.predicate_matches(p, row), None),
            Filter::Subquery { at_snapshot, .. } => {
                let meta = at_snapshot.meta(row);
                (meta.included, Some(meta))
            }
        }
    }

    /// The (old, new) row metadata of a log entry in this subquery shape, as of its commit
    /// (entries committed before the where was registered are evaluated now).
    fn entry_meta(&self, e: &Entry) -> (Option<RowMeta>, Option<RowMeta>) {
        match &self.filter {
            Filter::Subquery { name, current, .. } => match e.meta.get(*name) {
                Some((old, new)) => (old.clone(), new.clone()),
                None => (e.old.as_ref().map(|r| current.meta(r)), e.new.as_ref().map(|r| current.meta(r))),
            },
            _ => (None, None),
        }
    }

    /// Whether the old and the new row of a change are in the shape.
    fn entry_matches(&self, e: &Entry) -> (bool, bool) {
        match &self.filter {
            Filter::All => (e.old.is_some(), e.new.is_some()),
            Filter::Predicate(p) => (
                e.old.as_ref().is_some_and(|r| self.predicate_matches(p, r)),
                e.new.as_ref().is_some_and(|r| self.predicate_matches(p, r)),
            ),
            Filter::Subquery { .. } => {
                let (old, new) = self.entry_meta(e);
                (old.is_some_and(|m| m.included), new.is_some_and(|m| m.included))
            }
        }
    }

    /// The offset of the last entry this shape sees, or `0_inf`.
    fn latest_offset(&self) -> Offset {
        self.generation.log.iter().rev().find(|e| self.visible(e)).map_or(Offset::SNAPSHOT_END, |e| e.offset)
    }

    /// Does this shape's log contain the entry? Move events and move-in rows belong to one
    /// subquery shape. A change is in the log if its old or new row is in the shape, except
    /// an update that changes none of the selected columns of a non-subquery shape, which
    /// Electric drops (`shapes/shape.ex` `do_convert_change` and `should_keep_change?`; for
    /// subquery shapes such updates are kept, they carry `active_conditions`).
    fn visible(&self, e: &Entry) -> bool {
        if let Some(only) = &e.only_for {
            return matches!(&self.filter, Filter::Subquery { name, .. } if *name == only.as_str());
        }
        let (old, new) = self.entry_matches(e);
        if e.op == Op::Update && old && new && !matches!(self.filter, Filter::Subquery { .. }) {
            let (o, n) = (e.old.as_ref().expect("update has old"), e.new.as_ref().expect("update has new"));
            return self.selected.iter().any(|&i| o[i] != n[i]);
        }
        old || new
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
                        .filter_map(|(key, r)| {
                            let (included, meta) = self.snapshot_row(r);
                            included
                                .then(|| self.render(key, "insert", r, None, None, Extra::of(meta.as_ref())))
                        })
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
                self.render(&self.def.key_of(&row), "insert", &row, None, None, Extra::default()).len() + 1
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

    /// Indexes of the visible log entries from `start`, each with its `last` flag: the last
    /// change of its transaction in THIS shape (Electric marks it after converting the
    /// transaction for the shape: `consumer/transaction_converter.ex` `convert_changes`,
    /// rendered by log_items.ex `put_if_true(:last, change.last?)`). Transactions are
    /// appended whole, so the flags of a prefix never change as the log grows.
    fn visible_from(&self, start: usize) -> Vec<(usize, bool)> {
        let log = &self.generation.log;
        let visible: Vec<usize> = (start..log.len()).filter(|&i| self.visible(&log[i])).collect();
        visible
            .iter()
            .enumerate()
            .map(|(k, &i)| {
                let last = matches!(log[i].kind, EntryKind::Change)
                    && visible.get(k + 1).is_none_or(|&next| log[next].lsn != log[i].lsn);
                (i, last)
            })
            .collect()
    }

    /// The end of the log chunk holding the entries after `after`: chunk boundaries are
    /// fixed positions in this shape's log, placed after the entry that brings a chunk to
    /// `chunk_bytes` of rendered messages (like Electric's storage, `shape_cache/log_chunker.ex`
    /// `fit_into_chunk`), independent of the request. Electric serves up to the first
    /// boundary after the request offset, or to the shape's latest offset when the offset is
    /// in the open last chunk (`api.ex` `determine_log_chunk_offset`,
    /// `Shapes.get_chunk_end_log_offset`).
    fn chunk_end(&self, after: Offset, chunk_bytes: usize) -> Offset {
        let mut h = DefaultHasher::new();
        (self.shape, chunk_bytes).hash(&mut h);
        let mut cache = self.generation.log_chunks.lock().unwrap_or_else(|e| e.into_inner());
        let index = cache.entry(h.finish()).or_default();
        let log = &self.generation.log;
        if index.scanned < log.len() {
            for (i, last) in self.visible_from(index.scanned) {
                index.bytes += self.render_entry(i, last).len() + 1;
                if index.bytes >= chunk_bytes {
                    index.boundaries.push(log[i].offset);
                    index.bytes = 0;
                }
            }
            index.scanned = log.len();
        }
        let k = index.boundaries.partition_point(|b| *b <= after);
        index.boundaries.get(k).copied().unwrap_or_else(|| self.latest_offset())
    }

    /// Visible log entries after `after` up to the end of their chunk, and that end.
    /// `None` if there are none.
    fn log_chunk(
        &self,
        after: Offset,
        chunk_bytes: usize,
        cut_mid_transaction: bool,
    ) -> Option<(Messages, Offset)> {
        let log = &self.generation.log;
        let start = log.partition_point(|e| e.offset <= after);
        let visible = self.visible_from(start);
        if visible.is_empty() {
            return None;
        }
        let chunk_end = self.chunk_end(after, chunk_bytes);
        let mut body = Messages::default();
        let mut end = after;
        let mut ops_of_tx = 0;
        for &(i, last) in &visible {
            let e = &log[i];
            if e.offset > chunk_end {
                break;
            }
            if cut_mid_transaction && last && ops_of_tx > 0 {
                break;
            }
            ops_of_tx = if last { 0 } else { ops_of_tx + 1 };
            body.push(&self.render_entry(i, last));
            end = e.offset;
        }
        Some((body, end))
    }

    /// Renders log entry `i` (visible in this shape) as log_items.ex `from_change` does for
    /// the change converted by `shapes/shape.ex` `do_convert_change`: updates whose old or
    /// new row is outside the shape become inserts/deletes, subquery shapes add `tags`,
    /// `active_conditions` and on updates `removed_tags` (old tags not in the new ones), and
    /// a key change (delete + insert entries) keeps `key_change_to`/`key_change_from` only
    /// when both halves are in the shape (else it is a plain delete or insert).
    fn render_entry(&self, i: usize, last: bool) -> Vec<u8> {
        let log = &self.generation.log;
        let e = &log[i];
        match &e.kind {
            EntryKind::Control(json) => return json.clone().into_bytes(),
            EntryKind::MoveIn => {
                // Move-in query rows: querying.ex `query_move_in` (`is_move_in`, tags and
                // active conditions, no transaction headers).
                let (_, meta) = self.entry_meta(e);
                let extra = Extra { is_move_in: true, ..Extra::of(meta.as_ref()) };
                return self.render(&e.key, "insert", e.new.as_deref().expect("row"), None, None, extra);
            }
            EntryKind::Change => {}
        }
        let tx = TxHeaders { e, last };
        let (old_match, new_match) = self.entry_matches(e);
        let (old_meta, new_meta) = self.entry_meta(e);
        let (old, new) = (e.old.as_deref(), e.new.as_deref());
        match (e.op, old_match, new_match) {
            (Op::Update, true, true) => {
                let (old, new) = (old.expect("update has old"), new.expect("update has new"));
                let mut extra = Extra::of(new_meta.as_ref());
                if extra.tags.is_some() {
                    let old_tags = old_meta.map(|m| m.tags).unwrap_or_default();
                    let new_tags = extra.tags.as_deref().unwrap_or_default();
                    extra.removed_tags =
                        Some(old_tags.into_iter().filter(|t| !new_tags.contains(t)).collect());
                }
                let changed: Vec<usize> =
                    self.selected.iter().copied().filter(|&i| old[i] != new[i]).collect();
                if self.shape.replica_full {
                    let old_value = Values { def: self.def, row: old, columns: &changed };
                    self.render(&e.key, "update", new, Some(old_value), Some(tx), extra)
                } else {
                    let mut columns = self.def.key_columns();
                    columns.retain(|i| self.selected.contains(i));
                    columns.extend(&changed);
                    columns.sort_unstable();
                    columns.dedup();
                    let value = Values { def: self.def, row: new, columns: &columns };
                    render_message(&e.key, "update", value, None, Some(tx), extra, self.def)
                }
            }
            (_, _, true) => {
                let mut extra = Extra::of(new_meta.as_ref());
                if e.key_change_from.is_some() && i > 0 && self.visible(&log[i - 1]) {
                    extra.key_change_from = e.key_change_from.as_deref();
                }
                self.render(&e.key, "insert", new.expect("row"), None, Some(tx), extra)
            }
            _ => {
                let old = old.expect("delete has old row");
                let partner = log.get(i + 1).filter(|p| e.key_change_to.is_some() && self.visible(p));
                let extra = match partner {
                    Some(partner) => {
                        // log_items.ex `from_change(%UpdatedRecord{})` with a changed key: the
                        // delete half carries the new tags plus the removed ones, no `last`.
                        let (_, partner_meta) = self.entry_meta(partner);
                        let mut extra = Extra::of(partner_meta.as_ref());
                        if let Some(tags) = &mut extra.tags {
                            let old_tags = old_meta.map(|m| m.tags).unwrap_or_default();
                            let removed: Vec<String> =
                                old_tags.into_iter().filter(|t| !tags.contains(t)).collect();
                            tags.extend(removed);
                        }
                        extra.key_change_to = e.key_change_to.as_deref();
                        extra
                    }
                    None => Extra::of(old_meta.as_ref()),
                };
                if self.shape.replica_full || !self.def.has_primary_key() {
                    self.render(&e.key, "delete", old, None, Some(tx), extra)
                } else {
                    let mut columns = self.def.key_columns();
                    columns.retain(|i| self.selected.contains(i));
                    let value = Values { def: self.def, row: old, columns: &columns };
                    render_message(&e.key, "delete", value, None, Some(tx), extra, self.def)
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
        extra: Extra,
    ) -> Vec<u8> {
        let value = Values { def: self.def, row, columns: &self.selected };
        render_message(key, op, value, old, tx, extra, self.def)
    }
}

/// Fixed log chunk boundaries of one shape: the log entries scanned so far, the bytes of
/// the open chunk, and the offsets of the last entry of each closed chunk.
#[derive(Default)]
pub(crate) struct LogChunkIndex {
    scanned: usize,
    bytes: usize,
    boundaries: Vec<Offset>,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    is_move_in: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tags: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    removed_tags: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    active_conditions: Option<Vec<bool>>,
}

/// A change message; `headers` is serialized last (subset rendering relies on it).
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
    extra: Extra,
    def: &TableDef,
) -> Vec<u8> {
    let mut buf = Vec::new();
    write_message(&mut buf, key, op, value, old, tx, extra, def);
    buf
}

#[allow(clippy::too_many_arguments)]
fn write_message(
    buf: &mut Vec<u8>,
    key: &str,
    op: &str,
    value: Values,
    old: Option<Values>,
    tx: Option<TxHeaders>,
    extra: Extra,
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
        key_change_to: extra.key_change_to,
        key_change_from: extra.key_change_from,
        is_move_in: extra.is_move_in.then_some(true),
        tags: extra.tags,
        removed_tags: extra.removed_tags,
        active_conditions: extra.active_conditions,
    };
    let msg = Message { key, value, old_value: old, headers };
    serde_json::to_writer(&mut *buf, &msg).expect("serializing to a Vec cannot fail");
}
