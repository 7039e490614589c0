//! Applying patches to stored objects, for the `patch` operation.
//!
//! A patch is a JSON merge patch (RFC 7386, an object) or a JSON Patch (RFC 6902, an array); the
//! `json-patch` crate applies both. What RFC 7386 cannot express is how Kubernetes merges the
//! status lists of pods and nodes: a strategic merge patch matches their entries by a key, where
//! RFC 7386 would replace the whole list. edged patches those lists a few entries at a time, so
//! they are merged here by key, the way the API server would:
//!
//! - an entry of the patch whose key matches an entry of the object is merged into it field by
//!   field (RFC 7386 again: `null` removes a field); one with a new key is appended; entries the
//!   patch does not name are kept;
//! - `"$patch": "delete"` in an entry removes the entries of that key, `"$patch": "replace"`
//!   puts the entry in place of the one of that key; any other directive is refused;
//! - `$setElementOrder/<list>` beside such a list orders it: the entries it names first, in its
//!   order, then the others as they were. The same directive beside any other status list is
//!   dropped (that list is replaced whole, so it is already in the patch's order), never stored;
//! - an entry without its key (not an object, or the key not a string) is refused.
//!
//! JSON Patch is exact about paths and needs no such rule: it is applied by the crate alone, to
//! every type. Other strategic-merge directives (`$retainKeys`, a list-level `$patch`) are not
//! interpreted: outside the lists above a merge patch is plain RFC 7386.
//!
//! Patches run in the store's writer thread, so what one can cost is bounded before it is
//! applied: at most [`MAX_OPERATIONS`] operations, `copy` operations together copy at most the
//! size limit, insertions and removals in arrays shift at most [`MAX_SHIFTED`] elements in
//! all, and no operation may nest the object deeper than [`MAX_DEPTH`] (a chain of
//! copies could otherwise double the object with each operation, or nest it deep enough that
//! writing it out overflows the stack). The result is held to the same limits as content that
//! arrives in a message.

use crate::resource::rtype;
use std::collections::HashMap;

use bytes::Bytes;
use json_patch::{PatchErrorKind, PatchOperation};
use serde_json::{Map, Value};

use crate::message::MAX_DEPTH;

/// Most operations one JSON Patch may have; each may compare or move a whole object.
pub const MAX_OPERATIONS: usize = 1000;
/// Array elements that a JSON Patch's `add`, `remove`, `move` and `copy` operations may shift
/// together: inserting or removing at the front of an array moves every element after it, so
/// a thousand of them on a long array would hold the writer thread (and every message behind
/// it) for about a second. This many take a few milliseconds.
pub const MAX_SHIFTED: usize = 4 * 1024 * 1024;

/// A status list that Kubernetes merges by `key` rather than replacing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KeyedList {
    field: &'static str,
    key: &'static str,
}

const POD_LISTS: &[KeyedList] = &[
    KeyedList {
        field: "conditions",
        key: "type",
    },
    KeyedList {
        field: "containerStatuses",
        key: "name",
    },
    KeyedList {
        field: "initContainerStatuses",
        key: "name",
    },
    KeyedList {
        field: "ephemeralContainerStatuses",
        key: "name",
    },
];

const NODE_LISTS: &[KeyedList] = &[
    KeyedList {
        field: "conditions",
        key: "type",
    },
    KeyedList {
        field: "addresses",
        key: "type",
    },
];

const SET_ELEMENT_ORDER: &str = "$setElementOrder/";

/// The fields of `status` that a patch of a `target` object merges by key.
pub fn keyed_status_lists(target: &str) -> impl Iterator<Item = &'static str> {
    let lists = match target {
        rtype::POD => POD_LISTS,
        rtype::NODE => NODE_LISTS,
        _ => &[],
    };
    lists.iter().map(|l| l.field)
}

/// The type a patch of resource type `rtype` changes: KubeEdge's `podpatch` and `nodepatch`
/// name the pod and the node of the same namespace and name; any other type patches itself.
pub fn target_type(rtype: &str) -> &str {
    match rtype {
        "podpatch" => rtype::POD,
        "nodepatch" => rtype::NODE,
        other => other,
    }
}

