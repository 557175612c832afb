//! The scripted data: tables, their current rows, shape generations (handles) and logs.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value as Json;
use shapesync_core::Offset;

use crate::shape::{LogChunkIndex, StoredChunks};
use crate::subquery::{RowMeta, SubqueryWhere};
use crate::synthetic;
use crate::table::{RowView, TableDef};

/// A row: one text value or NULL per table column, in table order.
pub(crate) type Row = Vec<Option<String>>;

/// A `where` predicate registered by a test.
pub(crate) type Predicate = Arc<dyn Fn(&RowView<'_>) -> bool + Send + Sync>;

/// `(schema, name)`.
pub(crate) type TableKey = (String, String);

/// Everything the server serves, behind one lock.
pub(crate) struct State {
    pub tables: HashMap<TableKey, Table>,
    /// The last commit LSN handed out (server-wide, like Postgres).
    pub last_lsn: u64,
    pub next_txid: u64,
    last_generation_id: u64,
    /// The most log entries a shape keeps (see `ServerOptions::max_log_entries`).
    pub max_log_entries: Option<usize>,
}

impl State {
    pub fn new() -> Self {
        State {
            tables: HashMap::new(),
            last_lsn: 24_008_176,
            next_txid: 751,
            last_generation_id: 0,
            max_log_entries: None,
        }
    }

    /// A fresh generation id: unix µs, strictly increasing, so handles are never reused.
    fn next_generation_id(&mut self) -> u64 {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0);
        self.last_generation_id = now.max(self.last_generation_id + 1);
        self.last_generation_id
    }

    /// Starts a new generation of `table` whose snapshot is its current rows.
    /// Bounds every shape's log (see [`State::bound_log`]).
    pub fn with_max_log_entries(mut self, max: Option<usize>) -> Self {
        self.max_log_entries = max;
        self
    }

    /// A shape whose log has grown past `max_log_entries` is rotated: a new handle whose
    /// snapshot is the current rows, so memory holds the rows and a bounded log (clients
    /// on the old handle get a 409 and refetch, as when Electric rotates a shape).
    fn bound_log(&mut self, key: &TableKey) {
        let Some(max) = self.max_log_entries else { return };
        let long =
            self.tables.get(key).and_then(|t| t.generation.as_ref()).is_some_and(|g| g.log.len() > max);
        if long {
            self.new_generation(key);
        }
    }

    pub fn new_generation(&mut self, key: &TableKey) {
        let id = self.next_generation_id();
        let xmin = self.next_txid;
        let table = self.tables.get_mut(key).expect("table exists");
        let snapshot = table.data.snapshot();
        table.generation = Some(Generation {
            id,
            snapshot,
            subqueries: table.subqueries.clone(),
            log: Vec::new(),
            xmin,
            rendered: Mutex::default(),
            log_chunks: Mutex::default(),
        });
    }

    /// Allocates the LSN and txid of a new transaction (or move event).
    fn next_tx(&mut self, lsn: Option<u64>, txid: Option<u64>) -> (u64, u64) {
        let lsn = match lsn {
            Some(l) => {
                // Equal is fine: the parts of one source transaction over several tables
                // share its commit LSN, each in its own table's log (as in Electric).
                assert!(l >= self.last_lsn, "LSN {l} must not be below the last LSN {}", self.last_lsn);
                l
            }
            None => self.last_lsn + 8,
        };
        let txid = txid.unwrap_or(self.next_txid);
        self.last_lsn = lsn;
        self.next_txid = self.next_txid.max(txid + 1);
        (lsn, txid)
    }

    /// Moves `values` out of (or into) position `pos` of the subquery where `where_clause`
    /// and appends the move event for that shape, for a move-in followed by the inserts of
    /// rows that enter the shape and a `snapshot-end`. Returns the offset of the last entry.
    ///
    /// Follows Electric's `consumer/subqueries/move_broadcast.ex` `make` (the event: `event`,
    /// `patterns` of `{pos, value: hash}`, `txids`), `consumer/subqueries/splice_plan.ex`
    /// `build` (the move-in event is followed by the move-in snapshot) and
    /// `consumer/effects.ex` `execute_effect(%AppendMoveInSnapshot{})` (a `snapshot-end`
    /// after a non-empty move-in snapshot). Unlike Electric, which appends control messages
    /// at the next op offset of the shape's last entry, this server gives each move its own
    /// LSN and txid, like the dependency transaction that caused it.
    pub fn move_subquery(
        &mut self,
        key: &TableKey,
        where_clause: &str,
        pos: usize,
        values: &[&str],
        move_in: bool,
    ) -> Offset {
        let (lsn, txid) = self.next_tx(None, None);
        let xmin = self.next_txid;
        let table = self.tables.get_mut(key).expect("table exists");
        let subquery = table
            .subqueries
            .get_mut(where_clause)
            .unwrap_or_else(|| panic!("no subquery where {where_clause:?} is registered"));
        assert!(
            pos < subquery.positions(),
            "position {pos} is not one of the {} positions",
            subquery.positions()
        );
        let before = subquery.clone();
        for v in values {
            if move_in {
                subquery.members[pos].insert(v.to_string());
            } else {
                subquery.members[pos].remove(*v);
            }
        }
        let subquery = subquery.clone();
        let patterns: Vec<serde_json::Value> = values
            .iter()
            .map(|v| serde_json::json!({"pos": pos, "value": crate::subquery::tag_hash(Some(v))}))
            .collect();
        let event = if move_in { "move-in" } else { "move-out" };
        let message = serde_json::json!({"headers": {"event": event, "patterns": patterns, "txids": [txid]}});
        let control = |op: u64, json: String| Entry {
            offset: Offset::new(lsn, op),
            lsn,
            txid,
            kind: EntryKind::Control(json),
            only_for: Some(where_clause.to_string()),
            op: Op::Insert,
            key: String::new(),
            old: None,
            new: None,
            key_change_to: None,
            key_change_from: None,
            meta: HashMap::new(),
        };
        let mut entries = vec![control(0, message.to_string())];
        if move_in && let Data::Stored { rows, .. } = &table.data {
            for (row_key, row) in rows.values() {
                let after = subquery.meta(row);
                if before.meta(row).included || !after.included {
                    continue;
                }
                entries.push(Entry {
                    offset: Offset::new(lsn, entries.len() as u64),
                    lsn,
                    txid,
                    kind: EntryKind::MoveIn,
                    only_for: Some(where_clause.to_string()),
                    op: Op::Insert,
                    key: row_key.clone(),
                    old: None,
                    new: Some(row.clone()),
                    key_change_to: None,
                    key_change_from: None,
                    meta: HashMap::from([(where_clause.to_string(), (None, Some(after)))]),
                });
            }
            if entries.len() > 1 {
                let end = format!(
                    r#"{{"headers":{{"control":"snapshot-end","xmin":"{xmin}","xmax":"{xmin}","xip_list":[]}}}}"#
                );
                entries.push(control(entries.len() as u64, end));
            }
        }
        let last = entries.last().expect("non-empty").offset;
        if let Some(generation) = &mut table.generation {
            generation.log.extend(entries);
        }
        self.bound_log(key);
        last
    }

    /// Applies a scripted transaction and appends its entries to the table's log.
    /// Returns the offset of its last entry.
    pub fn commit(
        &mut self,
        key: &TableKey,
        ops: Vec<ScriptOp>,
        lsn: Option<u64>,
        txid: Option<u64>,
    ) -> Offset {
        assert!(!ops.is_empty(), "a transaction needs at least one operation");
        let (lsn, txid) = self.next_tx(lsn, txid);
        let table = self.tables.get_mut(key).expect("table exists");
        if let Some(last) = table.generation.as_ref().and_then(|g| g.log.last()) {
            // Tables may share an LSN (one transaction's parts), one table's log may not.
            assert!(
                last.lsn < lsn,
                "LSN {lsn} must be above table {}'s last LSN {}",
                table.def.name,
                last.lsn
            );
        }
        let mut entries = Vec::new();
        for (i, op) in ops.into_iter().enumerate() {
            let pos = 2 * i as u64;
            let entry = |op: Op, key: String, old: Option<Row>, new: Option<Row>| Entry {
                offset: Offset::new(lsn, pos),
                lsn,
                txid,
                kind: EntryKind::Change,
                only_for: None,
                op,
                key,
                old,
                new,
                key_change_to: None,
                key_change_from: None,
                meta: HashMap::new(),
            };
            match op {
                ScriptOp::Insert(values) => {
                    let row = match values {
                        Some(v) => table.def.row_from_json(&v),
                        None => table.data.next_synthetic_row(),
                    };
                    let k = table.def.key_of(&row);
                    table.data.insert(&table.def, k.clone(), row.clone());
                    entries.push(entry(Op::Insert, k, None, Some(row)));
                }
                ScriptOp::Update(values) => {
                    let k = table.key_from_fields(&values);
                    let old = table.data.remove(&k);
                    let mut new = old.clone();
                    for (i, v) in table.def.json_fields(&values) {
                        new[i] = v;
                    }
                    table.data.insert(&table.def, k.clone(), new.clone());
                    entries.push(entry(Op::Update, k, Some(old), Some(new)));
                }
                ScriptOp::Delete(values) => {
                    let k = table.key_from_fields(&values);
                    let old = table.data.remove(&k);
                    entries.push(entry(Op::Delete, k, Some(old), None));
                }
                ScriptOp::ChangeKey { old_key, new_values } => {
                    let k = table.key_from_fields(&old_key);
                    let old = table.data.remove(&k);
                    let mut new = old.clone();
                    for (i, v) in table.def.json_fields(&new_values) {
                        new[i] = v;
                    }
                    let new_key = table.def.key_of(&new);
                    table.data.insert(&table.def, new_key.clone(), new.clone());
                    let mut delete = entry(Op::Delete, k.clone(), Some(old), None);
                    delete.key_change_to = Some(new_key.clone());
                    let mut insert = entry(Op::Insert, new_key, None, Some(new));
                    insert.offset = Offset::new(lsn, pos + 1);
                    insert.key_change_from = Some(k);
                    entries.push(delete);
                    entries.push(insert);
                }
            }
        }
        // Tags and active conditions as of this transaction, for every subquery shape.
        for e in &mut entries {
            for (where_clause, subquery) in &table.subqueries {
                let meta =
                    (e.old.as_ref().map(|r| subquery.meta(r)), e.new.as_ref().map(|r| subquery.meta(r)));
                e.meta.insert(where_clause.clone(), meta);
            }
        }
        let last = entries.last().expect("non-empty").offset;
        if let Some(generation) = &mut table.generation {
            generation.log.extend(entries);
        }
        self.bound_log(key);
        last
    }
}

