//! The pipeline's lease in the database file, beside its checkpoint.
//!
//! One row per pipeline in `_shapesync_leases` (owner, epoch, seq, expiry in ms since
//! the epoch) and one per standby in `_shapesync_standbys`. Every statement that reads
//! and then writes a lease runs in a `BEGIN IMMEDIATE` transaction, which SQLite runs
//! one at a time per file; a batch checks its fence inside its own transaction (see
//! `SqliteSink::apply_blocking`). The clock is this machine's: SQLite files are local,
//! so every instance that can open one shares it.

use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior};
use shapesync_core::lease::{StoredLease, judge};
use shapesync_core::{Acquisition, Fence, LeaseInfo, LeaseRequest, SinkError};
use shapesync_sql_table::{LEASE_TABLE, STANDBY_TABLE};

use crate::sink::{SqliteSink, classify};

/// Milliseconds since the Unix epoch on this machine.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn ttl(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// A lease row: the fields the fence compares, and its expiry.
struct LeaseRow {
    stored: StoredLease,
    expires_at_ms: i64,
}

impl SqliteSink {
    /// Creates the lease tables if missing.
    fn ensure_lease_tables(&self, tx: &Transaction<'_>) -> Result<(), SinkError> {
        for sql in self.lease_sql.create_tables() {
            tx.execute_batch(&sql).map_err(|e| self.classify(e))?;
        }
        Ok(())
    }

    fn classify(&self, e: rusqlite::Error) -> SinkError {
        classify(e, &self.path)
    }

    /// The pipeline's lease row, if the table and the row exist.
    fn lease_row(&self, conn: &Connection) -> Result<Option<LeaseRow>, SinkError> {
        if !Self::exists(conn, LEASE_TABLE).map_err(|e| self.classify(e))? {
            return Ok(None);
        }
        let sql = self.lease_sql.read_lease("expires_at_ms", false);
        conn.query_row(&sql, [&self.pipeline], |r| {
            Ok(LeaseRow {
                stored: StoredLease {
                    owner: r.get(0)?,
                    epoch: r.get::<_, i64>(1)?.try_into().unwrap_or(0),
                    seq: r.get::<_, i64>(2)?.try_into().unwrap_or(0),
                },
                expires_at_ms: r.get(3)?,
            })
        })
        .optional()
        .map_err(|e| self.classify(e))
    }

