//! Patches passed on to the cloud, waiting for its answer.
//!
//! The cloud answers a patch with the object as it stands after the patch, and that answer
//! names the patch only by its `msg_id`, while a `podpatch`'s object is stored under another
//! key (the pod's). So the key is remembered with the id when the patch is passed on, and the
//! answer's object is stored under it ([`WaitingPatches::answer`]).
//!
//! A waiting patch is one value, [`WaitingPatch`], made together with the change that carries
//! the patch: it is remembered here at once (the change may reach the cloud through the outbox
//! before its step runs, and the answer must find it), and the change carries the same entry
//! as a row for the store, written in its transaction, from which this list is loaded at start
//! so that a patch queued before a restart and answered after it is stored too. If the change
//! does not commit with the row (it failed, or the patch was rejected), dropping the value
//! forgets the patch here as well; nobody pairs the two by hand.
//!
//! Memory is bounded: at most [`MAX_SENT_PATCHES`] patches wait for an answer, and past that
//! the oldest is forgotten; its answer, should it come, is then relayed to edged like any
//! unclaimed answer, without being stored. The store keeps its rows to the same bound.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use crate::message::{Message, Operation};
use crate::store::{Applied, Change, SentPatch, Write, MAX_SENT_PATCHES};

/// Where a patch's answer is stored: the key of the object it patched, and its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub key: String,
    pub rtype: String,
}

/// The patches waiting for the cloud's answer.
#[derive(Default)]
pub struct WaitingPatches {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// By msg_id: the target and the entry's number in `order`.
    by_id: HashMap<String, (u64, Target)>,
    /// Ids by age, oldest first, to forget the oldest.
    order: BTreeMap<u64, String>,
    next: u64,
}