/// One operation of a scripted transaction.
pub(crate) enum ScriptOp {
    /// A full row; `None` = the next generated row of a synthetic table.
    Insert(Option<Json>),
    Update(Json),
    Delete(Json),
    ChangeKey {
        old_key: Json,
        new_values: Json,
    },
}

pub(crate) struct Table {
    pub def: TableDef,
    pub data: Data,
    /// `None` after a truncate until the next `-1`/`now` request creates a new shape.
    pub generation: Option<Generation>,
    pub predicates: HashMap<String, Predicate>,
    /// Subquery wheres with their current members.
    pub subqueries: HashMap<String, SubqueryWhere>,
    /// A `where` without a registered predicate is refused (400) instead of only
    /// affecting the shape's identity.
    pub strict_where: bool,
}

impl Table {
    /// The key of the row whose key columns are given in `values`.
    fn key_from_fields(&self, values: &Json) -> String {
        let mut row = vec![None; self.def.columns.len()];
        for (i, v) in self.def.json_fields(values) {
            row[i] = v;
        }
        self.def.key_of(&row)
    }
}

/// The current rows of a table.
pub(crate) enum Data {
    /// Rows in insertion order (sequence number -> key, row) plus a key index.
    Stored { rows: BTreeMap<u64, (String, Row)>, by_key: HashMap<String, u64>, next_seq: u64 },
    /// Rows `1..=count`, generated from their id (see [`crate::synthetic`]).
    Synthetic { count: u64 },
}

