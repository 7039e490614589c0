//! MetaManager: the edge node's metadata store between edgehub (the cloud link) and edged (the
//! node agent), speaking MQTT and persisting to SQLite.
//!
//! Module map, from the outside in:
//! - [`config`]: the optional YAML file read into [`config::Settings`], which gathers each
//!   part's settings; each part's settings struct, defaults and bounds live in the part
//!   ([`mqtt::settings`], [`store::settings`], [`http::settings`], [`cloud::settings`]).
//! - [`settings_checks`]: what every part's settings share, below them all: the error that
//!   names the key, range checks, the duration format, reading a file a key names.
//! - [`bounded_read`]: the files config keys name (password, TLS, API tokens and policy), read
//!   with a size cap; a secret others may read is warned about.
//! - [`telemetry`]: logging set-up.
//! - [`app`]: start-up in two steps: `app::build` makes every part from the settings, in an
//!   order that fails before anything is bound or opened; `app::running` runs the tasks and
//!   stops them, in-flight work first.
//! - [`broker`]: the embedded rumqttd broker (a patched copy, `vendor/rumqttd`).
//! - [`watchdog`]: checks now and then that the embedded broker still accepts clients.
//! - [`readiness`]: whether a new client can connect to the broker now, for `/readyz`.
//! - [`descriptors`]: the file descriptor limit, and each listener's share of it.
//! - [`mqtt`]: the link to the broker: a receiving side that reads only as fast as the inbound
//!   budget allows, and a sending one for everything outbound ([`mqtt::Publisher`]); two MQTT
//!   connections to an external broker, two in-process links to the embedded one.
//!   - [`mqtt::settings`]: `mqtt`: the broker, the credentials, the inbound budget, the watchdog.
//! - [`tls`]: the rustls client configuration for an external broker, TLS failure reasons, and
//!   the local API's HTTPS configuration.
//! - [`delivery`]: which of MetaManager's publishes the broker has acknowledged.
//! - [`budget`]: the bound on messages in flight; when it is spent, MetaManager stops reading.
//! - [`topics`]: the node's topic names, the bridge's state topic when configured, and the two
//!   peers, edgehub and edged.
//! - [`message`]: the wire message, its validation, and the replies MetaManager builds.
//! - [`resource`]: the `namespace/type[/name]` resource key, and the namespace segment of a
//!   cluster-scoped object.
//! - [`patch`]: applying a `patch` operation's merge patch or JSON Patch to a stored object,
//!   with the status lists of pods and nodes merged by key.
//! - [`ops`]: what MetaManager does with each message, in three parts: `ops::request` reads it
//!   once into a typed request, one variant per operation holding its valid input (every
//!   refusal of malformed input is there); the operation, one file each, is a method on its
//!   request that takes one borrowed [`ops::Context`] (the replies, the store, the
//!   [`cloud::Cloud`] side, [`ops::Rules`]) and ends in an outcome; `ops::outcome` turns the
//!   outcome into the reply and the broker ack, the one place a message is acknowledged. The
//!   API's writes share the context through [`ops::api_write::ApiWrites`].
//! - [`cloud`]: the cloud side, everything kept and done for the cloud, reached through edgehub.
//!   - [`cloud::state`]: whether the cloud is connected, as edgehub and, when configured, a
//!     bridge's state topic say.
//!   - [`cloud::outbox`]: what waits for the cloud while it is away, and its paced sending.
//!   - [`cloud::metasync`]: the periodic pod-status sync to the cloud, sending what changed.
//!   - [`cloud::digest`]: the store's digest as the `digest` message, in parts when large.
//!   - [`cloud::remote`]: queries and API writes waiting for the cloud's answer.
//!   - [`cloud::refusal`]: the cloud's refusal of a write, its reason read once from its words.
//!   - [`cloud::replaces`]: the pages of `replace` operations whose last page has not come.
//!   - [`cloud::settings`]: `outbox`, `meta` and `cloud_link`: the outbox's bounds and pacing,
//!     MetaSync's period, what is asked of the cloud and for how long, and the bridge's state
//!     topic.
//!   - [`cloud::waiting`]: patches passed on to the cloud, waiting for its answer.
//! - [`http`]: the local HTTP endpoint: `/healthz`, `/readyz`, `/metrics` and the API.
//!   - [`http::settings`]: `http`: the listener, its bounds, HTTPS and the API's auth files.
//!   - [`http::exporter`]: `/metrics`: the metrics rendered with the gauges read from their
//!     sources (the store, the outbox, the remote queries, the cloud's state, the link).
//!   - [`http::server`]: connections under a cap, with header and idle timeouts.
//!   - [`http::caps`]: caps on concurrent requests and watches (429 over them).
//!   - [`http::host`]: the `Host` check of a loopback listener (DNS rebinding).
//!   - [`http::accept`]: JSON only; `406` for a client that accepts only protobuf.
//!   - [`http::auth`]: bearer tokens and an ABAC policy, in kube-apiserver's file formats.
//!   - [`http::kinds`]: the kinds served: the core ones and every other kind the store holds.
//!   - [`http::target`]: what a resource path names, and the kind it is of.
//!   - [`http::kube`]: the Kubernetes API's routes; get, list and watch over the store.
//!   - [`http::discovery`]: `/version`, `/api`, `/apis` and resource lists, classic and
//!     aggregated.
//!   - [`http::write`]: create, update, patch and delete requests, read and checked as
//!     kube-apiserver does, carried out by `ops::api_write`.
//!   - [`http::openapi`]: OpenAPI v3 documents that let kubectl write without schemas.
//!   - [`http::list_page`]: a list answer streamed a page at a time, `limit` and `continue`.
//!   - [`http::table`]: server-side Table output, the columns kubectl prints.
//!   - [`http::scope`]: the scope of a list or watch, objects as served, the error answers.
//!   - [`http::selector`]: label and field selectors of list and watch requests.
//!   - [`http::watch`]: watch streams fed by the store's change feed, and streaming lists.
//!   - [`http::versions`]: a write's `resourceVersion`, the node's, checked and translated to
//!     the cloud's.
//! - [`metrics`]: the Prometheus metrics every part counts into, below them all; the gauges'
//!   values are handed in when rendering.
//! - [`inspect`]: read-only access to a database for the `get`, `list` and `export` commands.
//! - [`maintenance`]: the `backup` and `check` commands, on one snapshot of a running store.
//!   - [`maintenance::backup`]: a verified copy by SQLite's online backup, renamed into place.
//!   - [`maintenance::check`]: SQLite's integrity check and the store's invariants.
//! - [`progress`]: how a long command (`backup`, `check`, `export`) or the start-up digest count
//!   shows how far it got: a bar on a terminal, a line now and then otherwise.
//! - [`status`]: the status object on the status topic.
//! - [`shutdown`]: the one signal every task stops on.
//! - [`store`]: SQLite with one writer thread (group commit) and reads beside it, its own
//!   commit measurements, and the numbered change feed (recorded, so watches outlive restarts;
//!   each object keeps the number of its last change, the local API's `resourceVersion`).
//!   - [`store::lock`]: one MetaManager per database, by a lock file beside it.
//!   - [`store::digest`]: per scope, the count and order-independent hash of the stored
//!     objects, kept by the writer in each write's transaction; each row's `rv` column.
//!   - [`store::settings`]: `database`: the file, how hard each commit insists on the disk,
//!     and the quota (`max_size`).
//!   - [`store::space`]: the store's room on disk: the quota's measure and the storage-full
//!     state every side reads.
//!   - `store::writer`: the writer thread, split by job: `schema` (tables and migrations),
//!     `batch` (the group-commit loop; a rollback puts the writer's counters back whole),
//!     `message` (one message's change: duplicates, settling), `write` (the write step of each
//!     kind of write), `outbox`, `settle` (the settle marks and releases), `replace` (a whole
//!     scope in one transaction; its forwards to edged recorded until the broker has them) and
//!     `room` (refusing what needs room, the disk reserve, compaction).
//!
//! Each part is given what it uses when `app` builds it; nothing shares one object of
//! everything. No source file imports, directly or through others, a file that imports it,
//! with one allowance: the files in a folder may use what the folder's `mod.rs` holds, the
//! part's shared core. Nor does a top-level module (a folder counted whole) use, through others,
//! one that uses it: what parts share sits below them ([`settings_checks`], [`metrics`]), what
//! reads from several sits above them ([`config`], [`http::exporter`], [`app`]). CI checks both
//! with `.ci/cycles.py`, which states the rules in full.

pub mod app;
pub mod bounded_read;
pub mod broker;
pub mod budget;
pub mod cloud;
pub mod config;
pub mod delivery;
pub mod descriptors;
pub mod http;
pub mod inspect;
pub mod maintenance;
pub mod message;
pub mod metrics;
pub mod mqtt;
pub mod ops;
pub mod patch;
pub mod progress;
pub mod readiness;
pub mod resource;
pub mod settings_checks;
pub mod shutdown;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod topics;
pub mod watchdog;
