//! Leases: one writer per pipeline, proven by the sink at every commit.
//!
//! A pipeline's lease lives in its own sink, beside the checkpoint: the owning instance,
//! a fencing `epoch` that every acquisition raises, an expiry on the store's clock, and
//! `seq`, the number of commits stored under it. Every batch carries a [`Fence`]; the
//! sink's atomic unit first compares it with the stored lease and writes nothing unless
//! they agree ([`judge`] says how). So an instance that lost its lease — paused past
//! its expiry, cut off by a network partition, replaced by a rolling deploy — can never
//! overwrite what the new owner wrote, and a store that lost or rolled back its data
//! (restart without persistence, failover, restore, `reset`) is noticed at the next
//! commit or renewal instead of being written on.

use std::time::Duration;

/// Who may write a pipeline, and what the store held when it last wrote: carried by
/// every [`crate::Batch`] and checked by the sink in the batch's atomic unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The instance holding the lease.
    pub owner: String,
    /// The epoch of its acquisition; a later acquisition (by anyone) has a higher one.
    pub epoch: u64,
    /// Commits stored under the lease so far: the store must hold exactly this many
    /// before the batch, and this many plus one after it.
    pub seq: u64,
    /// How far a commit (and a renewal) pushes the lease's expiry, in milliseconds.
    pub ttl_ms: u64,
}

/// A lease as the store holds it, for operators and for spreading pipelines over
/// instances.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseInfo {
    /// The instance that holds (or last held) the lease.
    pub owner: String,
    /// Its fencing epoch.
    pub epoch: u64,
    /// Milliseconds until the lease expires by the store's clock; zero or less: expired,
    /// so anyone may take it.
    pub expires_in_ms: i64,
    /// Other instances that asked for the lease within the last TTL (standbys).
    pub standbys: Vec<String>,
}

impl LeaseInfo {
    /// Someone holds the lease now.
    pub fn is_held(&self) -> bool {
        self.expires_in_ms > 0
    }
}

/// What an instance asks of a pipeline's lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRequest {
    /// The asking instance.
    pub owner: String,
    /// The lease's time to live, in milliseconds.
    pub ttl_ms: u64,
    /// Take the lease if it is free (expired, released or never taken). When false the
    /// request only records the asker as a standby and reports the lease.
    pub take: bool,
}

/// The answer to a [`LeaseRequest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acquisition {
    /// The asker holds the lease now, with a new epoch.
    Owned {
        /// The fence its commits carry.
        fence: Fence,
        /// The highest resync generation any earlier holder may have written rows with
        /// (0 when the sink writes rows only together with their checkpoint): a new
        /// resync must start above it, or its sweep would miss those rows.
        generation_floor: u64,
    },
    /// Another instance holds the lease, or (when the request did not ask to take it)
    /// nobody does.
    NotOwned(LeaseInfo),
}

/// What a sink found when it compared a batch's fence with the stored lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The fence holds: write, and store `seq + 1` with the checkpoint.
    Proceed,
    /// The store already holds `seq + 1` under this very lease: this batch was committed
    /// by an attempt whose answer was lost (a timeout). Write nothing; it is done.
    AlreadyCommitted,
    /// Another instance took the lease: write nothing and stand by.
    Fenced(String),
    /// The store no longer holds what this owner wrote (its lease is gone or older):
    /// write nothing; the pipeline resyncs.
    Lost(String),
}

/// The lease fields a sink stores, as read inside the unit that checks them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredLease {
    /// Holder.
    pub owner: String,
    /// Fencing epoch.
    pub epoch: u64,
    /// Commits stored under the leases so far.
    pub seq: u64,
}