/// The patch `content` is: a merge patch (an object) or a JSON Patch (an array).
fn read_body(content: &[u8]) -> Result<Body, InvalidPatch> {
    let body = match content.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Body::Merge(
            serde_json::from_slice(content).map_err(|e| InvalidPatch::MergePatch(e.to_string()))?,
        ),
        Some(b'[') => {
            let ops: json_patch::Patch = serde_json::from_slice(content)
                .map_err(|e| InvalidPatch::JsonPatch(e.to_string()))?;
            if ops.0.len() > MAX_OPERATIONS {
                return Err(InvalidPatch::TooManyOperations(ops.0.len()));
            }
            Body::Json(ops)
        }
        Some(b'"') => return Err(InvalidPatch::Shape("a string")),
        Some(b't' | b'f') => return Err(InvalidPatch::Shape("a boolean")),
        Some(b'n') | None => return Err(InvalidPatch::Shape("null")),
        Some(_) => return Err(InvalidPatch::Shape("a number")),
    };
    Ok(body)
}

/// A patch that could be read, ready to be applied to the stored object. It keeps the text,
/// not the parsed tree: a parsed JSON value takes many times the bytes of its text, and a
/// patch waits from its arrival until its step is done, behind others, so only the text is
/// held that long; it is parsed again where it is applied, one at a time, and dropped there.
#[derive(Debug)]
pub struct Patch {
    text: Bytes,
    lists: &'static [KeyedList],
    /// Largest result, in bytes, and most bytes `copy` operations may copy together.
    limit: usize,
}

#[derive(Debug)]
enum Body {
    /// RFC 7386; always an object.
    Merge(Value),
    /// RFC 6902.
    Json(json_patch::Patch),
}

/// Why a patch's content is not a patch at all. Found before anything is stored.
#[derive(Debug, thiserror::Error)]
pub enum InvalidPatch {
    #[error(
        "patch content must be a JSON merge patch (an object) or a JSON Patch (an array), not {0}"
    )]
    Shape(&'static str),
    #[error("invalid JSON Patch: {0}")]
    JsonPatch(String),
    #[error("invalid merge patch: {0}")]
    MergePatch(String),
    #[error("a JSON Patch may have at most {MAX_OPERATIONS} operations, not {0}")]
    TooManyOperations(usize),
}

/// Why a patch could not be applied to the stored object; nothing was changed. Small and
/// `Copy`, so that it can travel in the store's [`crate::store::Outcome`]; [`Patch::explain`]
/// adds the failed operation's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    /// JSON Patch operation `op` (counted from 0) failed.
    #[error("operation {op} failed: {failure}")]
    Operation { op: usize, failure: OpFailure },
    #[error("the patched object would be larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the patched object would be nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("entry {entry} of status.{list} has no string \"{key}\" to merge it by")]
    NoMergeKey {
        list: &'static str,
        key: &'static str,
        entry: usize,
    },
    #[error("entry {entry} of status.{list} has a \"$patch\" directive other than \"delete\", \"replace\" or \"merge\"")]
    Directive { list: &'static str, entry: usize },
    #[error("the patch would shift more than {MAX_SHIFTED} array elements in all; send fewer insertions and removals in long arrays")]
    TooMuchShifting,
    #[error("the stored object is not JSON")]
    StoredNotJson,
    /// The patch's text no longer parses (it did when it was read).
    #[error("the patch could not be read again")]
    Unreadable,
}

/// How a JSON Patch operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpFailure {
    #[error("the value differs from the test's value")]
    TestFailed,
    #[error("the path does not exist")]
    NoPath,
    #[error("the \"from\" path does not exist")]
    NoFrom,
    #[error("a value cannot be moved inside itself")]
    MoveInside,
    #[error("it cannot be applied")]
    Other,
}

impl PatchError {
    fn op(op: usize, failure: OpFailure) -> Self {
        PatchError::Operation { op, failure }
    }
}

/// What applying a patch gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Patched {
    /// Equal, as JSON, to what was stored.
    Unchanged,
    /// The new object's JSON text.
    Changed(String),
}

impl Patch {
    /// Reads `content` (JSON text, as validated by [`crate::message::Message::decode`]) as a
    /// patch of an object of type `target` (see [`target_type`]) whose result may be at most
    /// `limit` bytes.
    pub fn parse(content: &[u8], target: &str, limit: usize) -> Result<Self, InvalidPatch> {
        Self::parse_shared(Bytes::copy_from_slice(content), target, limit)
    }

    /// [`Self::parse`] of text that is kept as it is, not copied (a slice of a message).
    pub fn parse_shared(content: Bytes, target: &str, limit: usize) -> Result<Self, InvalidPatch> {
        // Read once to refuse what is no patch before anything is queued; the tree is dropped.
        read_body(&content)?;
        let lists = match target {
            crate::resource::rtype::POD => POD_LISTS,
            crate::resource::rtype::NODE => NODE_LISTS,
            _ => &[],
        };
        Ok(Self {
            text: content,
            lists,
            limit,
        })
    }

    /// The patch as parsed; it parsed when it was read, so it parses now.
    fn body(&self) -> Result<Body, PatchError> {
        read_body(&self.text).map_err(|_| PatchError::Unreadable)
    }

