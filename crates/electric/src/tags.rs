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
use std::hash::BuildHasher;

use hashbrown::{DefaultHashBuilder, HashTable};
use shapesync_core::{Change, Operation, Row, Schema, Value};
use smallvec::SmallVec;

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

/// One slot of a tag: the disjunct it belongs to, its position in the `where`, and the
/// interned id of its dependency-value hash. Eight bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    disjunct: u8,
    pos: u8,
    value: u32,
}

/// `active_conditions` as bits; `len == 0` when the server sent none.
#[derive(Clone, Copy, Debug, Default)]
struct Conditions {
    bits: u64,
    len: u8,
}

impl Conditions {
    fn get(self, pos: u8) -> bool {
        pos >= self.len || self.bits & (1 << pos) != 0
    }

    fn set(&mut self, pos: u8, on: bool) {
        if pos < self.len {
            if on {
                self.bits |= 1 << pos;
            } else {
                self.bits &= !(1 << pos);
            }
        }
    }
}

/// Most `where`s have a handful of subqueries; beyond these limits a tag cannot be
/// indexed compactly and the stream stops with a protocol error instead.
const MAX_POSITIONS: usize = 64;
const MAX_DISJUNCTS: usize = 256;

/// What the index keeps per tagged row: about 100 bytes with its key (see
/// docs/PERFORMANCE.md), which is why it is laid out by hand.
#[derive(Debug)]
struct Entry {
    key: Box<str>,
    slots: SmallVec<[Slot; 2]>,
    active: Conditions,
    /// The key columns, when they cannot be read back from `key` (see [`key_sections`]).
    key_values: Option<Box<[Value]>>,
}

impl Entry {
    /// A row is in the shape while some disjunct has every position active
    /// (materializer.ex `evaluate_inclusion`: a missing position counts as active);
    /// without conditions, while it has any tag left.
    fn is_included(&self) -> bool {
        if self.active.len == 0 {
            return !self.slots.is_empty();
        }
        let mut disjuncts = self.slots.iter().map(|s| s.disjunct).collect::<SmallVec<[u8; 4]>>();
        disjuncts.dedup();
        disjuncts.is_empty()
            || disjuncts
                .iter()
                .any(|d| self.slots.iter().filter(|s| s.disjunct == *d).all(|s| self.active.get(s.pos)))
    }
}

/// The per-stream index of tagged rows: a slab of entries, found by key through a
/// hash table of slab indices (4 bytes a bucket), and interned tag values.
#[derive(Default)]
pub(crate) struct TagTracker {
    entries: Vec<Option<Entry>>,
    free_entries: Vec<u32>,
    by_key: HashTable<u32>,
    hasher: DefaultHashBuilder,
    values: HashMap<Box<str>, u32>,
    value_names: Vec<Box<str>>,
    /// Per value id: how many slots use it (0: free for reuse).
    value_uses: Vec<u32>,
    free_values: Vec<u32>,
    /// The index covers every row the consumer holds: the stream started at `-1`
    /// (or at `now` with nothing held) rather than resuming.
    complete: bool,
    len: usize,
    /// What moved since [`TagTracker::take_counts`] was last called.
    counts: MoveCounts,
}

/// Move events seen and rows they removed, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct MoveCounts {
    /// `move-in` events.
    pub move_ins: u64,
    /// `move-out` events.
    pub move_outs: u64,
    /// Rows a move-out removed (each became a delete).
    pub rows_moved_out: u64,
}

impl std::fmt::Debug for TagTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TagTracker").field("rows", &self.len).field("complete", &self.complete).finish()
    }
}

/// Why a response's tags could not be applied.
type Refusal = String;

impl TagTracker {
    /// An empty index; `complete` says whether it covers all rows the consumer holds.
    pub fn new(complete: bool) -> Self {
        TagTracker { complete, ..TagTracker::default() }
    }

    /// Forgets everything (a reset or a resume); the counts survive.
    pub fn reset(&mut self, complete: bool) {
        let counts = self.counts;
        *self = TagTracker::new(complete);
        self.counts = counts;
    }

    /// What moved since the last call.
    pub fn take_counts(&mut self) -> MoveCounts {
        std::mem::take(&mut self.counts)
    }

