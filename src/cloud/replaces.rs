//! The pages of `replace` operations whose last page has not come yet.
//!
//! A replace is the cloud's complete set of one scope, sent in pages that share a `replace_id`.
//! Nothing of it touches the store until the last page: the pages are held here, in memory, and
//! the whole set is then applied in one transaction ([`crate::store::Store::replace`]). A
//! replace that never finishes therefore changes nothing, whatever happens to it: the cloud
//! disconnects ([`Replaces::discard_all`]), MetaManager restarts (memory is gone), or no page
//! comes for [`PAGE_TIMEOUT`] (discarded when the next page of any replace arrives).
//!
//! Memory, not a staging table: the sets a node is replaced with are small (a node runs about a
//! hundred pods), a table would cost a commit per page, and one that outlives a restart would
//! have to be cleared anyway. What is held is bounded in bytes ([`MAX_HELD_BYTES`], over all
//! replaces together) and in count ([`MAX_HELD_REPLACES`]); a replace that would go beyond
//! either is refused and dropped, and the cloud falls back on single changes, which the
//! versions query tells it how to choose.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::store::ReplaceSet;

/// Bytes the unfinished replaces may hold together (keys, objects and bookkeeping, by
/// [`ReplaceSet::cost`]): room for a scope of about 10 000 pods of 3 KB.
pub const MAX_HELD_BYTES: usize = 32 * 1024 * 1024;
/// Unfinished replaces held at once (one per scope at most).
pub const MAX_HELD_REPLACES: usize = 16;
/// A replace whose next page does not come within this is dropped.
pub const PAGE_TIMEOUT: Duration = Duration::from_secs(600);

/// One page of a replace, as read from the message.
#[derive(Debug, Clone)]
pub struct Page {
    pub replace_id: String,
    pub page: u64,
    pub last: bool,
    /// `(metadata.name, object JSON)`.
    pub items: Vec<(String, Bytes)>,
}

/// What became of a page that was taken.
#[derive(Debug)]
pub enum Taken {
    /// Held, waiting for the next page.
    Held,
    /// A page already held, sent again (same msg_id): nothing changes.
    Repeat,
    /// The last page: the whole set, to apply now.
    Complete(ReplaceSet),
}

/// Why a page was refused. The replace it belongs to is dropped with it: it changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplaceError {
    #[error("replace {replace_id}: page {page} does not follow any page held (a replace starts at page 0); the replace changes nothing")]
    NothingHeld { replace_id: String, page: u64 },
    #[error("replace {replace_id}: page {page} does not follow page {held}, the last one held; the replace changes nothing")]
    OutOfSequence {
        replace_id: String,
        page: u64,
        held: u64,
    },
    #[error("replace {replace_id} is of {held}, not {scope}; the replace changes nothing")]
    OtherScope {
        replace_id: String,
        held: String,
        scope: String,
    },
    #[error("replace {replace_id}: {name} is in the set twice; the replace changes nothing")]
    Twice { replace_id: String, name: String },
    #[error("replace {replace_id}: the unfinished replaces would hold more than {max} bytes; the replace changes nothing (replace a smaller scope, or send single changes)", max = MAX_HELD_BYTES)]
    TooLarge { replace_id: String },
    #[error("replace {replace_id}: {max} replaces are already unfinished; the replace changes nothing", max = MAX_HELD_REPLACES)]
    TooMany { replace_id: String },
}

/// The unfinished replaces; shared by the replace operation and the connect operation.
#[derive(Default)]
pub struct Replaces {
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    by_id: HashMap<String, Pending>,
    /// What every pending set holds, by [`ReplaceSet::bytes`].
    bytes: usize,
    /// The msg_ids of the last pages of the latest complete replaces, newest last: a copy of
    /// one (a broker redelivery) is acked again, not refused as out of sequence.
    completed: VecDeque<String>,
}

/// Last pages remembered in [`Held::completed`].
const COMPLETED_KEPT: usize = 64;

struct Pending {
    set: ReplaceSet,
    /// The number of the last page held.
    page: u64,
    /// The msg_ids of the pages held, to recognise one sent again.
    msg_ids: Vec<String>,
    touched: Instant,
}

impl Held {
    fn drop_id(&mut self, id: &str) {
        if let Some(p) = self.by_id.remove(id) {
            self.bytes -= p.set.bytes();
        }
    }

    fn drop_expired(&mut self, now: Instant) {
        let expired: Vec<String> = self
            .by_id
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.touched) >= PAGE_TIMEOUT)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            tracing::info!(replace_id = %id, "replace dropped: no page for {}s", PAGE_TIMEOUT.as_secs());
            self.drop_id(&id);
        }
    }
}

