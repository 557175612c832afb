//! Move-in / move-out for shapes whose `where` has subqueries.
//!
//! When a row leaves such a shape because a *dependency* changed (the project it
//! belongs to was archived, say), Electric sends no delete. It sends one event,
//! `{"headers":{"event":"move-out","patterns":[{"pos":0,"value":"<hash>"}]}}`, and
//! expects the client to know which rows carried that tag. The [`TagTracker`] is that
//! knowledge: it indexes the `tags` / `active_conditions` every change carries and
//! turns each move-out into ordinary deletes, in log order, inside the response that
//! carried it. Sinks and the runner see only inserts, updates and deletes.
//!
//! The semantics follow the server's own materializer
//! (`packages/sync-service/lib/electric/shapes/consumer/materializer.ex`:
//! `add_row_to_tag_indices`, `process_move_event`, `evaluate_inclusion`) and the
//! official Elixir client (`packages/elixir-client/lib/electric/client/tag_tracker.ex`:
//! `generate_synthetic_deletes`, `handle_move_in`):
//! - a tag is one disjunct of the shape's `where` in DNF; its `/`-separated slots are
//!   positions, an empty slot is a position that disjunct does not use;
//! - with `active_conditions`, a move-out sets the matched positions to false, a
//!   move-in to true, and a row stays while some disjunct has all its positions active;
//! - without them (older servers, flat tags), a disjunct dies when one of its slots
//!   moves out and the row goes when no disjunct is left (for one flat tag, the row
//!   goes: the materializer's "no DNF, move-out: remove row entirely"); a move-in
//!   changes nothing: the rows it brings arrive as inserts.
//!
//! The index lives only in memory, so after a restart it knows nothing of the rows
//! synced before. A move-out then cannot be resolved, and the stream refetches the
//! shape instead (see [`Resolution::Unknown`]): exact, at the cost of one resync.
//! `docs/ARCHITECTURE.md` records why the index is not stored in the sinks.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use shapesync_core::{Change, Operation, Row, Schema};

/// The tag headers of one change message (`tags`, `removed_tags`, `active_conditions`).
#[derive(Debug, Default, PartialEq)]
pub(crate) struct TagHeaders {
    /// The row's tags after the change: one per disjunct.
    pub tags: Vec<String>,
    /// Tags an update removed (informative: `tags` is the full new set).
    pub removed_tags: Vec<String>,
    /// Which positions of the `where` the row currently satisfies.
    pub active_conditions: Option<Vec<bool>>,
}

/// One `{pos, value}` of a move event: position `pos` of the shape's `where`, for the
/// dependency value whose hash is `value`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct MovePattern {
    /// The position in the `where`'s DNF.
    pub pos: u16,
    /// The hashed dependency value, as tags carry it.
    pub value: String,
}

/// A move event.
#[derive(Debug, PartialEq)]
pub(crate) struct MoveEvent {
    /// `move-out` (true) or `move-in` (false).
    pub out: bool,
    /// What moved.
    pub patterns: Vec<MovePattern>,
}

/// Something a body held besides plain changes, at a place in its change list.
#[derive(Debug, PartialEq)]
pub(crate) enum Mark {
    /// The tag headers of the change at this index.
    Tags(TagHeaders),
    /// A move event, placed before the change at this index (or after the last one).
    Move(MoveEvent),
}

/// What the tracker made of a response.
#[derive(Debug, PartialEq)]
pub(crate) enum Resolution {
    /// The changes (with any move-outs turned into deletes) are exact.
    Resolved,
    /// A move-out arrived while the index does not cover the rows synced before this
    /// stream started (a resume): which rows it removes is unknown. Refetch the shape.
    Unknown,
}

/// A slot of a tag: (position, interned dependency-value hash).
type Slot = (u16, Arc<str>);

/// What the index keeps per tagged row.
#[derive(Debug)]
struct Tagged {
    /// One entry per tag (disjunct), each the non-empty slots of that tag.
    disjuncts: Vec<Box<[Slot]>>,
    /// `active_conditions`, when the server sends them.
    active: Option<Box<[bool]>>,
    /// The key columns, for the delete a move-out becomes.
    key_columns: Row,
}

impl Tagged {
    /// A row is in the shape while some disjunct has every position active
    /// (materializer.ex `evaluate_inclusion`: a missing position counts as active).
    fn is_included(&self) -> bool {
        let Some(active) = &self.active else { return !self.disjuncts.is_empty() };
        self.disjuncts.is_empty()
            || self
                .disjuncts
                .iter()
                .any(|d| d.iter().all(|(pos, _)| active.get(usize::from(*pos)).copied().unwrap_or(true)))
    }
}

