//! A hand-played cloud: edgehub's side of one node's link, with the cloud's own copy of what the
//! node should hold. It counts every byte that crosses the link (what it publishes to the node,
//! and what the node publishes to it), so the bench can compare ways of bringing a node back in
//! line after an outage, and tests can drive the reconciliation messages as a cloud would.
//!
//! Bytes are MQTT application bytes: each publish's topic and payload, both directions. The
//! MQTT framing (a few bytes a publish, and its PUBACK) is left out on both paths alike.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{json, Value};

use super::Client;

/// Changes a cloud keeps unanswered at a time.
const WINDOW: usize = 1_000;
const WAIT: Duration = Duration::from_secs(60);

/// One scope's line of a digest: how many objects, and their hash.
pub type Scopes = BTreeMap<String, (u64, String)>;

/// What a reconciliation did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// Scopes whose digest differed.
    pub scopes: Vec<String>,
    pub sent: usize,
    pub deleted: usize,
}

pub struct Cloud {
    client: Client,
    /// Unique among the players of this process; prefixes each msg_id.
    client_id: String,
    /// Where the cloud publishes to the node, and where the node publishes to the cloud.
    to_node: String,
    from_node: String,
    /// What the node should hold: key → object, as the cloud has it.
    pub objects: BTreeMap<String, Value>,
    /// Bytes the cloud published, and bytes it received from the node, so far.
    pub bytes_out: usize,
    pub bytes_in: usize,
    /// The largest payload received from the node.
    pub largest_in: usize,
    /// Messages received and not yet taken.
    unread: VecDeque<Value>,
    next_id: u64,
}

impl Cloud {
    /// Connects as edgehub of `node` (topic prefix `prefix`) to the broker on `port`.
    pub async fn connect(port: u16, prefix: &str, node: &str) -> Self {
        let from_node = format!("{prefix}/{node}/metamanager/to/edgehub");
        static PLAYERS: AtomicUsize = AtomicUsize::new(0);
        let n = PLAYERS.fetch_add(1, Ordering::Relaxed);
        let id = format!("cloud-{node}-{}-{n}", std::process::id());
        let client = Client::connect(port, &id, &[from_node.as_str()]).await;
        Self {
            client,
            client_id: id,
            to_node: format!("{prefix}/{node}/edgehub/to/metamanager"),
            from_node,
            objects: BTreeMap::new(),
            bytes_out: 0,
            bytes_in: 0,
            largest_in: 0,
            unread: VecDeque::new(),
            next_id: 0,
        }
    }

    pub fn reset_bytes(&mut self) {
        self.bytes_out = 0;
        self.bytes_in = 0;
    }

    /// Publishes one message to the node; returns its msg_id.
    pub async fn send(&mut self, operation: &str, resource: &str, content: Value) -> String {
        self.next_id += 1;
        let msg_id = format!("{}-{}", self.client_id, self.next_id);
        let m = json!({
            "header": {"msg_id": msg_id, "timestamp": 0},
            "route": {"source": "edgecontroller", "group": "resource",
                      "operation": operation, "resource": resource},
            "content": content,
        });
        let payload = serde_json::to_vec(&m).unwrap_or_default();
        self.bytes_out += self.to_node.len() + payload.len();
        self.client.publish(&self.to_node, payload).await;
        msg_id
    }

    /// The next message from the node, counted.
    async fn receive(&mut self) -> Value {
        if let Some(m) = self.unread.pop_front() {
            return m;
        }
        loop {
            let (topic, payload) = tokio::time::timeout(WAIT, self.client.received.recv())
                .await
                .expect("the node answers in time")
                .expect("the connection is up");
            if topic != self.from_node {
                continue;
            }
            self.bytes_in += topic.len() + payload.len();
            self.largest_in = self.largest_in.max(payload.len());
            if let Ok(m) = serde_json::from_slice(&payload) {
                return m;
            }
        }
    }

    /// Drops what the node sent that was not taken yet (an older digest, say), so that the next
    /// message read is one sent from now on.
    pub fn forget_unread(&mut self) {
        self.unread.clear();
        while self.client.received.try_recv().is_ok() {}
    }

