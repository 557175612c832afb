//! `mode: invalidate` and `mode: refresh`: keeping an application's own cache honest
//! instead of owning a mirror of the shape.
//!
//! Every committed change removes (`UNLINK`) the keys the `keys` templates name for the
//! row, rendered with its new values and, for updates under `replica: full`, its old ones
//! too (a project that moves to another org invalidates both orgs' lists); `refresh`
//! also rewrites the row's own key (`key`) in place when it exists. Each removed or
//! refreshed key gets a tombstone (see [`crate::guard`]), and all of it goes in the same
//! fenced unit as the checkpoint, one unit per transaction.
//!
//! Snapshot rows are not written (they say nothing changed). When continuity with the
//! shape is lost — no checkpoint, a must-refetch, a changed definition, a store that
//! lost its state — the changes in between are unknown, so the batch that completes the
//! resync (the one with `sweep`) invalidates every key the templates can name: a flush
//! stamp first (fills that read the database before it are refused), then `SCAN` with
//! each template's pattern and `UNLINK` of what it finds, `part_size` keys per fenced
//! unit, then the `invalidate_all` notice with the checkpoint.

use std::collections::{BTreeMap, BTreeSet};

use shapesync_core::{Change, ConfigError, Operation, ResyncReason, Row, Schema, SinkError};

use crate::config::{Layout, Mode, RedisSinkConfig};
use crate::guard::{flush_key, tombstone_key};
use crate::template::{KeyError, KeyTemplate};
use crate::unit::{Unit, command};

/// Keys per `UNLINK` command (each command runs alone in Redis, so it stays short).
const KEYS_PER_UNLINK: usize = 250;

/// A template of `keys`, with the text it was written as (for error messages).
struct Named {
    text: String,
    template: KeyTemplate,
}

/// Turns changes into the units that keep an application's cache honest.
pub(crate) struct CacheKeeper {
    mode: Mode,
    layout: Layout,
    /// The templates of keys every change removes.
    invalidated: Vec<Named>,
    /// `prefix`: the start of every key.
    base: String,
    tombstone_ms: u64,
    notify: Option<String>,
    full_rows: bool,
}

impl CacheKeeper {
    /// The keeper `config` describes (its mode is not `mirror`, so there is no hash tag
    /// and every key starts with `prefix`), for a shape whose updates carry whole rows when `full_rows`.
    pub(crate) fn new(config: &RedisSinkConfig, full_rows: bool) -> Result<Self, ConfigError> {
        let invalidated = config
            .keys
            .iter()
            .zip(config.cache_templates()?)
            .map(|(text, template)| Named { text: text.clone(), template })
            .collect();
        Ok(CacheKeeper {
            mode: config.mode,
            layout: config.layout,
            invalidated,
            base: config.prefix.clone(),
            tombstone_ms: config.tombstone_ms,
            notify: config.notify.clone(),
            full_rows,
        })
    }

    /// Whether the row's own key is rewritten in place (`mode: refresh`).
    pub(crate) fn refreshes(&self) -> bool {
        self.mode == Mode::Refresh
    }

    /// What rows of `schema` the `keys` templates cannot name: a column the shape does
    /// not have, or one outside the primary key without `replica: full` (an update
    /// carries only the key and the changed columns, a delete only the key). A NULL
    /// value is fine: that template names no key for the row.
    pub(crate) fn check_schema(&self, schema: &Schema) -> Result<(), SinkError> {
        let pk = schema.primary_key();
        for named in &self.invalidated {
            for c in named.template.columns() {
                if !schema.0.contains_key(c) {
                    return Err(SinkError::rejected(format!(
                        "key template `{}` uses `{c}`, which is not among the shape's columns; add it to the source's `columns` or fix `keys`",
                        named.text
                    )));
                }
                if !self.full_rows && !pk.contains(&c) {
                    return Err(SinkError::rejected(needs_full_rows(&named.text, c)));
                }
            }
        }
        Ok(())
    }

