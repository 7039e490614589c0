//! Label and field selectors of list and watch requests, as kube-apiserver reads them: query
//! parameters, so untrusted text.
//!
//! Label selectors are equality-based (`a=b`, `a==b`, `a!=b`) and set-based (`a in (x,y)`,
//! `a notin (x,y)`, `a`, `!a`), comma-separated, all of which must hold. Field selectors take
//! `metadata.name` and `metadata.namespace` for every kind and, for pods, `spec.nodeName` and
//! `status.phase`: the ones node agents and kubectl use (a kubelet lists its pods with
//! `spec.nodeName=NODE`).

use serde_json::{Map, Value};

/// Requirements at most in one selector; more is an error rather than work per object.
const MAX_REQUIREMENTS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    NotExists,
}

/// Splits at commas outside parentheses: `a in (x,y),b` is two requirements.
fn requirements(text: &str) -> Result<Vec<&str>, String> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0usize, 0usize);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| format!("unbalanced ')' in {text:?}"))?
            }
            ',' if depth == 0 => {
                parts.push(text[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("unbalanced '(' in {text:?}"));
    }
    parts.push(text[start..].trim());
    parts.retain(|p| !p.is_empty());
    if parts.len() > MAX_REQUIREMENTS {
        return Err(format!(
            "{} requirements; at most {MAX_REQUIREMENTS} are allowed",
            parts.len()
        ));
    }
    Ok(parts)
}

/// `key=value`, `key==value` or `key!=value`, as `(key, equal, value)`.
fn equality(term: &str) -> Option<(&str, bool, &str)> {
    if let Some((k, v)) = term.split_once("!=") {
        return Some((k.trim(), false, v.trim()));
    }
    let (k, v) = term.split_once("==").or_else(|| term.split_once('='))?;
    Some((k.trim(), true, v.trim()))
}

/// `key in (a,b)` or `key notin (a,b)`.
fn set_based(term: &str) -> Option<Result<(&str, Op), String>> {
    let open = term.find('(')?;
    let (head, rest) = term.split_at(open);
    let mut words = head.split_whitespace();
    let (key, op) = (words.next()?, words.next()?);
    if words.next().is_some() {
        return None;
    }
    let Some(inner) = rest.strip_prefix('(').and_then(|r| r.strip_suffix(')')) else {
        return Some(Err(format!("{term:?}: the values must be in parentheses")));
    };
    let values: Vec<String> = inner
        .split(',')
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect();
    if values.iter().any(|v| !valid_word(v)) {
        return Some(Err(format!("{term:?}: invalid value")));
    }
    match op {
        "in" => Some(Ok((key, Op::In(values)))),
        "notin" => Some(Ok((key, Op::NotIn(values)))),
        _ => None,
    }
}

/// A label key or value: no spaces, no operator characters.
fn valid_word(word: &str) -> bool {
    !word.is_empty() && !word.contains(['=', '!', ' ', '(', ')', ','])
}

