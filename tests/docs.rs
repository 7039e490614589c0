//! The docs hold as written. Every `sh` block of README.md, CONTRIBUTING.md and docs/*.md runs,
//! a document's blocks in order as one script (see [`common::guide`]), or is marked
//! `<!-- not run: REASON -->` on the line before it; no shell block hides under another info
//! string. Every relative link names a file of the repository (and a heading of it, where it
//! names an anchor).

mod common;

use common::markdown::{self, anchors, documents, fences, links, Doc};

/// Info strings of fenced blocks that are not run, as they are not shell: what a block may be
/// besides `sh`.
const NOT_SHELL: [&str; 4] = ["text", "yaml", "json", "ini"];

/// One test per document, so that each runs (and fails) on its own; `every_document_has_a_test`
/// keeps the list whole.
macro_rules! documents_run {
    ($($test:ident => $name:literal),* $(,)?) => {
        const TESTED: &[&str] = &[$($name),*];
        $(
            #[test]
            fn $test() {
                common::guide::run(&Doc::read($name));
            }
        )*
    };
}

documents_run! {
    readme_runs => "README.md",
    contributing_runs => "CONTRIBUTING.md",
    architecture_runs => "docs/architecture.md",
    configuration_runs => "docs/configuration.md",
    fleet_runs => "docs/fleet.md",
    guarantees_runs => "docs/guarantees.md",
    limits_runs => "docs/limits.md",
    local_api_runs => "docs/local-api.md",
    mosquitto_runs => "docs/mosquitto.md",
    operating_runs => "docs/operating.md",
    rabbitmq_runs => "docs/rabbitmq.md",
}

#[test]
fn every_document_has_a_test() {
    let names: Vec<String> = documents().into_iter().map(|d| d.name).collect();
    assert_eq!(
        names, TESTED,
        "documents_run! lists every document, in this order"
    );
}

#[test]
fn every_block_is_run_or_says_why_not() {
    let mut wrong = Vec::new();
    for doc in documents() {
        for fence in fences(&doc.text) {
            let place = format!("{}:{}", doc.name, fence.line);
            match (&fence.not_run, fence.lang.as_str()) {
                (Some(reason), _) if reason.is_empty() => {
                    wrong.push(format!("{place}: `not run` with no reason"))
                }
                (Some(_), "sh") | (None, "sh") => {}
                (Some(_), lang) => wrong.push(format!(
                    "{place}: a `not run` mark on a {lang:?} block, which never runs"
                )),
                (None, lang) if NOT_SHELL.contains(&lang) => {}
                (None, lang) => wrong.push(format!(
                    "{place}: a block of {lang:?}: write shell as `sh` (it is run) and other \
                     text as one of {NOT_SHELL:?}"
                )),
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

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
