//! Caps on the API's concurrent requests and open watches.
//!
//! Like kube-apiserver's max-requests-inflight, a request over the cap is answered `429` with
//! `Retry-After` at once, not queued: client libraries retry it, and nothing waits in memory.
//! Watches are long-running, so they have a cap of their own and do not count as requests,
//! and the probes and `/metrics` are never capped, so a busy API does not fail its probes.

use std::sync::Arc;

use axum::body::Body;
use std::collections::HashMap;

use axum::extract::{Query, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::scope::{is_watch, ApiError};

/// The two caps, shared by every connection.
#[derive(Clone)]
pub struct Caps {
    requests: Arc<Semaphore>,
    max_requests: usize,
    watches: Arc<Semaphore>,
    max_watches: usize,
}

impl Caps {
    pub fn new(max_requests: usize, max_watches: usize) -> Self {
        Self {
            requests: Arc::new(Semaphore::new(max_requests)),
            max_requests,
            watches: Arc::new(Semaphore::new(max_watches)),
            max_watches,
        }
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
