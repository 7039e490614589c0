//! The wire message in KubeEdge's beehive form, its validation, and the replies MetaManager
//! builds.
//!
//! Content is kept as raw JSON text, a slice of the received payload: most operations only store
//! or forward it, so parsing it into a tree, or even copying it, on every message would be wasted
//! work. The few operations that must look inside (update's comparison, delete's uid check, a
//! patch) parse it where they need it.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::resource::{Resource, ResourceError};

/// Deepest nesting accepted in content. Below serde_json's own limit (128), so anything
/// accepted can be parsed again later (update's comparison, delete's uid check, a patch and its
/// result, which is held to the same depth).
pub const MAX_DEPTH: usize = 100;

/// Deepest nesting accepted in `header` and in `route`, counting the object itself as level 1.
/// Both are small fixed records; anything deeper is an attack or a bug, and the header is
/// forwarded byte for byte, so it must be refused here rather than passed on to edged.
pub const MAX_ENVELOPE_DEPTH: usize = 8;

/// Longest `header.msg_id` and `header.parent_msg_id` accepted, in bytes. Ids are remembered
/// (the duplicate window) and echoed in replies, so their size bounds that memory; KubeEdge's
/// are 36-byte UUIDs.
pub const MAX_ID_BYTES: usize = 256;

/// `route.source` of every message MetaManager creates.
pub const SOURCE: &str = "metamanager";
/// `route.source` of the writes the local API passes on to the cloud, KubeEdge's name for the
/// edge's API server.
pub const API_SOURCE: &str = "metaserver";
/// `route.group` of every message MetaManager creates.
pub const GROUP: &str = "meta";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Insert,
    Update,
    Delete,
    Patch,
    Query,
    Response,
    Error,
    Connect,
    MetaInternalSync,
    /// The cloud's complete set of one scope, in pages (topics.md, "Reconciliation").
    Replace,
    /// MetaManager's digest of the store, to edgehub (topics.md, "Reconciliation"). Sent only:
    /// it is not in [`Operation::ALL`], so an inbound message never parses as one.
    Digest,
}

impl Operation {
    pub const ALL: [Operation; 10] = [
        Operation::Insert,
        Operation::Update,
        Operation::Delete,
        Operation::Patch,
        Operation::Query,
        Operation::Response,
        Operation::Error,
        Operation::Connect,
        Operation::MetaInternalSync,
        Operation::Replace,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Insert => "insert",
            Operation::Update => "update",
            Operation::Delete => "delete",
            Operation::Patch => "patch",
            Operation::Query => "query",
            Operation::Response => "response",
            Operation::Error => "error",
            Operation::Connect => "connect",
            Operation::MetaInternalSync => "meta-internal-sync",
            Operation::Replace => "replace",
            Operation::Digest => "digest",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|op| op.as_str() == text)
    }
}

impl Serialize for Operation {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Header {
    pub msg_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_msg_id: Option<String>,
    #[serde(default)]
    pub timestamp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resourceversion: Option<String>,
    #[serde(default)]
    pub sync: bool,
}

/// The route as it arrives; the operation and resource are checked after decoding so the error
/// can say exactly what was wrong with them.
#[derive(Debug, Deserialize)]
struct WireRoute {
    #[serde(default)]
    source: String,
    #[serde(default)]
    group: String,
    operation: String,
    resource: String,
}

/// The outer object. Header and route are taken as raw text first and checked to be JSON
/// objects: serde would otherwise also accept them written as arrays of their fields.
#[derive(Debug, Deserialize)]
struct WireMessage<'a> {
    #[serde(borrow)]
    header: &'a RawValue,
    #[serde(borrow)]
    route: &'a RawValue,
    #[serde(default, borrow)]
    content: Option<&'a RawValue>,
}

/// A validated inbound message.
#[derive(Debug)]
pub struct Message {
    pub header: Header,
    pub source: String,
    pub group: String,
    pub operation: Operation,
    pub resource: Resource,
    /// The content's JSON text: a slice of the received payload, shared, not copied. `None`
    /// when the message had no content or `null`.
    pub content: Option<Bytes>,
}

