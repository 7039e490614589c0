//! An inbound message, read once into what it asks for.
//!
//! Every refusal of malformed input is made here: a message that passes is a [`Request`]
//! whose parts are already valid (the key names one object where one is needed, the content
//! is there and of the right form, a patch is parsed), so that an operation acts without
//! checking again. What depends on the node's state at that moment (a lease while the cloud is
//! away, a replace page out of sequence, a patch that does not apply to the stored object) is
//! the operation's to refuse.

mod replace_page;

use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;

use crate::cloud::replaces::Page;
use crate::cloud::waiting::Target;
use crate::cloud::Source;
use crate::message::{self, Message, Operation};
use crate::metrics::ErrorReason;
use crate::mqtt::Inbound;
use crate::patch::{self, Patch};
use crate::resource::{metadata_uid, rtype, Resource, UidError};
use crate::store::Write;
use crate::topics::{Peer, Topics};

use super::outcome::Refusal;
use super::Context;

/// What a message asks for: one variant per operation.
pub(super) enum Request {
    Change(ChangeRequest),
    Patch(PatchRequest),
    Query(QueryRequest),
    Versions(VersionsRequest),
    Relay(RelayRequest),
    Answer(AnswerRequest),
    Connect(ConnectRequest),
    Sync(SyncRequest),
    Replace(ReplaceRequest),
}

/// How an insert, update or delete is written.
#[derive(Clone, Copy)]
pub(super) enum WriteKind {
    Put,
    PutIfChanged,
    Delete,
}

/// insert, update or delete of one object; `payload` is the message as received, passed on
/// unchanged.
pub(super) struct ChangeRequest {
    pub from: Peer,
    pub msg: Message,
    pub payload: Bytes,
    pub kind: WriteKind,
    pub write: Write,
}

/// A patch of one object, parsed; `target` is the object it changes (a pod's for a
/// `podpatch`).
pub(super) struct PatchRequest {
    pub from: Peer,
    pub msg: Message,
    pub payload: Bytes,
    pub target: Target,
    pub patch: Arc<Patch>,
}

/// A query of one object or of a scope.
pub(super) struct QueryRequest {
    pub from: Peer,
    pub msg: Message,
}

/// A query for the resourceVersions of a scope, from the start or `after` the key a page
/// ended with (empty for the first page).
pub(super) struct VersionsRequest {
    pub msg: Message,
    pub after: String,
}

/// edged's `response` or `error`, for the cloud; `write` stores the object a response
/// carries.
pub(super) struct RelayRequest {
    pub msg: Message,
    pub payload: Bytes,
    pub write: Option<Write>,
}

/// The cloud's `response` or `error`.
pub(super) struct AnswerRequest {
    pub msg: Message,
    pub payload: Bytes,
}

/// A report of the cloud connection, from edgehub or from the bridge's state topic.
pub(super) struct ConnectRequest {
    pub source: Source,
    pub connected: bool,
}

/// `meta-internal-sync`: MetaSync now.
pub(super) struct SyncRequest {
    pub msg: Message,
}

/// One page of the cloud's `replace` of a scope.
pub(super) struct ReplaceRequest {
    pub msg: Message,
    pub page: Page,
}

/// The state topic's label in `metamanager_messages_received_total`.
const BRIDGE_LABEL: &str = "bridge";
/// What a bridge state's log line shows of a payload it cannot read.
const SHOWN_BYTES: usize = 64;
/// The types a `replace` may not name: the edge owns them, the cloud has no set of them.
const EDGE_OWNED: [&str; 2] = [rtype::PODSTATUS, rtype::EVENT];

