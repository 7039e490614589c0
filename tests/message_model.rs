//! Property tests of the wire message model (topics.md, sections 3 and 8): any well-formed
//! message survives a round trip through JSON and `Message::decode` field for field; anything
//! that is not an object, and any byte string at all, is refused without a panic.

use metamanager::message::{self, DecodeError, Message, Operation};
use metamanager::resource::Resource;
use proptest::prelude::*;
use serde_json::{json, Map, Value};

const LIMIT: usize = 1 << 20;

/// What a generated message should decode to.
#[derive(Debug, Clone)]
struct Model {
    msg_id: String,
    parent_msg_id: Option<String>,
    timestamp: i64,
    resourceversion: Option<String>,
    sync: bool,
    source: String,
    group: String,
    operation: Operation,
    resource: String,
    content: Value,
    /// How optional fields that are absent are written: left out, or as `null`.
    nulls: bool,
    /// An unknown field added to the header, the route and the message; ignored by decode.
    extra: Option<Value>,
}

impl Model {
    fn to_json(&self) -> Value {
        let mut header = Map::new();
        header.insert("msg_id".into(), json!(self.msg_id));
        put_opt(
            &mut header,
            "parent_msg_id",
            &self.parent_msg_id,
            self.nulls,
        );
        header.insert("timestamp".into(), json!(self.timestamp));
        put_opt(
            &mut header,
            "resourceversion",
            &self.resourceversion,
            self.nulls,
        );
        header.insert("sync".into(), json!(self.sync));
        let mut route = Map::new();
        route.insert("source".into(), json!(self.source));
        route.insert("group".into(), json!(self.group));
        route.insert("operation".into(), json!(self.operation.as_str()));
        route.insert("resource".into(), json!(self.resource));
        let mut msg = Map::new();
        if let Some(extra) = &self.extra {
            header.insert("x-extra".into(), extra.clone());
            route.insert("x-extra".into(), extra.clone());
            msg.insert("x-extra".into(), extra.clone());
        }
        msg.insert("header".into(), Value::Object(header));
        msg.insert("route".into(), Value::Object(route));
        if !self.content.is_null() || self.nulls {
            msg.insert("content".into(), self.content.clone());
        }
        Value::Object(msg)
    }
}

fn put_opt(map: &mut Map<String, Value>, key: &str, value: &Option<String>, nulls: bool) {
    match value {
        Some(v) => {
            map.insert(key.into(), json!(v));
        }
        None if nulls => {
            map.insert(key.into(), Value::Null);
        }
        None => {}
    }
}

/// Text that JSON must escape or that looks like JSON structure.
fn tricky_string() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z0-9 ]{0,12}",
        prop::collection::vec(
            prop_oneof![
                Just("\"".to_owned()),
                Just("\\".to_owned()),
                Just("\\\"".to_owned()),
                Just("[".to_owned()),
                Just("]".to_owned()),
                Just("{".to_owned()),
                Just("}".to_owned()),
                Just("\\u0000".to_owned()),
                Just("\n\t\u{0}\u{1f}".to_owned()),
                Just("é日本😀".to_owned()),
                Just("null".to_owned()),
                "[a-z]{1,4}",
            ],
            0..8
        )
        .prop_map(|parts| parts.concat()),
    ]
}

fn msg_id() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u128>().prop_map(uuid_like),
        tricky_string().prop_filter("msg_id is non-empty", |s| !s.is_empty()),
        "\\PC{1,20}",
    ]
}

fn uuid_like(n: u128) -> String {
    let h = format!("{n:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn operation() -> impl Strategy<Value = Operation> {
    prop::sample::select(Operation::ALL.to_vec())
}

/// One resource segment: Kubernetes-style names, or any text without `/` or control characters.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9]([a-z0-9.-]{0,30}[a-z0-9])?",
        1 => "[^/\\p{Cc}]{1,20}",
        1 => "[\"\\\\\\[\\]{}:, ]{1,6}",
    ]
}

fn resource() -> impl Strategy<Value = String> {
    (segment(), segment(), prop::option::of(segment())).prop_map(|(ns, t, name)| match name {
        Some(name) => format!("{ns}/{t}/{name}"),
        None => format!("{ns}/{t}"),
    })
}

/// JSON numbers that survive text and back exactly. serde_json's default float parsing is
/// exact only while the decimal significand fits in 53 bits, so fractions stay short.
fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (any::<i16>(), 0u32..=10).prop_map(|(m, e)| json!(f64::from(m) / f64::from(1u32 << e))),
    ]
}