/// Why an inbound payload is not a valid message. The text is what the sender sees.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("message is {size} bytes; the limit is {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("payload is not valid JSON: {0}")]
    NotJson(String),
    #[error("payload is not a JSON object")]
    NotObject,
    #[error("invalid message: {0}")]
    Shape(String),
    #[error("header.msg_id must be a non-empty string")]
    EmptyMsgId,
    #[error("unknown operation {0:?}; expected one of insert, update, delete, patch, query, response, error, connect, meta-internal-sync, replace")]
    UnknownOperation(String),
    #[error("content is nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("{0} is nested deeper than {MAX_ENVELOPE_DEPTH} levels")]
    EnvelopeTooDeep(&'static str),
    #[error("header.{field} is {size} bytes; the limit is {MAX_ID_BYTES} bytes")]
    IdTooLong { field: &'static str, size: usize },
    #[error("invalid content: {0}")]
    BadContent(String),
    #[error("invalid route.resource: {0}")]
    Resource(#[from] ResourceError),
}

impl Message {
    /// Decodes and validates a payload held in a byte slice (copies it once).
    pub fn decode(payload: &[u8], limit: usize) -> Result<Self, DecodeError> {
        if payload.len() > limit {
            return Err(DecodeError::TooLarge {
                size: payload.len(),
                limit,
            });
        }
        Self::decode_bytes(&Bytes::copy_from_slice(payload), limit)
    }

    /// Decodes and validates one received payload; the content stays in `payload`. Nothing
    /// here panics on hostile input: nesting is bounded, and the size is checked first.
    pub fn decode_bytes(payload: &Bytes, limit: usize) -> Result<Self, DecodeError> {
        if payload.len() > limit {
            return Err(DecodeError::TooLarge {
                size: payload.len(),
                limit,
            });
        }
        let first = payload.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            return match serde_json::from_slice::<IgnoredAny>(payload) {
                Ok(_) => Err(DecodeError::NotObject),
                Err(e) => Err(DecodeError::NotJson(e.to_string())),
            };
        }
        let mut de = serde_json::Deserializer::from_slice(payload);
        let wire: WireMessage =
            serde_path_to_error::deserialize(&mut de).map_err(|e| shape_error("", e))?;
        // Trailing garbage after the object makes the payload invalid JSON as a whole.
        de.end().map_err(|e| DecodeError::NotJson(e.to_string()))?;
        let header: Header = field_object("header", wire.header)?;
        let route: WireRoute = field_object("route", wire.route)?;
        if header.msg_id.is_empty() {
            return Err(DecodeError::EmptyMsgId);
        }
        check_id("msg_id", &header.msg_id)?;
        if let Some(parent) = &header.parent_msg_id {
            check_id("parent_msg_id", parent)?;
        }
        let operation = Operation::parse(&route.operation)
            .ok_or(DecodeError::UnknownOperation(route.operation))?;
        let resource = Resource::parse(&route.resource)?;
        let content = match wire.content.filter(|c| c.get() != "null") {
            Some(raw) => {
                check_content(raw.get())?;
                Some(share(payload, raw.get().as_bytes()))
            }
            None => None,
        };
        Ok(Self {
            header,
            source: route.source,
            group: route.group,
            operation,
            resource,
            content,
        })
    }

    pub fn msg_id(&self) -> &str {
        &self.header.msg_id
    }

    /// Content as raw JSON text, `null` when absent.
    pub fn content_json(&self) -> &str {
        // Validated as JSON (hence UTF-8) by decode.
        self.content
            .as_deref()
            .and_then(|c| std::str::from_utf8(c).ok())
            .unwrap_or("null")
    }

    /// Content as an owned raw JSON value, for the rare replies that carry it on.
    pub fn content_raw(&self) -> Box<RawValue> {
        raw(self.content_json().to_owned())
    }
}

/// `part` as a shared slice of `payload` when it lies inside it (a borrowed raw value always
/// does), else as a copy; never a panic.
fn share(payload: &Bytes, part: &[u8]) -> Bytes {
    let start = (part.as_ptr() as usize).wrapping_sub(payload.as_ptr() as usize);
    if start <= payload.len() && part.len() <= payload.len() - start {
        payload.slice(start..start + part.len())
    } else {
        Bytes::copy_from_slice(part)
    }
}

fn check_id(field: &'static str, id: &str) -> Result<(), DecodeError> {
    if id.len() > MAX_ID_BYTES {
        return Err(DecodeError::IdTooLong {
            field,
            size: id.len(),
        });
    }
    Ok(())
}

/// Decodes `header` or `route`, which must be a JSON object nested at most
/// [`MAX_ENVELOPE_DEPTH`] levels.
fn field_object<T: serde::de::DeserializeOwned>(
    name: &'static str,
    raw: &RawValue,
) -> Result<T, DecodeError> {
    if !raw.get().starts_with('{') {
        return Err(DecodeError::Shape(format!("{name} must be a JSON object")));
    }
    scan(raw.get(), MAX_ENVELOPE_DEPTH, || {
        DecodeError::EnvelopeTooDeep(name)
    })
    .map_err(|e| match e {
        DecodeError::BadContent(why) => DecodeError::Shape(format!("{name}: {why}")),
        other => other,
    })?;
    let mut de = serde_json::Deserializer::from_str(raw.get());
    serde_path_to_error::deserialize(&mut de).map_err(|e| shape_error(name, e))
}

/// A decoding error, with the path of the field it concerns under `prefix`.
fn shape_error(prefix: &str, e: serde_path_to_error::Error<serde_json::Error>) -> DecodeError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    if inner.is_syntax() || inner.is_eof() {
        return DecodeError::NotJson(inner.to_string());
    }
    let path = match (prefix, path.as_str()) {
        ("", ".") => String::new(),
        (p, ".") => p.to_owned(),
        ("", rest) => rest.to_owned(),
        (p, rest) => format!("{p}.{rest}"),
    };
    if path.is_empty() {
        DecodeError::Shape(inner.to_string())
    } else {
        DecodeError::Shape(format!("{path}: {inner}"))
    }
}