/// `labelSelector`: requirements all of which must hold.
#[derive(Debug, Clone, Default)]
pub struct LabelSelector {
    requirements: Vec<(String, Op)>,
}

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parsed = Vec::new();
        for term in requirements(text)? {
            let unparsable = || {
                format!(
                    "unable to parse requirement {term:?} in labelSelector: use a=b, a==b, a!=b, \
                     a in (x,y), a notin (x,y), a or !a"
                )
            };
            let (key, op) = if let Some(set) = set_based(term) {
                set?
            } else if let Some((key, equal, value)) = equality(term) {
                if !valid_word(value) && !value.is_empty() {
                    return Err(unparsable());
                }
                let values = vec![value.to_owned()];
                (
                    key,
                    if equal {
                        Op::In(values)
                    } else {
                        Op::NotIn(values)
                    },
                )
            } else if let Some(key) = term.strip_prefix('!') {
                (key.trim(), Op::NotExists)
            } else {
                (term, Op::Exists)
            };
            if !valid_word(key) {
                return Err(unparsable());
            }
            parsed.push((key.to_owned(), op));
        }
        Ok(Self {
            requirements: parsed,
        })
    }

    pub fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        self.requirements.iter().all(|(key, op)| {
            let have = labels.and_then(|l| l.get(key)).and_then(Value::as_str);
            match op {
                Op::In(values) => have.is_some_and(|h| values.iter().any(|v| v == h)),
                // As in Kubernetes, an absent label is "not in" any set.
                Op::NotIn(values) => have.is_none_or(|h| values.iter().all(|v| v != h)),
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
    NodeName,
    Phase,
}

/// `fieldSelector`.
#[derive(Debug, Clone, Default)]
pub struct FieldSelector {
    requirements: Vec<(Field, bool, String)>,
}

impl FieldSelector {
    /// `pods`: whether the list is of pods, which have two more fields.
    pub fn parse(text: &str, pods: bool) -> Result<Self, String> {
        let mut parsed = Vec::new();
        for term in requirements(text)? {
            let Some((key, equal, value)) = equality(term) else {
                return Err(format!(
                    "invalid field selector {term:?}: expected field=value"
                ));
            };
            let field = match key {
                "metadata.name" => Field::Name,
                "metadata.namespace" => Field::Namespace,
                "spec.nodeName" if pods => Field::NodeName,
                "status.phase" if pods => Field::Phase,
                other => {
                    return Err(format!(
                        "field label not supported: {other:?} (metadata.name and \
                         metadata.namespace are, and for pods spec.nodeName and status.phase)"
                    ))
                }
            };
            parsed.push((field, equal, value.to_owned()));
        }
        Ok(Self {
            requirements: parsed,
        })
    }

    /// `namespace` is "" for cluster-scoped objects; `object` is the stored object, whose
    /// absent fields count as "".
    pub fn matches(&self, name: &str, namespace: &str, object: &Value) -> bool {
        self.requirements.iter().all(|(field, equal, want)| {
            let have = match field {
                Field::Name => name,
                Field::Namespace => namespace,
                Field::NodeName => object["spec"]["nodeName"].as_str().unwrap_or(""),
                Field::Phase => object["status"]["phase"].as_str().unwrap_or(""),
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
    fn equality_based_label_terms() {
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
        assert!(!LabelSelector::parse("app=x").unwrap().matches(None));
    }

    #[test]
    fn set_based_label_terms() {
        let labels = json!({"app": "nginx", "tier": "web"});
        let labels = labels.as_object();
        let ok = |s: &str| LabelSelector::parse(s).unwrap().matches(labels);
        assert!(ok("app in (nginx, apache)"));
        assert!(ok("app in (nginx),tier notin (db,cache)"));
        assert!(!ok("app notin (nginx)"));
        assert!(!ok("app in (apache)"));
        assert!(ok("env notin (prod)"), "an absent label is not in any set");
        assert!(!ok("env in (prod)"));
        assert!(ok("app in (nginx),!env,tier"));
        for bad in [
            "app in nginx",
            "app in (a",
            "app)",
            "app lt (3)",
            "a b",
            "=x",
            "app=(x)",
        ] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad}");
        }
        let many = vec!["a"; MAX_REQUIREMENTS + 1].join(",");
        assert!(LabelSelector::parse(&many).is_err());
    }

    #[test]
    fn field_terms() {
        let pod = json!({"spec": {"nodeName": "edge-node"}, "status": {"phase": "Running"}});
        let f =
            FieldSelector::parse("metadata.name=a,metadata.namespace!=kube-system", false).unwrap();
        assert!(f.matches("a", "default", &pod));
        assert!(!f.matches("b", "default", &pod));
        assert!(!f.matches("a", "kube-system", &pod));
        assert!(FieldSelector::parse("metadata.name", false).is_err());

        // Pods have two more: what a node agent lists its pods by.
        assert!(FieldSelector::parse("spec.nodeName=x", false).is_err());
        let mine =
            FieldSelector::parse("spec.nodeName=edge-node,status.phase!=Failed", true).unwrap();
        assert!(mine.matches("p", "default", &pod));
        assert!(!mine.matches("p", "default", &json!({"spec": {"nodeName": "other"}})));
        let unscheduled = FieldSelector::parse("spec.nodeName=", true).unwrap();
        assert!(unscheduled.matches("p", "default", &json!({"spec": {}})));
        assert!(!unscheduled.matches("p", "default", &pod));
    }
}