    /// Live standbys of the pipeline other than `owner`; expired ones are deleted when
    /// `prune`.
    fn standbys(
        &self,
        conn: &Connection,
        owner: &str,
        now: i64,
        prune: bool,
    ) -> Result<Vec<String>, SinkError> {
        if !Self::exists(conn, STANDBY_TABLE).map_err(|e| self.classify(e))? {
            return Ok(Vec::new());
        }
        if prune {
            let sql = self.lease_sql.prune_standbys("?2");
            conn.execute(&sql, rusqlite::params![self.pipeline, now]).map_err(|e| self.classify(e))?;
        }
        let sql = format!(
            "SELECT instance FROM {} WHERE pipeline = ?1 AND expires_at_ms > ?2 AND instance <> ?3 ORDER BY instance",
            self.lease_sql.standbys()
        );
        let mut stmt = conn.prepare(&sql).map_err(|e| self.classify(e))?;
        let rows = stmt
            .query_map(rusqlite::params![self.pipeline, now, owner], |r| r.get(0))
            .map_err(|e| self.classify(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.classify(e))
    }

    fn info(&self, conn: &Connection, row: &LeaseRow, now: i64, prune: bool) -> Result<LeaseInfo, SinkError> {
        Ok(LeaseInfo {
            owner: row.stored.owner.clone(),
            epoch: row.stored.epoch,
            expires_in_ms: row.expires_at_ms.saturating_sub(now),
            standbys: self.standbys(conn, &row.stored.owner, now, prune)?,
        })
    }

    /// Writes the lease row.
    fn store_lease(
        &self,
        tx: &Transaction<'_>,
        stored: &StoredLease,
        expires_at_ms: i64,
    ) -> Result<(), SinkError> {
        let sql = self.lease_sql.store_lease("?5");
        let epoch = i64::try_from(stored.epoch).unwrap_or(i64::MAX);
        let seq = i64::try_from(stored.seq).unwrap_or(i64::MAX);
        tx.execute(&sql, rusqlite::params![self.pipeline, stored.owner, epoch, seq, expires_at_ms])
            .map_err(|e| self.classify(e))?;
        Ok(())
    }

    /// Takes the lease for `owner` whoever holds it until `expires_at_ms`: a new epoch,
    /// the same commit count; its fence extends it by `ttl_ms`.
    fn take(
        &self,
        tx: &Transaction<'_>,
        owner: &str,
        expires_at_ms: i64,
        ttl_ms: u64,
    ) -> Result<Fence, SinkError> {
        let old = self.lease_row(tx)?;
        let stored = StoredLease {
            owner: owner.to_owned(),
            epoch: old.as_ref().map_or(0, |r| r.stored.epoch) + 1,
            seq: old.as_ref().map_or(0, |r| r.stored.seq),
        };
        self.store_lease(tx, &stored, expires_at_ms)?;
        tx.execute(&self.lease_sql.remove_standby(), [&self.pipeline, owner])
            .map_err(|e| self.classify(e))?;
        Ok(Fence { owner: owner.to_owned(), epoch: stored.epoch, seq: stored.seq, ttl_ms })
    }

    /// Checks a batch's fence inside its transaction: `Ok(true)` to write it,
    /// `Ok(false)` when it was already committed.
    pub(crate) fn check_fence(&self, tx: &Transaction<'_>, fence: &Fence) -> Result<bool, SinkError> {
        let row = self.lease_row(tx)?;
        let verdict = judge(row.as_ref().map(|r| &r.stored), fence, true);
        match SinkError::from_verdict(verdict.clone()) {
            Some(e) => Err(e),
            None => Ok(verdict == shapesync_core::lease::Verdict::Proceed),
        }
    }

    /// Counts the batch's commit under `fence` and extends the lease, inside the batch's
    /// transaction (after its checkpoint).
    pub(crate) fn count_commit(&self, tx: &Transaction<'_>, fence: &Fence) -> Result<(), SinkError> {
        tx.execute(
            &self.lease_sql.extend_lease("?2", true),
            rusqlite::params![self.pipeline, now_ms().saturating_add(ttl(fence.ttl_ms))],
        )
        .map_err(|e| self.classify(e))?;
        Ok(())
    }

    /// Runs `work` in a `BEGIN IMMEDIATE` transaction over the lease tables, committed
    /// when it succeeds.
    fn in_lease_tx<T>(
        &self,
        work: impl FnOnce(&Transaction<'_>) -> Result<T, SinkError>,
    ) -> Result<T, SinkError> {
        let mut state = self.state();
        let conn = self.connection(&mut state)?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| classify(e, &self.path))?;
        self.ensure_lease_tables(&tx)?;
        let out = work(&tx)?;
        tx.commit().map_err(|e| classify(e, &self.path))?;
        Ok(out)
    }

    pub(crate) fn acquire_blocking(&self, request: &LeaseRequest) -> Result<Acquisition, SinkError> {
        self.in_lease_tx(|tx| {
            let now = now_ms();
            let expires = now.saturating_add(ttl(request.ttl_ms));
            let row = self.lease_row(tx)?;
            let held_by_other =
                row.as_ref().is_some_and(|r| r.expires_at_ms > now && r.stored.owner != request.owner);
            if request.take && !held_by_other {
                let fence = self.take(tx, &request.owner, expires, request.ttl_ms)?;
                return Ok(Acquisition::Owned { fence, generation_floor: 0 });
            }
            tx.execute(
                &self.lease_sql.store_standby("?3"),
                rusqlite::params![self.pipeline, request.owner, expires],
            )
            .map_err(|e| self.classify(e))?;
            Ok(Acquisition::NotOwned(match &row {
                Some(row) => self.info(tx, row, now, true)?,
                None => LeaseInfo { standbys: self.standbys(tx, "", now, true)?, ..LeaseInfo::default() },
            }))
        })
    }

    pub(crate) fn renew_blocking(&self, fence: &Fence) -> Result<LeaseInfo, SinkError> {
        self.in_lease_tx(|tx| {
            let row = self.lease_row(tx)?;
            if let Some(e) = SinkError::from_verdict(judge(row.as_ref().map(|r| &r.stored), fence, false)) {
                return Err(e);
            }
            let now = now_ms();
            tx.execute(
                &self.lease_sql.extend_lease("?2", false),
                rusqlite::params![self.pipeline, now.saturating_add(ttl(fence.ttl_ms))],
            )
            .map_err(|e| self.classify(e))?;
            let row = self.lease_row(tx)?.expect("judged present above");
            self.info(tx, &row, now, true)
        })
    }

    pub(crate) fn release_blocking(&self, fence: &Fence) -> Result<(), SinkError> {
        self.in_lease_tx(|tx| {
            let sql = self.lease_sql.release_lease();
            let epoch = i64::try_from(fence.epoch).unwrap_or(i64::MAX);
            tx.execute(&sql, rusqlite::params![self.pipeline, fence.owner, epoch])
                .map_err(|e| self.classify(e))?;
            Ok(())
        })
    }

    pub(crate) fn lease_blocking(&self) -> Result<Option<LeaseInfo>, SinkError> {
        let mut state = self.state();
        if state.conn.is_none() && !self.path.exists() {
            return Ok(None); // reading must not create the file
        }
        let conn = self.connection(&mut state)?;
        let now = now_ms();
        match self.lease_row(conn)? {
            Some(row) => self.info(conn, &row, now, false).map(Some),
            None => Ok(None),
        }
    }

    /// Inside `reset`'s transaction: takes the lease from any running owner and leaves it
    /// released, so that owner's next commit is refused (it resyncs once it takes the
    /// lease back), and no instance waits for the reset's lease to expire.
    pub(crate) fn take_for_reset(&self, tx: &Transaction<'_>) -> Result<(), SinkError> {
        if Self::exists(tx, LEASE_TABLE).map_err(|e| self.classify(e))? {
            self.take(tx, &format!("reset-{}", shapesync_core::lease::instance_id()), 0, 0)?;
        }
        Ok(())
    }
}