    /// The next message from the node that `keep` takes; others are kept for later.
    pub async fn next_where(&mut self, keep: impl Fn(&Value) -> bool) -> Value {
        let mut passed = VecDeque::new();
        let found = loop {
            let m = self.receive().await;
            if keep(&m) {
                break m;
            }
            passed.push_back(m);
        };
        passed.append(&mut self.unread);
        self.unread = passed;
        found
    }

    /// The node's reply to the message `msg_id`.
    pub async fn reply_to(&mut self, msg_id: &str) -> Value {
        self.next_where(|m| m["header"]["parent_msg_id"] == msg_id)
            .await
    }

    /// Sends a message and waits for its reply.
    pub async fn request(&mut self, operation: &str, resource: &str, content: Value) -> Value {
        let id = self.send(operation, resource, content).await;
        self.reply_to(&id).await
    }

    /// Sends `messages`, keeping at most [`WINDOW`] unanswered, and waits for every answer;
    /// panics on an `error`.
    pub async fn send_all(&mut self, messages: Vec<(&'static str, String, Value)>) {
        let mut waiting = HashSet::new();
        for (operation, resource, content) in messages {
            while waiting.len() >= WINDOW {
                self.take_answer(&mut waiting).await;
            }
            waiting.insert(self.send(operation, &resource, content).await);
        }
        while !waiting.is_empty() {
            self.take_answer(&mut waiting).await;
        }
    }

    async fn take_answer(&mut self, waiting: &mut HashSet<String>) {
        let m = self.receive().await;
        let Some(parent) = m["header"]["parent_msg_id"].as_str() else {
            return;
        };
        if waiting.remove(parent) {
            assert_eq!(m["route"]["operation"], "response", "{m}");
        }
    }

    /// Tells the node the cloud is connected.
    pub async fn link_up(&mut self) {
        self.send(
            "connect",
            "default/node/edge-node",
            json!("cloud_connected"),
        )
        .await;
    }

    /// Tells the node the cloud went away.
    pub async fn link_down(&mut self) {
        self.send(
            "connect",
            "default/node/edge-node",
            json!("cloud_disconnected"),
        )
        .await;
    }

    /// The next digest the node publishes, all its parts: scope → (count, hash).
    pub async fn digest(&mut self) -> Scopes {
        let mut scopes = Scopes::new();
        let mut parts = HashMap::new();
        loop {
            let m = self
                .next_where(|m| m["route"]["operation"] == "digest")
                .await;
            let c = &m["content"];
            if let Some(all) = c["scopes"].as_object() {
                for (scope, d) in all {
                    let count = d["count"].as_u64().unwrap_or(0);
                    let hash = d["hash"].as_str().unwrap_or_default().to_owned();
                    scopes.insert(scope.clone(), (count, hash));
                }
            }
            let total = c["parts"].as_u64().unwrap_or(1);
            parts.insert(c["part"].as_u64().unwrap_or(0), ());
            if parts.len() as u64 >= total {
                return scopes;
            }
        }
    }

    /// The digest of what the cloud has, computed here as the node must.
    pub fn own_digest(&self) -> Scopes {
        let mut sums: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for (key, object) in &self.objects {
            let scope = key.rsplit_once('/').map_or(key.as_str(), |(s, _)| s);
            let rv = object["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default();
            let e = sums.entry(scope.to_owned()).or_default();
            e.0 += 1;
            e.1 = e.1.wrapping_add(term(key, rv));
        }
        sums.into_iter()
            .map(|(s, (count, hash))| (s, (count, format!("{hash:016x}"))))
            .collect()
    }

    /// Every `key → rv` the node holds in `scope`, a page at a time.
    pub async fn versions(&mut self, scope: &str) -> BTreeMap<String, String> {
        let mut all = BTreeMap::new();
        let mut token = Value::Null;
        loop {
            let mut content = json!({"versions": true});
            if !token.is_null() {
                content["continue"] = token.clone();
            }
            let answer = self.request("query", scope, content).await;
            assert_eq!(answer["route"]["operation"], "response", "{answer}");
            let page = &answer["content"];
            if let Some(v) = page["versions"].as_object() {
                for (key, rv) in v {
                    all.insert(key.clone(), rv.as_str().unwrap_or_default().to_owned());
                }
            }
            token = page["continue"].clone();
            if token.is_null() {
                return all;
            }
        }
    }

    /// Replaces `scope` on the node with what the cloud has of it, `per_page` objects a page;
    /// returns the last page's answer.
    pub async fn replace(&mut self, scope: &str, replace_id: &str, per_page: usize) -> Value {
        let prefix = format!("{scope}/");
        let items: Vec<Value> = self
            .objects
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| v.clone())
            .collect();
        let pages: Vec<&[Value]> = if items.is_empty() {
            vec![&[]]
        } else {
            items.chunks(per_page.max(1)).collect()
        };
        let n = pages.len();
        let mut answer = Value::Null;
        for (i, page) in pages.into_iter().enumerate() {
            let content =
                json!({"replace_id": replace_id, "page": i, "items": page, "last": i + 1 == n});
            answer = self.request("replace", scope, content).await;
            assert_eq!(answer["route"]["operation"], "response", "{answer}");
        }
        answer
    }

    /// Brings the node in line with the cloud after the link came up: compares the node's
    /// digest with the cloud's own, reads the versions of each scope that differs, and sends
    /// an insert or update for each object that is missing or of another version there, and a
    /// delete for each it holds that the cloud does not.
    pub async fn reconcile(&mut self) -> Reconciled {
        self.reconcile_scopes(|_| true).await
    }

    /// [`Cloud::reconcile`] of the scopes `owned` takes only: a cloud leaves alone the scopes
    /// the edge owns (pod statuses, which it never sends), whose digest it cannot compute.
    pub async fn reconcile_scopes(&mut self, owned: impl Fn(&str) -> bool) -> Reconciled {
        let theirs = self.digest().await;
        let ours = self.own_digest();
        let mut differing: Vec<String> = theirs
            .keys()
            .chain(ours.keys())
            .filter(|s| owned(s) && theirs.get(*s) != ours.get(*s))
            .cloned()
            .collect();
        differing.sort();
        differing.dedup();
        let mut done = Reconciled::default();
        let mut changes = Vec::new();
        for scope in &differing {
            let node = self.versions(scope).await;
            let prefix = format!("{scope}/");
            for (key, object) in self.objects.range(prefix.clone()..) {
                if !key.starts_with(&prefix) {
                    break;
                }
                let rv = object["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default();
                let operation = match node.get(key) {
                    None => "insert",
                    Some(theirs) if theirs != rv => "update",
                    Some(_) => continue,
                };
                changes.push((operation, key.clone(), object.clone()));
                done.sent += 1;
            }
            for key in node.keys().filter(|k| !self.objects.contains_key(*k)) {
                changes.push(("delete", key.clone(), json!({})));
                done.deleted += 1;
            }
        }
        done.scopes = differing;
        self.send_all(changes).await;
        done
    }

    /// Sends the node every object the cloud has, and a delete for each of `deleted`, the way
    /// a cloud without the digest brings a node back.
    pub async fn resend_all(&mut self, deleted: &[String]) {
        let mut messages: Vec<(&'static str, String, Value)> = self
            .objects
            .iter()
            .map(|(k, v)| ("update", k.clone(), v.clone()))
            .collect();
        messages.extend(deleted.iter().map(|k| ("delete", k.clone(), json!({}))));
        self.send_all(messages).await;
    }

    /// Whether the node's digest, asked for with a `meta-internal-sync`, equals the cloud's.
    pub async fn agrees(&mut self) -> bool {
        self.agrees_on(|_| true).await
    }

    /// [`Cloud::agrees`] on the scopes `owned` takes only (see [`Cloud::reconcile_scopes`]).
    pub async fn agrees_on(&mut self, owned: impl Fn(&str) -> bool) -> bool {
        self.send("meta-internal-sync", "default/node/edge-node", Value::Null)
            .await;
        let mut theirs = self.digest().await;
        let mut ours = self.own_digest();
        theirs.retain(|s, _| owned(s));
        ours.retain(|s, _| owned(s));
        theirs == ours
    }
}

/// One object's term of its scope's hash: the first 8 bytes, big-endian, of SHA-256 over
/// `key + "\n" + rv`.
pub fn term(key: &str, rv: &str) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(key.as_bytes());
    ctx.update(b"\n");
    ctx.update(rv.as_bytes());
    let sum = ctx.finish();
    let mut first = [0u8; 8];
    first.copy_from_slice(&sum.as_ref()[..8]);
    u64::from_be_bytes(first)
}