impl Held {
    /// A new start (page 0) of the replace `id`: whatever was held under this id, or for this
    /// scope, is dropped.
    fn start(
        &mut self,
        id: &str,
        namespace: &str,
        rtype: &str,
        now: Instant,
    ) -> Result<Pending, ReplaceError> {
        self.drop_id(id);
        let scope = format!("{namespace}/{rtype}");
        let same_scope: Vec<String> = self
            .by_id
            .iter()
            .filter(|(_, p)| p.set.scope() == scope)
            .map(|(id, _)| id.clone())
            .collect();
        for other in same_scope {
            self.drop_id(&other);
        }
        if self.by_id.len() >= MAX_HELD_REPLACES {
            return Err(ReplaceError::TooMany {
                replace_id: id.to_owned(),
            });
        }
        Ok(Pending {
            set: ReplaceSet::new(namespace, rtype),
            page: 0,
            msg_ids: Vec::new(),
            touched: now,
        })
    }

    /// The replace `id` taken out of the map for its next page, `page`, of `scope`; out of
    /// the map for good when the page does not follow.
    fn follow(
        &mut self,
        id: &str,
        scope: &str,
        page: u64,
        now: Instant,
    ) -> Result<Pending, ReplaceError> {
        let replace_id = id.to_owned();
        let Some(p) = self.by_id.remove(id) else {
            return Err(ReplaceError::NothingHeld { replace_id, page });
        };
        self.bytes -= p.set.bytes();
        if p.set.scope() != scope {
            return Err(ReplaceError::OtherScope {
                replace_id,
                held: p.set.scope(),
                scope: scope.to_owned(),
            });
        }
        if page != p.page + 1 {
            return Err(ReplaceError::OutOfSequence {
                replace_id,
                page,
                held: p.page,
            });
        }
        Ok(Pending {
            page,
            touched: now,
            ..p
        })
    }

    /// Adds a page's items to `pending`, within [`MAX_HELD_BYTES`] over all replaces.
    fn fill(
        &self,
        pending: &mut Pending,
        id: &str,
        items: Vec<(String, Bytes)>,
    ) -> Result<(), ReplaceError> {
        for (name, value) in items {
            let cost = pending.set.cost(&name, &value);
            if self.bytes + pending.set.bytes() + cost > MAX_HELD_BYTES {
                return Err(ReplaceError::TooLarge {
                    replace_id: id.to_owned(),
                });
            }
            if !pending.set.add(&name, value) {
                return Err(ReplaceError::Twice {
                    replace_id: id.to_owned(),
                    name,
                });
            }
        }
        Ok(())
    }
}