    /// Applies the patch to the stored JSON text `stored`.
    pub fn apply(&self, stored: &str) -> Result<Patched, PatchError> {
        let body = self.body()?;
        let original: Value =
            serde_json::from_str(stored).map_err(|_| PatchError::StoredNotJson)?;
        let mut doc = original.clone();
        match &body {
            Body::Merge(patch) => merge(&mut doc, patch, self.lists)?,
            Body::Json(ops) => apply_operations(&mut doc, &ops.0, self.limit)?,
        }
        if doc == original {
            return Ok(Patched::Unchanged);
        }
        let text = doc.to_string();
        if text.len() > self.limit {
            return Err(PatchError::TooLarge { limit: self.limit });
        }
        Ok(Patched::Changed(text))
    }

    /// `e` for the sender: with the failed operation and its path, when it is one.
    pub fn explain(&self, e: PatchError) -> String {
        let Ok(body) = self.body() else {
            return e.to_string();
        };
        let (op, failure, operation) = match (&body, e) {
            (Body::Json(ops), PatchError::Operation { op, failure }) => match ops.0.get(op) {
                Some(operation) => (op, failure, operation),
                None => return e.to_string(),
            },
            _ => return e.to_string(),
        };
        let at = |p: &json_patch::jsonptr::Pointer| {
            if p.is_root() {
                "\"\", the whole object".to_owned()
            } else {
                p.as_str().to_owned()
            }
        };
        let what = match operation {
            PatchOperation::Add(o) => format!("add at {}", at(&o.path)),
            PatchOperation::Remove(o) => format!("remove at {}", at(&o.path)),
            PatchOperation::Replace(o) => format!("replace at {}", at(&o.path)),
            PatchOperation::Move(o) => format!("move from {} to {}", at(&o.from), at(&o.path)),
            PatchOperation::Copy(o) => format!("copy from {} to {}", at(&o.from), at(&o.path)),
            PatchOperation::Test(o) => format!("test at {}", at(&o.path)),
        };
        format!("operation {op} ({what}) failed: {failure}")
    }
}

/// RFC 7386, with the keyed status lists of pods and nodes merged by key.
fn merge(doc: &mut Value, patch: &Value, lists: &[KeyedList]) -> Result<(), PatchError> {
    let status = match patch.get("status") {
        Some(Value::Object(status)) if !lists.is_empty() => status,
        _ => {
            json_patch::merge(doc, patch);
            return Ok(());
        }
    };
    // The keyed lists and the order directives are set aside; the rest is plain RFC 7386.
    let mut plain = status.clone();
    let mut keyed = Vec::new();
    for list in lists {
        let order = plain.remove(&format!("{SET_ELEMENT_ORDER}{}", list.field));
        let entries = match plain.get(list.field) {
            Some(Value::Array(_)) => match plain.remove(list.field) {
                Some(Value::Array(entries)) => Some(entries),
                _ => None,
            },
            _ => None,
        };
        if order.is_some() || entries.is_some() {
            keyed.push((list, entries.unwrap_or_default(), order));
        }
    }
    plain.retain(|k, _| !k.starts_with(SET_ELEMENT_ORDER));
    let mut rest: Map<String, Value> = patch
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.as_str() != "status")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    rest.insert("status".into(), Value::Object(plain));
    json_patch::merge(doc, &Value::Object(rest));
    // The merge of an object made `status` an object.
    let Some(status) = doc.get_mut("status").and_then(Value::as_object_mut) else {
        return Ok(());
    };
    for (list, entries, order) in keyed {
        let current = status.remove(list.field);
        if current.is_none() && entries.is_empty() {
            continue;
        }
        let merged = merge_by_key(current, &entries, *list, order.as_ref())?;
        status.insert(list.field.into(), Value::Array(merged));
    }
    Ok(())
}

