//! Label and field selectors of list and watch requests, as kube-apiserver reads them: query
//! parameters, so untrusted text.
//!
//! Label selectors are equality-based (`a=b`, `a==b`, `a!=b`) and set-based (`a in (x,y)`,
//! `a notin (x,y)`, `a`, `!a`), comma-separated, all of which must hold. Field selectors take
//! `metadata.name` and `metadata.namespace` for every kind and the fields kube-apiserver adds
//! for two kinds: for pods `spec.nodeName` and `status.phase` (a kubelet lists its pods with
//! `spec.nodeName=NODE`), for events the object they are about, their reason, source and type
//! (`kubectl describe` lists an object's events by `involvedObject.name`, `.namespace`, `.kind`
//! and `.uid`).

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

/// The fields a pod adds to metadata's: (label, where in the object).
const POD_FIELDS: &[(&str, &[&str])] = &[
    ("spec.nodeName", &["/spec/nodeName"]),
    ("status.phase", &["/status/phase"]),
];

/// The fields an event adds, as kube-apiserver has them for core `v1` events. One stored
/// `event` type holds both kinds of event (core and `events.k8s.io/v1`, which renamed
/// `involvedObject` to `regarding` and `reportingComponent` to `reportingController`), so each
/// field is read from either shape, and both groups' labels are taken on both kinds.
/// `source` is `source.component`, or the reporting controller when that is empty, as there.
const EVENT_FIELDS: &[(&str, &[&str])] = &[
    ("involvedObject.kind", REGARDING_KIND),
    ("involvedObject.namespace", REGARDING_NAMESPACE),
    ("involvedObject.name", REGARDING_NAME),
    ("involvedObject.uid", REGARDING_UID),
    ("involvedObject.apiVersion", REGARDING_API_VERSION),
    ("involvedObject.resourceVersion", REGARDING_VERSION),
    ("involvedObject.fieldPath", REGARDING_FIELD_PATH),
    ("regarding.kind", REGARDING_KIND),
    ("regarding.namespace", REGARDING_NAMESPACE),
    ("regarding.name", REGARDING_NAME),
    ("regarding.uid", REGARDING_UID),
    ("regarding.apiVersion", REGARDING_API_VERSION),
    ("regarding.resourceVersion", REGARDING_VERSION),
    ("regarding.fieldPath", REGARDING_FIELD_PATH),
    ("reason", &["/reason"]),
    ("reportingComponent", REPORTING),
    ("reportingController", REPORTING),
    (
        "source",
        &[
            "/source/component",
            "/deprecatedSource/component",
            "/reportingComponent",
            "/reportingController",
        ],
    ),
    ("type", &["/type"]),
];
const REGARDING_KIND: &[&str] = &["/involvedObject/kind", "/regarding/kind"];
const REGARDING_NAMESPACE: &[&str] = &["/involvedObject/namespace", "/regarding/namespace"];
const REGARDING_NAME: &[&str] = &["/involvedObject/name", "/regarding/name"];
const REGARDING_UID: &[&str] = &["/involvedObject/uid", "/regarding/uid"];
const REGARDING_API_VERSION: &[&str] = &["/involvedObject/apiVersion", "/regarding/apiVersion"];
const REGARDING_VERSION: &[&str] = &[
    "/involvedObject/resourceVersion",
    "/regarding/resourceVersion",
];
const REGARDING_FIELD_PATH: &[&str] = &["/involvedObject/fieldPath", "/regarding/fieldPath"];
const REPORTING: &[&str] = &["/reportingComponent", "/reportingController"];

/// The fields of `rtype` beyond `metadata.name` and `metadata.namespace`.
fn fields_of(rtype: &str) -> &'static [(&'static str, &'static [&'static str])] {
    match rtype {
        crate::resource::rtype::POD => POD_FIELDS,
        crate::resource::rtype::EVENT => EVENT_FIELDS,
        _ => &[],
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Name,
    Namespace,
    /// A field of the object: the first of these JSON pointers that holds a string that is not
    /// empty; none is "", as an absent field is in Kubernetes.
    Object(&'static [&'static str]),
}

/// `fieldSelector`.
#[derive(Debug, Clone, Default)]
pub struct FieldSelector {
    requirements: Vec<(Field, bool, String)>,
}

