//! Spreading pipelines over the instances that run the same pipeline files.
//!
//! There is no coordinator to run: each instance learns the others from the leases it
//! reads — owners, and the standbys every lease request records — and keeps to its
//! share. With `N` live instances and `P` pipelines an instance takes a free lease only
//! while it owns fewer than `⌈P/N⌉`, or when the pipeline has been orphaned for a whole
//! TTL (then one over its share, so nothing stays unowned while the view of who is
//! alive catches up). An instance owning more than its share while another owns less
//! hands one pipeline over (releases its lease) per renewal. A new instance first
//! announces itself for one poll before it takes anything, so instances started
//! together do not all grab everything first.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Instant;

use crate::{LeaseInfo, LeaseTiming};

/// One instance's view of who runs which pipeline; shared by its pipelines.
#[derive(Debug)]
pub struct Fleet {
    me: String,
    pipelines: usize,
    spread: bool,
    timing: LeaseTiming,
    started: Instant,
    view: Mutex<HashMap<String, Seen>>,
}

/// The last look at one pipeline's lease.
#[derive(Debug)]
struct Seen {
    at: Instant,
    /// The live holder, if any.
    owner: Option<String>,
    standbys: Vec<String>,
    /// Since when nobody holds it, as far as this instance saw.
    free_since: Option<Instant>,
}

/// Live instances and how many pipelines each owns.
struct Census {
    owned: BTreeMap<String, usize>,
    live: BTreeSet<String>,
}

impl Fleet {
    /// An instance `me` running `pipelines` pipelines; `spread` shares them with other
    /// instances (otherwise it takes every lease it can).
    pub fn new(me: impl Into<String>, pipelines: usize, spread: bool, timing: LeaseTiming) -> Self {
        Fleet {
            me: me.into(),
            pipelines: pipelines.max(1),
            spread,
            timing,
            started: Instant::now(),
            view: Mutex::default(),
        }
    }

    /// This instance's id, as its leases name it.
    pub fn instance(&self) -> &str {
        &self.me
    }

    /// The lease timing every pipeline of this instance uses.
    pub fn timing(&self) -> &LeaseTiming {
        &self.timing
    }

    fn view(&self) -> std::sync::MutexGuard<'_, HashMap<String, Seen>> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a look at `pipeline`'s lease.
    pub fn observe(&self, pipeline: &str, lease: &LeaseInfo) {
        let now = Instant::now();
        let owner = lease.is_held().then(|| lease.owner.clone());
        let mut view = self.view();
        let free_since = match (&owner, view.get(pipeline)) {
            (Some(_), _) => None,
            (None, Some(seen)) => seen.free_since.or(Some(now)),
            (None, None) => Some(now),
        };
        view.insert(
            pipeline.to_owned(),
            Seen { at: now, owner, standbys: lease.standbys.clone(), free_since },
        );
    }

    /// Records that this instance holds `pipeline`'s lease (with the standbys the store
    /// reported).
    pub fn observe_owned(&self, pipeline: &str, standbys: &[String]) {
        let seen = Seen {
            at: Instant::now(),
            owner: Some(self.me.clone()),
            standbys: standbys.to_vec(),
            free_since: None,
        };
        self.view().insert(pipeline.to_owned(), seen);
    }

    /// Records that this instance no longer holds `pipeline`'s lease.
    pub fn released(&self, pipeline: &str) {
        if let Some(seen) = self.view().get_mut(pipeline)
            && seen.owner.as_deref() == Some(&self.me)
        {
            seen.owner = None;
            seen.free_since = Some(Instant::now());
        }
    }

    fn census(&self, view: &HashMap<String, Seen>) -> Census {
        let fresh = self.timing.ttl * 2;
        let mut census = Census { owned: BTreeMap::new(), live: BTreeSet::from([self.me.clone()]) };
        for seen in view.values().filter(|s| s.at.elapsed() < fresh) {
            if let Some(owner) = &seen.owner {
                *census.owned.entry(owner.clone()).or_default() += 1;
                census.live.insert(owner.clone());
            }
            census.live.extend(seen.standbys.iter().cloned());
        }
        census
    }