/// Checks raw content for what the decoder lets through but a later parse would refuse:
/// nesting deeper than [`MAX_DEPTH`], numbers beyond f64's range, and unpaired UTF-16
/// surrogate escapes.
fn check_content(json: &str) -> Result<(), DecodeError> {
    scan(json, MAX_DEPTH, || DecodeError::TooDeep)
}

/// One pass over JSON text, no allocation: nesting deeper than `max_depth` is `too_deep()`,
/// and numbers beyond f64's range and unpaired UTF-16 surrogate escapes are bad content. The
/// text is already known to be JSON.
fn scan(
    json: &str,
    max_depth: usize,
    too_deep: impl Fn() -> DecodeError,
) -> Result<(), DecodeError> {
    let b = json.as_bytes();
    let (mut i, mut depth) = (0usize, 0usize);
    while i < b.len() {
        match b[i] {
            b'"' => {
                i = skip_string(b, i + 1)?;
                continue;
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return Err(too_deep());
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < b.len() && matches!(b[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
                let number = &json[start..i];
                if number.parse::<f64>().is_ok_and(f64::is_infinite) {
                    return Err(DecodeError::BadContent(format!(
                        "number {number} is out of range"
                    )));
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// Skips a string body from just after its opening quote; returns the index after the
/// closing quote.
fn skip_string(b: &[u8], mut i: usize) -> Result<usize, DecodeError> {
    let hex = |at: usize| -> Option<u32> {
        let digits = b.get(at..at + 4)?;
        u32::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
    };
    let lone =
        || DecodeError::BadContent("a string contains an unpaired UTF-16 surrogate escape".into());
    while i < b.len() {
        match b[i] {
            b'"' => return Ok(i + 1),
            b'\\' if b.get(i + 1) == Some(&b'u') => {
                let unit = hex(i + 2).ok_or_else(lone)?;
                match unit {
                    0xD800..=0xDBFF => {
                        let low = (b.get(i + 6..i + 8) == Some(b"\\u"))
                            .then(|| hex(i + 8))
                            .flatten();
                        if !matches!(low, Some(0xDC00..=0xDFFF)) {
                            return Err(lone());
                        }
                        i += 12;
                    }
                    0xDC00..=0xDFFF => return Err(lone()),
                    _ => i += 6,
                }
            }
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    Ok(i)
}

/// Reads `header.msg_id` from a payload that failed validation, so the error reply can carry
/// `parent_msg_id`. It allocates nothing for the rest of the document.
pub fn salvage_msg_id(payload: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Head {
        msg_id: Option<serde_json::Value>,
    }
    #[derive(Deserialize)]
    struct Loose<'a> {
        #[serde(borrow)]
        header: Option<&'a RawValue>,
    }
    // Only an object with an object header has an id; serde alone would also read arrays.
    if payload.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    // The first JSON value only: trailing garbage must not hide an id that was readable.
    let loose: Loose = serde_json::Deserializer::from_slice(payload)
        .into_iter()
        .next()?
        .ok()?;
    let header = loose.header?;
    if !header.get().starts_with('{') {
        return None;
    }
    // An id over the limit is not echoed: the error must not carry what it refuses.
    match serde_json::from_str::<Head>(header.get()).ok()?.msg_id? {
        serde_json::Value::String(s) if !s.is_empty() && s.len() <= MAX_ID_BYTES => Some(s),
        _ => None,
    }
}

#[derive(Serialize)]
struct OutRoute<'a> {
    source: &'a str,
    group: &'a str,
    operation: Operation,
    resource: &'a str,
}

#[derive(Serialize)]
struct OutMessage<'a> {
    header: Header,
    route: OutRoute<'a>,
    content: &'a RawValue,
}

/// Builds a message MetaManager originates: fresh UUID v4 id, current time.
pub fn build(
    parent_msg_id: Option<&str>,
    operation: Operation,
    resource: &str,
    content: &RawValue,
) -> Vec<u8> {
    build_with_id(new_msg_id(), parent_msg_id, operation, resource, content)
}

pub fn new_msg_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Builds a message with a chosen id, for callers that must remember it (remote queries).
pub fn build_with_id(
    msg_id: String,
    parent_msg_id: Option<&str>,
    operation: Operation,
    resource: &str,
    content: &RawValue,
) -> Vec<u8> {
    let header = header(msg_id, parent_msg_id);
    assemble(header, SOURCE, operation, resource, content)
}

/// Builds a message with a chosen id and `route.source`, answering none.
pub fn build_from(
    source: &str,
    msg_id: String,
    operation: Operation,
    resource: &str,
    content: &RawValue,
) -> Vec<u8> {
    assemble(header(msg_id, None), source, operation, resource, content)
}

/// The header of a message MetaManager builds now.
fn header(msg_id: String, parent_msg_id: Option<&str>) -> Header {
    Header {
        msg_id,
        parent_msg_id: parent_msg_id.map(str::to_owned),
        timestamp: now_millis(),
        resourceversion: None,
        sync: false,
    }
}

fn assemble(
    header: Header,
    source: &str,
    operation: Operation,
    resource: &str,
    content: &RawValue,
) -> Vec<u8> {
    let msg = OutMessage {
        header,
        route: OutRoute {
            source,
            group: GROUP,
            operation,
            resource,
        },
        content,
    };
    // Serialising a struct of strings and already-valid raw JSON cannot fail.
    serde_json::to_vec(&msg).unwrap_or_default()
}

/// The ack: `response` with content `"OK"`.
pub fn ack(to: &Message) -> Vec<u8> {
    build(
        Some(to.msg_id()),
        Operation::Response,
        to.resource.key(),
        &raw_string("OK"),
    )
}

/// A reply to `to` with `operation` and raw JSON `content`.
pub fn reply(to: &Message, operation: Operation, content: &RawValue) -> Vec<u8> {
    build(Some(to.msg_id()), operation, to.resource.key(), content)
}

/// An `error` reply whose content is the human-readable `text`.
pub fn error(parent_msg_id: Option<&str>, resource: &str, text: &str) -> Vec<u8> {
    build(parent_msg_id, Operation::Error, resource, &raw_string(text))
}

/// A JSON string as raw JSON.
pub fn raw_string(text: &str) -> Box<RawValue> {
    raw(serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into()))
}

/// Wraps JSON text that MetaManager produced itself (or read from its own store) as raw JSON.
pub fn raw(json: String) -> Box<RawValue> {
    RawValue::from_string(json).unwrap_or_else(|_| raw_null())
}

pub fn raw_null() -> Box<RawValue> {
    RawValue::from_string("null".into()).unwrap_or_else(|_| unreachable!("null is valid JSON"))
}

/// `[a,b,c]` from stored JSON texts, without re-parsing them.
pub fn raw_array<'a>(items: impl IntoIterator<Item = &'a str>) -> Box<RawValue> {
    let mut out = String::from("[");
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(item);
    }
    out.push(']');
    raw(out)
}

pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 1 << 20;

    #[test]
    fn decodes_fixture() {
        let payload = include_bytes!("../tests/fixtures/insert-pod.message.json");
        let m = Message::decode(payload, LIMIT).unwrap();
        assert_eq!(m.operation, Operation::Insert);
        assert_eq!(m.resource.key(), "default/pod/nginx-7d9c5b8f4-x2k9p");
        assert!(m.content_json().contains("nginx"));
    }

    fn err(payload: &str) -> String {
        Message::decode(payload.as_bytes(), LIMIT)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn names_what_is_wrong() {
        assert!(err("nope").contains("not valid JSON"));
        assert!(err("[1]").contains("not a JSON object"));
        assert!(err("{}").contains("header"));
        let no_id = r#"{"header":{},"route":{"operation":"insert","resource":"a/b/c"}}"#;
        assert!(err(no_id).contains("msg_id"));
        let empty_id =
            r#"{"header":{"msg_id":""},"route":{"operation":"insert","resource":"a/b/c"}}"#;
        assert!(err(empty_id).contains("msg_id"));
        let bad_ts = r#"{"header":{"msg_id":"1","timestamp":"x"},"route":{"operation":"insert","resource":"a/b/c"}}"#;
        assert!(err(bad_ts).contains("header.timestamp"));
        let bad_op =
            r#"{"header":{"msg_id":"1"},"route":{"operation":"upsert","resource":"a/b/c"}}"#;
        assert!(err(bad_op).contains("upsert"));
        let bad_res =
            r#"{"header":{"msg_id":"1"},"route":{"operation":"insert","resource":"a//c"}}"#;
        assert!(err(bad_res).contains("route.resource"));
        assert!(Message::decode(&vec![b' '; 2048], 1024)
            .unwrap_err()
            .to_string()
            .contains("limit"));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = format!(
            r#"{{"header":{{"msg_id":"1"}},"route":{{"operation":"insert","resource":"a/b/c"}},"content":{}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let e = Message::decode(deep.as_bytes(), LIMIT).unwrap_err();
        assert!(matches!(e, DecodeError::TooDeep), "{e}");
        // Brackets inside strings do not count.
        let text = format!(
            r#"{{"header":{{"msg_id":"1"}},"route":{{"operation":"insert","resource":"a/b/c"}},"content":{{"s":"{}\\\"["}}}}"#,
            "[".repeat(500)
        );
        Message::decode(text.as_bytes(), LIMIT).unwrap();
    }

    #[test]
    fn deep_nesting_in_unknown_fields_is_skipped_without_recursion() {
        // Unknown fields are skipped by an iterative scanner: no stack is at risk, nothing is
        // kept. At the top level the message stands (the contract ignores unknown fields).
        let deep = |at: &str| {
            let nest = format!("{}{}", "[".repeat(200_000), "]".repeat(200_000));
            match at {
                "header" => format!(
                    r#"{{"header":{{"msg_id":"1","x":{nest}}},"route":{{"operation":"insert","resource":"a/b/c"}}}}"#
                ),
                "route" => format!(
                    r#"{{"header":{{"msg_id":"1"}},"route":{{"operation":"insert","resource":"a/b/c","x":{nest}}}}}"#
                ),
                _ => format!(
                    r#"{{"header":{{"msg_id":"1"}},"route":{{"operation":"insert","resource":"a/b/c"}},"x":{nest}}}"#
                ),
            }
        };
        for at in ["header", "route", "top"] {
            let payload = deep(at);
            let decoded = Message::decode(payload.as_bytes(), 1 << 22);
            // In header and route the envelope's depth limit refuses it, after one scan.
            assert_eq!(decoded.is_ok(), at == "top", "{at}");
            assert_eq!(salvage_msg_id(payload.as_bytes()).as_deref(), Some("1"));
        }
    }

    #[test]
    fn refuses_content_that_could_not_be_parsed_again() {
        let with = |content: &str| {
            format!(
                r#"{{"header":{{"msg_id":"1"}},"route":{{"operation":"insert","resource":"a/pod/c"}},"content":{content}}}"#
            )
        };
        for bad in [
            r#""\ud800""#,
            r#""\udc00x""#,
            r#""\ud800\u0041""#,
            "1e400",
            r#"{"a":-1e309}"#,
        ] {
            let e = Message::decode(with(bad).as_bytes(), LIMIT).unwrap_err();
            assert!(matches!(e, DecodeError::BadContent(_)), "{bad}: {e}");
        }
        for good in [
            r#""\ud83d\ude00""#,
            "1e308",
            "1e-400",
            r#""\\ud800""#,
            "123456789012345678901234567890",
        ] {
            let m = Message::decode(with(good).as_bytes(), LIMIT).unwrap();
            serde_json::from_str::<serde_json::Value>(m.content_json()).unwrap();
        }
    }

    #[test]
    fn header_and_route_must_be_objects() {
        let arrays = r#"{"header":["1"],"route":["s","g","insert","a/b"]}"#;
        let e = Message::decode(arrays.as_bytes(), LIMIT).unwrap_err();
        assert!(
            e.to_string().contains("header must be a JSON object"),
            "{e}"
        );
        assert_eq!(salvage_msg_id(arrays.as_bytes()), None);
        assert_eq!(salvage_msg_id(br#"[["abc"]]"#), None);
        let route = r#"{"header":{"msg_id":"1"},"route":["s","g","insert","a/b"]}"#;
        let e = Message::decode(route.as_bytes(), LIMIT).unwrap_err();
        assert!(e.to_string().contains("route must be a JSON object"), "{e}");
    }

    #[test]
    fn salvages_msg_id() {
        assert_eq!(
            salvage_msg_id(br#"{"header":{"msg_id":"abc"},"route":5}"#).as_deref(),
            Some("abc")
        );
        assert_eq!(salvage_msg_id(b"garbage"), None);
    }

    #[test]
    fn replies_carry_parent_and_source() {
        let payload = include_bytes!("../tests/fixtures/insert-pod.message.json");
        let m = Message::decode(payload, LIMIT).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&ack(&m)).unwrap();
        assert_eq!(v["header"]["parent_msg_id"], m.msg_id());
        assert_eq!(v["route"]["source"], "metamanager");
        assert_eq!(v["route"]["group"], "meta");
        assert_eq!(v["route"]["operation"], "response");
        assert_eq!(v["content"], "OK");
        assert_eq!(v["header"]["msg_id"].as_str().unwrap().len(), 36);
    }

    #[test]
    fn ids_over_the_limit_are_refused_and_not_echoed() {
        let long = "x".repeat(MAX_ID_BYTES + 1);
        let at_limit = "x".repeat(MAX_ID_BYTES);
        let with_id = |id: &str| {
            format!(
                r#"{{"header":{{"msg_id":"{id}"}},"route":{{"operation":"insert","resource":"a/b/c"}}}}"#
            )
        };
        assert!(Message::decode(with_id(&at_limit).as_bytes(), 1 << 20).is_ok());
        let e = err(&with_id(&long));
        assert!(
            e.contains("header.msg_id") && e.contains("256 bytes"),
            "{e}"
        );
        assert_eq!(salvage_msg_id(with_id(&long).as_bytes()), None);

        let parent = format!(
            r#"{{"header":{{"msg_id":"1","parent_msg_id":"{long}"}},"route":{{"operation":"response","resource":"a/b/c"}}}}"#
        );
        let e = err(&parent);
        assert!(
            e.contains("header.parent_msg_id") && e.contains("256 bytes"),
            "{e}"
        );
        assert_eq!(salvage_msg_id(parent.as_bytes()).as_deref(), Some("1"));
    }

    #[test]
    fn header_and_route_nest_at_most_eight_levels() {
        // `{"x":` repeated: the header object is level 1, so seven more fit.
        let nest = |levels: usize| {
            format!(
                "{}{}",
                "{\"x\":".repeat(levels),
                "1".to_owned() + &"}".repeat(levels)
            )
        };
        let header = |extra: &str| {
            format!(
                r#"{{"header":{{"msg_id":"1","deep":{extra}}},"route":{{"operation":"insert","resource":"a/b/c"}}}}"#
            )
        };
        let route = |extra: &str| {
            format!(
                r#"{{"header":{{"msg_id":"1"}},"route":{{"operation":"insert","resource":"a/b/c","deep":{extra}}}}}"#
            )
        };
        assert!(Message::decode(header(&nest(7)).as_bytes(), 1 << 20).is_ok());
        assert!(Message::decode(route(&nest(7)).as_bytes(), 1 << 20).is_ok());
        for levels in [8, 5000] {
            let e = err(&header(&nest(levels)));
            assert!(e.contains("header is nested deeper than 8 levels"), "{e}");
            let e = err(&route(&nest(levels)));
            assert!(e.contains("route is nested deeper than 8 levels"), "{e}");
        }
        // The id is still echoed in the error's parent_msg_id.
        assert_eq!(
            salvage_msg_id(route(&nest(5000)).as_bytes()).as_deref(),
            Some("1")
        );
    }
}
