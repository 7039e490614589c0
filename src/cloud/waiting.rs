//! Patches edged sent to the cloud, remembered until the cloud answers them.
//!
//! The cloud answers a patch with the object as it stands after the patch, and that answer
//! names the patch only by its `msg_id`, while a `podpatch`'s object is stored under another
//! key (the pod's). So the key is remembered with the id when the patch is passed on. Memory is
//! bounded: at most [`MAX_SENT_PATCHES`] patches wait for an answer, and past that the oldest is
//! forgotten; its answer, should it come, is then relayed to edged like any unclaimed answer,
//! without being stored. The store keeps the same list (written with each patch's change,
//! see [`crate::store::Change::remember_patch`]), from which it is loaded at start, so that a
//! patch queued before a restart and answered after it is stored too.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use crate::store::{SentPatch, MAX_SENT_PATCHES};

/// Where a patch's answer is stored: the key of the object it patched, and its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub key: String,
    pub rtype: String,
}

#[derive(Default)]
pub struct SentPatches {
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

impl SentPatches {
    /// The patches the store says still wait for an answer, oldest first.
    pub fn load(waiting: Vec<SentPatch>) -> Self {
        let loaded = Self::default();
        for patch in waiting {
            loaded.remember(
                &patch.msg_id,
                Target {
                    key: patch.key,
                    rtype: patch.rtype,
                },
            );
        }
        loaded
    }

    /// Remembers that the patch `msg_id` of `target` went to the cloud. A redelivered patch
    /// counts as new.
    pub fn remember(&self, msg_id: &str, target: Target) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
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
    }

    /// The target of the patch `parent` answers, which is forgotten: one answer per patch.
    pub fn claim(&self, parent: &str) -> Option<Target> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (seq, target) = inner.by_id.remove(parent)?;
        inner.order.remove(&seq);
        Some(target)
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_id
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> Target {
        Target {
            key: format!("default/pod/{name}"),
            rtype: "pod".into(),
        }
    }

    #[test]
    fn an_answer_claims_its_patch_once() {
        let sent = SentPatches::default();
        sent.remember("p-1", pod("a"));
        assert_eq!(sent.claim("other"), None);
        assert_eq!(sent.claim("p-1"), Some(pod("a")));
        assert_eq!(sent.claim("p-1"), None);
        assert!(sent.is_empty());
    }

    #[test]
    fn past_the_bound_the_oldest_is_forgotten() {
        let sent = SentPatches::default();
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