/// Merges the patch's `entries` into the list `current` by `list.key`; see the module doc.
fn merge_by_key(
    current: Option<Value>,
    entries: &[Value],
    list: KeyedList,
    order: Option<&Value>,
) -> Result<Vec<Value>, PatchError> {
    let key_of = |v: &Value| key_of(v, list.key);
    // A target that is not a list is replaced, as RFC 7386 replaces it.
    let mut slots: Vec<Option<Value>> = match current {
        Some(Value::Array(items)) => items.into_iter().map(Some).collect(),
        _ => Vec::new(),
    };
    // Positions by key, so that a long list costs one lookup per entry; the first is merged
    // into, as the API server does.
    let mut index: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, slot) in slots.iter().enumerate() {
        if let Some(k) = slot.as_ref().and_then(key_of) {
            index.entry(k).or_default().push(i);
        }
    }
    for (n, entry) in entries.iter().enumerate() {
        let Entry {
            key: k,
            directive,
            fields,
        } = read_entry(entry, n, list)?;
        if directive == Some("delete") {
            for i in index.remove(&k).unwrap_or_default() {
                slots[i] = None;
            }
            continue;
        }
        let fields = match directive {
            None => entry.clone(),
            Some(_) => {
                let mut f = fields.clone();
                f.remove("$patch");
                Value::Object(f)
            }
        };
        let first = index.get(&k).and_then(|at| at.first()).copied();
        match (first.and_then(|i| slots[i].as_mut()), directive) {
            (Some(existing), Some("replace")) => {
                *existing = Value::Null;
                json_patch::merge(existing, &fields);
            }
            (Some(existing), _) => json_patch::merge(existing, &fields),
            (None, _) => {
                // Merged into nothing, which drops its `null` fields.
                let mut added = Value::Null;
                json_patch::merge(&mut added, &fields);
                index.entry(k).or_default().push(slots.len());
                slots.push(Some(added));
            }
        }
    }
    let mut items: Vec<Value> = slots.into_iter().flatten().collect();
    if let Some(Value::Array(order)) = order {
        sort_in_order(&mut items, order, list.key);
    }
    Ok(items)
}

/// The value of `key` in the list entry `v`, when it is a string.
fn key_of(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_owned)
}

/// One entry of a keyed list in a patch.
struct Entry<'a> {
    key: String,
    /// `merge`, `replace` or `delete`, from `$patch`.
    directive: Option<&'a str>,
    fields: &'a serde_json::Map<String, Value>,
}

/// The patch's entry `n` of a keyed list, checked.
fn read_entry(entry: &Value, n: usize, list: KeyedList) -> Result<Entry<'_>, PatchError> {
    let no_key = PatchError::NoMergeKey {
        list: list.field,
        key: list.key,
        entry: n,
    };
    let Some(fields) = entry.as_object() else {
        return Err(no_key);
    };
    let Some(k) = key_of(entry, list.key) else {
        return Err(no_key);
    };
    let directive = match fields.get("$patch") {
        None => None,
        Some(Value::String(d)) if matches!(d.as_str(), "merge" | "replace" | "delete") => {
            Some(d.as_str())
        }
        Some(_) => {
            return Err(PatchError::Directive {
                list: list.field,
                entry: n,
            })
        }
    };
    Ok(Entry {
        key: k,
        directive,
        fields,
    })
}

/// Sorts `items` by where their `key` stands in `order`. Stable: the entries the order does
/// not name keep their places among themselves, after those it names.
fn sort_in_order(items: &mut [Value], order: &[Value], key: &str) {
    let rank: HashMap<String, usize> = order
        .iter()
        .filter_map(|v| key_of(v, key))
        .enumerate()
        .map(|(i, k)| (k, i))
        .collect();
    items.sort_by_key(|v| {
        key_of(v, key)
            .and_then(|k| rank.get(&k).copied())
            .unwrap_or(usize::MAX)
    });
}

/// RFC 6902 through the crate, one operation at a time so that each is checked against the
/// bounds first. The document is a copy, thrown away on failure, so the crate's `patch_unsafe`
/// serves: its `patch` undoes what a failed patch did, and panics where the undo itself fails
/// (a `move` to the root followed by a failing operation is enough), which here would take the
/// writer thread down.
fn apply_operations(
    doc: &mut Value,
    operations: &[PatchOperation],
    limit: usize,
) -> Result<(), PatchError> {
    // An upper bound of the document's nesting, kept as it changes.
    let mut depth = depth_of(doc);
    let mut copied = 0usize;
    let mut shifted = 0usize;
    for (op, operation) in operations.iter().enumerate() {
        shifted += match operation {
            PatchOperation::Add(o) => shift_at(doc, o.path.as_str()),
            PatchOperation::Remove(o) => shift_at(doc, o.path.as_str()),
            PatchOperation::Copy(o) => shift_at(doc, o.path.as_str()),
            PatchOperation::Move(o) => {
                shift_at(doc, o.from.as_str()) + shift_at(doc, o.path.as_str())
            }
            PatchOperation::Replace(_) | PatchOperation::Test(_) => 0,
        };
        if shifted > MAX_SHIFTED {
            return Err(PatchError::TooMuchShifting);
        }
        let reach = match operation {
            PatchOperation::Add(o) => o.path.count() + depth_of(&o.value),
            PatchOperation::Replace(o) => o.path.count() + depth_of(&o.value),
            PatchOperation::Move(o) => o.path.count() + depth.saturating_sub(o.from.count()),
            PatchOperation::Copy(o) => {
                let from = doc
                    .pointer(o.from.as_str())
                    .ok_or(PatchError::op(op, OpFailure::NoFrom))?;
                copied += encoded_len_within(from, limit - copied)
                    .ok_or(PatchError::TooLarge { limit })?;
                o.path.count() + depth.saturating_sub(o.from.count())
            }
            PatchOperation::Remove(_) | PatchOperation::Test(_) => 0,
        };
        depth = depth.max(reach);
        if depth > MAX_DEPTH {
            return Err(PatchError::TooDeep);
        }
        json_patch::patch_unsafe(doc, std::slice::from_ref(operation)).map_err(|e| {
            let failure = match e.kind {
                PatchErrorKind::TestFailed => OpFailure::TestFailed,
                PatchErrorKind::InvalidPointer => OpFailure::NoPath,
                PatchErrorKind::InvalidFromPointer => OpFailure::NoFrom,
                PatchErrorKind::CannotMoveInsideItself => OpFailure::MoveInside,
                _ => OpFailure::Other,
            };
            PatchError::op(op, failure)
        })?;
    }
    Ok(())
}

