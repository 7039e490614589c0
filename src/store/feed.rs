//! The change feed: every committed change to `meta`, numbered, for watchers.
//!
//! The writer numbers each change inside the transaction that makes it, stores the number beside
//! the object it changed (`meta.change_seq`), and records the change in the `changes` table
//! there too (without its content, and only the last [`HISTORY_CHANGES`] are kept); after the
//! commit it puts the change in a history in memory and sends it on a broadcast channel,
//! neither of which can make it wait.
//!
//! The numbers are the local API's `resourceVersion`s: an object's is the number of its last
//! change, a list's the last number, an event's that of its change. So a client that resumes a
//! watch from whatever it was handed last (a list, an event, a bookmark) is given the changes
//! after it from the history, instead of missing them or being told to list again. Because the
//! numbers and the recent changes are in the database, that also holds across a restart, while
//! the history covers the version. A new database starts its numbers at the microseconds since
//! the epoch, above any number an older MetaManager gave out.
//!
//! The history is bounded twice: [`HISTORY_CHANGES`] changes, which decides how far back a
//! watch resumes, and [`FEED_HISTORY_BYTES`] of the objects they carry. Past the byte bound the
//! oldest changes lose their object but stay in the history, as the changes recorded before a
//! restart are: a watcher resumed over one reads the object as stored now.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use super::StoreEvent;

/// Changes kept, in memory and in the `changes` table, for watches that resume from a version:
/// a watch from a version at most this many changes old resumes without a 410. A client whose
/// watch timed out after ten quiet minutes, on a node taking a change a second, is 600 changes
/// behind; this covers over an hour at that rate. A change costs about a hundred bytes here
/// (its key and type) once its object is let go (see [`FEED_HISTORY_BYTES`]).
pub const HISTORY_CHANGES: usize = 4096;

/// Changes buffered for each live watcher's task between the writer and its queue (the task
/// takes them off as they come; one that falls this far behind is told to list again).
pub const LIVE_BUFFER: usize = 1024;

/// Bytes of the objects the history holds (with keys and bookkeeping, see
/// [`StoreEvent::size`]). Past it the oldest changes keep only their key and number.
pub const FEED_HISTORY_BYTES: usize = 8 * 1024 * 1024;

/// A watch asked for changes the history no longer holds.
#[derive(Debug, thiserror::Error)]
#[error("resource version {0} is too old or unknown; list again")]
pub struct Expired(pub u64);

/// Where a watch resumes: a live receiver, and the recorded changes it will not receive.
pub type Resume = (broadcast::Receiver<Arc<StoreEvent>>, Vec<Arc<StoreEvent>>);

pub(super) struct Feed {
    /// The number of the last change sent.
    seq: AtomicU64,
    sender: broadcast::Sender<Arc<StoreEvent>>,
    /// Locked by the writer to record a commit's changes and by a resuming watcher to copy
    /// the ones it needs: both are a few microseconds, so the writer's wait is that at most.
    history: Mutex<History>,
}

struct History {
    events: VecDeque<Arc<StoreEvent>>,
    /// What `events` holds, by [`StoreEvent::size`].
    bytes: usize,
    /// Every change numbered from here on is in `events`.
    since: u64,
    /// The first this many of `events` carry no object (let go for the byte bound, or
    /// recorded before a restart).
    bare: usize,
}

impl History {
    /// Holds `events` to [`HISTORY_CHANGES`] and, by letting the oldest objects go, to
    /// [`FEED_HISTORY_BYTES`]; only when bare changes alone are over it are changes dropped.
    fn bound(&mut self) {
        while self.events.len() > HISTORY_CHANGES {
            self.pop_front();
        }
        while self.bytes > FEED_HISTORY_BYTES && self.bare < self.events.len() {
            let old = &self.events[self.bare];
            if old.value.is_some() {
                let bare = Arc::new(StoreEvent {
                    value: None,
                    ..StoreEvent::clone(old)
                });
                self.bytes = self.bytes - old.size() + bare.size();
                self.events[self.bare] = bare;
            }
            self.bare += 1;
        }
        while self.bytes > FEED_HISTORY_BYTES {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some(old) = self.events.pop_front() {
            self.bytes -= old.size();
            self.since = old.seq + 1;
            self.bare = self.bare.saturating_sub(1);
        }
    }
}

impl Default for Feed {
    fn default() -> Self {
        Self::new(first_number() - 1, Vec::new())
    }
}

/// Where the numbers of a database without any start: the microseconds since the epoch.
pub fn first_number() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64)
}

impl Feed {
    /// A feed whose last change was numbered `last`, with `recent` (numbered, oldest first, the
    /// last of them `last`) as its history: what the `changes` table held at start-up.
    pub fn new(last: u64, recent: Vec<StoreEvent>) -> Self {
        let since = recent.first().map_or(last + 1, |e| e.seq);
        let events: VecDeque<Arc<StoreEvent>> = recent.into_iter().map(Arc::new).collect();
        let bytes = events.iter().map(|e| e.size()).sum();
        let bare = events.len();
        let mut history = History {
            events,
            bytes,
            since,
            bare,
        };
        history.bound();
        Self {
            seq: AtomicU64::new(last),
            sender: broadcast::channel(LIVE_BUFFER).0,
            history: Mutex::new(history),
        }
    }
}

impl Feed {
    pub fn watched(&self) -> bool {
        self.sender.receiver_count() > 0
    }

