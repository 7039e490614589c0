//! The docs hold as written: every relative link in README.md, CONTRIBUTING.md and docs/*.md
//! names a file of the repository (and a heading of it, where it names an anchor).

mod common;

use common::markdown::{self, anchors, documents, links, Doc};

/// The broken links of `doc`, one line each.
fn broken_links(doc: &Doc) -> Vec<String> {
    let mut broken = Vec::new();
    for link in links(&doc.text) {
        let target = link.target.as_str();
        if target.contains("://") || target.starts_with("mailto:") {
            continue;
        }
        let (path, anchor) = target.split_once('#').unwrap_or((target, ""));
        let file = if path.is_empty() {
            markdown::root().join(&doc.name)
        } else {
            doc.dir().join(path)
        };
        let place = format!("{}:{}: {target}", doc.name, link.line);
        if !file.exists() {
            broken.push(format!("{place}: no file {}", file.display()));
            continue;
        }
        if anchor.is_empty() {
            continue;
        }
        if file.extension().is_some_and(|e| e == "md") {
            let text = std::fs::read_to_string(&file).expect("a linked Markdown file");
            if !anchors(&text).iter().any(|a| a == anchor) {
                broken.push(format!("{place}: no heading #{anchor} there"));
            }
        }
    }
    broken
}

#[test]
fn every_relative_link_resolves() {
    let mut docs = documents();
    docs.push(Doc::read("topics.md"));
    let broken: Vec<String> = docs.iter().flat_map(broken_links).collect();
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}
