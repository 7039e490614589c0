//! `Resource::parse` on arbitrary text: never panics, and accepts exactly the keys the contract
//! allows: `namespace/type` or `namespace/type/name`, no empty segment, no control character,
//! at most MAX_KEY_LEN bytes in all and 253 in a segment.

#![no_main]

use libfuzzer_sys::fuzz_target;
use metamanager::resource::{Resource, MAX_KEY_LEN};

/// Longest segment the contract allows (Kubernetes' name limit).
const MAX_SEGMENT_LEN: usize = 253;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let segments: Vec<&str> = text.split('/').collect();
    let valid = !text.is_empty()
        && text.len() <= MAX_KEY_LEN
        && !text.chars().any(char::is_control)
        && (2..=3).contains(&segments.len())
        && segments
            .iter()
            .all(|s| !s.is_empty() && s.len() <= MAX_SEGMENT_LEN);
    let parsed = Resource::parse(&text);
    assert_eq!(
        parsed.is_ok(),
        valid,
        "parse({text:?}) = {parsed:?}, but the contract says valid = {valid}"
    );
    let Ok(r) = parsed else { return };
    assert_eq!(r.key(), text);
    assert_eq!(r.to_string(), text);
    assert_eq!(r.namespace(), segments[0]);
    assert_eq!(r.rtype(), segments[1]);
    assert_eq!(r.name(), segments.get(2).copied());
    assert_eq!(r.is_list(), segments.len() == 2);
    assert_eq!(Resource::parse(r.key()).as_ref(), Ok(&r));
    if let Some(name) = r.name() {
        assert_eq!(
            Resource::object(r.namespace(), r.rtype(), name),
            Ok(r.clone())
        );
    }
});