/// Any JSON value, nested at most four levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        tricky_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(tricky_string(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

prop_compose! {
    fn model()(
        msg_id in msg_id(),
        parent_msg_id in prop::option::of(msg_id()),
        timestamp in any::<i64>(),
        resourceversion in prop::option::of(prop_oneof!["[0-9]{1,10}", tricky_string()]),
        sync in any::<bool>(),
        source in tricky_string(),
        group in tricky_string(),
        operation in operation(),
        resource in resource(),
        content in json_value(),
        nulls in any::<bool>(),
        extra in prop::option::of(json_value()),
    ) -> Model {
        Model {
            msg_id, parent_msg_id, timestamp, resourceversion, sync, source, group, operation,
            resource, content, nulls, extra,
        }
    }
}

/// Every field of the decoded message equals the model's. Compact JSON keeps content text
/// byte for byte as serde_json wrote it.
fn assert_matches(m: &Message, model: &Model, compact: bool) {
    assert_eq!(m.header.msg_id, model.msg_id);
    assert_eq!(m.header.parent_msg_id, model.parent_msg_id);
    assert_eq!(m.header.timestamp, model.timestamp);
    assert_eq!(m.header.resourceversion, model.resourceversion);
    assert_eq!(m.header.sync, model.sync);
    assert_eq!(m.source, model.source);
    assert_eq!(m.group, model.group);
    assert_eq!(m.operation, model.operation);
    assert_eq!(m.resource.key(), model.resource);
    let segments: Vec<&str> = model.resource.split('/').collect();
    assert_eq!(m.resource.namespace(), segments[0]);
    assert_eq!(m.resource.rtype(), segments[1]);
    assert_eq!(m.resource.name(), segments.get(2).copied());
    assert_eq!(m.resource.is_list(), segments.len() == 2);
    if model.content.is_null() {
        assert!(m.content.is_none(), "null content decodes as None");
        assert_eq!(m.content_json(), "null");
    } else {
        assert!(m.content.is_some(), "content present");
        let raw = m.content_json();
        // Raw content is kept byte for byte, and means the same value.
        if compact {
            assert_eq!(raw, serde_json::to_string(&model.content).unwrap());
        }
        let parsed: Value = serde_json::from_str(raw).unwrap();
        assert_eq!(parsed, model.content);
    }
}

