//! The cloud's `error` answer to a write, read once: its words, and the reason they give.
//!
//! The cloud (kube-apiserver behind edgecontroller) answers a write it refuses with text, a
//! string or a `Status`, and no code MetaManager can rely on. The reason is read from the words
//! here, once, so that the write's caller and the API's status code agree on it.

use serde_json::Value;

/// Why the cloud refused a write, as its words say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The object does not exist.
    NotFound,
    /// An object of that name exists already (a create).
    AlreadyExists,
    /// The write conflicts with the object as it is (kube-apiserver's words for a write from a
    /// stale read, among others).
    Conflict,
    /// Any other failure.
    Failed,
}

/// The cloud's refusal of a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    /// Its words: a string's, a `Status`'s message, or the JSON as sent.
    pub text: String,
}

impl Refusal {
    /// Reads the content of the cloud's `error`.
    pub fn read(content: &str) -> Self {
        let text = match serde_json::from_str::<Value>(content) {
            Ok(Value::String(text)) => text,
            Ok(value) => match value.get("message").and_then(Value::as_str) {
                Some(text) => text.to_owned(),
                None => content.to_owned(),
            },
            Err(_) => content.to_owned(),
        };
        Self {
            reason: Reason::of(&text),
            text,
        }
    }
}

impl Reason {
    fn of(text: &str) -> Self {
        let lower = text.to_ascii_lowercase();
        let says = |words: &[&str]| words.iter().any(|w| lower.contains(w));
        if says(&["not found", "notfound"]) {
            Reason::NotFound
        } else if says(&["already exists"]) {
            Reason::AlreadyExists
        } else if says(&["conflict", "alreadyexists", "the object has been modified"]) {
            Reason::Conflict
        } else {
            Reason::Failed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(content: &str) -> Reason {
        Refusal::read(content).reason
    }

    #[test]
    fn the_clouds_words_give_the_reason() {
        assert_eq!(
            reason(r#""configmaps \"c\" already exists""#),
            Reason::AlreadyExists
        );
        assert_eq!(
            reason(r#""Operation cannot be fulfilled: the object has been modified (Conflict)""#),
            Reason::Conflict
        );
        assert_eq!(reason(r#""configmaps \"c\" not found""#), Reason::NotFound);
        assert_eq!(reason(r#""etcd is down""#), Reason::Failed);
    }

    #[test]
    fn an_error_status_gives_its_message() {
        assert_eq!(Refusal::read(r#""plain""#).text, "plain");
        let status = Refusal::read(r#"{"kind":"Status","message":"nope"}"#);
        assert_eq!(status.text, "nope");
        assert_eq!(Refusal::read("[1]").text, "[1]");
    }
}
