//! Test-side handles for scripting tables: seed rows, append transactions, rotate, truncate.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::Value as Json;
use shapesync_core::Offset;

use crate::server::{ShapeServer, Shared};
use crate::shape::ShapeDef;
use crate::store::{Data, ScriptOp, Table, TableKey};
use crate::subquery::SubqueryWhere;
use crate::synthetic::synthetic_table_def;
use crate::table::{RowView, TableDef};

impl ShapeServer {
    /// Creates (or replaces) a table with no rows and an initial shape handle.
    pub fn create_table(&self, def: TableDef) -> TableHandle {
        let data = Data::Stored { rows: BTreeMap::new(), by_key: HashMap::new(), next_seq: 0 };
        self.add_table(def, data)
    }

    /// Creates (or replaces) a table holding `rows` from the start (see
    /// [`Tables::create_seeded_table`]).
    pub fn create_seeded_table(&self, def: TableDef, rows: impl IntoIterator<Item = Json>) -> TableHandle {
        self.tables().create_seeded_table(def, rows)
    }

    /// A handle that creates tables, usable apart from the server (cheap to clone).
    pub fn tables(&self) -> Tables {
        Tables { shared: self.shared.clone() }
    }

    /// Creates a synthetic benchmark table of `rows` generated rows (ids `1..=rows`, columns
    /// `id int8, title text, amount numeric, flag bool, tags text[], data jsonb`). Its snapshot
    /// chunks are generated on demand, so memory does not grow with `rows`.
    pub fn create_synthetic_table(&self, name: &str, rows: u64) -> TableHandle {
        self.add_table(synthetic_table_def(name), Data::Synthetic { count: rows })
    }

    fn add_table(&self, def: TableDef, data: Data) -> TableHandle {
        self.tables().add_table(def, data)
    }
}

/// Creates tables of a [`ShapeServer`] from anywhere (the devserver's follower reloads a
/// table whose columns changed); cheap to clone.
#[derive(Clone)]
pub struct Tables {
    shared: Arc<Shared>,
}

impl Tables {
    /// Creates (or replaces) a table holding `rows` from the start, in one step, so no
    /// request ever sees it empty: a new shape handle whose snapshot is those rows
    /// (requests with an older handle of a replaced table get 409). Rows with the key of
    /// an earlier one (identical rows of a table without a primary key, keyed by all
    /// columns as Electric does) are kept once.
    pub fn create_seeded_table(&self, def: TableDef, rows: impl IntoIterator<Item = Json>) -> TableHandle {
        let (mut stored, mut by_key, mut next_seq) = (BTreeMap::new(), HashMap::new(), 0u64);
        for values in rows {
            let row = def.row_from_json(&values);
            let key = def.key_of(&row);
            if by_key.contains_key(&key) {
                continue;
            }
            by_key.insert(key.clone(), next_seq);
            stored.insert(next_seq, (key, row));
            next_seq += 1;
        }
        self.add_table(def, Data::Stored { rows: stored, by_key, next_seq })
    }

    fn add_table(&self, def: TableDef, data: Data) -> TableHandle {
        let key: TableKey = (def.schema.clone(), def.name.clone());
        let mut state = self.shared.state();
        state.tables.insert(
            key.clone(),
            Table {
                def,
                data,
                generation: None,
                predicates: HashMap::new(),
                subqueries: HashMap::new(),
                strict_where: false,
            },
        );
        state.new_generation(&key);
        drop(state);
        self.shared.notify();
        TableHandle { shared: self.shared.clone(), key }
    }
}

/// Scripts one table of a [`ShapeServer`]. Cheap to clone; usable from any thread.
///
/// Values are JSON objects of column name -> Postgres text string or `null` (the wire format),
/// e.g. `json!({"id": "1", "title": "a", "tags": "{x,y}"})`.
///
/// # Panics
/// Methods panic on scripting mistakes (unknown column, non-string value, insert of an
/// existing key, update/delete of a missing key, LSN not increasing).
#[derive(Clone)]
pub struct TableHandle {
    shared: Arc<Shared>,
    key: TableKey,
}

