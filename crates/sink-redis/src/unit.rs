//! How a batch becomes units, each one fenced call of the unit script (see
//! `lease::UNIT_SCRIPT`): a live transaction is one unit; a snapshot batch is one unit
//! per `part_size` rows ([`parts`]); a sweep is one unit per `HSCAN` page of the
//! membership ([`UnitBuilder::sweep_step`]). Within a unit, new memberships come first,
//! then the rows' commands, then removed memberships, then the checkpoint
//! ([`Unit::into_call`]), so a unit cut short never leaves a row the sweep cannot find
//! and never moves the checkpoint.

use std::collections::BTreeMap;

use redis::{Arg, Cmd, Script, ScriptInvocation};
use shapesync_core::{Batch, Change, Fence, Operation, Row, SinkError};

use crate::layout::{RowLayout, StoredRows};
use crate::sink::KeyNames;
use crate::template::{KeyError, KeyTemplate};

/// Membership entries per `HSET`/`HDEL`. Each command runs alone in Redis, so it is kept
/// short (~0.4 ms on a million-entry hash) for readers; it must also stay under the 8000
/// values Redis' Lua `unpack` takes.
const MEMBERS_PER_COMMAND: usize = 250;

/// A command from its name and arguments.
pub(crate) fn command<const N: usize>(parts: [&str; N]) -> Cmd {
    let mut cmd = Cmd::new();
    for part in parts {
        cmd.arg(part);
    }
    cmd
}

/// The commands of one unit and the membership changes it makes (row key → `true` to
/// tag it with the unit's generation, `false` to remove it), written as few `HSET`s and
/// `HDEL`s: only the unit's final membership of each row is ever written.
#[derive(Default)]
pub(crate) struct Unit {
    commands: Vec<Step>,
    members: BTreeMap<String, bool>,
}

/// One step of a unit's script.
enum Step {
    /// A command.
    Command(Cmd),
    /// The next `commands` steps run only if `key` exists when the script reaches them
    /// (a cached key refreshed in place; encoded as an argument count of 0).
    IfExists { key: String, commands: usize },
    /// Sets each key to Redis' clock (µs) when the script runs, living `ms` (encoded as
    /// a negative argument count).
    Stamp { keys: Vec<String>, ms: u64 },
}

impl Unit {
    /// Adds a command, run after the ones added before it.
    pub(crate) fn push(&mut self, command: Cmd) {
        self.commands.push(Step::Command(command));
    }

    /// Adds `commands`, run only if `key` exists when the script reaches them: one
    /// atomic check-and-write, since Redis runs the script alone.
    pub(crate) fn push_if_exists(&mut self, key: &str, commands: Vec<Cmd>) {
        if commands.is_empty() {
            return;
        }
        self.commands.push(Step::IfExists { key: key.to_owned(), commands: commands.len() });
        self.commands.extend(commands.into_iter().map(Step::Command));
    }

    /// Sets each of `keys` to Redis' clock in µs as the unit runs, living `ms`
    /// (tombstones: stamped inside the unit, they are never older than it).
    pub(crate) fn push_stamps(&mut self, keys: Vec<String>, ms: u64) {
        if keys.is_empty() {
            return;
        }
        self.commands.push(Step::Stamp { keys, ms });
    }

    fn set_member(&mut self, id: &str, current: bool) {
        self.members.insert(id.to_owned(), current);
    }

    /// The unit as one call of `script` (the unit script): the fence (or none), whether
    /// it stores `checkpoint`, the `generation` its rows carry, then its commands —
    /// new memberships tagged `generation`, the rows' commands, removed memberships,
    /// the checkpoint. `None` when there is nothing to run: no command and no fence.
    pub(crate) fn into_call<'s>(
        self,
        script: &'s Script,
        keys: &KeyNames,
        generation: &str,
        checkpoint: Option<&str>,
        fence: Option<&Fence>,
    ) -> Option<ScriptInvocation<'s>> {
        let ordered = self.into_commands(keys, generation, checkpoint);
        if ordered.is_empty() && fence.is_none() {
            return None;
        }
        let mut invocation = script.key(&keys.lease);
        match fence {
            Some(f) => invocation.arg(&f.owner).arg(f.epoch).arg(f.seq).arg(f.ttl_ms),
            None => invocation.arg("").arg(0).arg(0).arg(0),
        };
        invocation.arg(if checkpoint.is_some() { "1" } else { "0" }).arg(generation);
        for step in &ordered {
            match step {
                Step::Command(cmd) => {
                    invocation.arg(cmd.args_iter().len());
                    for arg in cmd.args_iter() {
                        if let Arg::Simple(bytes) = arg {
                            invocation.arg(bytes);
                        }
                    }
                }
                Step::IfExists { key, commands } => {
                    invocation.arg(0).arg(key).arg(*commands);
                }
                Step::Stamp { keys, ms } => {
                    invocation.arg(-(keys.len() as i64)).arg(*ms).arg(keys);
                }
            }
        }
        Some(invocation)
    }

    /// The unit's steps in the order the script runs them.
    fn into_commands(self, keys: &KeyNames, generation: &str, checkpoint: Option<&str>) -> Vec<Step> {
        let Unit { commands, members } = self;
        let (joined, left): (Vec<_>, Vec<_>) = members.into_iter().partition(|(_, current)| *current);
        let mut ordered = Vec::with_capacity(commands.len() + 4);
        for chunk in joined.chunks(MEMBERS_PER_COMMAND) {
            let mut hset = command(["HSET", &keys.members]);
            for (id, _) in chunk {
                hset.arg(id).arg(generation);
            }
            ordered.push(Step::Command(hset));
        }
        ordered.extend(commands);
        for chunk in left.chunks(MEMBERS_PER_COMMAND) {
            let mut hdel = command(["HDEL", &keys.members]);
            for (id, _) in chunk {
                hdel.arg(id);
            }
            ordered.push(Step::Command(hdel));
        }
        ordered.extend(checkpoint.map(|json| Step::Command(command(["SET", &keys.checkpoint, json]))));
        ordered
    }
}