impl Data {
    /// A frozen copy of the current rows.
    pub fn snapshot(&self) -> Snapshot {
        match self {
            Data::Stored { rows, .. } => Snapshot::Rows(Arc::new(rows.values().cloned().collect())),
            Data::Synthetic { count } => Snapshot::Synthetic { count: *count },
        }
    }

    fn insert(&mut self, def: &TableDef, key: String, row: Row) {
        match self {
            Data::Stored { rows, by_key, next_seq } => {
                assert!(!by_key.contains_key(&key), "insert of an existing row {key} in {}", def.name);
                by_key.insert(key.clone(), *next_seq);
                rows.insert(*next_seq, (key, row));
                *next_seq += 1;
            }
            Data::Synthetic { count } => *count += 1,
        }
    }

    fn remove(&mut self, key: &str) -> Row {
        match self {
            Data::Stored { rows, by_key, .. } => {
                let seq = by_key.remove(key).unwrap_or_else(|| panic!("no row with key {key}"));
                rows.remove(&seq).expect("indexed row").1
            }
            Data::Synthetic { .. } => panic!("synthetic tables only support appending generated inserts"),
        }
    }

    fn next_synthetic_row(&self) -> Row {
        match self {
            Data::Synthetic { count } => synthetic::row(count + 1),
            Data::Stored { .. } => panic!("generated inserts need a synthetic table"),
        }
    }
}