impl Replaces {
    /// Takes one page of a replace of the scope `namespace/rtype`, carried by the message
    /// `msg_id`, at `now`.
    pub fn take(
        &self,
        namespace: &str,
        rtype: &str,
        msg_id: &str,
        page: Page,
        now: Instant,
    ) -> Result<Taken, ReplaceError> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.drop_expired(now);
        let id = page.replace_id.clone();
        let held_page = held
            .by_id
            .get(&id)
            .is_some_and(|p| p.msg_ids.iter().any(|m| m == msg_id));
        if held_page || held.completed.iter().any(|m| m == msg_id) {
            return Ok(Taken::Repeat);
        }
        let mut pending = if page.page == 0 {
            held.start(&id, namespace, rtype, now)?
        } else {
            let scope = format!("{namespace}/{rtype}");
            held.follow(&id, &scope, page.page, now)?
        };
        // `pending` is out of the map here: an error below drops it with its bytes.
        held.fill(&mut pending, &id, page.items)?;
        if page.last {
            if held.completed.len() >= COMPLETED_KEPT {
                held.completed.pop_front();
            }
            held.completed.push_back(msg_id.to_owned());
            return Ok(Taken::Complete(pending.set));
        }
        pending.msg_ids.push(msg_id.to_owned());
        held.bytes += pending.set.bytes();
        held.by_id.insert(id, pending);
        Ok(Taken::Held)
    }

    /// Drops the replace `replace_id`, if held: one of its pages was refused.
    pub fn discard(&self, replace_id: &str) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.drop_id(replace_id);
    }

    /// Drops every unfinished replace: the cloud went away, and will start over.
    pub fn discard_all(&self) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if !held.by_id.is_empty() {
            tracing::info!(
                replaces = held.by_id.len(),
                bytes = held.bytes,
                "unfinished replaces dropped: the cloud disconnected"
            );
        }
        held.by_id.clear();
        held.bytes = 0;
    }

    /// Bytes held for unfinished replaces, and how many there are.
    pub fn held(&self) -> (usize, usize) {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        (held.bytes, held.by_id.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(id: &str, n: u64, last: bool, names: &[&str]) -> Page {
        Page {
            replace_id: id.into(),
            page: n,
            last,
            items: names
                .iter()
                .map(|n| (n.to_string(), Bytes::from(format!("{{\"n\":\"{n}\"}}"))))
                .collect(),
        }
    }

    fn take(r: &Replaces, msg: &str, p: Page) -> Result<Taken, ReplaceError> {
        r.take("ns", "pod", msg, p, Instant::now())
    }

    #[test]
    fn pages_in_sequence_make_one_set_on_the_last() {
        let r = Replaces::default();
        assert!(matches!(
            take(&r, "m0", page("r", 0, false, &["b"])),
            Ok(Taken::Held)
        ));
        assert!(matches!(
            take(&r, "m1", page("r", 1, false, &["a"])),
            Ok(Taken::Held)
        ));
        assert!(r.held().0 > 0);
        let Ok(Taken::Complete(set)) = take(&r, "m2", page("r", 2, true, &["c"])) else {
            panic!("the last page completes the set");
        };
        assert_eq!(set.len(), 3);
        assert_eq!(r.held(), (0, 0), "nothing held once complete");
    }

    #[test]
    fn a_page_out_of_sequence_drops_the_replace() {
        let r = Replaces::default();
        assert_eq!(
            take(&r, "m1", page("r", 1, true, &["a"])).unwrap_err(),
            ReplaceError::NothingHeld {
                replace_id: "r".into(),
                page: 1
            }
        );
        take(&r, "m0", page("r", 0, false, &["a"])).unwrap();
        let skipped = take(&r, "m2", page("r", 2, true, &["b"])).unwrap_err();
        assert!(matches!(
            skipped,
            ReplaceError::OutOfSequence { held: 0, .. }
        ));
        assert_eq!(r.held(), (0, 0), "dropped");
        // What follows finds nothing held.
        assert!(matches!(
            take(&r, "m3", page("r", 1, true, &[])),
            Err(ReplaceError::NothingHeld { .. })
        ));
    }

    #[test]
    fn a_page_sent_again_changes_nothing() {
        let r = Replaces::default();
        take(&r, "m0", page("r", 0, false, &["a"])).unwrap();
        let bytes = r.held().0;
        assert!(matches!(
            take(&r, "m0", page("r", 0, false, &["a"])),
            Ok(Taken::Repeat)
        ));
        assert_eq!(r.held().0, bytes);
        assert!(matches!(
            take(&r, "m1", page("r", 1, true, &["b"])),
            Ok(Taken::Complete(_))
        ));
        assert!(
            matches!(
                take(&r, "m1", page("r", 1, true, &["b"])),
                Ok(Taken::Repeat)
            ),
            "a copy of the last page is not applied again"
        );
    }

    #[test]
    fn a_name_twice_in_the_set_drops_the_replace() {
        let r = Replaces::default();
        take(&r, "m0", page("r", 0, false, &["a"])).unwrap();
        assert!(matches!(
            take(&r, "m1", page("r", 1, true, &["a"])),
            Err(ReplaceError::Twice { .. })
        ));
        assert_eq!(r.held(), (0, 0));
    }

    #[test]
    fn what_is_held_is_bounded_in_bytes_and_count() {
        let r = Replaces::default();
        let big = Bytes::from(vec![b' '; 1024 * 1024]);
        let mut n = 0;
        let refused = loop {
            let p = Page {
                replace_id: "r".into(),
                page: n,
                last: false,
                items: vec![(format!("o{n}"), big.clone())],
            };
            match take(&r, &format!("m{n}"), p) {
                Ok(_) => n += 1,
                Err(e) => break e,
            }
            assert!(r.held().0 <= MAX_HELD_BYTES);
        };
        assert!(
            matches!(refused, ReplaceError::TooLarge { .. }),
            "{refused}"
        );
        assert!(n >= 30, "about 32 MiB held before the refusal, {n} pages");
        assert_eq!(r.held(), (0, 0), "the refused replace is dropped whole");

        for i in 0..MAX_HELD_REPLACES {
            let p = page(&format!("r{i}"), 0, false, &["a"]);
            r.take("ns", &format!("t{i}"), "m", p, Instant::now())
                .unwrap();
        }
        let p = page("one-more", 0, false, &["a"]);
        assert!(matches!(
            r.take("ns", "other", "m", p, Instant::now()),
            Err(ReplaceError::TooMany { .. })
        ));
        r.discard_all();
        assert_eq!(r.held(), (0, 0));
    }

    #[test]
    fn a_new_start_of_a_scope_replaces_the_unfinished_one() {
        let r = Replaces::default();
        take(&r, "m0", page("first", 0, false, &["a", "b"])).unwrap();
        take(&r, "n0", page("second", 0, false, &["c"])).unwrap();
        assert_eq!(r.held().1, 1);
        assert!(matches!(
            take(&r, "m1", page("first", 1, true, &[])),
            Err(ReplaceError::NothingHeld { .. })
        ));
    }

    #[test]
    fn a_replace_without_a_page_for_ten_minutes_is_dropped() {
        let r = Replaces::default();
        let start = Instant::now();
        r.take("ns", "pod", "m0", page("r", 0, false, &["a"]), start)
            .unwrap();
        let later = start + PAGE_TIMEOUT;
        let late = r.take("ns", "pod", "m1", page("r", 1, true, &["b"]), later);
        assert!(matches!(late, Err(ReplaceError::NothingHeld { .. })));
    }

    #[test]
    fn a_page_of_another_scope_drops_the_replace() {
        let r = Replaces::default();
        take(&r, "m0", page("r", 0, false, &["a"])).unwrap();
        let other = r.take(
            "ns",
            "configmap",
            "m1",
            page("r", 1, true, &[]),
            Instant::now(),
        );
        assert!(matches!(other, Err(ReplaceError::OtherScope { .. })));
        assert_eq!(r.held(), (0, 0));
    }
}