/// Reads `publish`: who sent it (`None` for the bridge's state topic, which no peer sends
/// on), and what it asks for or why it is refused. Counts it as received.
pub(super) fn read(
    publish: &Inbound,
    topics: &Topics,
    ctx: &Context,
) -> (Option<Peer>, Result<Request, Refusal>) {
    if topics.is_bridge_state(&publish.topic) {
        return (None, bridge_state(publish, ctx));
    }
    let Some(from) = topics.sender(&publish.topic) else {
        tracing::warn!(topic = %publish.topic, "message on a topic MetaManager does not serve; ignored");
        return (None, Err(Refusal::Unanswerable));
    };
    (Some(from), from_peer(from, publish, ctx))
}

fn from_peer(from: Peer, publish: &Inbound, ctx: &Context) -> Result<Request, Refusal> {
    let metrics = &ctx.replies.metrics;
    let msg = match Message::decode_bytes(&publish.payload, ctx.rules.max_payload) {
        Ok(msg) => msg,
        Err(e) => {
            metrics.received(from.as_str(), "invalid");
            return Err(Refusal::Reply {
                reason: ErrorReason::Decode,
                parent: message::salvage_msg_id(&publish.payload),
                resource: String::new(),
                text: e.to_string(),
            });
        }
    };
    metrics.received(from.as_str(), msg.operation.as_str());
    tracing::debug!(
        from = from.as_str(),
        operation = msg.operation.as_str(),
        resource = %msg.resource,
        msg_id = msg.msg_id(),
        "message"
    );
    let payload = publish.payload.clone();
    match msg.operation {
        Operation::Insert => change(from, msg, payload, WriteKind::Put),
        Operation::Update => change(from, msg, payload, WriteKind::PutIfChanged),
        Operation::Delete => change(from, msg, payload, WriteKind::Delete),
        Operation::Patch => patch(from, msg, payload, ctx.rules.max_payload),
        Operation::Query => query(from, msg),
        Operation::Response | Operation::Error => Ok(match from {
            Peer::Edged => Request::Relay(relay(msg, payload)),
            Peer::Edgehub => Request::Answer(AnswerRequest { msg, payload }),
        }),
        Operation::Connect => connect(from, msg),
        Operation::MetaInternalSync => Ok(Request::Sync(SyncRequest { msg })),
        Operation::Replace => replace(from, msg, ctx),
        // Never parsed from a message (see `Operation::Digest`); refused all the same.
        Operation::Digest => Err(Refusal::invalid(
            &msg,
            "digest is sent by MetaManager, not accepted".to_owned(),
        )),
    }
}

/// A change or a patch names one object, never a scope.
fn one_object(msg: &Message) -> Result<&str, Refusal> {
    msg.resource.name().ok_or_else(|| {
        let text = format!(
            "{} needs a single object (namespace/type/name), not the list {}",
            msg.operation.as_str(),
            msg.resource
        );
        Refusal::invalid(msg, text)
    })
}

fn change(from: Peer, msg: Message, payload: Bytes, kind: WriteKind) -> Result<Request, Refusal> {
    one_object(&msg)?;
    let write = write_of(kind, &msg).map_err(|text| Refusal::invalid(&msg, text))?;
    Ok(Request::Change(ChangeRequest {
        from,
        msg,
        payload,
        kind,
        write,
    }))
}

/// The write `msg` asks for, or why it cannot be made.
fn write_of(kind: WriteKind, msg: &Message) -> Result<Write, String> {
    let key = msg.resource.key().to_owned();
    let rtype = msg.resource.rtype().to_owned();
    if let WriteKind::Delete = kind {
        let uid = match rtype.as_str() {
            rtype::POD => delete_uid(msg.content_json())?,
            _ => None,
        };
        return Ok(Write::Delete { uid, key });
    }
    let Some(value) = msg.content.clone() else {
        return Err(format!("{} needs content", msg.operation.as_str()));
    };
    Ok(match kind {
        WriteKind::Put => Write::Put { key, rtype, value },
        _ => Write::PutIfChanged { key, rtype, value },
    })
}

