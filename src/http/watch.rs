//! Watch streams: newline-delimited `{"type": ..., "object": ...}` events from the store's
//! change feed, the way kube-apiserver streams them and kubectl reads them.
//!
//! Each watcher has a task that takes its changes off the feed as they come, so the feed never
//! holds changes for a slow watcher, and puts them on the watcher's own queue. The connection
//! takes events off that queue as fast as the client reads, and only then encodes them. The
//! queue has a byte budget: a watcher whose client falls that far behind is ended with an
//! `ERROR` event (410, list again), and what it held is let go at once. Memory per watcher is
//! therefore its budget at most, and watchers that never read cost no more than that.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit};

use super::scope::{self, ApiError, Kind, Pager, Scope};
use crate::resource::Resource;
use crate::shutdown::Shutdown;
use crate::store::read::Row;
use crate::store::Store;
use crate::store::{ChangeKind, StoreEvent};

/// A bare newline this often keeps an idle stream (and proxies on the way) from timing out;
/// JSON decoders skip it as whitespace.
const HEARTBEAT: Duration = Duration::from_secs(30);

/// Bytes of changes one watcher may have waiting for its client (as the feed counts them,
/// [`StoreEvent::size`]). Several watchers that do not read hold the same changes, which the
/// feed shares among them, so together they hold about this much, not this much each.
pub const WATCH_BUDGET_BYTES: usize = 16 * 1024 * 1024;

/// Where a watch starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Start {
    /// No version: the current objects as `ADDED` first, then their changes.
    #[default]
    Listing,
    /// A streaming list (`sendInitialEvents=true`): the current objects as `ADDED`, then a
    /// `BOOKMARK` annotated `k8s.io/initial-events-end` with the version they are as of, then
    /// their changes. Informers take it in place of a list.
    Streaming,
    /// After a version the node gave out (a list's, an object's, an event's or a bookmark's):
    /// the changes after it, or `410 Expired` when they are no longer known.
    After(u64),
}

/// The annotation of the bookmark that ends a streaming list's initial events.
pub const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

/// What a watch request asks for besides its scope.
#[derive(Debug, Clone, Copy, Default)]
pub struct WatchOptions {
    pub start: Start,
    /// `allowWatchBookmarks`: a `BOOKMARK` event in place of each keep-alive newline, carrying
    /// the version the client has been sent everything up to, so that it can resume from there
    /// without replaying what it has seen.
    pub bookmarks: bool,
    /// `timeoutSeconds`: the stream ends after this, as kube-apiserver ends it, and the client
    /// watches again from its last version.
    pub timeout: Option<Duration>,
    /// Each event's object as a Table of one row ([`super::table`]), as `kubectl get -w` asks.
    pub table: bool,
}

