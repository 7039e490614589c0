//! A `replace` message's page, read and checked: each object must belong to the scope, so
//! that the set the writer applies names only keys of that scope.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::cloud::replaces::Page;
use crate::message::{self, Message};
use crate::resource::Resource;

/// The page a replace message carries, each object checked to belong to the scope. On an
/// error, the replace_id when it could be read, and the text.
pub(super) fn parse_page(msg: &Message) -> Result<Page, (Option<String>, String)> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Wire<'a> {
        replace_id: String,
        page: u64,
        #[serde(borrow)]
        items: Vec<&'a RawValue>,
        last: bool,
    }
    #[derive(Deserialize)]
    struct Id {
        replace_id: Option<String>,
    }
    let content = msg.content_json();
    let wire: Wire = serde_json::from_str(content).map_err(|e| {
        let id = serde_json::from_str::<Id>(content)
            .ok()
            .and_then(|i| i.replace_id);
        let text = format!(
            "replace content must be {{\"replace_id\": string, \"page\": number, \"items\": [object, …], \"last\": bool}}: {e}"
        );
        (id, text)
    })?;
    let id = wire.replace_id;
    if id.is_empty() || id.len() > message::MAX_ID_BYTES {
        let text = format!(
            "replace_id must be 1 to {} bytes, not {}",
            message::MAX_ID_BYTES,
            id.len()
        );
        return Err((None, text));
    }
    let mut items = Vec::with_capacity(wire.items.len());
    for (i, raw) in wire.items.into_iter().enumerate() {
        match object_name(raw.get(), &msg.resource) {
            Ok(name) => items.push((name, Bytes::copy_from_slice(raw.get().as_bytes()))),
            Err(why) => {
                let text = format!(
                    "replace {id}: item {i} of page {}: {why}; the replace changes nothing",
                    wire.page
                );
                return Err((Some(id), text));
            }
        }
    }
    Ok(Page {
        replace_id: id,
        page: wire.page,
        last: wire.last,
        items,
    })
}

/// `metadata.name` of one object of a replace of `scope`: a name that makes a valid key of the
/// scope, and a `metadata.namespace`, if given, of the scope's namespace.
fn object_name(json: &str, scope: &Resource) -> Result<String, String> {
    #[derive(Deserialize)]
    struct Meta {
        name: Option<String>,
        namespace: Option<String>,
    }
    #[derive(Deserialize)]
    struct Object {
        metadata: Option<Meta>,
    }
    if !json.starts_with('{') {
        return Err("an object is needed".into());
    }
    let object: Object = serde_json::from_str(json).map_err(|e| format!("metadata: {e}"))?;
    let meta = object.metadata.ok_or("metadata.name is missing")?;
    let name = meta.name.ok_or("metadata.name is missing")?;
    if name.is_empty() || name.contains('/') {
        return Err(format!("metadata.name {name:?} is not a name"));
    }
    // The key must be one a single message could name.
    Resource::parse(&format!("{}/{name}", scope.key())).map_err(|e| e.to_string())?;
    let namespace = scope.namespace();
    match meta.namespace.as_deref() {
        Some(ns) if !ns.is_empty() && ns != namespace => {
            Err(format!("{name} is of namespace {ns}, not {namespace}"))
        }
        _ => Ok(name),
    }
}