    /// Records and sends one commit's changes, numbered by the writer. Called by the writer
    /// only; never waits.
    pub fn publish(&self, events: Vec<StoreEvent>) {
        let Some(last) = events.last().map(|e| e.seq) else {
            return;
        };
        let events: Vec<Arc<StoreEvent>> = events.into_iter().map(Arc::new).collect();
        self.seq.store(last, Ordering::SeqCst);
        // Recorded before sent: a watcher that subscribes and then reads the history sees
        // each change in one or the other, possibly both (it skips numbers it has seen).
        {
            let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
            for e in &events {
                h.bytes += e.size();
                h.events.push_back(e.clone());
            }
            h.bound();
        }
        for e in events {
            // A receiver that is behind loses the oldest and is told so; the send never waits.
            let _ = self.sender.send(e);
        }
    }

    /// The number of the last change sent: what a list read after this call includes.
    pub fn position(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<StoreEvent>> {
        self.sender.subscribe()
    }

    /// A live receiver, and the recorded changes after `version` that it will not see.
    pub fn since(&self, version: u64) -> Result<Resume, Expired> {
        let live = self.sender.subscribe();
        if version > self.position() {
            return Err(Expired(version));
        }
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        if version + 1 < h.since {
            return Err(Expired(version));
        }
        // Numbered in order: the first change after `version` is found by bisection, so the
        // lock is held for copying pointers, not for a scan.
        let first = h.events.partition_point(|e| e.seq <= version);
        let backlog = h.events.range(first..).cloned().collect();
        Ok((live, backlog))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ChangeKind;

    /// Numbers `events` after the feed's last, as the writer does, and publishes them.
    fn publish(feed: &Feed, mut events: Vec<StoreEvent>) {
        let mut next = feed.position();
        for e in &mut events {
            next += 1;
            e.seq = next;
        }
        feed.publish(events);
    }

    fn event(key: &str) -> StoreEvent {
        StoreEvent {
            seq: 0,
            kind: ChangeKind::Added,
            key: key.into(),
            rtype: "pod".into(),
            value: Some(bytes::Bytes::from_static(b"{}")),
        }
    }

    #[test]
    fn bare_changes_too_are_bounded_in_bytes() {
        let feed = Feed::default();
        let start = feed.position();
        let long_key = "k".repeat(64 * 1024);
        for _ in 0..200 {
            publish(&feed, vec![event(&long_key)]);
        }
        let h = feed.history.lock().unwrap();
        assert!(h.bytes <= FEED_HISTORY_BYTES, "{} bytes held", h.bytes);
        assert!(h.events.len() < 200 && !h.events.is_empty());
        drop(h);
        assert!(feed.since(start).is_err(), "what was let go is expired");
        assert_eq!(feed.since(feed.position() - 2).unwrap().1.len(), 2);
    }

    #[test]
    fn ten_quiet_minutes_at_a_change_a_second_resume() {
        let feed = Feed::default();
        let watched_last = feed.position();
        // Pod-sized objects, each kept while somebody watched.
        let pod = bytes::Bytes::from(vec![b' '; 16 * 1024]);
        for i in 0..600 + 60 {
            let mut e = event(&format!("default/pod/p{}", i % 50));
            e.value = Some(pod.clone());
            publish(&feed, vec![e]);
        }
        assert_eq!(feed.since(watched_last).unwrap().1.len(), 660);
    }

    #[test]
    fn a_watch_from_a_version_gets_what_came_after_it() {
        let feed = Feed::default();
        publish(&feed, vec![event("a")]);
        let listed = feed.position();
        publish(&feed, vec![event("b"), event("c")]);
        let (_live, backlog) = feed.since(listed).unwrap();
        let keys: Vec<&str> = backlog.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["b", "c"]);
        assert_eq!(backlog[1].seq, feed.position());
        assert!(feed.since(feed.position()).unwrap().1.is_empty());
        assert!(feed.since(feed.position() + 1).is_err(), "a future version");
    }

    #[test]
    fn versions_the_history_no_longer_holds_are_expired() {
        let feed = Feed::default();
        let start = feed.position();
        for i in 0..HISTORY_CHANGES + 10 {
            publish(&feed, vec![event(&format!("k{i}"))]);
        }
        assert!(feed.since(start).is_err());
        assert!(feed.since(1).is_err(), "a version from an earlier run");
        let recent = feed.position() - 5;
        assert_eq!(feed.since(recent).unwrap().1.len(), 5);
    }

    #[test]
    fn past_the_byte_bound_the_oldest_changes_keep_their_number_but_not_their_object() {
        let feed = Feed::default();
        let start = feed.position();
        let big = bytes::Bytes::from(vec![b' '; 1024 * 1024]);
        for i in 0..20 {
            let mut e = event(&format!("k{i}"));
            e.value = Some(big.clone());
            publish(&feed, vec![e]);
        }
        let h = feed.history.lock().unwrap();
        assert!(h.bytes <= FEED_HISTORY_BYTES, "{} bytes held", h.bytes);
        assert_eq!(h.events.len(), 20, "every change is still there");
        drop(h);
        let backlog = feed.since(start).unwrap().1;
        assert_eq!(backlog.len(), 20);
        assert!(backlog[0].value.is_none(), "the oldest object was let go");
        assert!(backlog[19].value.is_some(), "the newest is kept");
    }

    #[test]
    fn a_feed_reopened_from_its_recorded_changes_resumes_versions_given_out_before() {
        let recent: Vec<StoreEvent> = (0..3)
            .map(|i| StoreEvent {
                seq: 100 + i,
                value: None,
                ..event(&format!("k{i}"))
            })
            .collect();
        let feed = Feed::new(102, recent);
        assert_eq!(feed.position(), 102);
        let keys: Vec<String> = feed
            .since(100)
            .unwrap()
            .1
            .iter()
            .map(|e| e.key.clone())
            .collect();
        assert_eq!(keys, ["k1", "k2"]);
        assert!(feed.since(98).is_err(), "before the recorded history");
        publish(&feed, vec![event("k3")]);
        assert_eq!(feed.position(), 103);
    }
}
