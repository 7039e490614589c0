//! Caps on the API's concurrent requests and open watches.
//!
//! Like kube-apiserver's max-requests-inflight, a request over the cap is answered `429` with
//! `Retry-After` at once, not queued: client libraries retry it, and nothing waits in memory.
//! Watches are long-running, so they have a cap of their own and do not count as requests,
//! and the probes and `/metrics` are never capped, so a busy API does not fail its probes.
//! Writes count as requests, and at most half the request cap may be writes: a write waits
//! for the cloud, up to `meta.remote_query_timeout`, and writes to a cloud that does not
//! answer must not leave no room for reads.

use std::sync::Arc;

use axum::body::Body;
use std::collections::HashMap;

use axum::extract::{Query, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::scope::{is_watch, ApiError};

/// The caps, shared by every connection.
#[derive(Clone)]
pub struct Caps {
    requests: Arc<Semaphore>,
    max_requests: usize,
    writes: Arc<Semaphore>,
    max_writes: usize,
    watches: Arc<Semaphore>,
    max_watches: usize,
}

impl Caps {
    pub fn new(max_requests: usize, max_watches: usize) -> Self {
        let max_writes = (max_requests / 2).max(1);
        Self {
            requests: Arc::new(Semaphore::new(max_requests)),
            max_requests,
            writes: Arc::new(Semaphore::new(max_writes)),
            max_writes,
            watches: Arc::new(Semaphore::new(max_watches)),
            max_watches,
        }
    }

    /// A place for one more write, held until the write is finished (see
    /// [`crate::ops::api_write::ApiWrite::hold`]).
    pub fn write(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.writes.clone().try_acquire_owned().map_err(|_| {
            ApiError::TooManyRequests(format!(
                "too many writes in progress (at most {}, half of http.max_requests)",
                self.max_writes
            ))
        })
    }

    /// A place for one more watch, held for as long as its stream lasts.
    pub fn watch(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.watches.clone().try_acquire_owned().map_err(|_| {
            ApiError::TooManyRequests(format!(
                "too many watches open (at most {})",
                self.max_watches
            ))
        })
    }
}

/// Middleware: an API request that is not a watch holds a place under the request cap until
/// its answer's body is fully written, since a streamed list still reads the store then.
pub async fn limit_requests(State(caps): State<Caps>, request: Request, next: Next) -> Response {
    let watch = Query::<HashMap<String, String>>::try_from_uri(request.uri())
        .is_ok_and(|Query(params)| is_watch(&params));
    if !request.uri().path().starts_with("/api") || watch {
        return next.run(request).await;
    }
    let Ok(permit) = caps.requests.clone().try_acquire_owned() else {
        return ApiError::TooManyRequests(format!(
            "too many requests in progress (at most {})",
            caps.max_requests
        ))
        .into_response();
    };
    let (parts, body) = next.run(request).await.into_parts();
    let held = futures_util::stream::unfold(
        (body.into_data_stream(), permit),
        |(mut body, permit)| async move { body.next().await.map(|chunk| (chunk, (body, permit))) },
    );
    Response::from_parts(parts, Body::from_stream(held))
}