    /// Tagged rows indexed.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Applies a response's marks to the index and turns its move-outs into deletes of
    /// the rows that left the shape, placed where the events were. On anything but
    /// `Ok(Resolved)` the changes are unspecified: the caller refetches or stops.
    pub fn apply(
        &mut self,
        changes: &mut Vec<Change>,
        marks: Vec<(usize, Mark)>,
        schema: &Schema,
    ) -> Result<Resolution, Refusal> {
        if marks.is_empty() && self.len == 0 {
            return Ok(Resolution::Resolved); // no subqueries: the common case costs nothing
        }
        let key_columns = key_columns(schema);
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
                            return Ok(Resolution::Unknown);
                        }
                        match self.on_move(&event, schema, &key_columns) {
                            Some(deletes) => {
                                if event.out {
                                    self.counts.move_outs += 1;
                                    self.counts.rows_moved_out += deletes.len() as u64;
                                } else {
                                    self.counts.move_ins += 1;
                                }
                                out.extend(deletes);
                            }
                            None => return Ok(Resolution::Unknown),
                        }
                    }
                }
            }
            let Some(change) = input.next() else { break };
            self.on_change(&change, headers, schema, &key_columns)?;
            out.push(change);
        }
        *changes = out;
        Ok(Resolution::Resolved)
    }

    fn find(&self, key: &str) -> Option<u32> {
        let hash = self.hasher.hash_one(key);
        let entries = &self.entries;
        self.by_key.find(hash, |&id| entries[id as usize].as_ref().is_some_and(|e| &*e.key == key)).copied()
    }

    fn remove(&mut self, id: u32) -> Entry {
        let entry = self.entries[id as usize].take().expect("indexed entries exist");
        let hash = self.hasher.hash_one(&*entry.key);
        if let Ok(found) = self.by_key.find_entry(hash, |&other| other == id) {
            found.remove();
        }
        for slot in &entry.slots {
            self.release_value(slot.value);
        }
        self.free_entries.push(id);
        self.len -= 1;
        entry
    }

    fn add(&mut self, entry: Entry) {
        let hash = self.hasher.hash_one(&*entry.key);
        let id = match self.free_entries.pop() {
            Some(id) => {
                self.entries[id as usize] = Some(entry);
                id
            }
            None => {
                self.entries.push(Some(entry));
                u32::try_from(self.entries.len() - 1).expect("fewer than 4 billion tagged rows")
            }
        };
        let (entries, hasher) = (&self.entries, &self.hasher);
        self.by_key.insert_unique(hash, id, |&other| {
            hasher.hash_one(&*entries[other as usize].as_ref().expect("indexed entries exist").key)
        });
        self.len += 1;
    }

    fn on_change(
        &mut self,
        change: &Change,
        headers: Option<TagHeaders>,
        schema: &Schema,
        key_columns: &[&str],
    ) -> Result<(), Refusal> {
        let key = change.key.as_str();
        let existing = self.find(key);
        if change.op == Operation::Delete {
            if let Some(id) = existing {
                self.remove(id);
            }
            return Ok(());
        }
        let Some(h) = headers else {
            if let (Operation::Insert, Some(id)) = (change.op, existing) {
                self.remove(id); // a row re-inserted without tags is untagged
            }
            return Ok(());
        };
        let active = conditions(h.active_conditions.as_deref())?;
        let new_slots = if h.tags.is_empty() { None } else { Some(self.slots(&h.tags)?) };
        let Some(id) = existing else {
            let Some(slots) = new_slots else { return Ok(()) };
            let key_values = stored_key_values(key, &change.value, schema, key_columns);
            self.add(Entry { key: key.into(), slots, active: active.unwrap_or_default(), key_values });
            return Ok(());
        };
        // materializer.ex `apply_changes` (UpdatedRecord): sent tags replace the row's,
        // as do sent active_conditions; otherwise the row keeps its own.
        let replaced = match new_slots {
            Some(slots) => Some(slots),
            None if !h.removed_tags.is_empty() => Some(SmallVec::new()),
            None => None,
        };
        if replaced.as_ref().is_some_and(SmallVec::is_empty) {
            self.remove(id); // no tag left: the row can no longer move out
            return Ok(());
        }
        let key_values = (change.op == Operation::Insert)
            .then(|| stored_key_values(key, &change.value, schema, key_columns));
        let entry = self.entries[id as usize].as_mut().expect("indexed entries exist");
        if let Some(a) = active {
            entry.active = a;
        }
        if let Some(values) = key_values {
            entry.key_values = values;
        }
        if let Some(slots) = replaced {
            for slot in std::mem::replace(&mut entry.slots, slots) {
                self.release_value(slot.value);
            }
        }
        Ok(())
    }

    /// Applies a move event; returns the deletes of rows that left the shape, or
    /// `None` if one of them has key columns that cannot be rebuilt.
    fn on_move(&mut self, event: &MoveEvent, schema: &Schema, key_columns: &[&str]) -> Option<Vec<Change>> {
        let moved: HashSet<(u8, u32)> = event
            .patterns
            .iter()
            .filter_map(|p| Some((u8::try_from(p.pos).ok()?, *self.values.get(p.value.as_str())?)))
            .collect();
        if moved.is_empty() {
            return Some(Vec::new());
        }
        let hit = |s: &Slot| moved.contains(&(s.pos, s.value));
        let mut gone = Vec::new();
        let mut released = Vec::new();
        // A scan, not a reverse index: move events are rare next to changes, and a
        // (position, value) → rows map would double the index's memory.
        for (id, entry) in self.entries.iter_mut().enumerate() {
            let Some(entry) = entry else { continue };
            if !entry.slots.iter().any(hit) {
                continue;
            }
            if entry.active.len > 0 {
                for slot in entry.slots.iter().filter(|s| hit(s)) {
                    entry.active.set(slot.pos, !event.out);
                }
            } else if event.out {
                let dead: SmallVec<[u8; 4]> =
                    entry.slots.iter().filter(|s| hit(s)).map(|s| s.disjunct).collect();
                entry.slots.retain(|s| {
                    let keep = !dead.contains(&s.disjunct);
                    if !keep {
                        released.push(s.value);
                    }
                    keep
                });
            }
            if event.out && !entry.is_included() {
                gone.push(id as u32);
            }
        }
        for value in released {
            self.release_value(value);
        }
        let mut deletes = Vec::with_capacity(gone.len());
        for id in gone {
            let entry = self.remove(id);
            let value = key_row(&entry, schema, key_columns)?;
            deletes.push(Change::delete(String::from(entry.key), value));
        }
        Some(deletes)
    }

    /// Parses tags (`"h1/h2"`, `"h1/"`, `"/h2"`, flat `"h"`) into interned slots.
    fn slots(&mut self, tags: &[String]) -> Result<SmallVec<[Slot; 2]>, Refusal> {
        if tags.len() > MAX_DISJUNCTS {
            return Err(format!(
                "a row carries {} subquery tags; at most {MAX_DISJUNCTS} are supported",
                tags.len()
            ));
        }
        let mut slots = SmallVec::new();
        for (disjunct, tag) in tags.iter().enumerate() {
            for (pos, value) in tag.split('/').enumerate().filter(|(_, v)| !v.is_empty()) {
                if pos >= MAX_POSITIONS {
                    return Err(format!("a subquery tag has more than {MAX_POSITIONS} positions"));
                }
                let value = self.intern(value);
                slots.push(Slot { disjunct: disjunct as u8, pos: pos as u8, value });
            }
        }
        Ok(slots)
    }

    fn intern(&mut self, value: &str) -> u32 {
        if let Some(&id) = self.values.get(value) {
            self.value_uses[id as usize] += 1;
            return id;
        }
        let id = match self.free_values.pop() {
            Some(id) => {
                self.value_names[id as usize] = value.into();
                id
            }
            None => {
                self.value_uses.push(0);
                self.value_names.push(value.into());
                u32::try_from(self.value_uses.len() - 1).expect("fewer than 4 billion tag values")
            }
        };
        self.value_uses[id as usize] = 1;
        self.values.insert(value.into(), id);
        id
    }

    fn release_value(&mut self, id: u32) {
        let uses = &mut self.value_uses[id as usize];
        *uses -= 1;
        if *uses == 0 {
            self.values.remove(&self.value_names[id as usize]);
            self.value_names[id as usize] = Box::default();
            self.free_values.push(id);
        }
    }
}

