//! The local API's writes. The cloud owns every object, so a write is passed on to it and
//! answered with its result; while the cloud is away, only what the edge owns is written here.
//!
//! Connected: the write goes to edgehub as an `insert`, `update`, `patch` or `delete` with
//! source `metaserver` and a new id, and waits up to `meta.remote_query_timeout` for the
//! cloud's answer: an `error`, or a `response` carrying the object (a bare "OK" before it is a
//! receipt; for a delete it is the answer). The object is stored before the caller hears of
//! it, unless the store already holds a newer one (the cloud's own update may arrive first),
//! and passed to edged as a change from the cloud would be, so that the store and edged agree.
//! The wait runs in a task of its own: a client that goes away does not leave the cloud's
//! answer unhandled.
//!
//! Away, or while older messages wait in the outbox (a direct send would overtake them): a
//! status write of this node's pods or of its node is applied here with the keyed merge of an
//! edged patch, queued for the cloud in the same transaction, and answered with the merged
//! object, because the edge owns status; creating an event is queued. Anything else needs the
//! cloud's say, and is refused as unavailable.

mod cloud;
mod here;

use std::sync::Arc;

use crate::cloud::refusal::{Reason, Refusal};

use crate::cloud::remote::TooManyPending;
use crate::message::Operation;
use crate::metrics::{ApiVerb, ApiWriteOutcome};
use crate::resource::rtype as rtypes;
use crate::resource::Resource;
use crate::store::StoreError;

use super::{rules, Context};
use cloud::through_cloud;
use here::{of_this_node, patch_status_here, queue_event, status_only};

/// What the API asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Create,
    Update,
    Patch,
    Delete,
}

/// One write of the local API.
#[derive(Debug)]
pub struct ApiWrite {
    pub verb: Verb,
    /// The object written, `namespace/type/name`.
    pub resource: Resource,
    /// JSON text. Create and update: the object. Patch: a merge patch (an object; a strategic
    /// merge patch is read as one) or a JSON Patch (an array). Delete: `null`, or an object
    /// with the `metadata.uid` the deleted object must have.
    pub content: String,
    /// The write is of the `status` subresource: only the object's status changes.
    pub status: bool,
    /// Held until the write is finished, also when its caller has gone: the caller's place
    /// under a cap on writes, which so bounds the writes waiting for the cloud.
    pub hold: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// What a write that succeeded left.
#[derive(Debug)]
pub enum Written {
    /// The object as it now is.
    Object(String),
    /// Nothing to show: the object was deleted, or the cloud accepted a patch of an object
    /// this node does not hold.
    Done,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The cloud refused the write for a conflict: `reason` is [`Reason::AlreadyExists`] or
    /// [`Reason::Conflict`].
    #[error("the cloud refused the write of {key}: {text}")]
    Conflict {
        key: String,
        text: String,
        reason: Reason,
    },
    #[error("{text}")]
    NotFound { text: String },
    #[error("the cloud failed the write of {key}: {text}")]
    Cloud { key: String, text: String },
    #[error("the cloud did not answer the write of {key} in time ({timeout})")]
    Timeout { key: String, timeout: String },
    #[error("the cloud is not connected, and {0}")]
    Unavailable(String),
    #[error(transparent)]
    TooMany(#[from] TooManyPending),
    #[error("{0}")]
    Invalid(String),
    #[error("the write of {key} could not be stored: {source}")]
    Store { key: String, source: StoreError },
    /// The store is full (see [`crate::store::space`]): kube-apiserver has no word for it, so
    /// `507 Insufficient Storage`, whose text begins `storage full:`.
    #[error("{0}")]
    StorageFull(crate::store::Full),
    /// The object changed since the client read it (a stale `resourceVersion`).
    #[error("Operation cannot be fulfilled on {key}: the object has been modified; please apply your changes to the latest version and try again")]
    Modified { key: String },
    #[error("the write of {key} failed: {text}")]
    Failed { key: String, text: String },
}

impl Verb {
    /// Its `verb` label in `metamanager_api_writes`.
    fn label(self) -> ApiVerb {
        match self {
            Verb::Create => ApiVerb::Create,
            Verb::Update => ApiVerb::Update,
            Verb::Patch => ApiVerb::Patch,
            Verb::Delete => ApiVerb::Delete,
        }
    }

    /// The operation the cloud is sent for it.
    pub fn operation(self) -> Operation {
        match self {
            Verb::Create => Operation::Insert,
            Verb::Update => Operation::Update,
            Verb::Patch => Operation::Patch,
            Verb::Delete => Operation::Delete,
        }
    }
}

impl WriteError {
    /// Its `outcome` label in `metamanager_api_writes`.
    fn outcome(&self) -> ApiWriteOutcome {
        match self {
            WriteError::Conflict { .. } | WriteError::Modified { .. } => ApiWriteOutcome::Conflict,
            WriteError::NotFound { .. } => ApiWriteOutcome::NotFound,
            WriteError::Cloud { .. } => ApiWriteOutcome::CloudError,
            WriteError::Timeout { .. } => ApiWriteOutcome::Timeout,
            WriteError::Unavailable(_) => ApiWriteOutcome::Unavailable,
            WriteError::TooMany(_) => ApiWriteOutcome::TooMany,
            WriteError::Invalid(_) => ApiWriteOutcome::Invalid,
            WriteError::Store { .. } | WriteError::Failed { .. } => ApiWriteOutcome::Failed,
            WriteError::StorageFull(_) => ApiWriteOutcome::StorageFull,
        }
    }

