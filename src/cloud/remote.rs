//! Remote queries waiting for the cloud's answer.
//!
//! Each waits at most the configured timeout, so a cloud that never answers costs edged one
//! `error` reply, never a hung query (a long-standing KubeEdge complaint). Queries for the same
//! resource while one is in flight share it: the cloud is asked once, and every asker gets its
//! own reply when it answers (50 pods starting at once and asking for one missing configmap are
//! one query to the cloud, not 50). The table is bounded: at most [`MAX_PENDING`] resources
//! in flight and [`MAX_ASKERS`] askers waiting; past either, a new query is refused at once
//! instead of piling up.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::message::Message;

/// Resources asked of the cloud at once.
pub const MAX_PENDING: usize = 1024;
/// Askers waiting at once, over all resources.
pub const MAX_ASKERS: usize = 8192;

/// The cloud's answer, handed to the query or request waiting for it.
pub struct Answer {
    pub message: Message,
    /// Told once the waiter has handled the answer (stored what it carries, answered its
    /// askers), or dropped if it never does: the answer is acknowledged to the broker only
    /// then, so never before it is stored.
    pub taken: oneshot::Sender<()>,
}

/// What a query joined.
pub enum Joined {
    /// It is the first for its resource: ask the cloud under `id`, and wait for `answer`.
    First {
        id: String,
        answer: oneshot::Receiver<Answer>,
    },
    /// The resource is being asked already; the asker is answered with the others.
    Waiting,
}

/// Who waits for one resource.
pub struct Askers {
    /// The queries, in arrival order, their content dropped (only their ids and resource are
    /// needed to reply).
    pub queries: Vec<Message>,
    /// What to serve if the cloud cannot answer, as the first asker found it (a stored token
    /// that has not expired yet, see [`crate::ops`]).
    pub fallback: Option<String>,
}

struct Pending {
    id: String,
    answer: Option<oneshot::Sender<Answer>>,
    askers: Askers,
}

#[derive(Default)]
struct Table {
    by_resource: HashMap<String, Pending>,
    /// The id each resource was asked under, to find it from an answer's `parent_msg_id`.
    by_id: HashMap<String, String>,
    askers: usize,
    /// Requests of one asker each (the local API's writes), by the id they were sent under.
    requests: HashMap<String, Request>,
}

struct Request {
    answer: oneshot::Sender<Answer>,
    /// Only a `response` that carries an object, or an `error`, answers it; a bare "OK" is
    /// the cloud saying it received the request.
    needs_object: bool,
}

/// What became of an answer from the cloud.
pub enum Completion {
    /// A query or request waiting for it took it; done when it has been handled (the
    /// receiver ends, with or without a value).
    Claimed(oneshot::Receiver<()>),
    /// A request's receipt ("OK" before the object): nothing more to do than ack it.
    Receipt,
    /// Nobody waits for it.
    Unclaimed,
}

pub struct RemoteQueries {
    timeout: Duration,
    table: Mutex<Table>,
}

#[derive(Debug, thiserror::Error)]
#[error("too many remote queries in flight ({MAX_PENDING} resources, {MAX_ASKERS} askers); try again later")]
pub struct TooManyPending;

impl RemoteQueries {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            table: Mutex::new(Table::default()),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `query` to the askers of its resource, `key`; the first asker asks the cloud.
    pub fn join(
        &self,
        key: &str,
        mut query: Message,
        fallback: Option<String>,
    ) -> Result<Joined, TooManyPending> {
        query.content = None;
        let mut table = self.table();
        if table.askers >= MAX_ASKERS {
            return Err(TooManyPending);
        }
        if let Some(pending) = table.by_resource.get_mut(key) {
            pending.askers.queries.push(query);
            table.askers += 1;
            return Ok(Joined::Waiting);
        }
        if table.by_resource.len() >= MAX_PENDING {
            return Err(TooManyPending);
        }
        let id = crate::message::new_msg_id();
        let (tx, answer) = oneshot::channel();
        table.by_id.insert(id.clone(), key.to_owned());
        table.by_resource.insert(
            key.to_owned(),
            Pending {
                id: id.clone(),
                answer: Some(tx),
                askers: Askers {
                    queries: vec![query],
                    fallback,
                },
            },
        );
        table.askers += 1;
        Ok(Joined::First { id, answer })
    }