/// The per-stream index of tagged rows.
#[derive(Debug, Default)]
pub(crate) struct TagTracker {
    rows: HashMap<Box<str>, Tagged>,
    /// Interned slot values: most rows share a few dependency values.
    values: HashSet<Arc<str>>,
    /// Size of `values` after the last purge of unused ones.
    values_after_purge: usize,
    /// The index covers every row the consumer holds: the stream started at `-1`
    /// (or at `now` with nothing held) rather than resuming.
    complete: bool,
}

impl TagTracker {
    /// An empty index; `complete` says whether it covers all rows the consumer holds.
    pub fn new(complete: bool) -> Self {
        TagTracker { complete, ..TagTracker::default() }
    }

    /// Forgets everything (a reset or a resume).
    pub fn reset(&mut self, complete: bool) {
        *self = TagTracker::new(complete);
    }

    /// Tagged rows indexed.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Applies a response's marks to the index and turns its move-outs into deletes of
    /// the rows that left the shape, placed where the events were.
    pub fn apply(
        &mut self,
        changes: &mut Vec<Change>,
        marks: Vec<(usize, Mark)>,
        schema: &Schema,
    ) -> Resolution {
        if marks.is_empty() && self.rows.is_empty() {
            return Resolution::Resolved; // no subqueries: the common case costs nothing
        }
        let key_columns = schema.primary_key();
        let mut marks = marks.into_iter().peekable();
        let input = std::mem::take(changes);
        let total = input.len();
        let mut input = input.into_iter();
        let mut out = Vec::with_capacity(total);
        for index in 0..=total {
            let mut headers = None;
            while let Some((_, mark)) = marks.next_if(|(at, _)| *at <= index) {
                match mark {
                    Mark::Tags(h) => headers = Some(h),
                    Mark::Move(event) => {
                        if event.out && !self.complete {
                            return Resolution::Unknown;
                        }
                        out.extend(self.on_move(&event));
                    }
                }
            }
            let Some(change) = input.next() else { break };
            self.on_change(&change, headers, &key_columns);
            out.push(change);
        }
        *changes = out;
        self.purge_values();
        Resolution::Resolved
    }

    fn on_change(&mut self, change: &Change, headers: Option<TagHeaders>, key_columns: &[&str]) {
        let key = change.key.as_str();
        match change.op {
            Operation::Delete => {
                self.rows.remove(key);
            }
            Operation::Insert | Operation::Update => {
                let Some(h) = headers else {
                    if change.op == Operation::Insert {
                        self.rows.remove(key); // a row re-inserted without tags is untagged
                    }
                    return;
                };
                let disjuncts = (!h.tags.is_empty()).then(|| self.disjuncts(&h.tags));
                let active = h.active_conditions.map(Vec::into_boxed_slice);
                match self.rows.get_mut(key) {
                    Some(row) => {
                        // materializer.ex: new tags replace the old when sent, as do
                        // active_conditions; otherwise the row keeps its own.
                        if let Some(d) = disjuncts {
                            row.disjuncts = d;
                        } else if !h.removed_tags.is_empty() {
                            row.disjuncts.clear();
                        }
                        if let Some(a) = active {
                            row.active = Some(a);
                        }
                        if change.op == Operation::Insert {
                            row.key_columns = pick(&change.value, key_columns);
                        }
                        if row.disjuncts.is_empty() {
                            self.rows.remove(key);
                        }
                    }
                    None => {
                        let Some(disjuncts) = disjuncts else { return };
                        let tagged =
                            Tagged { disjuncts, active, key_columns: pick(&change.value, key_columns) };
                        self.rows.insert(key.into(), tagged);
                    }
                }
            }
        }
    }

    /// Applies a move event; returns the deletes of rows that left the shape.
    fn on_move(&mut self, event: &MoveEvent) -> Vec<Change> {
        let moved: HashSet<(u16, &str)> = event.patterns.iter().map(|p| (p.pos, p.value.as_str())).collect();
        let mut gone = Vec::new();
        // A scan, not a reverse index: move events are rare next to changes, and a
        // (position, value) → keys map would double the index's memory.
        for (key, row) in &mut self.rows {
            let hit = |slot: &Slot| moved.contains(&(slot.0, &*slot.1));
            if !row.disjuncts.iter().any(|d| d.iter().any(hit)) {
                continue;
            }
            match &mut row.active {
                Some(active) => {
                    for (pos, _) in row.disjuncts.iter().flat_map(|d| d.iter()).filter(|s| hit(s)) {
                        if let Some(flag) = active.get_mut(usize::from(*pos)) {
                            *flag = !event.out;
                        }
                    }
                }
                None if event.out => row.disjuncts.retain(|d| !d.iter().any(hit)),
                None => {}
            }
            if event.out && !row.is_included() {
                gone.push(key.clone());
            }
        }
        gone.into_iter()
            .filter_map(|key| {
                let row = self.rows.remove(&key)?;
                Some(Change::delete(String::from(key), row.key_columns))
            })
            .collect()
    }