/// The `metadata.uid` a pod delete is limited to. A uid that is there but not a string is
/// refused: taking it as "no uid" would delete whatever pod holds the name, the one thing the
/// uid is sent to prevent.
fn delete_uid(content: &str) -> Result<Option<String>, String> {
    metadata_uid(content).map_err(|e| match e {
        UidError::Metadata(e) => format!("content.metadata of a pod delete must be an object: {e}"),
        UidError::NotAString(uid) => format!("content.metadata.uid must be a string, not {uid}"),
    })
}

fn patch(from: Peer, msg: Message, payload: Bytes, max_payload: usize) -> Result<Request, Refusal> {
    let name = one_object(&msg)?;
    let rtype = patch::target_type(msg.resource.rtype()).to_owned();
    let (target, patch) =
        read_patch(&msg, name, rtype, max_payload).map_err(|text| Refusal::invalid(&msg, text))?;
    Ok(Request::Patch(PatchRequest {
        from,
        msg,
        payload,
        target,
        patch,
    }))
}

/// The object a patch changes, and the patch, read now so that content that is no patch is
/// refused before anything is queued.
fn read_patch(
    msg: &Message,
    name: &str,
    rtype: String,
    max_payload: usize,
) -> Result<(Target, Arc<Patch>), String> {
    let target =
        Resource::object(msg.resource.namespace(), &rtype, name).map_err(|e| e.to_string())?;
    let Some(content) = msg.content.clone() else {
        return Err("patch needs content".into());
    };
    let parsed = Patch::parse_shared(content, &rtype, max_payload).map_err(|e| e.to_string())?;
    let target = Target {
        key: target.key().to_owned(),
        rtype,
    };
    Ok((target, Arc::new(parsed)))
}

fn query(from: Peer, msg: Message) -> Result<Request, Refusal> {
    let after = match versions_asked(&msg) {
        None => return Ok(Request::Query(QueryRequest { from, msg })),
        Some(after) => after,
    };
    let scope = msg.resource.key();
    let after = match after {
        Ok(None) => String::new(),
        // A token is a key of the scope; one of another scope was not given out for this one.
        Ok(Some(key)) if key.starts_with(&format!("{scope}/")) => key,
        Ok(Some(key)) => {
            let text = format!("continue {key:?} was not given out for the versions of {scope}");
            return Err(Refusal::invalid(&msg, text));
        }
        Err(text) => return Err(Refusal::invalid(&msg, text)),
    };
    Ok(Request::Versions(VersionsRequest { msg, after }))
}

/// Whether `msg` asks for a scope's versions (content `{"versions": true}`), and from where:
/// the `continue` token, or why it is not one.
fn versions_asked(msg: &Message) -> Option<Result<Option<String>, String>> {
    #[derive(Deserialize)]
    struct Content {
        versions: Option<bool>,
        #[serde(rename = "continue")]
        token: Option<serde_json::Value>,
    }
    if msg.resource.name().is_some() || !msg.content_json().starts_with('{') {
        return None;
    }
    let content: Content = serde_json::from_str(msg.content_json()).ok()?;
    if content.versions != Some(true) {
        return None;
    }
    Some(match content.token {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(key)) => Ok(Some(key)),
        Some(other) => Err(format!(
            "continue must be the string a page of versions gave, or null, not {other}"
        )),
    })
}

fn relay(msg: Message, payload: Bytes) -> RelayRequest {
    let stores = msg.operation == Operation::Response
        && msg.resource.name().is_some()
        && msg.content_json().starts_with('{');
    let write = stores.then(|| Write::Put {
        key: msg.resource.key().to_owned(),
        rtype: msg.resource.rtype().to_owned(),
        value: msg.content.clone().unwrap_or_default(),
    });
    RelayRequest {
        msg,
        payload,
        write,
    }
}