    /// The answer a write of `key` gets from the cloud's refusal, by its reason.
    fn from_cloud(key: &str, refusal: Refusal) -> Self {
        let Refusal { reason, text } = refusal;
        let key = key.to_owned();
        match reason {
            Reason::NotFound => WriteError::NotFound { text },
            Reason::AlreadyExists | Reason::Conflict => WriteError::Conflict { key, text, reason },
            Reason::Failed => WriteError::Cloud { key, text },
        }
    }

    fn store(key: &str) -> impl FnOnce(StoreError) -> Self + '_ {
        move |source| match source {
            StoreError::StorageFull(full) => WriteError::StorageFull(full),
            source => WriteError::Store {
                key: key.to_owned(),
                source,
            },
        }
    }
}

/// What the API's writes are carried out with: the operations' context; cheap to clone.
#[derive(Clone)]
pub struct ApiWrites {
    ctx: Arc<Context>,
}

impl ApiWrites {
    pub fn new(ctx: Arc<Context>) -> Self {
        Self { ctx }
    }

    /// The largest message MetaManager takes, which a write's request must fit in.
    pub fn max_payload(&self) -> usize {
        self.ctx.rules.max_payload
    }

    /// Carries out `write`: through the cloud while it is there, else locally when the edge
    /// owns what it changes; counted in `metamanager_api_writes`.
    pub async fn write(&self, write: ApiWrite) -> Result<Written, WriteError> {
        let verb = write.verb.label();
        // A full store takes deletes, which make room, and refuses the rest before the cloud
        // is asked: what the cloud accepted could not be kept here.
        let full = self
            .ctx
            .store
            .space()
            .full()
            .filter(|_| write.verb != Verb::Delete);
        let (result, by_cloud) = match full {
            Some(full) => (Err(WriteError::StorageFull(full)), false),
            None => carry_out(&self.ctx, write).await,
        };
        let outcome = match &result {
            Ok(_) if by_cloud => ApiWriteOutcome::Cloud,
            Ok(_) => ApiWriteOutcome::Here,
            Err(e) => e.outcome(),
        };
        self.ctx.replies.metrics.api_write(verb, outcome);
        result
    }
}

/// [`ApiWrites::write`], and whether it went to the cloud.
async fn carry_out(ctx: &Arc<Context>, write: ApiWrite) -> (Result<Written, WriteError>, bool) {
    match decide(ctx, write).await {
        Ok(Route::Here(done)) => (done, false),
        Ok(Route::Cloud(write)) => (through_cloud(ctx, write).await, true),
        Err(e) => (Err(e), false),
    }
}

/// Where a write is carried out.
enum Route {
    /// Here, already: its result.
    Here(Result<Written, WriteError>),
    /// Through the cloud, as this write.
    Cloud(ApiWrite),
}

async fn decide(ctx: &Context, write: ApiWrite) -> Result<Route, WriteError> {
    let (write, guarded) = if write.status {
        status_only(write)?
    } else {
        (write, false)
    };
    // Local while the cloud is away, and while older messages wait in the outbox: a status
    // write sent directly would overtake the ones queued before it.
    if ctx.cloud.outbox.must_queue() {
        let rtype = write.resource.rtype();
        let connected = ctx.cloud.state.connected();
        if write.status && (rtype == rtypes::POD || rtype == rtypes::NODE) {
            let key = write.resource.key();
            let stored = ctx.store.get(key).await.map_err(WriteError::store(key))?;
            match stored {
                Some(stored) if of_this_node(ctx, &write.resource, &stored) => {
                    return Ok(Route::Here(patch_status_here(ctx, write, guarded).await))
                }
                _ if connected => {}
                None => {
                    return Err(WriteError::NotFound {
                        text: format!("{key} is not stored on this node"),
                    })
                }
                Some(_) => {
                    return Err(WriteError::Unavailable(format!(
                        "{key} is not of this node ({}), so its status is the cloud's to change",
                        ctx.rules.node_id
                    )))
                }
            }
        } else if write.verb == Verb::Create && rtype == rules::EVENT {
            return Ok(Route::Here(queue_event(ctx, write).await));
        } else if !connected {
            return Err(WriteError::Unavailable(format!(
                "only status writes of this node's pods and node, and new events, are taken while it is away; {} is refused",
                write.resource
            )));
        }
    }
    Ok(Route::Cloud(write))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clouds_reason_chooses_the_error() {
        let k = "default/configmap/c";
        let from = |content: &str| WriteError::from_cloud(k, Refusal::read(content));
        assert!(matches!(
            from(r#""configmaps \"c\" already exists""#),
            WriteError::Conflict {
                reason: Reason::AlreadyExists,
                ..
            }
        ));
        assert!(matches!(
            from(r#""Operation cannot be fulfilled: the object has been modified (Conflict)""#),
            WriteError::Conflict {
                reason: Reason::Conflict,
                ..
            }
        ));
        assert!(matches!(
            from(r#""configmaps \"c\" not found""#),
            WriteError::NotFound { .. }
        ));
        assert!(matches!(
            from(r#""etcd is down""#),
            WriteError::Cloud { .. }
        ));
    }
}
