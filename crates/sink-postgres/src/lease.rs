//! The pipeline's lease in the target database, beside its checkpoint.
//!
//! One row per pipeline in `<schema>._shapesync_leases` (owner, epoch, seq, expiry in ms
//! by the database's clock, so instances' clocks never matter) and one per standby in
//! `<schema>._shapesync_standbys`. Whatever reads a lease and then writes it first locks
//! its row (`SELECT … FOR UPDATE`) in the same transaction, a batch included (see
//! `PostgresSink::apply_in`): a takeover waits for a commit in flight, and a commit after
//! a takeover sees the new epoch and writes nothing.

use shapesync_core::lease::{StoredLease, Verdict, judge};
use shapesync_core::{Acquisition, Fence, LeaseInfo, LeaseRequest, SinkError};
use sqlx::{AssertSqlSafe, Postgres, Row as _, Transaction};

use crate::sink::{PostgresSink, UNDEFINED_TABLE, classify, execute};

/// The database's clock in milliseconds since the Unix epoch, as SQL.
const NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::int8";

/// A lease row: the fields the fence compares, and how long until it expires.
struct LeaseRow {
    stored: StoredLease,
    expires_in_ms: i64,
}

fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl PostgresSink {
    /// Creates the lease tables if missing (once per sink, unless they vanish).
    async fn ensure_lease_tables(&self, tx: &mut Transaction<'static, Postgres>) -> Result<(), SinkError> {
        if self.lease_tables_ready.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        self.lock_ddl(tx).await?;
        let [leases, standbys] = self.lease_sql.create_tables();
        execute(tx, leases, []).await.map_err(|e| self.schema_hint(e))?;
        execute(tx, standbys, []).await
    }

    /// Runs `acquire_lease`'s work; when it fails while the lease tables were believed
    /// to exist (they may have been dropped: a store that lost its state), tries once
    /// more, creating them.
    pub(crate) async fn acquire_tracked(&self, request: &LeaseRequest) -> Result<Acquisition, SinkError> {
        let believed = self.lease_tables_ready.load(std::sync::atomic::Ordering::Relaxed);
        let mut result = self.acquire_lease(request).await;
        if result.is_err() && believed {
            self.lease_tables_ready.store(false, std::sync::atomic::Ordering::Relaxed);
            result = self.acquire_lease(request).await;
        }
        self.lease_tables_ready.store(result.is_ok(), std::sync::atomic::Ordering::Relaxed);
        result
    }

    /// The pipeline's lease row, locked until the transaction ends. `None` when there
    /// is none — also when the table is gone (the error aborts the transaction, which the
    /// caller then rolls back: it is refused anyway).
    async fn lock_lease(
        &self,
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<Option<LeaseRow>, SinkError> {
        let sql = self.lease_sql.read_lease(&format!("expires_at_ms - {NOW_MS}"), true);
        let row = match sqlx::query(AssertSqlSafe(sql)).bind(&self.pipeline).fetch_optional(&mut **tx).await {
            Ok(row) => row,
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some(UNDEFINED_TABLE) => {
                return Ok(None);
            }
            Err(e) => return Err(classify(e)),
        };
        row.map(|r| {
            Ok(LeaseRow {
                stored: StoredLease {
                    owner: r.try_get(0).map_err(classify)?,
                    epoch: r.try_get::<i64, _>(1).map_err(classify)?.try_into().unwrap_or(0),
                    seq: r.try_get::<i64, _>(2).map_err(classify)?.try_into().unwrap_or(0),
                },
                expires_in_ms: r.try_get(3).map_err(classify)?,
            })
        })
        .transpose()
    }

    /// Live standbys of the pipeline other than `owner`, pruning expired ones.
    async fn standbys(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        owner: &str,
    ) -> Result<Vec<String>, SinkError> {
        execute(tx, self.lease_sql.prune_standbys(NOW_MS), [Some(self.pipeline.clone())]).await?;
        let sql = format!(
            "SELECT instance FROM {} WHERE pipeline = $1 AND instance <> $2 ORDER BY instance",
            self.lease_sql.standbys()
        );
        sqlx::query_scalar(AssertSqlSafe(sql))
            .bind(&self.pipeline)
            .bind(owner)
            .fetch_all(&mut **tx)
            .await
            .map_err(classify)
    }

    /// Takes the lease for `owner` whoever holds it: a new epoch, the same commit count,
    /// expiring `ttl_ms` from now (0: released at once).
    async fn take(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        old: Option<&LeaseRow>,
        owner: &str,
        ttl_ms: u64,
    ) -> Result<Fence, SinkError> {
        let epoch = old.map_or(0, |r| r.stored.epoch) + 1;
        let seq = old.map_or(0, |r| r.stored.seq);
        let expires = if ttl_ms == 0 { "0".to_owned() } else { format!("{NOW_MS} + {}", signed(ttl_ms)) };
        let sql = self.lease_sql.store_lease(&expires);
        let params =
            [&self.pipeline, owner, &epoch.to_string(), &seq.to_string()].map(|p| Some(p.to_owned()));
        execute(tx, sql, params).await?;
        execute(tx, self.lease_sql.remove_standby(), [Some(self.pipeline.clone()), Some(owner.to_owned())])
            .await?;
        Ok(Fence { owner: owner.to_owned(), epoch, seq, ttl_ms })
    }

    /// Checks a batch's fence at the start of its transaction, locking the lease row:
    /// `Ok(true)` to write it, `Ok(false)` when it was already committed.
    pub(crate) async fn check_fence(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        fence: &Fence,
    ) -> Result<bool, SinkError> {
        let row = self.lock_lease(tx).await?;
        let verdict = judge(row.as_ref().map(|r| &r.stored), fence, true);
        match SinkError::from_verdict(verdict.clone()) {
            Some(e) => Err(e),
            None => Ok(verdict == Verdict::Proceed),
        }
    }

    /// Counts the batch's commit under `fence` and extends the lease by its TTL from
    /// now (the end of the batch: a long batch does not eat into the lease).
    pub(crate) async fn count_commit(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        fence: &Fence,
    ) -> Result<(), SinkError> {
        let sql = self.lease_sql.extend_lease(&format!("{NOW_MS} + {}", signed(fence.ttl_ms)), true);
        execute(tx, sql, [Some(self.pipeline.clone())]).await
    }

    async fn acquire_lease(&self, request: &LeaseRequest) -> Result<Acquisition, SinkError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        self.ensure_lease_tables(&mut tx).await?;
        // The row must exist to be locked: two instances asking at once then queue on it.
        let sql = format!(
            "INSERT INTO {} (pipeline, owner, epoch, seq, expires_at_ms) VALUES ($1, '', 0, 0, 0) ON CONFLICT (pipeline) DO NOTHING",
            self.lease_sql.leases()
        );
        execute(&mut tx, sql, [Some(self.pipeline.clone())]).await?;
        let row = self.lock_lease(&mut tx).await?.ok_or_else(|| {
            SinkError::unavailable("the lease row vanished while being taken; trying again")
        })?;
        let held_by_other = row.expires_in_ms > 0 && row.stored.owner != request.owner;
        let acquisition = if request.take && !held_by_other {
            let fence = self.take(&mut tx, Some(&row), &request.owner, request.ttl_ms).await?;
            Acquisition::Owned { fence, generation_floor: 0 }
        } else {
            let sql = self.lease_sql.store_standby(&format!("{NOW_MS} + {}", signed(request.ttl_ms)));
            execute(&mut tx, sql, [Some(self.pipeline.clone()), Some(request.owner.clone())]).await?;
            Acquisition::NotOwned(LeaseInfo {
                standbys: self.standbys(&mut tx, &row.stored.owner).await?,
                owner: row.stored.owner,
                epoch: row.stored.epoch,
                expires_in_ms: row.expires_in_ms,
            })
        };
        tx.commit().await.map_err(classify)?;
        Ok(acquisition)
    }

    pub(crate) async fn renew_lease(&self, fence: &Fence) -> Result<LeaseInfo, SinkError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let row = self.lock_lease(&mut tx).await?;
        if let Some(e) = SinkError::from_verdict(judge(row.as_ref().map(|r| &r.stored), fence, false)) {
            return Err(e);
        }
        let extend = self.lease_sql.extend_lease(&format!("{NOW_MS} + {}", signed(fence.ttl_ms)), false);
        let sql = format!("{extend} RETURNING expires_at_ms - {NOW_MS}");
        let expires_in_ms: i64 = sqlx::query_scalar(AssertSqlSafe(sql))
            .bind(&self.pipeline)
            .fetch_one(&mut *tx)
            .await
            .map_err(classify)?;
        let standbys = self.standbys(&mut tx, &fence.owner).await?;
        tx.commit().await.map_err(classify)?;
        Ok(LeaseInfo { owner: fence.owner.clone(), epoch: fence.epoch, expires_in_ms, standbys })
    }

    pub(crate) async fn release_lease(&self, fence: &Fence) -> Result<(), SinkError> {
        sqlx::query(AssertSqlSafe(self.lease_sql.release_lease()))
            .bind(&self.pipeline)
            .bind(&fence.owner)
            .bind(fence.epoch.to_string())
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(())
    }

    pub(crate) async fn read_lease(&self) -> Result<Option<LeaseInfo>, SinkError> {
        let sql = format!(
            "SELECT owner, epoch, expires_at_ms - {NOW_MS},
                    coalesce((SELECT array_agg(s.instance ORDER BY s.instance) FROM {} s
                              WHERE s.pipeline = l.pipeline AND s.instance <> l.owner AND s.expires_at_ms > {NOW_MS}), '{{}}')
             FROM {} l WHERE pipeline = $1 AND owner <> ''",
            self.lease_sql.standbys(),
            self.lease_sql.leases()
        );
        let row = match sqlx::query(AssertSqlSafe(sql)).bind(&self.pipeline).fetch_optional(&self.pool).await
        {
            Ok(row) => row,
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some(UNDEFINED_TABLE) => {
                return Ok(None);
            }
            Err(e) => return Err(classify(e)),
        };
        row.map(|r| {
            Ok(LeaseInfo {
                owner: r.try_get(0).map_err(classify)?,
                epoch: r.try_get::<i64, _>(1).map_err(classify)?.try_into().unwrap_or(0),
                expires_in_ms: r.try_get(2).map_err(classify)?,
                standbys: r.try_get(3).map_err(classify)?,
            })
        })
        .transpose()
    }

    /// Inside `reset`'s transaction: takes the lease from any running owner and leaves it
    /// released, so that owner's next commit is refused (it resyncs once it takes the
    /// lease back), and no instance waits for the reset's lease to expire.
    pub(crate) async fn take_for_reset(
        &self,
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), SinkError> {
        let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(self.lease_sql.leases())
            .fetch_one(&mut **tx)
            .await
            .map_err(classify)?;
        if exists.is_some() {
            let row = self.lock_lease(tx).await?;
            let owner = format!("reset-{}", shapesync_core::lease::instance_id());
            self.take(tx, row.as_ref(), &owner, 0).await?;
        }
        Ok(())
    }
}
