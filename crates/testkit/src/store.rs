//! The scripted data: tables, their current rows, shape generations (handles) and logs.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value as Json;
use shapesync_core::Offset;

use crate::shape::StoredChunks;
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
}

impl State {
    pub fn new() -> Self {
        State { tables: HashMap::new(), last_lsn: 24_008_176, next_txid: 751, last_generation_id: 0 }
    }

    /// A fresh generation id: unix µs, strictly increasing, so handles are never reused.
    fn next_generation_id(&mut self) -> u64 {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0);
        self.last_generation_id = now.max(self.last_generation_id + 1);
        self.last_generation_id
    }

    /// Starts a new generation of `table` whose snapshot is its current rows.
    pub fn new_generation(&mut self, key: &TableKey) {
        let id = self.next_generation_id();
        let xmin = self.next_txid;
        let table = self.tables.get_mut(key).expect("table exists");
        let snapshot = table.data.snapshot();
        table.generation =
            Some(Generation { id, snapshot, log: Vec::new(), xmin, rendered: Mutex::default() });
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
        let lsn = match lsn {
            Some(l) => {
                assert!(l > self.last_lsn, "LSN {l} must be above the last LSN {}", self.last_lsn);
                l
            }
            None => self.last_lsn + 8,
        };
        let txid = txid.unwrap_or(self.next_txid);
        self.last_lsn = lsn;
        self.next_txid = self.next_txid.max(txid + 1);
        let table = self.tables.get_mut(key).expect("table exists");
        let mut entries = Vec::new();
        for (i, op) in ops.into_iter().enumerate() {
            let pos = 2 * i as u64;
            let entry = |op: Op, key: String, old: Option<Row>, new: Option<Row>| Entry {
                offset: Offset::new(lsn, pos),
                lsn,
                txid,
                op,
                key,
                old,
                new,
                key_change_to: None,
                key_change_from: None,
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
        let last = entries.last().expect("non-empty").offset;
        if let Some(generation) = &mut table.generation {
            generation.log.extend(entries);
        }
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
    pub log: Vec<Entry>,
    /// Reported as `snapshot-end` xmin/xmax.
    pub xmin: u64,
    /// Rendered snapshot chunks per shape definition; cleared when the snapshot or predicates change.
    pub rendered: Mutex<HashMap<u64, Arc<StoredChunks>>>,
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
    pub op: Op,
    pub key: String,
    pub old: Option<Row>,
    pub new: Option<Row>,
    pub key_change_to: Option<String>,
    pub key_change_from: Option<String>,
}

/// The operation of a log entry.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Op {
    Insert,
    Update,
    Delete,
}
