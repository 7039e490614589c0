//! Watch streams: newline-delimited `{"type": ..., "object": ...}` events from the store's
//! change feed, the way kube-apiserver streams them and kubectl reads them.
//!
//! Each watcher has its own task, its own change-feed receiver and a small buffer toward its
//! connection. The writer's sends never wait for a watcher: one that does not keep up falls
//! behind in the feed, gets an `ERROR` event (410, list again) and its stream ends.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

use super::scope::{self, ApiError, Scope};
use crate::resource::Resource;
use crate::shutdown::Shutdown;
use crate::store::Store;
use crate::store::{ChangeKind, StoreEvent};

/// A bare newline this often keeps an idle stream (and proxies on the way) from timing out;
/// JSON decoders skip it as whitespace.
const HEARTBEAT: Duration = Duration::from_secs(30);
/// Encoded events buffered toward one connection before its task waits for the client.
const WATCHER_BUFFER: usize = 64;

/// Starts a watch of `scope`. Without a `version`, the objects in scope are first sent as
/// `ADDED`, as kube-apiserver does; from a version (a list's `resourceVersion`), the changes
/// after it are sent, recorded ones first, or an `ERROR` (410) when they are no longer known.
pub async fn respond(
    store: Store,
    stop: Shutdown,
    scope: Scope,
    version: Option<u64>,
) -> Result<Response, ApiError> {
    let (changes, first, seen) = match version {
        None => {
            // Subscribed before the objects are read, and changes up to `seen` are in what
            // is read: nothing falls between, nothing is sent twice.
            let changes = store.subscribe_changes();
            let seen = store.feed_position();
            let first = scope
                .current(&store)
                .await?
                .iter()
                .map(|object| event_line("ADDED", object))
                .collect();
            (changes, first, seen)
        }
        Some(version) => match store.changes_since(version) {
            Ok((changes, backlog)) => {
                let seen = backlog.last().map_or(version, |e| e.seq.max(version));
                let first = backlog.iter().filter_map(|e| encode(&scope, e)).collect();
                (changes, first, seen)
            }
            Err(expired) => {
                let status =
                    scope::status_object(StatusCode::GONE, "Expired", expired.to_string(), None);
                return Ok(stream_response(Body::from(event_line("ERROR", &status))));
            }
        },
    };
    let (tx, rx) = mpsc::channel(WATCHER_BUFFER);
    tokio::spawn(feed(scope, first, seen, changes, tx, stop));
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|line| (Ok::<Bytes, std::convert::Infallible>(line), rx))
    });
    Ok(stream_response(Body::from_stream(body)))
}

fn stream_response(body: Body) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// Why a watcher's task stops sending.
enum End {
    /// The client went away or the server is stopping.
    Gone,
}

/// Sends `first`, then every change numbered after `seen`, until the client goes away, the
/// server stops, or the watcher falls behind.
async fn feed(
    scope: Scope,
    first: Vec<Bytes>,
    seen: u64,
    mut changes: tokio::sync::broadcast::Receiver<Arc<StoreEvent>>,
    tx: mpsc::Sender<Bytes>,
    mut stop: Shutdown,
) {
    let mut out = Out {
        tx,
        stop: &mut stop,
    };
    for line in first {
        if out.send(line).await.is_err() {
            return;
        }
    }
    let mut heartbeat =
        tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
    loop {
        let next = tokio::select! {
            next = changes.recv() => next,
            _ = heartbeat.tick() => {
                if out.send(Bytes::from_static(b"\n")).await.is_err() {
                    return;
                }
                continue;
            }
            _ = out.stop.wait() => return,
            _ = out.tx.closed() => return,
        };
        let event = match next {
            Ok(event) => event,
            Err(RecvError::Lagged(missed)) => {
                tracing::debug!(missed, "watcher fell behind the change feed");
                let status = scope::status_object(
                    StatusCode::GONE,
                    "Expired",
                    "watch fell behind; list again".into(),
                    None,
                );
                let _ = out.send(event_line("ERROR", &status)).await;
                return;
            }
            Err(RecvError::Closed) => return,
        };
        if event.seq <= seen {
            continue;
        }
        if let Some(line) = encode(&scope, &event) {
            if out.send(line).await.is_err() {
                return;
            }
        }
    }
}

/// The connection side of one watcher.
struct Out<'a> {
    tx: mpsc::Sender<Bytes>,
    stop: &'a mut Shutdown,
}

impl Out<'_> {
    /// Waits for room in the buffer, unless the client leaves or the server stops first.
    async fn send(&mut self, line: Bytes) -> Result<(), End> {
        tokio::select! {
            sent = self.tx.send(line) => sent.map_err(|_| End::Gone),
            _ = self.stop.wait() => Err(End::Gone),
        }
    }
}

/// The event line for a change in scope; `None` for one outside it.
fn encode(scope: &Scope, event: &StoreEvent) -> Option<Bytes> {
    if event.rtype != scope.kind.rtype {
        return None;
    }
    let value: Value = serde_json::from_slice(&event.value).ok()?;
    if event.kind == ChangeKind::Deleted && value.as_object().is_some_and(|o| o.is_empty()) {
        // The old object was not read (nobody watched when the delete was applied): name it
        // from the key so the client still learns what went.
        let resource = Resource::parse(&event.key).ok()?;
        let (ns, name) = (resource.namespace(), resource.name()?);
        let stub = json!({"metadata": {"name": name, "namespace": ns}});
        return scope
            .matches(&event.key, &stub)
            .then(|| event_line("DELETED", &scope::served(scope.kind, stub)));
    }
    if !scope.matches(&event.key, &value) {
        return None;
    }
    let kind = match event.kind {
        ChangeKind::Added => "ADDED",
        ChangeKind::Modified => "MODIFIED",
        ChangeKind::Deleted => "DELETED",
    };
    Some(event_line(kind, &scope::served(scope.kind, value)))
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}
