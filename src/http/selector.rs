//! Equality-based label selectors and the field selectors kubectl sends
//! (`metadata.name`, `metadata.namespace`), as query parameters arrive: untrusted text.

use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    NotEq,
    Exists,
    NotExists,
}

/// Splits one `key=value`, `key==value` or `key!=value` term.
fn split_term(term: &str) -> Option<(&str, Op, &str)> {
    if let Some((k, v)) = term.split_once("!=") {
        return Some((k.trim(), Op::NotEq, v.trim()));
    }
    if let Some((k, v)) = term.split_once("==") {
        return Some((k.trim(), Op::Eq, v.trim()));
    }
    if let Some((k, v)) = term.split_once('=') {
        return Some((k.trim(), Op::Eq, v.trim()));
    }
    None
}

fn terms(text: &str) -> impl Iterator<Item = &str> {
    text.split(',').map(str::trim).filter(|t| !t.is_empty())
}

/// `labelSelector`: comma-separated requirements, all of which must hold.
#[derive(Debug, Clone, Default)]
pub struct LabelSelector {
    requirements: Vec<(String, Op, String)>,
}

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for term in terms(text) {
            let (key, op, value) = match split_term(term) {
                Some(t) => t,
                None => match term.strip_prefix('!') {
                    Some(key) => (key.trim(), Op::NotExists, ""),
                    None => (term, Op::Exists, ""),
                },
            };
            if key.is_empty() || key.contains(['=', '!', ' ']) || value.contains(['=', '!', ' ']) {
                return Err(format!(
                    "unable to parse requirement {term:?} in labelSelector: only equality-based \
                     selectors (a=b, a==b, a!=b, a, !a) are supported"
                ));
            }
            requirements.push((key.to_owned(), op, value.to_owned()));
        }
        Ok(Self { requirements })
    }

    pub fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        self.requirements.iter().all(|(key, op, want)| {
            let have = labels.and_then(|l| l.get(key)).and_then(Value::as_str);
            match op {
                Op::Eq => have == Some(want.as_str()),
                Op::NotEq => have != Some(want.as_str()),
                Op::Exists => have.is_some(),
                Op::NotExists => have.is_none(),
            }
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Name,
    Namespace,
}

/// `fieldSelector` on `metadata.name` and `metadata.namespace`.
#[derive(Debug, Clone, Default)]
pub struct FieldSelector {
    requirements: Vec<(Field, bool, String)>,
}

impl FieldSelector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for term in terms(text) {
            let Some((key, op, value)) = split_term(term) else {
                return Err(format!(
                    "invalid field selector {term:?}: expected field=value"
                ));
            };
            let field = match key {
                "metadata.name" => Field::Name,
                "metadata.namespace" => Field::Namespace,
                other => {
                    return Err(format!(
                        "field label not supported: {other:?} (only metadata.name and \
                         metadata.namespace are)"
                    ))
                }
            };
            requirements.push((field, op == Op::Eq, value.to_owned()));
        }
        Ok(Self { requirements })
    }

    /// `namespace` is "" for cluster-scoped objects.
    pub fn matches(&self, name: &str, namespace: &str) -> bool {
        self.requirements.iter().all(|(field, equal, want)| {
            let have = match field {
                Field::Name => name,
                Field::Namespace => namespace,
            };
            (have == want) == *equal
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_terms() {
        let labels = json!({"app": "nginx", "tier": "web"});
        let labels = labels.as_object();
        let ok = |s: &str| LabelSelector::parse(s).unwrap().matches(labels);
        assert!(ok(""));
        assert!(ok("app=nginx"));
        assert!(ok("app==nginx, tier!=db"));
        assert!(!ok("app=nginx,tier=db"));
        assert!(ok("app"));
        assert!(!ok("!app"));
        assert!(ok("!missing"));
        assert!(LabelSelector::parse("app in (a,b)").is_err());
        assert!(!LabelSelector::parse("app=x").unwrap().matches(None));
    }

    #[test]
    fn field_terms() {
        let f = FieldSelector::parse("metadata.name=a,metadata.namespace!=kube-system").unwrap();
        assert!(f.matches("a", "default"));
        assert!(!f.matches("b", "default"));
        assert!(!f.matches("a", "kube-system"));
        assert!(FieldSelector::parse("spec.nodeName=x").is_err());
        assert!(FieldSelector::parse("metadata.name").is_err());
    }
}