impl TableHandle {
    /// Adds rows that exist "before the shape was created": they become part of the current
    /// handle's snapshot, not the log. Seed before clients fetch the snapshot.
    pub fn seed(&self, rows: impl IntoIterator<Item = Json>) {
        let mut state = self.shared.state();
        let table = state.tables.get_mut(&self.key).expect("table exists");
        for values in rows {
            let row = table.def.row_from_json(&values);
            let key = table.def.key_of(&row);
            let Data::Stored { rows, by_key, next_seq } = &mut table.data else {
                panic!("seed() needs a table made by create_table");
            };
            assert!(!by_key.contains_key(&key), "seed of an existing row {key}");
            by_key.insert(key.clone(), *next_seq);
            rows.insert(*next_seq, (key, row));
            *next_seq += 1;
        }
        let snapshot = table.data.snapshot();
        if let Some(generation) = &mut table.generation {
            assert!(generation.log.is_empty(), "seed() after transactions were appended; use a transaction");
            // Same handle: seeding only fills the snapshot of the existing shape.
            generation.snapshot = snapshot;
            generation.invalidate();
        }
    }

    /// Starts a transaction; add operations and [`Transaction::commit`] it.
    pub fn transaction(&self) -> Transaction {
        Transaction { table: self.clone(), ops: Vec::new(), lsn: None, txid: None }
    }

    /// Appends a one-insert transaction; returns its offset.
    pub fn insert(&self, row: Json) -> Offset {
        self.transaction().insert(row).commit()
    }

    /// Appends a one-update transaction (`values` = PK plus the columns to change).
    pub fn update(&self, values: Json) -> Offset {
        self.transaction().update(values).commit()
    }

    /// Appends a one-delete transaction (`pk` = the primary key columns).
    pub fn delete(&self, pk: Json) -> Offset {
        self.transaction().delete(pk).commit()
    }

    /// Synthetic tables: appends a transaction inserting the next generated row.
    pub fn append_generated(&self) -> Offset {
        let offset = self.shared.state().commit(&self.key, vec![ScriptOp::Insert(None)], None, None);
        self.shared.notify();
        offset
    }

    /// Rotates the shape: a new handle whose snapshot is the current rows. Requests with the
    /// old handle and pending live requests get 409 with the new handle.
    pub fn rotate(&self) {
        self.shared.state().new_generation(&self.key);
        self.shared.notify();
    }

    /// The table is gone (dropped in Postgres): pending live requests end, and every
    /// request for it gets the 400 of a table that does not exist.
    pub fn remove(&self) {
        self.shared.state().tables.remove(&self.key);
        self.shared.notify();
    }

    /// Like a Postgres TRUNCATE: all rows go and the shape is removed. Pending live requests
    /// and requests with the old handle get 409 **without** a handle; the next `offset=-1`
    /// creates a new handle with an empty snapshot (plus rows inserted since).
    pub fn truncate(&self) {
        let mut state = self.shared.state();
        let table = state.tables.get_mut(&self.key).expect("table exists");
        match &mut table.data {
            Data::Stored { rows, by_key, .. } => {
                rows.clear();
                by_key.clear();
            }
            Data::Synthetic { count } => *count = 0,
        }
        table.generation = None;
        drop(state);
        self.shared.notify();
    }