/// A reply MetaManager builds for `to` decodes again and answers it.
fn assert_reply(bytes: &[u8], to: &Message, operation: Operation) -> Message {
    let r = Message::decode(bytes, 2 * LIMIT).expect("reply decodes");
    assert_eq!(r.header.parent_msg_id.as_deref(), Some(to.msg_id()));
    assert_ne!(r.msg_id(), to.msg_id());
    assert_eq!(r.operation, operation);
    assert_eq!(r.resource, to.resource);
    assert_eq!(r.source, message::SOURCE);
    assert_eq!(r.group, message::GROUP);
    r
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn round_trip(model in model(), pretty in any::<bool>()) {
        let v = model.to_json();
        let bytes = if pretty {
            serde_json::to_vec_pretty(&v).unwrap()
        } else {
            serde_json::to_vec(&v).unwrap()
        };
        let m = Message::decode(&bytes, LIMIT).unwrap_or_else(|e| {
            panic!("{e}\n{}", String::from_utf8_lossy(&bytes))
        });
        assert_matches(&m, &model, !pretty);
        prop_assert_eq!(message::salvage_msg_id(&bytes), Some(model.msg_id.clone()));
        prop_assert_eq!(Resource::parse(m.resource.key()), Ok(m.resource.clone()));

        // Replies: ack, a reply carrying the content, and an error.
        let ack = assert_reply(&message::ack(&m), &m, Operation::Response);
        prop_assert_eq!(ack.content_json(), "\"OK\"");
        let content = m.content_raw();
        let rep = assert_reply(&message::reply(&m, m.operation, &content), &m, m.operation);
        prop_assert_eq!(rep.content_json(), m.content_json());
        let text = format!("bad {} \"{}\" \\", model.source, model.msg_id);
        let err = message::error(Some(m.msg_id()), m.resource.key(), &text);
        let err = assert_reply(&err, &m, Operation::Error);
        prop_assert_eq!(serde_json::from_str::<String>(err.content_json()).unwrap(), text);
    }

    #[test]
    fn non_objects_are_refused(v in json_value().prop_filter("not an object", |v| !v.is_object())) {
        let bytes = serde_json::to_vec(&v).unwrap();
        match Message::decode(&bytes, LIMIT) {
            Err(DecodeError::NotObject) => {}
            other => panic!("{v} decoded to {other:?}"),
        }
        prop_assert_eq!(message::salvage_msg_id(&bytes), None);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = message::salvage_msg_id(&bytes);
        if let Ok(m) = Message::decode(&bytes, LIMIT) {
            prop_assert!(!m.msg_id().is_empty());
        }
    }

    /// Valid messages cut short, with a byte changed, or over the limit: an error or a valid
    /// message, never a panic.
    #[test]
    fn damaged_messages_never_panic(
        model in model(),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let bytes = serde_json::to_vec(&model.to_json()).unwrap();
        let truncated = &bytes[..cut.index(bytes.len())];
        prop_assert!(Message::decode(truncated, LIMIT).is_err());
        let _ = message::salvage_msg_id(truncated);

        let mut changed = bytes.clone();
        changed[flip.index(bytes.len())] = byte;
        let _ = message::salvage_msg_id(&changed);
        if let Ok(m) = Message::decode(&changed, LIMIT) {
            prop_assert!(!m.msg_id().is_empty());
            prop_assert_eq!(Resource::parse(m.resource.key()), Ok(m.resource.clone()));
        }

        match Message::decode(&bytes, bytes.len() - 1) {
            Err(DecodeError::TooLarge { size, limit }) => {
                prop_assert_eq!((size, limit), (bytes.len(), bytes.len() - 1));
            }
            other => panic!("over the limit decoded to {other:?}"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The limits of topics.md sections 3 and 8, exactly: ids of at most 256 bytes, header and route
    /// nested at most 8 levels; a message one byte or one level over is refused, naming the
    /// limit, and the salvaged id of an error reply is never over the limit either. (The fuzz
    /// target `fuzz/fuzz_targets/envelope.rs` explores the same with arbitrary bytes.)
    #[test]
    fn envelope_limits_are_exact(
        header_depth in 0usize..12,
        route_depth in 0usize..12,
        id_len in 1usize..300,
        parent_len in prop::option::of(1usize..300),
    ) {
        let nest = |levels: usize| format!("{}1{}", r#"{"x":"#.repeat(levels), "}".repeat(levels));
        let id = "i".repeat(id_len);
        let parent = parent_len.map_or(String::new(), |n| format!(r#","parent_msg_id":"{}""#, "p".repeat(n)));
        let payload = format!(
            r#"{{"header":{{"msg_id":"{id}"{parent},"deep":{}}},"route":{{"operation":"response","resource":"a/b/c","deep":{}}},"content":"OK"}}"#,
            nest(header_depth),
            nest(route_depth),
        );
        // The header or route object is level 1, so `deep` may nest 7 more.
        let within = header_depth < message::MAX_ENVELOPE_DEPTH
            && route_depth < message::MAX_ENVELOPE_DEPTH
            && id_len <= message::MAX_ID_BYTES
            && parent_len.is_none_or(|n| n <= message::MAX_ID_BYTES);
        match Message::decode(payload.as_bytes(), LIMIT) {
            Ok(_) => prop_assert!(within, "accepted over a limit: {payload}"),
            Err(e) => {
                prop_assert!(!within, "refused within the limits: {e}");
                let text = e.to_string();
                prop_assert!(
                    text.contains("256 bytes") || text.contains("deeper than 8 levels"),
                    "{text}"
                );
            }
        }
        if let Some(salvaged) = message::salvage_msg_id(payload.as_bytes()) {
            prop_assert!(salvaged.len() <= message::MAX_ID_BYTES);
        }
    }
}

/// Examples worth keeping whatever proptest draws.
#[test]
fn fixed_cases() {
    // Content null and content absent both decode as None.
    for content in [",\"content\":null", ""] {
        let p = format!(
            r#"{{"header":{{"msg_id":"1"}},"route":{{"operation":"insert","resource":"a/b/c"}}{content}}}"#
        );
        let m = Message::decode(p.as_bytes(), LIMIT).unwrap();
        assert!(m.content.is_none());
    }
    // Strings that look like structure inside content do not count as nesting.
    let p = r#"{"header":{"msg_id":"\"]}"},"route":{"operation":"update","resource":"a/b/c"},"content":{"s":"\\\"[[{{","t":["]]}}"]}}"#;
    let m = Message::decode(p.as_bytes(), LIMIT).unwrap();
    assert_eq!(m.msg_id(), "\"]}");
    assert_eq!(m.content_json(), r#"{"s":"\\\"[[{{","t":["]]}}"]}"#);
}
