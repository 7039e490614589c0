//! Tests of patch application (topics.md, section 5.10): a merge patch followed by its inverse
//! gives the object back; a merge patch gives the results of RFC 7386's examples; a JSON Patch
//! applied by MetaManager (one operation at a time, within its bounds) gives what the crate
//! gives applying it whole, failures included. A failure leaves the stored object as it was:
//! `tests/operations.rs` and the store's tests show that.

use metamanager::patch::{OpFailure, Patch, PatchError, Patched};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

const LIMIT: usize = 1 << 20;

/// Keys from a small alphabet, so that two objects share many; with `/` and `~`, which a JSON
/// Pointer must escape. Never `status`: the keyed lists of pods and nodes are not RFC 7386.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-d]{1,2}",
        1 => Just("x/y".to_owned()),
        1 => Just("t~".to_owned()),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<bool>().prop_map(Value::Bool),
        (-5i64..5).prop_map(Value::from),
        "[a-c]{0,3}".prop_map(Value::String),
    ]
}

/// JSON without `null` (in a merge patch `null` means "remove"), arrays of leaves only.
fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(leaf(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn object() -> impl Strategy<Value = Value> {
    prop::collection::btree_map(key(), value(), 0..5)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

/// The RFC 7386 patch that turns `from` into `to` (both objects without `null`).
fn merge_diff(from: &Map<String, Value>, to: &Map<String, Value>) -> Value {
    let mut patch = Map::new();
    for (k, old) in from {
        match to.get(k) {
            None => {
                patch.insert(k.clone(), Value::Null);
            }
            Some(Value::Object(new)) => {
                if let Value::Object(old) = old {
                    if old != new {
                        patch.insert(k.clone(), merge_diff(old, new));
                    }
                } else {
                    patch.insert(k.clone(), Value::Object(new.clone()));
                }
            }
            Some(new) if new != old => {
                patch.insert(k.clone(), new.clone());
            }
            Some(_) => {}
        }
    }
    for (k, new) in to {
        if !from.contains_key(k) {
            patch.insert(k.clone(), new.clone());
        }
    }
    Value::Object(patch)
}

/// MetaManager's result of applying `patch` to `stored` as an object of type `target`.
fn apply(target: &str, stored: &Value, patch: &Value) -> Result<Value, PatchError> {
    let patch = Patch::parse(patch.to_string().as_bytes(), target, LIMIT).expect("a patch");
    match patch.apply(&stored.to_string())? {
        Patched::Unchanged => Ok(stored.clone()),
        Patched::Changed(text) => Ok(serde_json::from_str(&text).expect("stored JSON")),
    }
}

fn object_map(v: &Value) -> &Map<String, Value> {
    v.as_object().expect("an object")
}

/// A JSON Pointer to `key` under `parent`.
fn pointer(parent: &str, key: &str) -> String {
    format!("{parent}/{}", key.replace('~', "~0").replace('/', "~1"))
}

/// Every pointer into `v`, the root included, with the value there.
fn pointers(v: &Value, at: String, out: &mut Vec<(String, Value)>) {
    out.push((at.clone(), v.clone()));
    match v {
        Value::Object(fields) => {
            for (k, child) in fields {
                pointers(child, pointer(&at, k), out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                pointers(child, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// A document and JSON Patch operations on it: mostly on paths that exist (or, for `add` and
/// the target of `move` and `copy`, could be added), so that many apply; some on paths that
/// cannot work; tests that pass as well as fail.
fn document_and_operations() -> impl Strategy<Value = (Value, Vec<Value>)> {
    object().prop_flat_map(|doc| {
        let mut known = Vec::new();
        pointers(&doc, String::new(), &mut known);
        let mut existing: Vec<String> = Vec::new();
        let mut addable: Vec<String> = Vec::new();
        for (p, v) in &known {
            if !p.is_empty() {
                existing.push(p.clone());
                addable.push(p.clone());
            }
            match v {
                Value::Object(_) => addable.push(pointer(p, "n")),
                Value::Array(_) => addable.push(format!("{p}/-")),
                _ => {}
            }
        }
        // An empty document has nothing to point at but its root.
        if existing.is_empty() {
            existing.push(String::new());
        }
        let odd: Vec<String> = ["", "/zz/q", "/a/0", "/a/-"].map(str::to_owned).to_vec();
        let pick = |likely: Vec<String>| {
            prop_oneof![
                6 => prop::sample::select(likely),
                1 => prop::sample::select(odd.clone()),
            ]
        };
        let operation = (
            0usize..6,
            pick(existing),
            pick(addable),
            value(),
            prop::sample::select(known),
            any::<bool>(),
        )
            .prop_map(|(kind, at, to, value, (there, found), pass)| match kind {
                0 => json!({"op": "add", "path": to, "value": value}),
                1 => json!({"op": "remove", "path": at}),
                2 => json!({"op": "replace", "path": at, "value": value}),
                3 => json!({"op": "move", "from": at, "path": to}),
                4 => json!({"op": "copy", "from": at, "path": to}),
                _ if pass => json!({"op": "test", "path": there, "value": found}),
                _ => json!({"op": "test", "path": at, "value": value}),
            });
        (Just(doc), prop::collection::vec(operation, 1..6))
    })
}

proptest! {
    /// A merge patch from A to B, then the one from B to A, gives A again, for every type:
    /// without keyed status lists, pods and nodes are plain RFC 7386.
    #[test]
    fn a_merge_patch_then_its_inverse_restores_the_object(
        a in object(),
        b in object(),
        target in prop::sample::select(vec!["configmap", "pod", "node"]),
    ) {
        let forth = merge_diff(object_map(&a), object_map(&b));
        let back = merge_diff(object_map(&b), object_map(&a));
        let there = apply(target, &a, &forth).expect("applies");
        prop_assert_eq!(&there, &b);
        prop_assert_eq!(apply(target, &there, &back).expect("applies"), a);
    }

    /// A JSON Patch gives what the crate gives applying it in one go: the same document, or a
    /// failure of the same operation.
    #[test]
    fn a_json_patch_is_what_the_crate_makes_of_it(
        (doc, operations) in document_and_operations(),
    ) {
        let patch = Value::Array(operations);
        let ops: json_patch::Patch = serde_json::from_value(patch.clone()).expect("operations");
        // `patch_unsafe`: the crate's `patch` panics when undoing some failed patches (see
        // src/patch.rs); what it leaves behind on failure is not compared.
        let mut want = doc.clone();
        let crate_result = json_patch::patch_unsafe(&mut want, &ops);
        let ours = apply("configmap", &doc, &patch);
        match (crate_result, ours) {
            (Ok(()), Ok(got)) => prop_assert_eq!(got, want),
            (Err(e), Err(PatchError::Operation { op, failure })) => {
                prop_assert_eq!(op, e.operation, "{}", e);
                let kind = match e.kind {
                    json_patch::PatchErrorKind::TestFailed => OpFailure::TestFailed,
                    json_patch::PatchErrorKind::InvalidPointer => OpFailure::NoPath,
                    json_patch::PatchErrorKind::InvalidFromPointer => OpFailure::NoFrom,
                    json_patch::PatchErrorKind::CannotMoveInsideItself => OpFailure::MoveInside,
                    _ => OpFailure::Other,
                };
                prop_assert_eq!(failure, kind);
            }
            (theirs, ours) => prop_assert!(false, "crate {:?}, MetaManager {:?}", theirs, ours),
        }
    }
}

/// The examples of RFC 7386, appendix A, all of them: original, patch, result. None touches
/// `status`, so they hold for every type, pods and nodes included.
const RFC_7386_EXAMPLES: [(&str, &str, &str); 15] = [
    (r#"{"a":"b"}"#, r#"{"a":"c"}"#, r#"{"a":"c"}"#),
    (r#"{"a":"b"}"#, r#"{"b":"c"}"#, r#"{"a":"b","b":"c"}"#),
    (r#"{"a":"b"}"#, r#"{"a":null}"#, r#"{}"#),
    (r#"{"a":"b","b":"c"}"#, r#"{"a":null}"#, r#"{"b":"c"}"#),
    (r#"{"a":["b"]}"#, r#"{"a":"c"}"#, r#"{"a":"c"}"#),
    (r#"{"a":"c"}"#, r#"{"a":["b"]}"#, r#"{"a":["b"]}"#),
    (
        r#"{"a":{"b":"c"}}"#,
        r#"{"a":{"b":"d","c":null}}"#,
        r#"{"a":{"b":"d"}}"#,
    ),
    (r#"{"a":[{"b":"c"}]}"#, r#"{"a":[1]}"#, r#"{"a":[1]}"#),
    (r#"["a","b"]"#, r#"["c","d"]"#, r#"["c","d"]"#),
    (r#"{"a":"b"}"#, r#"["c"]"#, r#"["c"]"#),
    (r#"{"a":"foo"}"#, "null", "null"),
    (r#"{"a":"foo"}"#, r#""bar""#, r#""bar""#),
    (r#"{"e":null}"#, r#"{"a":1}"#, r#"{"e":null,"a":1}"#),
    (r#"[1,2]"#, r#"{"a":"b","c":null}"#, r#"{"a":"b"}"#),
    (
        r#"{}"#,
        r#"{"a":{"bb":{"ccc":null}}}"#,
        r#"{"a":{"bb":{}}}"#,
    ),
];

/// A merge patch gives the result RFC 7386 gives in each example of its appendix A. A patch
/// that is not an object is no merge patch here (topics.md, section 5.10: an array is a JSON
/// Patch, anything else is refused), so those four examples are refused before they are
/// applied rather than replacing the object whole.
#[test]
fn a_merge_patch_is_rfc_7386() {
    let json = |text: &str| serde_json::from_str::<Value>(text).expect("an example is JSON");
    for (original, patch, result) in RFC_7386_EXAMPLES {
        for target in ["configmap", "pod", "node"] {
            if !json(patch).is_object() {
                assert!(
                    Patch::parse(patch.as_bytes(), target, LIMIT).is_err(),
                    "{patch} is taken as a merge patch"
                );
                continue;
            }
            let got = apply(target, &json(original), &json(patch)).expect("applies");
            assert_eq!(got, json(result), "{original} patched with {patch}");
        }
    }
}