/// How many elements an insertion or removal at `path` may shift: the length of the array
/// that holds it, if it is in one.
fn shift_at(doc: &Value, path: &str) -> usize {
    let (parent, last) = path.rsplit_once('/').unwrap_or(("", path));
    match doc.pointer(parent) {
        // `-` is past the end; an index, the elements from it on.
        Some(Value::Array(items)) => last
            .parse::<usize>()
            .map_or(0, |at| items.len().saturating_sub(at)),
        _ => 0,
    }
}

/// Levels of arrays and objects in `v`, counted as the message decoder counts them (`{}` is 1),
/// without recursion.
fn depth_of(v: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(v, 0usize)];
    while let Some((v, above)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::Array(items) => Box::new(items.iter()),
            Value::Object(fields) => Box::new(fields.values()),
            _ => continue,
        };
        deepest = deepest.max(above + 1);
        stack.extend(children.map(|c| (c, above + 1)));
    }
    deepest
}

/// The length of `v` written as JSON, or `None` once it passes `budget`: writing stops there,
/// so a large value costs no more than the budget.
fn encoded_len_within(v: &Value, budget: usize) -> Option<usize> {
    struct Counter {
        left: usize,
    }
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.left = self
                .left
                .checked_sub(buf.len())
                .ok_or(std::io::ErrorKind::WriteZero)?;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter { left: budget };
    serde_json::to_writer(&mut counter, v).ok()?;
    Some(budget - counter.left)
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    const LIMIT: usize = 1 << 20;

    fn patched(target: &str, stored: &Value, patch: &Value) -> Result<Value, PatchError> {
        let patch = Patch::parse(patch.to_string().as_bytes(), target, LIMIT).expect("parses");
        match patch.apply(&stored.to_string())? {
            Patched::Unchanged => Ok(stored.clone()),
            Patched::Changed(text) => Ok(serde_json::from_str(&text).expect("JSON")),
        }
    }

    fn pod_with(status: Value) -> Value {
        json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}]}, "status": status})
    }

    #[test]
    fn podpatch_and_nodepatch_name_the_pod_and_the_node() {
        assert_eq!(target_type("podpatch"), "pod");
        assert_eq!(target_type("nodepatch"), "node");
        assert_eq!(target_type("configmap"), "configmap");
        assert_eq!(target_type("pod"), "pod");
    }

    /// The strategic-merge example of Kubernetes' documentation for a list with a merge key: an
    /// entry matched by key is merged field by field, a new key is appended, the others stay.
    #[test]
    fn container_statuses_are_merged_by_name() {
        let stored = pod_with(json!({"phase": "Pending", "containerStatuses": [
            {"name": "a", "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}},
            {"name": "b", "ready": true, "restartCount": 2},
        ]}));
        let patch = json!({"status": {"phase": "Running", "containerStatuses": [
            {"name": "a", "ready": true, "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}, "waiting": null}},
            {"name": "c", "ready": false, "lastState": null},
        ]}});
        let got = patched("pod", &stored, &patch).unwrap();
        assert_eq!(
            got,
            pod_with(json!({"phase": "Running", "containerStatuses": [
                {"name": "a", "ready": true, "restartCount": 0, "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}},
                {"name": "b", "ready": true, "restartCount": 2},
                {"name": "c", "ready": false},
            ]}))
        );
    }

    #[test]
    fn every_keyed_list_of_pods_and_nodes_is_merged_by_its_key() {
        for (target, field, key) in [
            ("pod", "conditions", "type"),
            ("pod", "containerStatuses", "name"),
            ("pod", "initContainerStatuses", "name"),
            ("pod", "ephemeralContainerStatuses", "name"),
            ("node", "conditions", "type"),
            ("node", "addresses", "type"),
        ] {
            let stored =
                json!({"status": {field: [{key: "x", "v": 1, "w": 1}, {key: "y", "v": 1}]}});
            let patch = json!({"status": {field: [{key: "y", "v": 2}, {key: "z", "v": 3}, {key: "x", "w": null}]}});
            let got = patched(target, &stored, &patch).unwrap();
            assert_eq!(
                got,
                json!({"status": {field: [{key: "x", "v": 1}, {key: "y", "v": 2}, {key: "z", "v": 3}]}}),
                "{target} {field}"
            );
        }
    }

    #[test]
    fn other_lists_and_other_types_are_replaced_whole_as_rfc_7386_says() {
        let stored = json!({"spec": {"containers": [{"name": "a", "image": "x"}]},
                            "status": {"conditions": [{"type": "Ready"}], "podIPs": [{"ip": "10.0.0.1"}]}});
        let patch = json!({"spec": {"containers": [{"name": "b"}]}, "status": {"podIPs": [{"ip": "10.0.0.2"}]}});
        let got = patched("pod", &stored, &patch).unwrap();
        assert_eq!(got["spec"]["containers"], json!([{"name": "b"}]));
        assert_eq!(got["status"]["podIPs"], json!([{"ip": "10.0.0.2"}]));
        assert_eq!(got["status"]["conditions"], json!([{"type": "Ready"}]));
        // A configmap has no keyed lists: its status list is an ordinary value.
        let patch = json!({"status": {"conditions": [{"type": "Other"}]}});
        let got = patched("configmap", &stored, &patch).unwrap();
        assert_eq!(got["status"]["conditions"], json!([{"type": "Other"}]));
    }

    #[test]
    fn directives_delete_replace_and_order_entries() {
        let stored = json!({"status": {"conditions": [
            {"type": "A", "status": "True", "reason": "r"},
            {"type": "B", "status": "True"},
            {"type": "C", "status": "False"},
        ]}});
        let patch = json!({"status": {
        "$setElementOrder/conditions": [{"type": "C"}, {"type": "A"}, {"type": "D"}],
        "$setElementOrder/podIPs": [{"ip": "10.0.0.1"}],
        "conditions": [
            {"type": "B", "$patch": "delete"},
            {"type": "A", "$patch": "replace", "status": "False"},
            {"type": "D", "status": "True"},
        ]}});
        let got = patched("pod", &stored, &patch).unwrap();
        assert_eq!(
            got,
            json!({"status": {"conditions": [
                {"type": "C", "status": "False"},
                {"type": "A", "status": "False"},
                {"type": "D", "status": "True"},
            ]}}),
            "no directive is stored"
        );
        // An order alone reorders what is stored.
        let order = json!({"status": {"$setElementOrder/conditions": [{"type": "D"}]}});
        let got = patched("pod", &got, &order).unwrap();
        let types: Vec<&str> = got["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["D", "C", "A"]);
        // Deleting what is not there changes nothing.
        let gone = json!({"status": {"conditions": [{"type": "Z", "$patch": "delete"}]}});
        assert_eq!(patched("pod", &got, &gone).unwrap(), got);
    }

    #[test]
    fn keyed_lists_are_created_and_replaced_like_rfc_7386_values() {
        // No status, or a list that is not a list: the patch's entries, their nulls dropped.
        let patch = json!({"status": {"conditions": [{"type": "Ready", "status": "True", "reason": null}]}});
        let want = json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}});
        assert_eq!(patched("pod", &json!({}), &patch).unwrap(), want);
        let odd = json!({"status": {"conditions": "none"}});
        assert_eq!(patched("pod", &odd, &patch).unwrap(), want);
        // null removes the list; an object replaces it.
        let stored = want.clone();
        let remove = json!({"status": {"conditions": null}});
        assert_eq!(
            patched("pod", &stored, &remove).unwrap(),
            json!({"status": {}})
        );
        let object = json!({"status": {"conditions": {"x": 1}}});
        assert_eq!(
            patched("pod", &stored, &object).unwrap(),
            json!({"status": {"conditions": {"x": 1}}})
        );
        // status: null removes the whole status.
        let drop = json!({"status": null, "metadata": {"name": "p"}});
        assert_eq!(
            patched("pod", &stored, &drop).unwrap(),
            json!({"metadata": {"name": "p"}})
        );
    }

    #[test]
    fn entries_without_their_key_or_with_unknown_directives_are_refused() {
        let stored = json!({"status": {"conditions": [{"type": "A"}]}});
        for (entry, want) in [
            (
                json!("Ready"),
                PatchError::NoMergeKey {
                    list: "conditions",
                    key: "type",
                    entry: 1,
                },
            ),
            (
                json!({"status": "True"}),
                PatchError::NoMergeKey {
                    list: "conditions",
                    key: "type",
                    entry: 1,
                },
            ),
            (
                json!({"type": 5}),
                PatchError::NoMergeKey {
                    list: "conditions",
                    key: "type",
                    entry: 1,
                },
            ),
            (
                json!({"type": "B", "$patch": "retainKeys"}),
                PatchError::Directive {
                    list: "conditions",
                    entry: 1,
                },
            ),
        ] {
            let patch = json!({"status": {"conditions": [{"type": "A", "x": 1}, entry]}});
            assert_eq!(patched("pod", &stored, &patch), Err(want), "{patch}");
        }
        assert_eq!(
            PatchError::NoMergeKey {
                list: "conditions",
                key: "type",
                entry: 1
            }
            .to_string(),
            "entry 1 of status.conditions has no string \"type\" to merge it by"
        );
    }

    #[test]
    fn duplicate_keys_merge_into_the_first_and_a_patch_may_name_a_key_twice() {
        let stored = json!({"status": {"addresses": [
            {"type": "InternalIP", "address": "10.0.0.1"},
            {"type": "InternalIP", "address": "10.0.0.2"},
        ]}});
        let patch = json!({"status": {"addresses": [
            {"type": "Hostname", "address": "n1"},
            {"type": "InternalIP", "address": "10.0.0.9"},
            {"type": "Hostname", "address": "n2"},
        ]}});
        assert_eq!(
            patched("node", &stored, &patch).unwrap(),
            json!({"status": {"addresses": [
                {"type": "InternalIP", "address": "10.0.0.9"},
                {"type": "InternalIP", "address": "10.0.0.2"},
                {"type": "Hostname", "address": "n2"},
            ]}})
        );
    }

    #[test]
    fn a_patch_that_changes_nothing_says_so() {
        let stored = json!({"a": 1, "status": {"conditions": [{"type": "A", "status": "True"}]}});
        let patch = Patch::parse(
            br#"{"a": 1, "status": {"conditions": [{"type": "A", "status": "True"}]}}"#,
            "pod",
            LIMIT,
        )
        .unwrap();
        assert_eq!(patch.apply(&stored.to_string()), Ok(Patched::Unchanged));
        let test = Patch::parse(
            br#"[{"op": "test", "path": "/a", "value": 1}]"#,
            "pod",
            LIMIT,
        )
        .unwrap();
        assert_eq!(test.apply(&stored.to_string()), Ok(Patched::Unchanged));
    }

    #[test]
    fn json_patch_failures_name_the_operation_and_its_path() {
        let stored = json!({"status": {"phase": "Pending"}, "list": [1]}).to_string();
        for (ops, want, text) in [
            (
                json!([{"op": "replace", "path": "/status/phase", "value": "Running"},
                       {"op": "test", "path": "/status/phase", "value": "Pending"}]),
                PatchError::op(1, OpFailure::TestFailed),
                "operation 1 (test at /status/phase) failed: the value differs from the test's value",
            ),
            (
                json!([{"op": "replace", "path": "/status/reason", "value": "x"}]),
                PatchError::op(0, OpFailure::NoPath),
                "operation 0 (replace at /status/reason) failed: the path does not exist",
            ),
            (
                json!([{"op": "remove", "path": "/list/3"}]),
                PatchError::op(0, OpFailure::NoPath),
                "operation 0 (remove at /list/3) failed: the path does not exist",
            ),
            (
                json!([{"op": "move", "from": "/nothing", "path": "/x"}]),
                PatchError::op(0, OpFailure::NoFrom),
                "operation 0 (move from /nothing to /x) failed: the \"from\" path does not exist",
            ),
            (
                json!([{"op": "move", "from": "/status", "path": "/status/inner"}]),
                PatchError::op(0, OpFailure::MoveInside),
                "operation 0 (move from /status to /status/inner) failed: a value cannot be moved inside itself",
            ),
            (
                json!([{"op": "test", "path": "", "value": {}}]),
                PatchError::op(0, OpFailure::TestFailed),
                "operation 0 (test at \"\", the whole object) failed: the value differs from the test's value",
            ),
        ] {
            let patch = Patch::parse(ops.to_string().as_bytes(), "pod", LIMIT).unwrap();
            let e = patch.apply(&stored).unwrap_err();
            assert_eq!(e, want, "{ops}");
            assert_eq!(patch.explain(e), text);
        }
    }

    #[test]
    fn a_failure_after_a_move_to_the_root_is_an_error_not_a_panic() {
        let ops =
            br#"[{"op":"move","from":"/a","path":""},{"op":"add","path":"/a","value":false}]"#;
        let patch = Patch::parse(ops, "configmap", LIMIT).unwrap();
        assert_eq!(
            patch.apply(r#"{"a":""}"#),
            Err(PatchError::op(1, OpFailure::NoPath))
        );
    }

    #[test]
    fn content_that_is_no_patch_is_refused_when_read() {
        let err = |content: &str| {
            Patch::parse(content.as_bytes(), "pod", LIMIT)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(r#""OK""#),
            "patch content must be a JSON merge patch (an object) or a JSON Patch (an array), not a string"
        );
        assert!(err("5").ends_with("not a number"));
        assert!(err("true").ends_with("not a boolean"));
        assert!(err("null").ends_with("not null"));
        let bad_op = err(r#"[{"op": "frobnicate", "path": "/a"}]"#);
        assert!(
            bad_op.starts_with("invalid JSON Patch: unknown variant `frobnicate`"),
            "{bad_op}"
        );
        let no_path = err(r#"[{"op": "remove"}]"#);
        assert!(no_path.contains("missing field `path`"), "{no_path}");
        let bad_pointer = err(r#"[{"op": "remove", "path": "a"}]"#);
        assert!(
            bad_pointer.starts_with("invalid JSON Patch"),
            "{bad_pointer}"
        );
        let many = format!(
            "[{}]",
            vec![r#"{"op":"test","path":"","value":1}"#; MAX_OPERATIONS + 1].join(",")
        );
        assert_eq!(
            err(&many),
            "a JSON Patch may have at most 1000 operations, not 1001"
        );
    }

    #[test]
    fn insertions_at_the_front_of_a_long_array_are_bounded() {
        let long = serde_json::json!({"items": vec![0; 10_000]}).to_string();
        let front: Vec<Value> = (0..1000)
            .map(|i| serde_json::json!({"op": "add", "path": "/items/0", "value": i}))
            .collect();
        let patch = Patch::parse(Value::Array(front).to_string().as_bytes(), "x", 1 << 20).unwrap();
        assert_eq!(patch.apply(&long), Err(PatchError::TooMuchShifting));
        // The same insertions at the end shift nothing.
        let back: Vec<Value> = (0..1000)
            .map(|i| serde_json::json!({"op": "add", "path": "/items/-", "value": i}))
            .collect();
        let patch = Patch::parse(Value::Array(back).to_string().as_bytes(), "x", 1 << 20).unwrap();
        assert!(patch.apply(&long).is_ok());
    }

    #[test]
    fn copies_that_would_blow_up_the_object_are_refused() {
        // Each copy doubles the object: refused once the copies pass the limit, before the
        // object is built.
        let doubling: Vec<Value> = (0..40)
            .map(|_| json!({"op": "copy", "from": "/a", "path": "/a/-"}))
            .collect();
        let stored = json!({"a": ["0123456789"]}).to_string();
        let patch = Patch::parse(Value::Array(doubling).to_string().as_bytes(), "x", 4096).unwrap();
        assert_eq!(
            patch.apply(&stored),
            Err(PatchError::TooLarge { limit: 4096 })
        );
        // Copying an object into itself nests it one level deeper each time.
        let nesting: Vec<Value> = (0..200)
            .map(|_| json!({"op": "copy", "from": "", "path": "/n"}))
            .collect();
        let patch = Patch::parse(Value::Array(nesting).to_string().as_bytes(), "x", LIMIT).unwrap();
        assert_eq!(patch.apply(r#"{"n":1}"#), Err(PatchError::TooDeep));
        // A result over the limit, however it came about, is refused.
        let grow = json!({"big": "x".repeat(200)});
        let patch = Patch::parse(grow.to_string().as_bytes(), "x", 100).unwrap();
        assert_eq!(patch.apply("{}"), Err(PatchError::TooLarge { limit: 100 }));
    }

    #[test]
    fn depth_is_counted_like_the_decoder_counts_it() {
        assert_eq!(depth_of(&json!(1)), 0);
        assert_eq!(depth_of(&json!({})), 1);
        assert_eq!(depth_of(&json!({"a": [1, {"b": []}]})), 4);
        assert_eq!(encoded_len_within(&json!({"a": [1]}), 100), Some(9));
        assert_eq!(encoded_len_within(&json!({"a": [1]}), 8), None);
    }
}