    /// Makes shapes with `where=<where_clause>` (exact string) filter rows with `predicate`:
    /// snapshot rows are filtered and updates that cross the filter become inserts (move-in)
    /// or deletes (move-out). Without a registered predicate a `where` only affects identity.
    pub fn register_where(
        &self,
        where_clause: impl Into<String>,
        predicate: impl Fn(&RowView<'_>) -> bool + Send + Sync + 'static,
    ) {
        let mut state = self.shared.state();
        let table = state.tables.get_mut(&self.key).expect("table exists");
        let where_clause = where_clause.into();
        table.subqueries.remove(&where_clause);
        table.predicates.insert(where_clause, Arc::new(predicate));
        if let Some(generation) = &table.generation {
            generation.invalidate();
        }
    }

    /// Makes shapes with `where=<where_clause>` (exact string) behave like an Electric shape
    /// whose `where` is a disjunction of subquery tests, one per position:
    /// `positions[0] IN (subquery 0) OR positions[1] IN (subquery 1) OR …`. A row is in the
    /// shape iff, for some position `p`, its `positions[p]` column value is in `members[p]`
    /// (NULL never is). `members[p]` are the values the subquery returns initially; change
    /// them with [`TableHandle::move_out`] / [`TableHandle::move_in`].
    ///
    /// Messages of the shape carry `headers.tags` (one per position: with one position a
    /// flat `"<hash>"`, with several `"<hash>//"`, `"/<hash>/"`, …, `/`-separated slots with the
    /// slot of its own position filled) and `headers.active_conditions` (one bool per
    /// position: is the row's value currently a member). Slot values are [`crate::tag_hash`]
    /// of the row's column value. Register before the shape's first transaction: log
    /// entries get their tags when they are committed.
    ///
    /// # Panics
    /// On an unknown column or `members.len() != positions.len()`.
    pub fn register_subquery_where(&self, where_clause: &str, positions: &[&str], members: &[&[&str]]) {
        let disjuncts: Vec<Vec<usize>> = (0..positions.len()).map(|p| vec![p]).collect();
        let disjuncts: Vec<&[usize]> = disjuncts.iter().map(Vec::as_slice).collect();
        self.register_subquery_dnf(where_clause, positions, &disjuncts, members);
    }

    /// Like [`TableHandle::register_subquery_where`] but the positions form ONE disjunct, a
    /// conjunction: `positions[0] IN (subquery 0) AND positions[1] IN (subquery 1) …`. A row
    /// is in the shape iff every position is active; its single tag has a slot per position,
    /// e.g. `"<hash a>/<hash b>"`.
    pub fn register_subquery_where_all(&self, where_clause: &str, positions: &[&str], members: &[&[&str]]) {
        let all: Vec<usize> = (0..positions.len()).collect();
        self.register_subquery_dnf(where_clause, positions, &[&all], members);
    }

    /// The general form: `positions` are the DNF positions (column tested by each),
    /// `disjuncts` lists the positions of each disjunct (the `where` is the OR of the ANDs
    /// of its disjuncts), `members[p]` the initial values of position `p`'s subquery. Tags
    /// have one string per disjunct with a slot per position, empty for positions outside
    /// the disjunct (Electric `shapes/shape.ex` `compute_tags`).
    ///
    /// # Panics
    /// On an unknown column, a position out of range, an empty disjunct, or
    /// `members.len() != positions.len()`.
    pub fn register_subquery_dnf(
        &self,
        where_clause: &str,
        positions: &[&str],
        disjuncts: &[&[usize]],
        members: &[&[&str]],
    ) {
        let mut state = self.shared.state();
        let table = state.tables.get_mut(&self.key).expect("table exists");
        let subquery = SubqueryWhere::new(&table.def, positions, disjuncts, members);
        table.predicates.remove(where_clause);
        table.subqueries.insert(where_clause.to_string(), subquery.clone());
        if let Some(generation) = &mut table.generation {
            generation.subqueries.insert(where_clause.to_string(), subquery);
            generation.invalidate();
        }
    }

    /// `values` leave the subquery of position `pos` of the subquery where `where_clause`.
    /// Appends, at a new LSN and txid, the event
    /// `{"headers":{"event":"move-out","patterns":[{"pos":pos,"value":tag_hash(v)}…],"txids":[txid]}}`
    /// to that shape's log and nothing else: no deletes (clients drop rows whose
    /// tags/active conditions no longer hold). Returns the event's offset.
    ///
    /// # Panics
    /// If `where_clause` is not a registered subquery where or `pos` is out of range.
    pub fn move_out(&self, where_clause: &str, pos: usize, values: &[&str]) -> Offset {
        let offset = self.shared.state().move_subquery(&self.key, where_clause, pos, values, false);
        self.shared.notify();
        offset
    }

    /// `values` enter the subquery of position `pos`. Appends, at a new LSN and txid (op
    /// positions 0, 1, …), the `move-in` event (same form as [`TableHandle::move_out`]),
    /// then one insert per row that was not in the shape and now is (headers `operation`,
    /// `relation`, `is_move_in: true`, `tags`, `active_conditions`; full row as value), then
    /// a `snapshot-end` control message if there was any such row. Rows already in the
    /// shape get nothing: clients flip their active conditions from the event. Returns the
    /// offset of the last entry.
    ///
    /// # Panics
    /// As [`TableHandle::move_out`].
    pub fn move_in(&self, where_clause: &str, pos: usize, values: &[&str]) -> Offset {
        let offset = self.shared.state().move_subquery(&self.key, where_clause, pos, values, true);
        self.shared.notify();
        offset
    }

    /// Refuses (400, naming `where`) shapes whose `where` has no registered predicate, as
    /// a server that cannot evaluate SQL must, instead of serving every row.
    pub fn refuse_unregistered_where(&self) {
        let mut state = self.shared.state();
        state.tables.get_mut(&self.key).expect("table exists").strict_where = true;
    }

    /// The current handle of the plain shape (`table` only: all columns, no `where`,
    /// `replica=default`, `log=full`); `None` after [`TableHandle::truncate`] until the next `-1`.
    pub fn handle(&self) -> Option<String> {
        let def = ShapeDef {
            table: self.key.clone(),
            where_clause: None,
            params: Vec::new(),
            columns: None,
            replica_full: false,
            changes_only: false,
        };
        let state = self.shared.state();
        state.tables[&self.key].generation.as_ref().map(|g| def.handle(g.id))
    }

    /// The LSN the next transaction without an explicit [`Transaction::lsn`] gets.
    pub fn next_lsn(&self) -> u64 {
        self.shared.state().last_lsn + 8
    }
}

/// A transaction being scripted. Operations get op positions 0, 2, 4, …; a key change takes
/// two (delete with `key_change_to` at X, insert with `key_change_from` at X+1).
#[must_use = "a transaction does nothing until commit()"]
pub struct Transaction {
    table: TableHandle,
    ops: Vec<ScriptOp>,
    lsn: Option<u64>,
    txid: Option<u64>,
}

impl Transaction {
    /// Inserts a full row (missing columns are NULL).
    pub fn insert(mut self, row: Json) -> Self {
        self.ops.push(ScriptOp::Insert(Some(row)));
        self
    }