fn connect(from: Peer, msg: Message) -> Result<Request, Refusal> {
    if from != Peer::Edgehub {
        let text = "connect is accepted only from edgehub".to_owned();
        return Err(Refusal::invalid(&msg, text));
    }
    let connected = match serde_json::from_str::<String>(msg.content_json()).as_deref() {
        Ok("cloud_connected") => true,
        Ok("cloud_disconnected") => false,
        _ => {
            let text = format!(
                "connect content must be \"cloud_connected\" or \"cloud_disconnected\", not {}",
                msg.content_json()
            );
            return Err(Refusal::invalid(&msg, text));
        }
    };
    Ok(Request::Connect(ConnectRequest {
        source: Source::Edgehub,
        connected,
    }))
}

/// The bridge's state topic (`cloud_link.state_topic`): the cloud's reachability as the node
/// broker's bridge to a central broker reports it, taken as edgehub's `connect` is. Nobody
/// sent it to MetaManager, so nobody gets a reply: a payload it cannot read is logged and
/// counted here, and the cloud's state stays as it was.
fn bridge_state(publish: &Inbound, ctx: &Context) -> Result<Request, Refusal> {
    // Only subscribed to with a state topic configured, which gives the words.
    let Some(words) = ctx.cloud.state.bridge_words() else {
        return Err(Refusal::Unanswerable);
    };
    let metrics = &ctx.replies.metrics;
    let Some(connected) = words.read(&publish.payload) else {
        metrics.received(BRIDGE_LABEL, "invalid");
        metrics.error(ErrorReason::Invalid);
        let shown = &publish.payload[..publish.payload.len().min(SHOWN_BYTES)];
        tracing::warn!(
            topic = %publish.topic,
            payload = %String::from_utf8_lossy(shown),
            connected = %words.connected,
            disconnected = %words.disconnected,
            "bridge state not understood (cloud_link.connected_payload and disconnected_payload say what is); the cloud's state is unchanged"
        );
        return Err(Refusal::Unanswerable);
    };
    let label = if connected {
        "connected"
    } else {
        "disconnected"
    };
    metrics.received(BRIDGE_LABEL, label);
    Ok(Request::Connect(ConnectRequest {
        source: Source::Bridge,
        connected,
    }))
}

fn replace(from: Peer, msg: Message, ctx: &Context) -> Result<Request, Refusal> {
    if from != Peer::Edgehub {
        let text = "replace is accepted only from edgehub".to_owned();
        return Err(Refusal::invalid(&msg, text));
    }
    let r = &msg.resource;
    if r.name().is_some() {
        let text = format!(
            "replace needs a scope (namespace/type), not the single object {}",
            r.key()
        );
        return Err(Refusal::invalid(&msg, text));
    }
    if EDGE_OWNED.contains(&r.rtype()) {
        let text = format!(
            "replace of {} refused: the edge owns {}, the cloud has no set to replace it with",
            r.key(),
            r.rtype()
        );
        return Err(Refusal::invalid(&msg, text));
    }
    match replace_page::parse_page(&msg) {
        Ok(page) => Ok(Request::Replace(ReplaceRequest { msg, page })),
        Err((replace_id, text)) => {
            // A page that cannot be read ends its replace as surely as one out of sequence.
            if let Some(id) = replace_id {
                ctx.cloud.replaces.discard(&id);
            }
            Err(Refusal::invalid(&msg, text))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::delete_uid;

    #[test]
    fn delete_uid_reads_a_string_and_refuses_other_types() {
        assert_eq!(delete_uid("null"), Ok(None));
        assert_eq!(delete_uid(r#"{"metadata":{"name":"p"}}"#), Ok(None));
        assert_eq!(delete_uid(r#"{"spec":{}}"#), Ok(None));
        assert_eq!(
            delete_uid(r#"{"metadata":{"uid":"u1"}}"#),
            Ok(Some("u1".into()))
        );
        for bad in [
            r#"{"metadata":{"uid":123}}"#,
            r#"{"metadata":{"uid":null}}"#,
            r#"{"metadata":{"uid":{}}}"#,
            r#"{"metadata":{"uid":["u1"]}}"#,
            r#"{"metadata":5}"#,
        ] {
            assert!(delete_uid(bad).is_err(), "{bad}");
        }
    }
}