/// One shape lineage of a table: what a handle points at.
pub(crate) struct Generation {
    pub id: u64,
    pub snapshot: Snapshot,
    /// Subquery members when the snapshot was taken (the snapshot is rendered with them).
    pub subqueries: HashMap<String, SubqueryWhere>,
    pub log: Vec<Entry>,
    /// Reported as `snapshot-end` xmin/xmax.
    pub xmin: u64,
    /// Rendered snapshot chunks per shape definition; cleared when the snapshot or predicates change.
    pub rendered: Mutex<HashMap<u64, Arc<StoredChunks>>>,
    /// Fixed log chunk boundaries per shape definition and threshold, extended as the log grows.
    pub log_chunks: Mutex<HashMap<u64, LogChunkIndex>>,
}

impl Generation {
    /// Forgets rendered snapshots and log chunk boundaries (after the snapshot or a
    /// shape's filter changed).
    pub fn invalidate(&self) {
        self.rendered.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.log_chunks.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// The rows of a generation's snapshot, frozen at its creation.
#[derive(Clone)]
pub(crate) enum Snapshot {
    Rows(Arc<Vec<(String, Row)>>),
    Synthetic { count: u64 },
}

/// A change in a generation's log, kept with full old/new rows so any shape
/// (columns, replica, where) can render it.
pub(crate) struct Entry {
    pub offset: Offset,
    pub lsn: u64,
    pub txid: u64,
    pub kind: EntryKind,
    /// Move events and move-in rows belong to one subquery shape (`where` string).
    pub only_for: Option<String>,
    pub op: Op,
    pub key: String,
    pub old: Option<Row>,
    pub new: Option<Row>,
    pub key_change_to: Option<String>,
    pub key_change_from: Option<String>,
    /// Per subquery where: the (old, new) row's metadata when the entry was written.
    pub meta: HashMap<String, (Option<RowMeta>, Option<RowMeta>)>,
}

/// What a log entry is.
pub(crate) enum EntryKind {
    /// A change of a transaction.
    Change,
    /// A pre-rendered control message (move event or `snapshot-end`).
    Control(String),
    /// A row of a move-in snapshot: an insert with `is_move_in`, no transaction headers.
    MoveIn,
}

/// The operation of a log entry.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Op {
    Insert,
    Update,
    Delete,
}