    /// Updates the row identified by the PK columns in `values`, setting the other given columns.
    pub fn update(mut self, values: Json) -> Self {
        self.ops.push(ScriptOp::Update(values));
        self
    }

    /// Deletes the row identified by the PK columns in `pk`.
    pub fn delete(mut self, pk: Json) -> Self {
        self.ops.push(ScriptOp::Delete(pk));
        self
    }

    /// Updates the row with primary key `old_pk`, changing its key (and any other columns) to
    /// `new_values`.
    pub fn change_key(mut self, old_pk: Json, new_values: Json) -> Self {
        self.ops.push(ScriptOp::ChangeKey { old_key: old_pk, new_values });
        self
    }

    /// Uses this commit LSN (must exceed every earlier one) instead of the next assigned one.
    pub fn lsn(mut self, lsn: u64) -> Self {
        self.lsn = Some(lsn);
        self
    }

    /// Uses this txid in `headers.txids`.
    pub fn txid(mut self, txid: u64) -> Self {
        self.txid = Some(txid);
        self
    }

    /// Applies the transaction, appends it to the log, wakes live requests, and returns the
    /// offset of its last entry (`<lsn>_<op>`).
    pub fn commit(self) -> Offset {
        let shared = &self.table.shared;
        let offset = shared.state().commit(&self.table.key, self.ops, self.lsn, self.txid);
        shared.notify();
        offset
    }
}
