//! A list answer written as it is read: the store is read a page at a time (see
//! [`Pager`]) and each page is encoded only when the client has taken the one before, so a list
//! holds one page, not the whole store twice, however many run at once.
//!
//! `limit` and `continue` work as kube-apiserver's do: a list cut at `limit` items carries a
//! `metadata.continue` token, and the next request passes it to go on after the last item
//! sent. The token names the last key and the first page's `resourceVersion`, which every
//! page reports. Unlike etcd, the store keeps no snapshot: a later page shows the objects as
//! they are when it is read. A client that needs one consistent view lists without `limit`.

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use super::scope::{ApiError, Page, Pager, Scope};
use crate::store::read::Row;

/// Encoded items are handed to the connection in chunks of about this size, so a list holds
/// one page of stored rows and one chunk, whatever the objects' sizes.
const CHUNK_BYTES: usize = 64 * 1024;

/// How a list is answered: as of the node's `version`, at most `limit` objects (the rest
/// behind a `continue` token), as a Table when `table`.
pub struct Answer {
    pub version: u64,
    pub limit: Option<usize>,
    pub table: bool,
}

/// The answer to a list: `{"kind", "apiVersion", "items": [...], "metadata"}`, or with
/// `table` a Table whose `rows` are the objects ([`super::table`]). The metadata comes last,
/// since the `continue` token is known only at the end; JSON readers do not mind.
pub fn stream(scope: Scope, pager: Pager, first: Option<Page>, answer: Answer) -> Response {
    let Answer {
        version,
        limit,
        table,
    } = answer;
    let head = if table {
        format!(
            r#"{{"kind":"Table","apiVersion":"meta.k8s.io/v1","columnDefinitions":{},"rows":["#,
            super::table::columns(&scope.kind)
        )
    } else {
        // The items' group and version: a typed client decodes a list by them.
        format!(
            r#"{{"kind":"{}List","apiVersion":"{}","items":["#,
            scope.kind.kind,
            scope.kind.api_version()
        )
    };
    let mut list = Listing {
        scope,
        table: table.then(std::time::SystemTime::now),
        pager,
        rows: Vec::new().into_iter(),
        version,
        left: limit,
        sent: 0,
        last_sent: None,
        state: State::Head(head),
    };
    list.take(first);
    let body = futures_util::stream::unfold(list, |mut list| async move {
        list.next_chunk()
            .await
            .map(|chunk| (chunk.map_err(std::io::Error::other), list))
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(body),
    )
        .into_response()
}

/// The `(resourceVersion, last key)` a `continue` token carries.
pub fn resume(token: &str) -> Result<(u64, String), ApiError> {
    let bad = || {
        ApiError::BadRequest(format!(
            "continue token {token:?} is not one this server gave out"
        ))
    };
    let (version, key) = token.split_once('-').ok_or_else(bad)?;
    let version = version.parse().map_err(|_| bad())?;
    let key = decode_hex(key).ok_or_else(bad)?;
    Ok((version, key))
}

fn token(version: u64, last_key: &str) -> String {
    let hex: String = last_key.bytes().map(|b| format!("{b:02x}")).collect();
    format!("{version}-{hex}")
}

fn decode_hex(hex: &str) -> Option<String> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

enum State {
    Head(String),
    Items,
    Done,
}

struct Listing {
    scope: Scope,
    /// Rows of a Table instead of objects, their ages as of this time.
    table: Option<std::time::SystemTime>,
    pager: Pager,
    rows: std::vec::IntoIter<Row>,
    version: u64,
    /// Items still to send under `limit`; `None` without a limit.
    left: Option<usize>,
    sent: usize,
    last_sent: Option<String>,
    state: State,
}

impl Listing {
    /// `None` once the page reader has read to the end.
    fn take(&mut self, page: Option<Page>) -> bool {
        match page {
            Some(page) if !page.rows.is_empty() => {
                self.rows = page.rows.into_iter();
                true
            }
            _ => false,
        }
    }

    async fn next_chunk(&mut self) -> Option<Result<Bytes, ApiError>> {
        match std::mem::replace(&mut self.state, State::Items) {
            State::Head(head) => return Some(Ok(Bytes::from(head))),
            State::Done => {
                self.state = State::Done;
                return None;
            }
            State::Items => {}
        }
        let mut chunk = Vec::new();
        loop {
            if self.left == Some(0) {
                // Cut at the limit: more may follow, the client asks with the token.
                let more = self.last_sent.as_deref().map(|k| token(self.version, k));
                return Some(Ok(self.tail(chunk, more)));
            }
            match self.rows.next() {
                Some(row) => {
                    let Some(object) = self.scope.served_if_matches(&row) else {
                        continue;
                    };
                    let key = row.key;
                    let item = match self.table {
                        Some(now) => super::table::row(&self.scope.kind, &object, now),
                        None => object,
                    };
                    if self.sent > 0 {
                        chunk.push(b',');
                    }
                    if serde_json::to_writer(&mut chunk, &item).is_err() {
                        continue;
                    }
                    self.sent += 1;
                    self.left = self.left.map(|n| n - 1);
                    self.last_sent = Some(key);
                    if chunk.len() >= CHUNK_BYTES {
                        return Some(Ok(Bytes::from(chunk)));
                    }
                }
                None if !chunk.is_empty() => return Some(Ok(Bytes::from(chunk))),
                None => match self.pager.next().await {
                    Ok(page) => {
                        if !self.take(page) {
                            return Some(Ok(self.tail(chunk, None)));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "list could not read the store; answer cut off");
                        self.state = State::Done;
                        return Some(Err(e));
                    }
                },
            }
        }
    }

    fn tail(&mut self, mut chunk: Vec<u8>, more: Option<String>) -> Bytes {
        self.state = State::Done;
        let metadata = match more {
            Some(token) => {
                serde_json::json!({"resourceVersion": self.version.to_string(), "continue": token})
            }
            None => serde_json::json!({"resourceVersion": self.version.to_string()}),
        };
        chunk.extend_from_slice(b"],\"metadata\":");
        chunk.extend_from_slice(metadata.to_string().as_bytes());
        chunk.push(b'}');
        Bytes::from(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_carry_the_version_and_the_last_key() {
        let t = token(42, "default/pod/nginx-7d9c5b8f4-x2k9p");
        assert_eq!(
            resume(&t).unwrap(),
            (42, "default/pod/nginx-7d9c5b8f4-x2k9p".to_owned())
        );
        for bad in ["", "42", "x-00", "42-0", "42-zz", "42-ff"] {
            assert!(resume(bad).is_err(), "{bad:?}");
        }
    }
}
