//! The repository's Markdown as the docs tests read it: which documents there are, their fenced
//! blocks (with the `<!-- not run: REASON -->` mark that may precede one), their headings'
//! anchors and their relative links.

use std::path::{Path, PathBuf};

/// The mark that says a block is not run by the tests, and why: the line right before its fence.
pub const NOT_RUN: &str = "<!-- not run:";

/// One Markdown file of the repository.
pub struct Doc {
    /// Relative to the repository root, with `/`.
    pub name: String,
    pub text: String,
}

impl Doc {
    pub fn read(name: &str) -> Doc {
        let text = std::fs::read_to_string(root().join(name))
            .unwrap_or_else(|e| panic!("read {name}: {e}"));
        Doc {
            name: name.to_owned(),
            text,
        }
    }

    /// The directory links in this file are relative to.
    pub fn dir(&self) -> PathBuf {
        root()
            .join(&self.name)
            .parent()
            .expect("a file has a directory")
            .to_owned()
    }
}

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The documents whose shell blocks run and whose links must resolve: README.md,
/// CONTRIBUTING.md and every docs/*.md, in that order (docs/ by name).
pub fn documents() -> Vec<Doc> {
    let mut names = vec!["README.md".to_owned(), "CONTRIBUTING.md".to_owned()];
    let mut guides: Vec<String> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .map(|e| e.expect("an entry of docs/").file_name())
        .filter_map(|n| n.to_str().map(str::to_owned))
        .filter(|n| n.ends_with(".md"))
        .map(|n| format!("docs/{n}"))
        .collect();
    guides.sort();
    names.extend(guides);
    names.iter().map(|n| Doc::read(n)).collect()
}

/// A fenced block.
#[derive(Debug, Clone)]
pub struct Fence {
    /// The info string (`sh`, `text`, `yaml`, …).
    pub lang: String,
    pub body: String,
    /// The line of the opening fence, from 1.
    pub line: usize,
    /// `Some(reason)` when the line before the fence is `<!-- not run: reason -->`; the reason
    /// may be empty, which the tests refuse.
    pub not_run: Option<String>,
}

/// Whether `line` opens or closes a fence (indented ones too, in a list item).
fn is_fence(line: &str) -> bool {
    line.trim_start().starts_with("```")
}

/// The fenced blocks of `text`, in order.
pub fn fences(text: &str) -> Vec<Fence> {
    let mut found = Vec::new();
    let mut open: Option<Fence> = None;
    let mut previous = "";
    for (n, line) in text.lines().enumerate() {
        match &mut open {
            None if is_fence(line) => {
                let not_run = previous
                    .trim()
                    .strip_prefix(NOT_RUN)
                    .and_then(|rest| rest.strip_suffix("-->"))
                    .map(|reason| reason.trim().to_owned());
                open = Some(Fence {
                    lang: line.trim_start()[3..].trim().to_owned(),
                    body: String::new(),
                    line: n + 1,
                    not_run,
                });
            }
            Some(_) if line.trim() == "```" => found.push(open.take().expect("open")),
            Some(fence) => {
                fence.body.push_str(line);
                fence.body.push('\n');
            }
            None => {}
        }
        previous = line;
    }
    found
}

/// The lines of `text` outside fenced blocks, with their numbers from 1.
pub fn prose(text: &str) -> Vec<(usize, &str)> {
    let mut fenced = false;
    let mut lines = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if is_fence(line) {
            fenced = !fenced;
        } else if !fenced {
            lines.push((n + 1, line));
        }
    }
    lines
}

/// The anchors GitHub gives the headings of `text`: lower case, punctuation dropped but `-`
/// and `_`, spaces made `-`; a repeated one gets `-1`, `-2`, ….
pub fn anchors(text: &str) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    for (_, line) in prose(text) {
        let hashes = line.len() - line.trim_start_matches('#').len();
        if hashes == 0 || hashes > 6 || !line[hashes..].starts_with(' ') {
            continue;
        }
        let slug: String = line[hashes..]
            .trim()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let repeats = found
            .iter()
            .filter(|a| {
                *a == &slug
                    || a.strip_prefix(&format!("{slug}-"))
                        .is_some_and(|n| n.parse::<u32>().is_ok())
            })
            .count();
        found.push(if repeats == 0 {
            slug
        } else {
            format!("{slug}-{repeats}")
        });
    }
    found
}

/// A link of a document's prose, `[text](target)`, with its line.
#[derive(Debug)]
pub struct Link {
    pub line: usize,
    pub target: String,
}

/// The links of `text`'s prose, in order; inline code spans are left out.
pub fn links(text: &str) -> Vec<Link> {
    let mut found = Vec::new();
    for (line_no, line) in prose(text) {
        // Inline code: every other backtick-separated piece.
        for (i, piece) in line.split('`').enumerate() {
            if i % 2 == 1 {
                continue;
            }
            let mut rest = piece;
            while let Some(at) = rest.find("](") {
                let after = &rest[at + 2..];
                let Some(end) = after.find(')') else { break };
                found.push(Link {
                    line: line_no,
                    target: after[..end].to_owned(),
                });
                rest = &after[end..];
            }
        }
    }
    found
}
