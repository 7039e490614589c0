//! The change feed: every committed change to `meta`, numbered, for watchers.
//!
//! The writer numbers each change inside the transaction that makes it, and records it in the
//! `changes` table there too (without its content, and only the last [`FEED_DEPTH`] are kept);
//! after the commit it puts the change in a short history in memory and sends it on a broadcast
//! channel, neither of which can make it wait. The numbers are what a list reports as its
//! `resourceVersion`, so a client that lists and then watches from that version is given the
//! changes in between from the history, instead of missing them. Because the numbers and the
//! recent changes are in the database, a watch from a version given out before a restart
//! resumes after it, without a 410, while the history covers it. A new database starts its
//! numbers at the microseconds since the epoch, above any number an older MetaManager gave out.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use super::StoreEvent;

/// Changes kept for watchers that start from a version, and buffered for each live watcher.
pub const FEED_DEPTH: usize = 1024;

/// Bytes the history may hold (values, keys and bookkeeping, see [`StoreEvent::size`]). With
/// large objects the byte bound, not [`FEED_DEPTH`], decides how far back a watch can resume.
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
    history: Mutex<History>,
    /// Non-zero: the number of the last change the writer could not record because a watcher
    /// was reading the history at that moment. The history is not complete up to there.
    gap: AtomicU64,
}

struct History {
    events: VecDeque<Arc<StoreEvent>>,
    /// What `events` holds, by [`StoreEvent::size`].
    bytes: usize,
    /// Every change numbered from here on is in `events`.
    since: u64,
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
        Self {
            seq: AtomicU64::new(last),
            sender: broadcast::channel(FEED_DEPTH).0,
            history: Mutex::new(History {
                events,
                bytes,
                since,
            }),
            gap: AtomicU64::new(0),
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
        match self.history.try_lock() {
            Ok(mut h) => {
                let gap = self.gap.swap(0, Ordering::SeqCst);
                if gap != 0 {
                    h.events.clear();
                    h.bytes = 0;
                    h.since = gap + 1;
                }
                for e in &events {
                    h.bytes += e.size();
                    h.events.push_back(e.clone());
                }
                while h.events.len() > FEED_DEPTH || h.bytes > FEED_HISTORY_BYTES {
                    let Some(old) = h.events.pop_front() else {
                        break;
                    };
                    h.bytes -= old.size();
                    h.since = old.seq + 1;
                }
            }
            Err(_) => {
                if let Some(last) = events.last() {
                    self.gap.store(last.seq, Ordering::SeqCst);
                }
            }
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
        let h = self.history.lock().map_err(|_| Expired(version))?;
        let since = match self.gap.load(Ordering::SeqCst) {
            0 => h.since,
            gap => gap + 1,
        };
        if version + 1 < since {
            return Err(Expired(version));
        }
        let backlog = h
            .events
            .iter()
            .filter(|e| e.seq > version)
            .cloned()
            .collect();
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
    fn the_history_is_bounded_in_bytes() {
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
        assert!(h.events.len() < 20 && !h.events.is_empty());
        drop(h);
        assert!(feed.since(start).is_err(), "what was let go is expired");
        assert_eq!(feed.since(feed.position() - 2).unwrap().1.len(), 2);
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
        for i in 0..FEED_DEPTH + 10 {
            publish(&feed, vec![event(&format!("k{i}"))]);
        }
        assert!(feed.since(start).is_err());
        assert!(feed.since(1).is_err(), "a version from an earlier run");
        let recent = feed.position() - 5;
        assert_eq!(feed.since(recent).unwrap().1.len(), 5);
    }

    #[test]
    fn a_change_not_recorded_while_a_watcher_reads_expires_older_versions() {
        let feed = Feed::default();
        let before = feed.position();
        let held = feed.history.lock().unwrap();
        publish(&feed, vec![event("a")]);
        drop(held);
        assert!(feed.since(before).is_err(), "the history misses `a`");
        let after = feed.position();
        publish(&feed, vec![event("b")]);
        let keys: Vec<String> = feed
            .since(after)
            .unwrap()
            .1
            .iter()
            .map(|e| e.key.clone())
            .collect();
        assert_eq!(keys, ["b"]);
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