/// One unit's share of a batch.
pub(crate) struct Part<'a> {
    /// The changes the unit writes.
    pub(crate) changes: &'a [Change],
    /// The batch's last part: sent only after every earlier part has committed.
    pub(crate) last: bool,
    /// The unit stores the checkpoint: the last part, unless a sweep follows (its last
    /// step stores it then).
    pub(crate) checkpoint: bool,
}

/// How `batch` is split into units: a live transaction (or an empty batch) is one; a
/// snapshot batch is one per `part_size` rows.
pub(crate) fn parts(batch: &Batch, part_size: usize) -> Vec<Part<'_>> {
    let chunks: Vec<&[Change]> = if batch.changes.is_empty() {
        vec![&[]]
    } else if batch.is_snapshot() {
        batch.changes.chunks(part_size).collect()
    } else {
        vec![&batch.changes]
    };
    let count = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, changes)| {
            let last = i + 1 == count;
            Part { changes, last, checkpoint: last && !batch.sweep }
        })
        .collect()
}

/// The key of `row` (of `change`) by `template`; a row without one is `Rejected`.
pub(crate) fn row_key(template: &KeyTemplate, row: &Row, change: &Change) -> Result<String, SinkError> {
    template.render(row).map_err(|e| {
        SinkError::rejected(match e {
            KeyError::Missing(c) => format!(
                "the {} of row {} has no value for key column `{c}`; key by columns every change carries (the primary key), or set `replica: full`",
                change.op.as_str(),
                change.key
            ),
            KeyError::Null(c) => {
                format!("key column `{c}` is NULL in row {}; key by non-null columns", change.key)
            }
        })
    })
}

/// Turns changes and sweep pages into units: the row's commands from the layout, plus
/// the membership each change makes and its `notify` message.
pub(crate) struct UnitBuilder {
    layout: Box<dyn RowLayout>,
    /// The `notify` channel, if any.
    notify: Option<String>,
}

impl UnitBuilder {
    /// Units writing rows by `layout`, announcing them on `notify`.
    pub(crate) fn new(layout: Box<dyn RowLayout>, notify: Option<String>) -> Self {
        UnitBuilder { layout, notify }
    }

    /// The layout rows are written by.
    pub(crate) fn layout(&self) -> &dyn RowLayout {
        &*self.layout
    }

    /// Adds `change` to `unit`. `rows` holds the stored JSON updates merge into (JSON
    /// layouts); `new_row`: the row cannot exist yet, so it is written without first
    /// removing what was there.
    pub(crate) fn write_change(
        &self,
        unit: &mut Unit,
        template: &KeyTemplate,
        change: &Change,
        rows: &mut StoredRows,
        new_row: bool,
    ) -> Result<(), SinkError> {
        let id = row_key(template, &change.value, change)?;
        match change.op {
            Operation::Insert => {
                self.layout.put(unit, &id, &change.value, !new_row, rows);
                self.mark(unit, &id, Operation::Insert);
            }
            Operation::Delete => self.remove(unit, &id, rows),
            Operation::Update => {
                // Under `replica: full` an update may change a key column: the row moves.
                if let Some(old) = &change.old_value {
                    let mut before = change.value.clone();
                    before.merge(old);
                    let old_id = row_key(template, &before, change)?;
                    if old_id != id {
                        self.remove(unit, &old_id, rows);
                        self.layout.put(unit, &id, &change.value, true, rows);
                        self.mark(unit, &id, Operation::Insert);
                        return Ok(());
                    }
                }
                self.layout.merge(unit, &id, &change.value, rows)?;
                self.mark(unit, &id, Operation::Update);
            }
        }
        Ok(())
    }

    /// One sweep step: removes every row of an `HSCAN` page of the membership (row key,
    /// generation, …) whose generation is below `generation`.
    pub(crate) fn sweep_step(&self, page: &[String], generation: u64) -> Unit {
        let mut unit = Unit::default();
        let mut scratch = StoredRows::new();
        for pair in page.chunks_exact(2) {
            // An unreadable generation cannot be current, so the row goes.
            if pair[1].parse::<u64>().map_or(true, |g| g < generation) {
                self.remove(&mut unit, &pair[0], &mut scratch);
            }
        }
        unit
    }

    /// Removes row `id` and its membership.
    fn remove(&self, unit: &mut Unit, id: &str, rows: &mut StoredRows) {
        self.layout.delete(unit, id, rows);
        unit.set_member(id, false);
        self.publish(unit, Operation::Delete, id);
    }

    /// Tags row `id` with the unit's generation.
    fn mark(&self, unit: &mut Unit, id: &str, op: Operation) {
        unit.set_member(id, true);
        self.publish(unit, op, id);
    }

    fn publish(&self, unit: &mut Unit, op: Operation, id: &str) {
        let Some(channel) = &self.notify else { return };
        unit.push(command(["PUBLISH", channel, &self.layout.notice(op, id).to_string()]));
    }
}