    /// Parses tags (`"h1/h2"`, `"h1/"`, `"/h2"`, flat `"h"`) into interned slots.
    fn disjuncts(&mut self, tags: &[String]) -> Vec<Box<[Slot]>> {
        tags.iter()
            .map(|tag| {
                tag.split('/')
                    .enumerate()
                    .filter(|(_, v)| !v.is_empty())
                    .map(|(pos, v)| (u16::try_from(pos).unwrap_or(u16::MAX), self.intern(v)))
                    .collect()
            })
            .collect()
    }

    fn intern(&mut self, value: &str) -> Arc<str> {
        if let Some(v) = self.values.get(value) {
            return v.clone();
        }
        let v: Arc<str> = value.into();
        self.values.insert(v.clone());
        v
    }

    /// Drops interned values no row uses any more, once the set has doubled.
    fn purge_values(&mut self) {
        if self.values.len() > 1024 && self.values.len() > 2 * self.values_after_purge {
            self.values.retain(|v| Arc::strong_count(v) > 1);
            self.values_after_purge = self.values.len();
        }
    }
}

/// The key columns of a row (all of it when the table has no primary key).
fn pick(value: &Row, key_columns: &[&str]) -> Row {
    if key_columns.is_empty() {
        return value.clone();
    }
    let mut row = Row::with_capacity(key_columns.len());
    for (name, v) in value.iter().filter(|(name, _)| key_columns.contains(name)) {
        row.insert(Arc::<str>::from(name), v.clone());
    }
    row
}

#[cfg(test)]
mod tests {
    use shapesync_core::Value;

    use super::*;