fn conditions(active: Option<&[bool]>) -> Result<Option<Conditions>, Refusal> {
    let Some(active) = active else { return Ok(None) };
    if active.len() > MAX_POSITIONS {
        return Err(format!(
            "a row carries {} subquery conditions; at most {MAX_POSITIONS} are supported",
            active.len()
        ));
    }
    let bits = active.iter().enumerate().filter(|(_, on)| **on).fold(0u64, |b, (i, _)| b | 1 << i);
    Ok(Some(Conditions { bits, len: active.len() as u8 }))
}

/// The columns Electric builds a row's key from: the primary key in order, or every
/// column by name when the table has none (changes.ex `build_key` / `join_escape_pk`).
fn key_columns(schema: &Schema) -> Vec<&str> {
    let pk = schema.primary_key();
    if pk.is_empty() { schema.0.keys().map(|c| &**c).collect() } else { pk }
}

/// The key columns' text as Electric wrote them into the key (changes.ex `build_key`):
/// `"<schema>"."<table>"` then one section per column, `/"<text with / doubled>"` or
/// `/_` for NULL. Every `/` inside the relation or a value is doubled and sections are
/// delimited by `"` or `_`, so the separators are exactly the lone slashes.
fn key_sections(key: &str, n: usize) -> Option<Vec<Option<String>>> {
    let bytes = key.as_bytes();
    let mut separators = Vec::with_capacity(n);
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'/' {
            let start = i;
            while i < bytes.len() && bytes[i] == b'/' {
                i += 1;
            }
            if i - start == 1 {
                separators.push(start);
            }
        } else {
            i += 1;
        }
    }
    if separators.len() != n {
        return None;
    }
    let ends = separators.iter().skip(1).copied().chain(std::iter::once(key.len()));
    separators
        .iter()
        .zip(ends)
        .map(|(&sep, end)| match &key[sep + 1..end] {
            "_" => Some(None),
            quoted if quoted.len() >= 2 && quoted.starts_with('"') && quoted.ends_with('"') => {
                Some(Some(quoted[1..quoted.len() - 1].replace("//", "/")))
            }
            _ => None,
        })
        .collect()
}