impl WaitingPatches {
    /// The patches the store says still wait for an answer, oldest first.
    pub fn load(rows: Vec<SentPatch>) -> Self {
        let loaded = Self::default();
        for row in rows {
            let target = Target {
                key: row.key,
                rtype: row.rtype,
            };
            loaded.remember(&row.msg_id, target);
        }
        loaded
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers that the patch `msg_id` of `target` went to the cloud, under the number it
    /// returns. A redelivered patch counts as new.
    fn remember(&self, msg_id: &str, target: Target) -> u64 {
        let mut inner = self.lock();
        let Inner { by_id, order, next } = &mut *inner;
        if let Some((seq, _)) = by_id.remove(msg_id) {
            order.remove(&seq);
        }
        while by_id.len() >= MAX_SENT_PATCHES {
            let Some((_, oldest)) = order.pop_first() else {
                break;
            };
            by_id.remove(&oldest);
        }
        *next += 1;
        order.insert(*next, msg_id.to_owned());
        by_id.insert(msg_id.to_owned(), (*next, target));
        *next
    }

    /// Forgets the patch `msg_id` if it is still the entry numbered `seq` (a redelivery since
    /// may have remembered it again, and waits on).
    fn release(&self, msg_id: &str, seq: u64) {
        let mut inner = self.lock();
        if inner.by_id.get(msg_id).is_some_and(|(s, _)| *s == seq) {
            inner.by_id.remove(msg_id);
            inner.order.remove(&seq);
        }
    }

    /// The target of the patch `parent` answers, which is forgotten: one answer per patch.
    fn claim(&self, parent: &str) -> Option<Target> {
        let mut inner = self.lock();
        let (seq, target) = inner.by_id.remove(parent)?;
        inner.order.remove(&seq);
        Some(target)
    }

    /// The change the cloud's `answer` makes when it ends a patch's wait: the patch forgotten
    /// (here at once, in the store with the change) and, when the answer carries the object
    /// as the cloud has it after the patch, that object stored under the key the patch
    /// changed. A `response` with an object, or an `error`, ends the wait; anything else (a
    /// bare ack) leaves the patch waiting for the answer that carries the object. `None` when
    /// the answer ends no patch's wait.
    pub fn answer(&self, answer: &Message) -> Option<Change> {
        let parent = answer.header.parent_msg_id.as_deref()?;
        let object =
            answer.operation == Operation::Response && answer.content_json().starts_with('{');
        if !object && answer.operation != Operation::Error {
            return None;
        }
        let target = self.claim(parent)?;
        let write = object.then(|| Write::Put {
            key: target.key,
            rtype: target.rtype,
            value: answer.content.clone().unwrap_or_default(),
        });
        Some(Change {
            write,
            forget_patch: Some(parent.to_owned()),
            ..Change::default()
        })
    }

    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One patch waiting for the cloud's answer, from the moment its change is made; see the
/// module doc. Forgotten when dropped, unless [`WaitingPatch::committed`] found its row
/// written.
#[must_use = "dropping a waiting patch forgets it"]
pub struct WaitingPatch {
    patches: Arc<WaitingPatches>,
    msg_id: String,
    seq: u64,
    /// Whether its change queues for the cloud only when its write finds the object, and so
    /// records the row only then.
    needs_object: bool,
    kept: bool,
}

impl WaitingPatch {
    /// Starts waiting for the answer to the patch `msg_id` of `target`, which `change` passes
    /// on to the cloud: remembered here now, and `change`, returned, carries its row.
    pub fn new(
        patches: &Arc<WaitingPatches>,
        msg_id: &str,
        target: Target,
        change: Change,
    ) -> (Change, Self) {
        let row = SentPatch {
            msg_id: msg_id.to_owned(),
            key: target.key.clone(),
            rtype: target.rtype.clone(),
        };
        let seq = patches.remember(msg_id, target);
        let waiting = Self {
            patches: patches.clone(),
            msg_id: msg_id.to_owned(),
            seq,
            needs_object: change.to_cloud_needs_object,
            kept: false,
        };
        let change = Change {
            remember_patch: Some(row),
            ..change
        };
        (change, waiting)
    }

    /// Its change committed as `applied`: the patch waits on when the store wrote its row,
    /// and is forgotten when it did not (the patch was rejected, or found no object it
    /// needed).
    pub fn committed(mut self, applied: &Applied) {
        self.kept = applied.outcome.keeps_riders(self.needs_object);
    }
}

impl Drop for WaitingPatch {
    fn drop(&mut self) {
        if !self.kept {
            self.patches.release(&self.msg_id, self.seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Outcome;

    fn pod(name: &str) -> Target {
        Target {
            key: format!("default/pod/{name}"),
            rtype: "pod".into(),
        }
    }

    fn answer(parent: &str, content: &str) -> Message {
        let payload = format!(
            r#"{{"header":{{"msg_id":"a","parent_msg_id":"{parent}"}},"route":{{"operation":"response","resource":"default/pod/p"}},"content":{content}}}"#
        );
        Message::decode(payload.as_bytes(), 1 << 20).unwrap()
    }

    fn applied(outcome: Outcome) -> Applied {
        Applied {
            outcome,
            queued: false,
            change: None,
        }
    }

    #[test]
    fn an_answer_claims_its_patch_once() {
        let sent = WaitingPatches::default();
        sent.remember("p-1", pod("a"));
        assert_eq!(sent.claim("other"), None);
        assert_eq!(sent.claim("p-1"), Some(pod("a")));
        assert_eq!(sent.claim("p-1"), None);
        assert!(sent.is_empty());
    }

    #[test]
    fn a_waiting_patch_waits_on_only_when_its_row_was_written() {
        let patches = Arc::new(WaitingPatches::default());
        let (change, kept) = WaitingPatch::new(&patches, "p-1", pod("a"), Change::default());
        assert_eq!(
            change.remember_patch.as_ref().map(|r| r.key.as_str()),
            Some("default/pod/a")
        );
        kept.committed(&applied(Outcome::Patched { changed: true }));
        let (_, failed) = WaitingPatch::new(&patches, "p-2", pod("b"), Change::default());
        drop(failed);
        let rejected = Outcome::Rejected(crate::patch::PatchError::Operation {
            op: 0,
            failure: crate::patch::OpFailure::TestFailed,
        });
        let (_, refused) = WaitingPatch::new(&patches, "p-3", pod("c"), Change::default());
        refused.committed(&applied(rejected));
        let needs = Change {
            to_cloud_needs_object: true,
            ..Change::default()
        };
        let (_, absent) = WaitingPatch::new(&patches, "p-4", pod("d"), needs);
        absent.committed(&applied(Outcome::Absent));
        assert_eq!(patches.len(), 1, "only the committed one waits");
        assert_eq!(patches.claim("p-1"), Some(pod("a")));
    }

    #[test]
    fn a_failed_change_does_not_forget_a_redelivery_that_waits_since() {
        let patches = Arc::new(WaitingPatches::default());
        let (_, first) = WaitingPatch::new(&patches, "p-1", pod("a"), Change::default());
        let (_, again) = WaitingPatch::new(&patches, "p-1", pod("a"), Change::default());
        drop(first);
        assert_eq!(patches.len(), 1, "the redelivery waits on");
        drop(again);
        assert!(patches.is_empty());
    }

    #[test]
    fn only_an_object_or_an_error_ends_the_wait_and_only_an_object_is_stored() {
        let patches = Arc::new(WaitingPatches::default());
        for id in ["p-1", "p-2"] {
            let (_, w) = WaitingPatch::new(&patches, id, pod("a"), Change::default());
            w.committed(&applied(Outcome::Patched { changed: true }));
        }
        assert!(
            patches.answer(&answer("p-1", r#""OK""#)).is_none(),
            "a receipt"
        );
        let change = patches
            .answer(&answer("p-1", r#"{"a":1}"#))
            .expect("answered");
        assert_eq!(change.forget_patch.as_deref(), Some("p-1"));
        assert_eq!(change.write.as_ref().map(Write::key), Some("default/pod/a"));
        assert!(
            patches.answer(&answer("p-1", r#"{"a":1}"#)).is_none(),
            "once"
        );
        assert_eq!(patches.len(), 1);
    }

    #[test]
    fn past_the_bound_the_oldest_is_forgotten() {
        let sent = WaitingPatches::default();
        for i in 0..MAX_SENT_PATCHES + 10 {
            sent.remember(&format!("p-{i}"), pod(&i.to_string()));
        }
        assert_eq!(sent.len(), MAX_SENT_PATCHES);
        assert_eq!(sent.claim("p-9"), None, "among the oldest");
        assert_eq!(sent.claim("p-10"), Some(pod("10")));
        let last = MAX_SENT_PATCHES + 9;
        assert_eq!(
            sent.claim(&format!("p-{last}")),
            Some(pod(&last.to_string()))
        );
        // Remembering an id again makes it the newest, not a second entry.
        sent.remember("p-11", pod("again"));
        sent.remember("p-11", pod("again"));
        assert_eq!(sent.len(), MAX_SENT_PATCHES - 2);
        for n in ["n-1", "n-2", "n-3"] {
            sent.remember(n, pod("n"));
        }
        assert_eq!(sent.len(), MAX_SENT_PATCHES);
        assert_eq!(sent.claim("p-12"), None, "the oldest went first");
        assert_eq!(sent.claim("p-11"), Some(pod("again")));
    }
}