    /// A request that is never shared (a write: each is its own change): send it under `id`
    /// and wait for `answer`, then [`Self::forget`] it if it was not answered. With
    /// `needs_object`, only an `error` or a `response` carrying an object answers it.
    pub fn request(
        &self,
        needs_object: bool,
    ) -> Result<(String, oneshot::Receiver<Answer>), TooManyPending> {
        let mut table = self.table();
        if table.requests.len() >= MAX_PENDING {
            return Err(TooManyPending);
        }
        let id = crate::message::new_msg_id();
        let (tx, answer) = oneshot::channel();
        table.requests.insert(
            id.clone(),
            Request {
                answer: tx,
                needs_object,
            },
        );
        Ok((id, answer))
    }

    /// Ends the wait for request `id`: an answer after this is nobody's.
    pub fn forget(&self, id: &str) {
        self.table().requests.remove(id);
    }

    /// Hands the cloud's answer to the query or request it answers.
    pub fn complete(&self, message: Message) -> Completion {
        let Some(parent) = message.header.parent_msg_id.clone() else {
            return Completion::Unclaimed;
        };
        let waiter = {
            let mut table = self.table();
            match table.requests.get(&parent) {
                Some(request) if request.needs_object && !carries_object(&message) => {
                    return Completion::Receipt;
                }
                Some(_) => table.requests.remove(&parent).map(|r| r.answer),
                None => {
                    let key = table.by_id.get(&parent).cloned();
                    key.and_then(|k| table.by_resource.get_mut(&k))
                        .and_then(|p| p.answer.take())
                }
            }
        };
        let Some(tx) = waiter else {
            return Completion::Unclaimed;
        };
        let (taken, handled) = oneshot::channel();
        match tx.send(Answer { message, taken }) {
            Ok(()) => Completion::Claimed(handled),
            Err(_) => Completion::Unclaimed,
        }
    }

    /// Ends the query for `key` (answered or timed out) and returns who waited for it; a query
    /// for `key` after this asks the cloud again.
    pub fn finish(&self, key: &str) -> Askers {
        let mut table = self.table();
        match table.by_resource.remove(key) {
            Some(pending) => {
                table.by_id.remove(&pending.id);
                table.askers -= pending.askers.queries.len();
                pending.askers
            }
            None => Askers {
                queries: Vec::new(),
                fallback: None,
            },
        }
    }

    /// Resources being asked of the cloud, and requests waiting for it.
    pub fn len(&self) -> usize {
        let table = self.table();
        table.by_resource.len() + table.requests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether an answer is more than a receipt: an `error`, or a `response` whose content is an
/// object or a list of them.
fn carries_object(message: &Message) -> bool {
    use crate::message::Operation;
    message.operation == Operation::Error
        || (message.operation == Operation::Response
            && matches!(
                message.content_json().trim_start().as_bytes().first(),
                Some(b'{' | b'[')
            ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(id: &str, key: &str) -> Message {
        let payload = format!(
            r#"{{"header":{{"msg_id":"{id}"}},"route":{{"operation":"query","resource":"{key}"}},"content":{{"big":"x"}}}}"#
        );
        Message::decode(payload.as_bytes(), 1 << 20).unwrap()
    }

    #[test]
    fn queries_for_one_resource_share_one_ask_and_all_are_answered() {
        let remote = RemoteQueries::new(Duration::from_secs(1));
        let key = "default/configmap/c";
        let Ok(Joined::First { id, .. }) = remote.join(key, query("q-0", key), None) else {
            panic!("the first asks");
        };
        for i in 1..50 {
            assert!(matches!(
                remote.join(key, query(&format!("q-{i}"), key), None),
                Ok(Joined::Waiting)
            ));
        }
        assert_eq!(remote.len(), 1, "one resource in flight");
        let askers = remote.finish(key);
        let ids: Vec<&str> = askers.queries.iter().map(Message::msg_id).collect();
        assert_eq!(ids.len(), 50);
        assert_eq!(ids[0], "q-0");
        assert!(
            askers.queries.iter().all(|q| q.content.is_none()),
            "content dropped"
        );
        assert!(remote.is_empty());
        // Asked again after it finished: a new ask, under a new id.
        let Ok(Joined::First { id: again, .. }) = remote.join(key, query("q-50", key), None) else {
            panic!("asks again");
        };
        assert_ne!(id, again);
    }

    #[test]
    fn the_cap_counts_resources_not_askers() {
        let remote = RemoteQueries::new(Duration::from_secs(1));
        for i in 0..MAX_PENDING {
            let key = format!("default/configmap/c{i}");
            assert!(matches!(
                remote.join(&key, query("q", &key), None),
                Ok(Joined::First { .. })
            ));
        }
        let more = "default/configmap/more";
        assert!(remote.join(more, query("q", more), None).is_err());
        let known = "default/configmap/c0";
        assert!(matches!(
            remote.join(known, query("q", known), None),
            Ok(Joined::Waiting)
        ));
    }
}