impl FieldSelector {
    /// `rtype`: the stored type listed, which decides the fields beyond metadata's.
    pub fn parse(text: &str, rtype: &str) -> Result<Self, String> {
        let own = fields_of(rtype);
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
                other => match own.iter().find(|(label, _)| *label == other) {
                    Some((_, paths)) => Field::Object(paths),
                    None => return Err(not_supported(other, rtype, own)),
                },
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
                Field::Object(paths) => paths
                    .iter()
                    .filter_map(|p| object.pointer(p).and_then(Value::as_str))
                    .find(|v| !v.is_empty())
                    .unwrap_or(""),
            };
            (have == want) == *equal
        })
    }
}

/// kube-apiserver's words for an unknown field (`field label not supported: …`), with the
/// fields this kind has.
fn not_supported(label: &str, rtype: &str, own: &[(&str, &[&str])]) -> String {
    let mut known = vec!["metadata.name", "metadata.namespace"];
    known.extend(own.iter().map(|(label, _)| *label));
    format!(
        "field label not supported: {label:?} (a {rtype} has {})",
        known.join(", ")
    )
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
        let f = FieldSelector::parse(
            "metadata.name=a,metadata.namespace!=kube-system",
            "configmap",
        )
        .unwrap();
        assert!(f.matches("a", "default", &pod));
        assert!(!f.matches("b", "default", &pod));
        assert!(!f.matches("a", "kube-system", &pod));
        assert!(FieldSelector::parse("metadata.name", "pod").is_err());

        // Pods have two more: what a node agent lists its pods by.
        assert!(FieldSelector::parse("spec.nodeName=x", "configmap").is_err());
        let mine =
            FieldSelector::parse("spec.nodeName=edge-node,status.phase!=Failed", "pod").unwrap();
        assert!(mine.matches("p", "default", &pod));
        assert!(!mine.matches("p", "default", &json!({"spec": {"nodeName": "other"}})));
        let unscheduled = FieldSelector::parse("spec.nodeName=", "pod").unwrap();
        assert!(unscheduled.matches("p", "default", &json!({"spec": {}})));
        assert!(!unscheduled.matches("p", "default", &pod));
    }

    #[test]
    fn event_terms_are_what_kubectl_describe_asks() {
        let core = json!({"involvedObject": {"kind": "ConfigMap", "name": "demo",
            "namespace": "default", "uid": "u-1"}, "reason": "Synced", "type": "Normal",
            "source": {"component": ""}, "reportingComponent": "edged"});
        let describe = "involvedObject.name=demo,involvedObject.namespace=default,\
                        involvedObject.kind=ConfigMap,involvedObject.uid=u-1";
        let f = FieldSelector::parse(describe, "event").unwrap();
        assert!(f.matches("demo.1", "default", &core));
        assert!(!f.matches(
            "demo.1",
            "default",
            &json!({"involvedObject": {"name": "demo"}})
        ));
        // `source`: the component, else the reporting controller, as kube-apiserver has it.
        let by = |s: &str| {
            FieldSelector::parse(s, "event")
                .unwrap()
                .matches("e", "default", &core)
        };
        assert!(by(
            "source=edged,reportingComponent=edged,reason=Synced,type!=Warning"
        ));
        assert!(by("involvedObject.fieldPath=,involvedObject.apiVersion="));

        // An events.k8s.io/v1 event, found by either group's names.
        let v1 = json!({"regarding": {"kind": "Node", "name": "edge-node"},
            "reportingController": "kubelet", "deprecatedSource": {"component": "kubelet"}});
        for s in [
            "involvedObject.kind=Node,involvedObject.name=edge-node",
            "regarding.name=edge-node",
            "reportingComponent=kubelet,source=kubelet",
        ] {
            assert!(
                FieldSelector::parse(s, "event")
                    .unwrap()
                    .matches("e", "", &v1),
                "{s}"
            );
        }

        let refused = FieldSelector::parse("involvedObject.name=x", "configmap").unwrap_err();
        assert!(
            refused.starts_with("field label not supported: \"involvedObject.name\""),
            "{refused}"
        );
        assert!(FieldSelector::parse("involvedObject.size=1", "event").is_err());
    }
}