/// The key columns' values read back from the key, if that works for this schema.
fn values_from_key(key: &str, schema: &Schema, key_columns: &[&str]) -> Option<Vec<Value>> {
    let sections = key_sections(key, key_columns.len())?;
    key_columns.iter().zip(&sections).map(|(c, text)| schema.parse(c, text.as_deref()).ok()).collect()
}

/// `None` when the key columns can be read back from the key exactly (checked here,
/// against the row's own values); otherwise the values, stored with the entry.
fn stored_key_values(key: &str, value: &Row, schema: &Schema, key_columns: &[&str]) -> Option<Box<[Value]>> {
    let actual: Option<Vec<Value>> = key_columns.iter().map(|c| value.get(c).cloned()).collect();
    let actual = actual?; // the change lacks a key column: nothing better to keep
    if values_from_key(key, schema, key_columns).as_ref() == Some(&actual) {
        None
    } else {
        Some(actual.into_boxed_slice())
    }
}

/// The delete's value: the key columns of the row.
fn key_row(entry: &Entry, schema: &Schema, key_columns: &[&str]) -> Option<Row> {
    let values = match &entry.key_values {
        Some(stored) => stored.to_vec(),
        None => values_from_key(&entry.key, schema, key_columns)?,
    };
    let mut row = Row::with_capacity(values.len());
    for (column, value) in key_columns.iter().zip(values) {
        row.insert(schema.intern(column), value);
    }
    Some(row)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

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
        let r = t.apply(&mut changes, marks, &schema()).unwrap();
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
        t.apply(&mut changes, vec![(0, moved(true, &[(0, "a")]))], &schema()).unwrap();
        assert_eq!(changes[0].op, Operation::Delete);
        assert_eq!(changes[0].value.get("id"), Some(&Value::Int(7)));
        assert_eq!(changes[0].value.get("p"), None);

        // An Electric key holds the key columns' text: nothing else is stored.
        let mut row = insert(9);
        row.key = r#""public"."t"/"9""#.into();
        run(&mut t, vec![row], vec![(0, tags(&["b"], None))]);
        let id = t.find(r#""public"."t"/"9""#).unwrap();
        assert!(t.entries[id as usize].as_ref().unwrap().key_values.is_none());
        let mut changes = Vec::new();
        t.apply(&mut changes, vec![(0, moved(true, &[(0, "b")]))], &schema()).unwrap();
        assert_eq!(changes[0].value.get("id"), Some(&Value::Int(9)));
        assert_eq!(changes[0].value.len(), 1);
    }

    #[test]
    fn key_sections_read_electrics_escaping() {
        // changes.ex `build_key` doctests.
        assert_eq!(
            key_sections(r#""hello"."world"/"b"/"d""#, 2),
            Some(vec![Some("b".into()), Some("d".into())])
        );
        assert_eq!(
            key_sections(r#""hello"."world"/"test//test"/"test""#, 2),
            Some(vec![Some("test/test".into()), Some("test".into())])
        );
        assert_eq!(key_sections(r#""a".."b"."c"/"""#, 1), Some(vec![Some(String::new())]));
        assert_eq!(key_sections(r#""s//x"."t"/_/"//""#, 2), Some(vec![None, Some("/".into())]));
        assert_eq!(key_sections(r#""s"."t"/"a"/"b""#, 1), None, "wrong section count");
        assert_eq!(key_sections("k7", 1), None);
    }

    #[test]
    fn too_many_positions_are_refused_not_truncated() {
        let mut t = TagTracker::new(true);
        let tag = "/".repeat(64) + "h";
        let mut changes = vec![insert(1)];
        assert!(t.apply(&mut changes, vec![(0, tags(&[&tag], None))], &schema()).is_err());
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
    fn moves_are_counted_for_metrics() {
        let mut t = TagTracker::new(true);
        run(&mut t, vec![insert(1), insert(2)], vec![(0, tags(&["a"], None)), (1, tags(&["a"], None))]);
        run(&mut t, vec![], vec![(0, moved(false, &[(0, "b")])), (0, moved(true, &[(0, "a")]))]);
        t.reset(true);
        assert_eq!(t.take_counts(), MoveCounts { move_ins: 1, move_outs: 1, rows_moved_out: 2 });
        assert_eq!(t.take_counts(), MoveCounts::default());
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
        assert!(t.values.is_empty(), "{}", t.values.len());
        assert!(t.value_uses.len() <= 2, "ids are reused: {}", t.value_uses.len());
    }

    /// The index's memory for a 1M-row subquery shape (100 projects, one flat tag and
    /// one condition per row): `cargo test -p shapesync-electric --release --lib --
    /// --ignored tag_index_memory --nocapture` prints it (docs/PERFORMANCE.md).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn tag_index_memory() {
        fn rss_kib() -> u64 {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
            line.split_whitespace().nth(1).unwrap().parse().unwrap()
        }
        let before = rss_kib();
        let mut t = TagTracker::new(true);
        let values: Vec<String> = (0..100).map(|p| format!("{:032x}", p * 7919)).collect();
        for chunk in (0..1_000_000i64).collect::<Vec<_>>().chunks(10_000) {
            let changes: Vec<Change> = chunk
                .iter()
                .map(|i| {
                    let mut c = insert(*i);
                    c.key = format!("\"public\".\"items\"/\"{i}\"");
                    c
                })
                .collect();
            let marks = chunk
                .iter()
                .enumerate()
                .map(|(n, i)| (n, tags(&[&values[(*i % 100) as usize]], Some(&[true]))))
                .collect();
            run(&mut t, changes, marks);
        }
        let after = rss_kib();
        assert_eq!(t.len(), 1_000_000);
        println!(
            "tag index for 1,000,000 rows: {} MiB ({} bytes/row)",
            (after - before) / 1024,
            (after - before) * 1024 / 1_000_000
        );
    }
}