/// Compares a fence with the stored lease (`None`: there is none). `committing` is
/// false for a renewal, which accepts any `seq` from the fence's up (the owner's own
/// commits may have moved it on since the renewal read it).
///
/// The rules, the same in every sink (the Redis sink runs them in Lua): a missing lease
/// means the store lost its state; a higher epoch means another instance took over; a
/// lower epoch, the same epoch under another owner, or a `seq` other than ours means
/// the store went back in time or was rewritten — state lost.
pub fn judge(stored: Option<&StoredLease>, fence: &Fence, committing: bool) -> Verdict {
    let Some(stored) = stored else {
        return Verdict::Lost(
            "its lease record is gone: the store was emptied, restarted without persistence, or reset".into(),
        );
    };
    if stored.epoch > fence.epoch {
        return Verdict::Fenced(format!(
            "instance `{}` took the lease over (epoch {} > ours, {})",
            stored.owner, stored.epoch, fence.epoch
        ));
    }
    if stored.epoch < fence.epoch || stored.owner != fence.owner {
        return Verdict::Lost(format!(
            "its lease went back to epoch {} of `{}` (ours: {} of `{}`): the store was restored or rewritten",
            stored.epoch, stored.owner, fence.epoch, fence.owner
        ));
    }
    match stored.seq {
        s if s == fence.seq => Verdict::Proceed,
        s if s == fence.seq + 1 && committing => Verdict::AlreadyCommitted,
        // A renewal races this owner's own commits, so any count from ours up is fine.
        s if s > fence.seq && !committing => Verdict::Proceed,
        s => Verdict::Lost(format!(
            "it holds commit {s} of this lease, but this instance stored {}: the store was restored from an older copy or lost writes",
            fence.seq
        )),
    }
}

/// Lease timing for a pipeline (the `lease:` section of pipeline files).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseTiming {
    /// The lease's time to live: how long after an owner dies another instance takes
    /// over.
    pub ttl: Duration,
    /// How often a standby asks for the lease.
    pub poll: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        LeaseTiming {
            ttl: Duration::from_millis(crate::config::defaults::LEASE_TTL_MS),
            poll: Duration::from_millis(crate::config::defaults::LEASE_POLL_MS),
        }
    }
}

impl LeaseTiming {
    /// How often an owner renews: three renewals per TTL, so one lost renewal never
    /// costs the lease.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }
}

/// This process's instance id: `<host>-<pid>-<random>`, unique among instances that run
/// the same pipelines (the random part tells apart two processes that reuse a pid).
pub fn instance_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned());
    let suffix: u32 = rand::random();
    format!("{host}-{}-{suffix:08x}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fence(epoch: u64, seq: u64) -> Fence {
        Fence { owner: "a".into(), epoch, seq, ttl_ms: 1000 }
    }

    fn stored(owner: &str, epoch: u64, seq: u64) -> StoredLease {
        StoredLease { owner: owner.into(), epoch, seq }
    }

    #[test]
    fn a_matching_lease_proceeds_and_a_repeated_commit_is_recognised() {
        assert_eq!(judge(Some(&stored("a", 3, 7)), &fence(3, 7), true), Verdict::Proceed);
        assert_eq!(judge(Some(&stored("a", 3, 8)), &fence(3, 7), true), Verdict::AlreadyCommitted);
        assert_eq!(judge(Some(&stored("a", 3, 8)), &fence(3, 7), false), Verdict::Proceed);
    }

    #[test]
    fn a_newer_epoch_fences_and_anything_older_or_missing_is_lost_state() {
        assert!(matches!(judge(Some(&stored("b", 4, 0)), &fence(3, 7), true), Verdict::Fenced(_)));
        assert!(matches!(judge(None, &fence(3, 7), true), Verdict::Lost(_)));
        assert!(matches!(judge(Some(&stored("b", 2, 9)), &fence(3, 7), true), Verdict::Lost(_)));
        assert!(matches!(judge(Some(&stored("b", 3, 7)), &fence(3, 7), true), Verdict::Lost(_)));
        assert!(matches!(judge(Some(&stored("a", 3, 6)), &fence(3, 7), true), Verdict::Lost(_)));
        assert!(matches!(judge(Some(&stored("a", 3, 9)), &fence(3, 7), true), Verdict::Lost(_)));
        assert_eq!(judge(Some(&stored("a", 3, 9)), &fence(3, 7), false), Verdict::Proceed);
        assert!(matches!(judge(Some(&stored("a", 3, 6)), &fence(3, 7), false), Verdict::Lost(_)));
    }

    #[test]
    fn instance_ids_differ() {
        assert_ne!(instance_id(), instance_id());
    }
}