    /// The unit for a transaction's `changes`: every key they name removed (or, the
    /// row's own key under `refresh`, rewritten if it exists), each with a tombstone
    /// stamped with Redis' clock as the unit runs. `own` is the row's own key template
    /// under `refresh`. Also says how many keys it removes.
    pub(crate) fn unit(
        &self,
        changes: &[Change],
        own: Option<&KeyTemplate>,
    ) -> Result<(Unit, u64), SinkError> {
        let mut unit = Unit::default();
        // Key → the last operation that touched it (for notices), in key order.
        let mut touched: BTreeMap<String, Operation> = BTreeMap::new();
        // Keys of `keys` templates: removed once, after the row keys' commands.
        let mut removed: BTreeSet<String> = BTreeSet::new();
        let mut removed_own = 0;
        for change in changes {
            let (row, old) = rows_of(change);
            if let Some(own) = own {
                removed_own += self.refresh(&mut unit, own, change, &row, old.as_ref(), &mut touched)?;
            }
            for named in &self.invalidated {
                for r in std::iter::once(&row).chain(old.as_ref()) {
                    if let Some(key) = self.render(&named.template, r, change)? {
                        touched.insert(key.clone(), change.op);
                        removed.insert(key);
                    }
                }
            }
        }
        let count = removed_own + removed.len() as u64;
        unlink(&mut unit, &removed.into_iter().collect::<Vec<_>>());
        unit.push_stamps(touched.keys().map(|key| tombstone_key(key)).collect(), self.tombstone_ms);
        if let Some(channel) = &self.notify {
            for (key, op) in &touched {
                let notice = serde_json::json!({ "op": op.as_str(), "key": key });
                unit.push(command(["PUBLISH", channel, &notice.to_string()]));
            }
        }
        Ok((unit, count))
    }

    /// Adds the commands for the row's own key under `refresh`: removed when the row
    /// is deleted or moves away from it (a key column changed), rewritten in place if
    /// it exists when the change carries the whole row, removed when it carries only
    /// some columns of a JSON row (which cannot be merged without reading it). Says how
    /// many keys it removes.
    fn refresh(
        &self,
        unit: &mut Unit,
        own: &KeyTemplate,
        change: &Change,
        row: &Row,
        old: Option<&Row>,
        touched: &mut BTreeMap<String, Operation>,
    ) -> Result<u64, SinkError> {
        let mut removed = 0;
        let key = self.render(own, row, change)?;
        if let Some(old) = old
            && let Some(old_key) = self.render(own, old, change)?
            && Some(&old_key) != key.as_ref()
        {
            unit.push(command(["UNLINK", &old_key]));
            removed += 1;
            touched.insert(old_key, Operation::Delete);
        }
        let Some(key) = key else { return Ok(removed) };
        let whole = change.op == Operation::Insert || self.full_rows;
        match (change.op, self.layout, whole) {
            (Operation::Delete, ..) | (_, Layout::Json | Layout::Table, false) => {
                unit.push(command(["UNLINK", &key]));
                removed += 1;
            }
            (_, Layout::Json | Layout::Table, true) => {
                let json = serde_json::to_string(row).expect("rows always serialize");
                // XX: only an existing key; KEEPTTL: whatever expiry the application set stays.
                unit.push(command(["SET", &key, &json, "XX", "KEEPTTL"]));
            }
            (_, Layout::Hash, _) => {
                // The given columns set, the NULL ones removed; with the whole row that is
                // the row (no DEL, so the key's expiry stays).
                let commands = crate::layout::merge_commands(&key, row);
                unit.push_if_exists(&key, commands);
            }
        }
        touched.insert(key, change.op);
        Ok(removed)
    }

    /// The key `template` names for `row` (under `prefix`); `None` when a column of it is
    /// NULL. A column the change does not carry is `Rejected` (the schema check keeps
    /// that from happening).
    fn render(
        &self,
        template: &KeyTemplate,
        row: &Row,
        change: &Change,
    ) -> Result<Option<String>, SinkError> {
        match template.render(row) {
            Ok(key) => Ok(Some(format!("{}{key}", self.base))),
            Err(KeyError::Null(_)) => Ok(None),
            Err(KeyError::Missing(c)) => Err(SinkError::rejected(format!(
                "the {} of row {} has no value for `{c}`, which a key template uses; set `replica: full` on the source, or name keys by primary-key columns only",
                change.op.as_str(),
                change.key
            ))),
        }
    }

    /// The `SCAN` patterns of every key the templates can name (the row's own key
    /// template `own` too, under `refresh`), without repeats.
    pub(crate) fn patterns(&self, own: Option<&KeyTemplate>) -> Vec<String> {
        let mut patterns: Vec<String> = own
            .into_iter()
            .chain(self.invalidated.iter().map(|n| &n.template))
            .map(|t| format!("{}{}", crate::template::escape_glob(&self.base), t.glob()))
            .collect();
        patterns.sort();
        patterns.dedup();
        patterns
    }