    fn share(&self, census: &Census) -> usize {
        self.pipelines.div_ceil(census.live.len())
    }

    /// Whether to take `pipeline`'s lease if it is free.
    pub fn may_take(&self, pipeline: &str) -> bool {
        if !self.spread {
            return true;
        }
        if self.pipelines > 1 && self.started.elapsed() < self.timing.poll {
            return false; // announce first: instances started together see each other
        }
        let view = self.view();
        let census = self.census(&view);
        let share = self.share(&census);
        let mine = census.owned.get(&self.me).copied().unwrap_or(0);
        let orphaned = view
            .get(pipeline)
            .and_then(|s| s.free_since)
            .is_some_and(|since| since.elapsed() >= self.timing.ttl);
        mine < share || (orphaned && mine <= share)
    }

    /// Whether to hand `pipeline` over: this instance owns more than its share while
    /// another live instance owns less. Answering yes marks it released in the view, so
    /// the next question counts one fewer.
    pub fn should_hand_over(&self, pipeline: &str) -> bool {
        if !self.spread {
            return false;
        }
        let mut view = self.view();
        let census = self.census(&view);
        let share = self.share(&census);
        let mine = census.owned.get(&self.me).copied().unwrap_or(0);
        let someone_has_room =
            census.live.iter().any(|i| *i != self.me && census.owned.get(i).copied().unwrap_or(0) < share);
        if mine <= share || !someone_has_room {
            return false;
        }
        if let Some(seen) = view.get_mut(pipeline) {
            seen.owner = None;
            seen.free_since = Some(Instant::now());
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn fleet(pipelines: usize) -> Fleet {
        let timing = LeaseTiming { ttl: Duration::from_secs(5), poll: Duration::ZERO };
        Fleet::new("me", pipelines, true, timing)
    }

    fn names(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn held(owner: &str, standbys: &[&str]) -> LeaseInfo {
        LeaseInfo {
            owner: owner.into(),
            epoch: 1,
            expires_in_ms: 1000,
            standbys: standbys.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn alone_it_takes_everything() {
        let f = fleet(3);
        assert!(f.may_take("a"));
        f.observe_owned("a", &[]);
        f.observe_owned("b", &[]);
        assert!(f.may_take("c"));
        assert!(!f.should_hand_over("a"));
    }

    #[test]
    fn with_others_it_keeps_to_its_share_and_hands_over_the_rest() {
        let f = fleet(4);
        f.observe_owned("a", &names(&["other"]));
        f.observe_owned("b", &names(&["other"]));
        f.observe_owned("c", &names(&["other"]));
        // Two live instances, four pipelines: a share of two. One over, and `other` owns none.
        assert!(f.should_hand_over("c"));
        assert!(!f.should_hand_over("b"), "handed one over: at its share now");
        f.observe("d", &held("other", &[]));
        assert!(!f.may_take("c"), "at its share");
    }

    #[test]
    fn an_orphan_is_taken_one_over_the_share_once_free_for_a_ttl() {
        let ttl = Duration::from_millis(20);
        let f = Fleet::new("me", 2, true, LeaseTiming { ttl, poll: Duration::ZERO });
        let gone = LeaseInfo { owner: "gone".into(), expires_in_ms: -5, ..Default::default() };
        f.observe("b", &gone);
        f.observe_owned("a", &names(&["other"]));
        assert!(!f.may_take("b"), "at its share (two instances, two pipelines), and b only just freed");
        std::thread::sleep(ttl + Duration::from_millis(5)); // the rule under test is about elapsed time
        f.observe("b", &gone);
        f.observe_owned("a", &names(&["other"]));
        assert!(f.may_take("b"), "free for a whole TTL: taken although at its share");
    }

    #[test]
    fn without_spreading_everything_is_taken() {
        let f = Fleet::new("me", 2, false, LeaseTiming::default());
        f.observe_owned("a", &names(&["x", "y", "z"]));
        assert!(f.may_take("b"));
        assert!(!f.should_hand_over("a"));
    }
}