/// Starts a watch of `scope` where `options.start` says: without a version, the objects in
/// scope are first sent as `ADDED`, as kube-apiserver does (a streaming list ends them with
/// its bookmark); from a version, the changes after it are sent, recorded ones first, or an
/// `ERROR` (410) when they are no longer known. `permit` is the watcher's place under the cap,
/// held until its stream ends.
pub async fn respond(
    store: Store,
    stop: Shutdown,
    scope: Scope,
    options: WatchOptions,
    permit: OwnedSemaphorePermit,
) -> Result<Response, ApiError> {
    let queue = Arc::new(Queue::default());
    // A timeout too large to add is no timeout.
    let deadline = options
        .timeout
        .and_then(|t| tokio::time::Instant::now().checked_add(t));
    let (changes, seen, initial) = match options.start {
        Start::Listing | Start::Streaming => {
            // Subscribed before anything is read: each page then holds every change up to
            // the position read before it, and later ones come from the feed.
            let changes = store.subscribe_changes();
            let seen = store.feed_position();
            let mut pager = scope.pager(&store, String::new());
            // The first page is read now, so that a store that cannot be read is an error
            // status rather than a stream that ends at once.
            let first = pager.next().await?;
            let streaming = options.start == Start::Streaming;
            (changes, seen, Initial::new(pager, first, streaming))
        }
        Start::After(version) => match store.changes_since(version) {
            Ok((changes, backlog)) => {
                let seen = backlog.last().map_or(version, |e| e.seq.max(version));
                for event in backlog.into_iter().filter(|e| e.seq > version) {
                    queue.push(event);
                }
                (changes, seen, Initial::done())
            }
            Err(expired) => {
                let status =
                    scope::status_object(StatusCode::GONE, "Expired", expired.to_string(), None);
                return Ok(stream_response(Body::from(event_line("ERROR", &status))));
            }
        },
    };
    let (gone, client_gone) = oneshot::channel();
    tokio::spawn(receive(
        Feed {
            changes,
            seen,
            kind: scope.kind.clone(),
            bookmarks: options.bookmarks,
            deadline,
        },
        queue.clone(),
        stop.clone(),
        client_gone,
    ));
    let stream = Stream {
        scope,
        store,
        stop,
        deadline,
        table: options.table,
        queue,
        initial,
        _gone: gone,
        _permit: permit,
    };
    let body = futures_util::stream::unfold(stream, |mut s| async move {
        s.next_line()
            .await
            .map(|line| (Ok::<Bytes, std::convert::Infallible>(line), s))
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

/// One watcher's side of the change feed.
struct Feed {
    changes: broadcast::Receiver<Arc<StoreEvent>>,
    /// Changes numbered up to here are in what the watcher was sent first.
    seen: u64,
    kind: Arc<Kind>,
    bookmarks: bool,
    deadline: Option<tokio::time::Instant>,
}

/// Takes the changes numbered after `seen` off the feed onto the watcher's queue, until the
/// client goes away, the server stops, the feed ends, the watch's time is up, or the queue
/// overruns its budget.
async fn receive(
    feed: Feed,
    queue: Arc<Queue>,
    mut stop: Shutdown,
    mut client_gone: oneshot::Receiver<()>,
) {
    let Feed {
        mut changes,
        seen,
        kind,
        bookmarks,
        deadline,
    } = feed;
    // Every change numbered up to here has been queued or was out of scope.
    let mut received = seen;
    let mut heartbeat =
        tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
    let time_up = async {
        match deadline {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(time_up);
    loop {
        let next = tokio::select! {
            next = changes.recv() => next,
            _ = heartbeat.tick() => {
                if bookmarks {
                    queue.heartbeat_with(bookmark(&kind, received));
                } else {
                    queue.heartbeat_with(Bytes::from_static(b"\n"));
                }
                continue;
            }
            _ = &mut time_up => {
                // As kube-apiserver does, a last bookmark before the stream ends, so the client
                // watches again from there.
                if bookmarks {
                    queue.line(bookmark(&kind, received));
                }
                return queue.end();
            }
            _ = stop.wait() => return queue.end(),
            _ = &mut client_gone => return,
        };
        if let Ok(event) = &next {
            received = received.max(event.seq);
        }
        match next {
            Ok(event) if event.seq > seen && event.rtype == kind.rtype => {
                if queue.push(event) == Pushed::Overrun {
                    tracing::info!(
                        budget = WATCH_BUDGET_BYTES,
                        "watch ended: its client fell behind by more than its budget"
                    );
                    return;
                }
            }
            Ok(_) => {}
            Err(RecvError::Lagged(missed)) => {
                tracing::debug!(missed, "watcher fell behind the change feed");
                return queue.expire("watch fell behind; list again".into());
            }
            Err(RecvError::Closed) => return queue.end(),
        }
    }
}

/// What waits for one watcher's client.
#[derive(Default)]
struct Queue {
    inner: Mutex<Waiting>,
    ready: Notify,
}

#[derive(Default)]
struct Waiting {
    items: VecDeque<Item>,
    bytes: usize,
    /// Nothing more will be added; the stream ends once `items` is empty.
    ended: bool,
}

enum Item {
    Change(Arc<StoreEvent>),
    Line(Bytes),
}

#[derive(PartialEq, Eq)]
enum Pushed {
    Queued,
    Overrun,
}

impl Queue {
    fn push(&self, event: Arc<StoreEvent>) -> Pushed {
        {
            let Ok(mut w) = self.inner.lock() else {
                return Pushed::Overrun;
            };
            if w.ended {
                return Pushed::Queued;
            }
            w.bytes += event.size();
            if w.bytes > WATCH_BUDGET_BYTES {
                drop(w);
                self.expire(format!(
                    "watch fell more than {WATCH_BUDGET_BYTES} bytes behind; list again"
                ));
                return Pushed::Overrun;
            }
            w.items.push_back(Item::Change(event));
        }
        self.ready.notify_one();
        Pushed::Queued
    }

    /// A line for the client after whatever waits (a bookmark).
    fn line(&self, line: Bytes) {
        if let Ok(mut w) = self.inner.lock() {
            if w.ended {
                return;
            }
            w.items.push_back(Item::Line(line));
        }
        self.ready.notify_one();
    }

    /// A keep-alive `line` (a newline, or a bookmark), unless something is already waiting to
    /// be sent: a client that does not read gets no more of them than one.
    fn heartbeat_with(&self, line: Bytes) {
        if let Ok(mut w) = self.inner.lock() {
            if !w.items.is_empty() || w.ended {
                return;
            }
            w.items.push_back(Item::Line(line));
        }
        self.ready.notify_one();
    }

    /// Drops what waits, and ends the stream with a 410 `ERROR` event that says why.
    fn expire(&self, why: String) {
        let status = scope::status_object(StatusCode::GONE, "Expired", why, None);
        if let Ok(mut w) = self.inner.lock() {
            w.items.clear();
            w.bytes = 0;
            w.items.push_back(Item::Line(event_line("ERROR", &status)));
            w.ended = true;
        }
        self.ready.notify_one();
    }

    /// Ends the stream once what waits is sent.
    fn end(&self) {
        if let Ok(mut w) = self.inner.lock() {
            w.ended = true;
        }
        self.ready.notify_one();
    }

    /// The next item, waiting for one; `None` once the stream has ended.
    async fn pop(&self) -> Option<Item> {
        loop {
            let notified = self.ready.notified();
            {
                let mut w = self.inner.lock().ok()?;
                if let Some(item) = w.items.pop_front() {
                    if let Item::Change(e) = &item {
                        w.bytes = w.bytes.saturating_sub(e.size());
                    }
                    return Some(item);
                }
                if w.ended {
                    return None;
                }
            }
            notified.await;
        }
    }
}

/// The `ADDED` events of a watch that did not start from a version: the objects in scope,
/// read a page at a time as the client takes them.
struct Initial {
    pager: Option<Pager>,
    rows: std::vec::IntoIter<Row>,
    /// Per page read, its last key (`None`: the end of the range) and the feed position read
    /// before it. A change to a key at or below a page's last key, numbered at or below its
    /// position, is already in what the page sent, and is not sent again.
    covered: Vec<(Option<String>, u64)>,
    /// A streaming list: once the pages are sent, the bookmark that says so is due.
    end_bookmark: bool,
}

impl Initial {
    fn new(pager: Pager, first: Option<scope::Page>, streaming: bool) -> Self {
        let mut initial = Self {
            pager: Some(pager),
            rows: Vec::new().into_iter(),
            covered: Vec::new(),
            end_bookmark: streaming,
        };
        initial.take(first);
        initial
    }

    fn done() -> Self {
        Self {
            pager: None,
            rows: Vec::new().into_iter(),
            covered: Vec::new(),
            end_bookmark: false,
        }
    }

    /// The version everything the initial pages sent is as of: the position read before the
    /// first (later pages are newer still, and a change after it that they did not show comes
    /// after the bookmark, so the client's version never goes back).
    fn as_of(&self) -> u64 {
        self.covered.first().map_or(0, |(_, position)| *position)
    }

    fn take(&mut self, page: Option<scope::Page>) {
        match page {
            Some(page) => {
                self.covered.push((page.last_key, page.position));
                self.rows = page.rows.into_iter();
            }
            None => self.pager = None,
        }
    }

    /// Whether the initial pages already sent the change `event`.
    fn sent(&self, event: &StoreEvent) -> bool {
        let page = self.covered.iter().find(|(last, _)| {
            last.as_deref()
                .is_none_or(|last| event.key.as_str() <= last)
        });
        page.is_some_and(|(_, position)| event.seq <= *position)
    }
}

/// One watcher's connection side.
struct Stream {
    scope: Scope,
    store: Store,
    stop: Shutdown,
    deadline: Option<tokio::time::Instant>,
    table: bool,
    queue: Arc<Queue>,
    initial: Initial,
    /// Dropped with the stream, which tells the receiving task that the client went away.
    _gone: oneshot::Sender<()>,
    _permit: OwnedSemaphorePermit,
}

impl Stream {
    /// The next line for the client; `None` ends the stream.
    async fn next_line(&mut self) -> Option<Bytes> {
        loop {
            let time_up = self
                .deadline
                .is_some_and(|at| tokio::time::Instant::now() >= at);
            if self.stop.is_shutdown() || time_up {
                return None;
            }
            if let Some(row) = self.initial.rows.next() {
                match self.scope.served_if_matches(&row) {
                    Some(object) => return Some(self.event_line("ADDED", object)),
                    None => continue,
                }
            }
            if let Some(pager) = &mut self.initial.pager {
                match pager.next().await {
                    Ok(page) => self.initial.take(page),
                    Err(e) => {
                        tracing::warn!(error = %e, "watch could not read the store");
                        return None;
                    }
                }
                continue;
            }
            if std::mem::take(&mut self.initial.end_bookmark) {
                return Some(end_of_initial_events(
                    &self.scope.kind,
                    self.initial.as_of(),
                ));
            }
            let line = match self.queue.pop().await? {
                Item::Line(line) => Some(line),
                Item::Change(event) if self.initial.sent(&event) => None,
                Item::Change(event) => self.encode(&event).await,
            };
            if line.is_some() {
                return line;
            }
        }
    }

    /// An event of `kind` for `object`, as a Table of one row when the watch asked for it.
    fn event_line(&self, kind: &str, object: Value) -> Bytes {
        if !self.table {
            return event_line(kind, &object);
        }
        let row = super::table::row(&self.scope.kind, &object, std::time::SystemTime::now());
        let version = object["metadata"]["resourceVersion"].clone();
        let metadata = json!({"resourceVersion": version});
        event_line(
            kind,
            &super::table::table(&self.scope.kind, vec![row], metadata),
        )
    }

    /// The event line for a change in scope; `None` for one outside it.
    async fn encode(&self, event: &StoreEvent) -> Option<Bytes> {
        let kind = match event.kind {
            ChangeKind::Added => "ADDED",
            ChangeKind::Modified => "MODIFIED",
            ChangeKind::Deleted => "DELETED",
        };
        // Every event carries its change's number, a deletion too, so a client that resumes
        // from its last event's version misses nothing and sees nothing twice.
        let version = event.seq;
        let value: Value = match (&event.value, event.kind) {
            (Some(value), _) => serde_json::from_slice(value).ok()?,
            (None, ChangeKind::Deleted) => {
                // The old object was not read (nobody watched when the delete was applied):
                // name it from the key so the client still learns what went. Its labels and
                // fields are unknown, so only the key is held to the scope: a client told of
                // the delete of an object it never had ignores it, one never told keeps it.
                let resource = Resource::parse(&event.key).ok()?;
                let (ns, name) = (resource.namespace(), resource.name()?);
                let stub = json!({"metadata": {"name": name, "namespace": ns}});
                return self.scope.holds_key(&event.key).then(|| {
                    self.event_line(kind, scope::served(&self.scope.kind, stub, version))
                });
            }
            (None, _) => {
                // Not kept (nobody watched then, or before a restart): the object as stored
                // now, under this change's number. If it has changed since, that change
                // follows in the feed; if it has gone, its deletion does.
                let row = self.store.get_row(&event.key).await.ok()??;
                serde_json::from_str(&row.value).ok()?
            }
        };
        self.scope
            .matches(&event.key, &value)
            .then(|| self.event_line(kind, scope::served(&self.scope.kind, value, version)))
    }
}

/// A `BOOKMARK` event: only the kind and the version everything up to which has been sent.
fn bookmark(kind: &Kind, version: u64) -> Bytes {
    let object = json!({
        "kind": kind.kind,
        "apiVersion": kind.api_version(),
        "metadata": {"resourceVersion": version.to_string()},
    });
    event_line("BOOKMARK", &object)
}

/// The `BOOKMARK` that ends a streaming list's initial events, as of `version`.
fn end_of_initial_events(kind: &Kind, version: u64) -> Bytes {
    let object = json!({
        "kind": kind.kind,
        "apiVersion": kind.api_version(),
        "metadata": {
            "resourceVersion": version.to_string(),
            "annotations": {INITIAL_EVENTS_END: "true"},
        },
    });
    event_line("BOOKMARK", &object)
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keep_alive_lines_wait_behind_nothing_and_never_pile_up() {
        let queue = Queue::default();
        queue.heartbeat_with(Bytes::from_static(b"\n"));
        // A client that does not read: later keep-alives are not queued behind the first.
        for _ in 0..100 {
            queue.heartbeat_with(Bytes::from_static(b"{\"type\":\"BOOKMARK\"}\n"));
        }
        assert_eq!(queue.inner.lock().unwrap().items.len(), 1);
        assert!(matches!(queue.pop().await, Some(Item::Line(l)) if l == "\n"));
        queue.end();
        assert!(queue.pop().await.is_none(), "ended once empty");
    }
}