    fn schema() -> Schema {
        serde_json::from_str(r#"{"id":{"type":"int8","pk_index":0},"p":{"type":"text"}}"#).unwrap()
    }

    fn insert(id: i64) -> Change {
        let mut row = Row::new();
        row.insert(Arc::<str>::from("id"), Value::Int(id));
        row.insert(Arc::<str>::from("p"), Value::Text("x".into()));
        Change::insert(format!("k{id}"), row)
    }

    fn tags(tags: &[&str], active: Option<&[bool]>) -> Mark {
        Mark::Tags(TagHeaders {
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            removed_tags: Vec::new(),
            active_conditions: active.map(<[bool]>::to_vec),
        })
    }

    fn moved(out: bool, patterns: &[(u16, &str)]) -> Mark {
        Mark::Move(MoveEvent {
            out,
            patterns: patterns
                .iter()
                .map(|(pos, v)| MovePattern { pos: *pos, value: (*v).to_owned() })
                .collect(),
        })
    }

    fn run(t: &mut TagTracker, changes: Vec<Change>, marks: Vec<(usize, Mark)>) -> (Resolution, Vec<String>) {
        let mut changes = changes;
        let r = t.apply(&mut changes, marks, &schema());
        let ops = changes.iter().map(|c| format!("{}:{}", c.op.as_str(), c.key)).collect();
        (r, ops)
    }

    #[test]
    fn untagged_shapes_pass_through_untouched() {
        let mut t = TagTracker::new(true);
        let (r, ops) = run(&mut t, vec![insert(1), insert(2)], vec![]);
        assert_eq!(r, Resolution::Resolved);
        assert_eq!(ops, ["insert:k1", "insert:k2"]);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn a_move_out_deletes_the_rows_with_that_tag_where_it_happened() {
        let mut t = TagTracker::new(true);
        let (_, ops) = run(
            &mut t,
            vec![insert(1), insert(2), insert(3)],
            vec![
                (0, tags(&["a"], None)),
                (1, tags(&["b"], None)),
                (2, moved(true, &[(0, "a")])),
                (2, tags(&["a"], None)),
            ],
        );
        // k1 left at the event; k3 (tag a) arrived after it and stays.
        assert_eq!(ops, ["insert:k1", "insert:k2", "delete:k1", "insert:k3"]);
        let (_, mut ops) = run(&mut t, vec![], vec![(0, moved(true, &[(0, "a"), (0, "b")]))]);
        ops.sort();
        assert_eq!(ops, ["delete:k2", "delete:k3"]);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn the_delete_carries_the_key_columns() {
        let mut t = TagTracker::new(true);
        run(&mut t, vec![insert(7)], vec![(0, tags(&["a"], None))]);
        let mut changes = Vec::new();
        t.apply(&mut changes, vec![(0, moved(true, &[(0, "a")]))], &schema());
        assert_eq!(changes[0].op, Operation::Delete);
        assert_eq!(changes[0].value.get("id"), Some(&Value::Int(7)));
        assert_eq!(changes[0].value.get("p"), None);
    }

    #[test]
    fn with_active_conditions_a_row_stays_while_another_disjunct_holds() {
        let mut t = TagTracker::new(true);
        // where a IN (..) OR b IN (..): tags "ha/" and "/hb", both active.
        run(&mut t, vec![insert(1)], vec![(0, tags(&["ha/", "/hb"], Some(&[true, true])))]);
        let (_, ops) = run(&mut t, vec![], vec![(0, moved(true, &[(0, "ha")]))]);
        assert!(ops.is_empty(), "still in through b: {ops:?}");
        // b moves in again (no-op: already active), then b moves out: gone.
        let (_, ops) =
            run(&mut t, vec![], vec![(0, moved(false, &[(1, "hb")])), (0, moved(true, &[(1, "hb")]))]);
        assert_eq!(ops, ["delete:k1"]);
    }

    #[test]
    fn a_move_in_reactivates_a_position_so_a_later_move_out_keeps_the_row() {
        let mut t = TagTracker::new(true);
        run(&mut t, vec![insert(1)], vec![(0, tags(&["ha/", "/hb"], Some(&[true, false])))]);
        let (_, ops) =
            run(&mut t, vec![], vec![(0, moved(false, &[(1, "hb")])), (0, moved(true, &[(0, "ha")]))]);
        assert!(ops.is_empty(), "{ops:?}");
    }

    #[test]
    fn composite_tags_need_every_slot() {
        let mut t = TagTracker::new(true);
        // where a IN (..) AND b IN (..): one disjunct with two slots.
        run(
            &mut t,
            vec![insert(1), insert(2)],
            vec![(0, tags(&["ha/hb"], Some(&[true, true]))), (1, tags(&["ha/hc"], Some(&[true, true])))],
        );
        let (_, ops) = run(&mut t, vec![], vec![(0, moved(true, &[(1, "hb")]))]);
        assert_eq!(ops, ["delete:k1"]);
        // Without active_conditions the disjunct dies with either slot as well.
        let mut t = TagTracker::new(true);
        run(&mut t, vec![insert(1)], vec![(0, tags(&["ha/hb"], None))]);
        assert_eq!(run(&mut t, vec![], vec![(0, moved(true, &[(0, "ha")]))]).1, ["delete:k1"]);
    }

    #[test]
    fn flat_tags_without_conditions_keep_a_row_while_another_tag_remains() {
        let mut t = TagTracker::new(true);
        run(&mut t, vec![insert(1)], vec![(0, tags(&["a", "b"], None))]);
        assert!(run(&mut t, vec![], vec![(0, moved(true, &[(0, "a")]))]).1.is_empty());
        assert_eq!(run(&mut t, vec![], vec![(0, moved(true, &[(0, "b")]))]).1, ["delete:k1"]);
    }

    #[test]
    fn updates_replace_tags_and_deletes_forget_rows() {
        let mut t = TagTracker::new(true);
        run(&mut t, vec![insert(1), insert(2)], vec![(0, tags(&["a"], None)), (1, tags(&["a"], None))]);
        let mut update = insert(1);
        update.op = Operation::Update;
        let mut delete = insert(2);
        delete.op = Operation::Delete;
        let marks = vec![
            (
                0,
                Mark::Tags(TagHeaders {
                    tags: vec!["b".into()],
                    removed_tags: vec!["a".into()],
                    active_conditions: None,
                }),
            ),
            (1, tags(&["a"], None)),
        ];
        run(&mut t, vec![update, delete], marks);
        assert!(run(&mut t, vec![], vec![(0, moved(true, &[(0, "a")]))]).1.is_empty());
        assert_eq!(run(&mut t, vec![], vec![(0, moved(true, &[(0, "b")]))]).1, ["delete:k1"]);
    }

    #[test]
    fn after_a_resume_a_move_out_is_unknown_but_a_move_in_is_not() {
        let mut t = TagTracker::new(false);
        assert_eq!(run(&mut t, vec![], vec![(0, moved(false, &[(0, "a")]))]).0, Resolution::Resolved);
        assert_eq!(
            run(&mut t, vec![insert(1)], vec![(0, tags(&["a"], None)), (1, moved(true, &[(0, "a")]))]).0,
            Resolution::Unknown
        );
    }

    #[test]
    fn unused_values_are_purged() {
        let mut t = TagTracker::new(true);
        for i in 0..3000 {
            run(&mut t, vec![insert(i)], vec![(0, tags(&[&format!("v{i}")], None))]);
            let mut delete = insert(i);
            delete.op = Operation::Delete;
            run(&mut t, vec![delete], vec![]);
        }
        assert!(t.values.len() <= 2048, "{}", t.values.len());
    }
}
