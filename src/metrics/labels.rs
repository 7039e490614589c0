//! The values of the metrics' labels: an enum per label whose values the code knows, made by one
//! macro that also lists them for the metric's help text, so that the help, the series shown at
//! 0 from start-up and the values counted cannot drift apart; and the label sets as
//! prometheus-client encodes them.

use prometheus_client::encoding::EncodeLabelSet;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct TopicOperation {
    pub(super) topic: String,
    pub(super) operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct OperationLabel {
    pub(super) operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ReasonLabel {
    pub(super) reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct OutcomeLabel {
    pub(super) outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ApiWriteLabel {
    pub(super) verb: &'static str,
    pub(super) outcome: &'static str,
}

/// The values of a metric's label, one variant each: the label's text, and every value in
/// order, from which the metric's help text lists them, so the two cannot drift apart.
macro_rules! label_values {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $($(#[$vmeta:meta])* $variant:ident => $value:literal),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every value, in the order the help text lists them.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $value),+
                }
            }

            /// The values, comma-separated, for the metric's help text.
            pub fn listed() -> String {
                Self::ALL
                    .iter()
                    .map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        }
    };
}

label_values! {
    /// Why an outbox message was dropped.
    pub enum DropReason {
        /// The outbox was at `outbox.max_messages`: the oldest went.
        Full => "full",
        /// It waited longer than `outbox.max_age`.
        Expired => "expired",
    }
}

label_values! {
    /// What a write to the local API asked for.
    pub enum ApiVerb {
        Create => "create",
        Update => "update",
        Patch => "patch",
        Delete => "delete",
    }
}

label_values! {
    /// How a write to the local API ended.
    pub enum ApiWriteOutcome {
        /// Carried out by the cloud.
        Cloud => "cloud",
        /// Taken here while the cloud is away (a status, an event).
        Here => "here",
        Conflict => "conflict",
        NotFound => "not_found",
        CloudError => "cloud_error",
        Timeout => "timeout",
        Unavailable => "unavailable",
        Invalid => "invalid",
        TooMany => "too_many",
        Failed => "failed",
        StorageFull => "storage_full",
    }
}

label_values! {
    /// How a remote query ended.
    pub enum RemoteOutcome {
        Answered => "answered",
        Error => "error",
        Timeout => "timeout",
        Disconnected => "disconnected",
        Refused => "refused",
    }
}

label_values! {
    /// Why something counted in `metamanager_errors_total` went wrong.
    pub enum ErrorReason {
        /// A message that is not a valid MetaManager message.
        Decode => "decode",
        /// A valid message that asks for something MetaManager refuses.
        Invalid => "invalid",
        /// A store write or read failed.
        Store => "store",
        /// A write refused because the store is full (see [`crate::store::space`]).
        StorageFull => "storage_full",
        /// A MetaSync run failed.
        Metasync => "metasync",
        RemoteTimeout => "remote_timeout",
        RemoteDisconnected => "remote_disconnected",
        RemoteRefused => "remote_refused",
        /// A lease from edged while the cloud is away (see [`crate::ops`]'s per-type rules).
        LeaseWhileDisconnected => "lease_while_disconnected",
    }
}

label_values! {
    /// Why a valid message was acked but neither stored nor passed on.
    pub enum HeldBack {
        /// An update older than the stored object, by resourceVersion.
        Stale => "stale",
        /// A msg_id handled before in this run.
        Repeat => "repeat",
    }
}

label_values! {
    /// How a MetaSync run ended.
    pub enum SyncOutcome {
        Synced => "synced",
        /// The cloud was disconnected; nothing was sent.
        Skipped => "skipped",
        Failed => "failed",
    }
}