    /// The first unit of a full invalidation: the flush stamp, so every fill that read
    /// the database before it is refused.
    pub(crate) fn flush_unit(&self) -> Unit {
        let mut unit = Unit::default();
        unit.push_stamps(vec![flush_key(&self.base)], self.tombstone_ms);
        unit
    }

    /// The last unit of a full invalidation: its notice, sent once every key is gone (an
    /// L1 cache that drops its entries then refills from a clean Redis).
    pub(crate) fn flushed_unit(&self, patterns: &[String], reason: Option<ResyncReason>) -> Unit {
        let mut unit = Unit::default();
        if let Some(channel) = &self.notify {
            let notice = serde_json::json!({
                "op": "invalidate_all",
                "patterns": patterns,
                "reason": reason.map(ResyncReason::as_str),
            });
            unit.push(command(["PUBLISH", channel, &notice.to_string()]));
        }
        unit
    }

    /// One step of a full invalidation: removes the keys a `SCAN` page found. (No
    /// pattern can match the sink's own keys or the guard's: `check` refuses templates
    /// that could render them.)
    pub(crate) fn scan_step(&self, page: &[String]) -> Unit {
        let mut unit = Unit::default();
        unlink(&mut unit, page);
        unit
    }
}

/// Why template `template` cannot render keys without `replica: full`: it uses `column`,
/// outside the primary key (said by `validate` and by the first batch alike).
pub(crate) fn needs_full_rows(template: &str, column: &str) -> String {
    format!(
        "key template `{template}` uses `{column}`, which is not a primary-key column; an update carries only the primary key and the changed columns, and a delete only the key, so its old and new keys cannot be rendered: set `replica: full` on the source, or name keys by primary-key columns only"
    )
}

/// The row a change names keys by, and for an update under `replica: full` the row as
/// it was (its `old_value` merged over it).
fn rows_of(change: &Change) -> (Row, Option<Row>) {
    let old = change.old_value.as_ref().filter(|_| change.op == Operation::Update).map(|old| {
        let mut before = change.value.clone();
        before.merge(old);
        before
    });
    (change.value.clone(), old)
}

/// `UNLINK`s `keys`, a few hundred per command.
fn unlink(unit: &mut Unit, keys: &[String]) {
    for chunk in keys.chunks(KEYS_PER_UNLINK) {
        let mut cmd = command(["UNLINK"]);
        for key in chunk {
            cmd.arg(key);
        }
        unit.push(cmd);
    }
}

#[cfg(test)]
mod tests {
    use shapesync_core::Value;

    use super::*;

    fn keeper(mode: Mode, keys: &[&str], full_rows: bool) -> CacheKeeper {
        let mut config = RedisSinkConfig::new("redis://h");
        config.mode = mode;
        config.keys = keys.iter().map(|k| (*k).to_owned()).collect();
        CacheKeeper::new(&config, full_rows).unwrap()
    }

    fn row(pairs: &[(&str, Value)]) -> Row {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()
    }

    #[test]
    fn an_update_that_moves_a_row_names_the_old_and_the_new_keys() {
        let k = keeper(Mode::Invalidate, &["project:{id}", "org:{org_id}:projects"], true);
        let mut change =
            Change::update("\"p\"/\"7\"", row(&[("id", Value::Int(7)), ("org_id", Value::Int(2))]));
        change.old_value = Some(row(&[("org_id", Value::Int(1))]));
        let (_, removed) = k.unit(&[change], None).unwrap();
        assert_eq!(removed, 3, "project:7, org:2:projects and org:1:projects");
    }

    #[test]
    fn a_null_column_names_no_key() {
        let k = keeper(Mode::Invalidate, &["project:{id}", "org:{org_id}:projects"], true);
        let change = Change::insert("k", row(&[("id", Value::Int(7)), ("org_id", Value::Null)]));
        let (_, removed) = k.unit(&[change], None).unwrap();
        assert_eq!(removed, 1);
    }

    #[test]
    fn patterns_cover_every_template_once() {
        let k = keeper(Mode::Invalidate, &["project:{id}", "project:{id}", "org:{org_id}:projects"], true);
        assert_eq!(k.patterns(None), ["org:*:projects", "project:*"]);
    }
}
