//! Building: every part made from the settings, in the order the module doc of [`crate::app`]
//! gives, with nothing running yet but the broker and the link.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::broker::{self, BrokerError, BrokerOptions, EmbeddedBroker, DEFAULT_MAX_CONNECTIONS};
use crate::cloud::metasync::SyncPlan;
use crate::cloud::settings::OutboxSettings;
use crate::cloud::{Cloud, CloudPlan};
use crate::config::{ConfigError, Settings};
use crate::descriptors;
use crate::http::auth::Auth;
use crate::http::exporter::Exporter;
use crate::http::{self, HttpError};
use crate::message::Operation;
use crate::metrics::Metrics;
use crate::mqtt::settings::BrokerMode;
use crate::mqtt::{Incoming, Link, LinkOptions};
use crate::ops::api_write::ApiWrites;
use crate::ops::{self, Ops};
use crate::readiness::{self, Readiness};
use crate::status;
use crate::store::{InstanceLock, Store, StoreError, StoreOptions};
use crate::tls::{self, TlsError};
use crate::topics::{Peer, Topics};
use crate::watchdog::{BrokerServing, BrokerUnresponsive, Watchdog};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Http(#[from] HttpError),
    /// Not a start-up failure: the embedded broker stopped serving while running.
    #[error(transparent)]
    BrokerUnresponsive(#[from] BrokerUnresponsive),
}

/// Listeners bound by the caller, used instead of the addresses in the settings: a test binds
/// port 0 and knows its ports before MetaManager starts.
#[derive(Default)]
pub struct Listeners {
    /// For the HTTP endpoint (when `http.enabled`).
    pub http: Option<http::Listener>,
    /// For the embedded broker (in embedded mode).
    pub broker: Option<std::net::TcpListener>,
}

/// Every part, built and linked to the broker; [`super::running::Running::start`] runs them.
pub(super) struct App {
    pub node_id: String,
    pub store: Store,
    pub link: Link,
    pub inbound: Incoming,
    pub ops: Arc<Ops>,
    pub cloud: Cloud,
    /// `meta.sync.podstatus.interval`: MetaSync's period.
    pub podstatus_interval: Duration,
    /// The outbox's bounds and pacing, for its drain.
    pub outbox: OutboxSettings,
    pub http: Option<Endpoint>,
    /// The embedded broker's check; none for an external broker.
    pub watchdog: Option<Watchdog>,
    /// Whether the embedded broker accepts clients: the watchdog says, the probes read.
    pub serving: BrokerServing,
}

/// The HTTP endpoint, bound and ready to serve.
pub(super) struct Endpoint {
    pub listener: http::Listener,
    pub context: http::Context,
    pub limits: http::Limits,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

impl App {
    pub async fn build(settings: Settings, listeners: Listeners) -> Result<Self, AppError> {
        // Settings built in code rather than read from a file are held to the same bounds.
        settings.validate()?;
        let files = Files::read(&settings)?;
        // Claimed before anything is created, bound or connected (after the files above, which
        // only read): a second MetaManager on this database stops here, saying which process
        // has it.
        let lock = InstanceLock::acquire(&settings.database.path).map_err(StoreError::from)?;
        // Bound next, so a taken port stops start-up before anything connects or opens.
        let listener = bind_http(&settings, listeners.http, &files.api_auth).await?;
        let store = open_store(lock, &settings).await?;
        // Each listener's connections are capped to its share of the descriptors (see
        // `descriptors`), so that a flood of clients cannot starve the database and the links.
        let open_files = descriptors::open_files_limit();
        tracing::info!(open_files, "file descriptor limit");
        let topics = Topics::new(&settings.mqtt.topic_prefix, &settings.node_id)
            .with_bridge_state(settings.cloud_link.state_topic.clone());
        let joining = Joining {
            credentials: files.credentials,
            tls: files.mqtt_tls,
            given: listeners.broker,
            open_files,
            topics: topics.clone(),
        };
        let (broker, link, inbound) = Broker::join(&settings, joining).await?;
        let parts = Parts::new(&settings, topics, &store, &link);
        let serving = BrokerServing::default();
        broker.log_start(&settings);
        let http = listener.map(|listener| Endpoint {
            listener,
            context: parts.http_context(&store, &link, &serving, &broker, files.api_auth),
            limits: http_limits(&settings, open_files),
            tls: files.api_tls,
        });
        Ok(Self {
            watchdog: broker.watchdog(&settings),
            node_id: settings.node_id,
            store,
            link,
            inbound,
            ops: parts.ops,
            cloud: parts.cloud,
            podstatus_interval: settings.meta.sync.podstatus.interval,
            outbox: settings.outbox,
            http,
            serving,
        })
    }
}

/// What the operations and the API's writes are given.
struct Parts {
    replies: ops::Replies,
    cloud: Cloud,
    /// `outbox.max_messages`, which `/metrics` shows beside the outbox's length.
    outbox_capacity: usize,
    ctx: Arc<ops::Context>,
    ops: Arc<Ops>,
}

impl Parts {
    /// The operations' parts, sending with `link` and keeping their state in `store`, with
    /// the cloud disconnected until edgehub (or the bridge's state topic) says otherwise.
    fn new(settings: &Settings, topics: Topics, store: &Store, link: &Link) -> Self {
        store.track_delivery(link.publisher.delivery.clone());
        let replies = ops::Replies {
            publisher: link.publisher.clone(),
            metrics: Arc::new(metrics(store, settings.cloud_link.state_topic.is_some())),
        };
        let plan = CloudPlan {
            remote_timeout: settings.meta.remote_query_timeout,
            sync: SyncPlan {
                node_id: settings.node_id.clone(),
                max_payload: settings.mqtt.max_payload_bytes,
                full_interval: settings.meta.sync.podstatus.full_interval,
            },
            bridge: settings.cloud_link.bridge_words(),
        };
        let cloud = Cloud::new(store, &link.publisher, replies.metrics.clone(), plan);
        let rules = Arc::new(ops::Rules::new(
            &settings.node_id,
            &settings.meta,
            &settings.mqtt,
        ));
        let ctx = Arc::new(ops::Context::new(
            replies.clone(),
            store.clone(),
            cloud.clone(),
            rules,
        ));
        let ops = Arc::new(Ops::new(Arc::new(topics), ctx.clone()));
        Self {
            replies,
            cloud,
            outbox_capacity: settings.outbox.max_messages,
            ctx,
            ops,
        }
    }

    /// What the HTTP endpoint reads and writes with.
    fn http_context(
        &self,
        store: &Store,
        link: &Link,
        serving: &BrokerServing,
        broker: &Broker,
        auth: Arc<Auth>,
    ) -> http::Context {
        http::Context {
            store: store.clone(),
            exporter: Exporter {
                metrics: self.replies.metrics.clone(),
                store: store.clone(),
                outbox: self.cloud.outbox.clone(),
                remote: self.cloud.remote.clone(),
                cloud: self.cloud.state.clone(),
                broker_connected: link.connected.clone(),
                publisher: link.publisher.clone(),
                serving: serving.clone(),
                outbox_capacity: self.outbox_capacity,
            },
            broker_connected: link.connected.clone(),
            serving: serving.clone(),
            readiness: Arc::new(Readiness::new(broker.readiness())),
            auth,
            writes: ApiWrites::new(self.ctx.clone()),
        }
    }
}

/// The node's metrics, with the messages and replies the operations count shown at 0 from
/// start-up, as the label enums' series are (see [`crate::metrics`]): either peer may send any
/// operation, or what is no message (`invalid`); the bridge's state topic, when there is one,
/// says connected or disconnected, or something else (`invalid`). `ops`'s request reading counts
/// them; replies are responses and errors.
fn metrics(store: &Store, bridge: bool) -> Metrics {
    let metrics = Metrics::new(store.metrics().clone());
    let mut operations: Vec<&str> = Operation::ALL.iter().map(|o| o.as_str()).collect();
    operations.push("invalid");
    for peer in [Peer::Edgehub, Peer::Edged] {
        metrics.known_received(peer.as_str(), &operations);
    }
    if bridge {
        metrics.known_received("bridge", &["connected", "disconnected", "invalid"]);
    }
    metrics.known_replies(&[Operation::Response.as_str(), Operation::Error.as_str()]);
    metrics
}

/// What the files config keys name hold, read and checked before anything is created.
struct Files {
    /// `mqtt.username` and the password (from `mqtt.password_file`, when set).
    credentials: Option<(String, String)>,
    /// `mqtt.tls`: TLS to an external broker.
    mqtt_tls: Option<Arc<rustls::ClientConfig>>,
    /// `http.tls`: the API's certificate and the CAs of client certificates.
    api_tls: Option<tokio_rustls::TlsAcceptor>,
    /// `http.auth`: the API's tokens and policy.
    api_auth: Arc<Auth>,
}

impl Files {
    fn read(settings: &Settings) -> Result<Self, AppError> {
        let credentials = settings.mqtt.credentials()?;
        let mqtt_tls = match &settings.mqtt.tls {
            Some(t) => Some(tls::client_config(
                &t.ca_file,
                t.client_cert(),
                &settings.mqtt.host,
            )?),
            None => None,
        };
        let api_tls = match &settings.http.tls {
            Some(t) => Some(tokio_rustls::TlsAcceptor::from(tls::server_config(
                &t.cert_file,
                &t.key_file,
                t.client_ca_file.as_deref(),
            )?)),
            None => None,
        };
        let auth = settings.http.auth.as_ref();
        let api_auth = Arc::new(Auth::load(
            auth.and_then(|a| a.token_file.as_deref()),
            auth.and_then(|a| a.policy_file.as_deref()),
            settings.http.client_certificates(),
        )?);
        Ok(Self {
            credentials,
            mqtt_tls,
            api_tls,
            api_auth,
        })
    }
}

/// The HTTP endpoint's listener: the caller's, or bound to `http.listen`; none when the
/// endpoint is off. A listener beyond loopback needs authentication (see
/// [`http::auth::check_exposure`]).
async fn bind_http(
    settings: &Settings,
    given: Option<http::Listener>,
    auth: &Auth,
) -> Result<Option<http::Listener>, AppError> {
    let listener = match (settings.http.enabled, given) {
        (false, _) => None,
        (true, Some(listener)) => Some(listener),
        (true, None) => Some(http::Listener::bind(settings.http.listen_addr()?).await?),
    };
    if let Some(addr) = listener.as_ref().and_then(http::Listener::local_addr) {
        http::auth::check_exposure(addr, auth, settings.http.insecure_allow_anonymous)?;
    }
    Ok(listener)
}

/// The HTTP endpoint's bounds (`http.*`); its connections are capped to a quarter of
/// `open_files`, the process's descriptor limit.
fn http_limits(settings: &Settings, open_files: Option<usize>) -> http::Limits {
    let configured = &settings.http;
    http::Limits {
        connections: http::server::ConnectionLimits {
            max_connections: descriptors::capped(configured.max_connections, open_files, 4),
            header_timeout: configured.header_timeout,
            idle_timeout: configured.idle_timeout,
        },
        max_requests: configured.max_requests,
        max_watches: configured.max_watches,
        allowed_hosts: configured.allowed_hosts.clone(),
    }
}

/// Opens the store on the database `lock` holds, off the async threads.
async fn open_store(lock: InstanceLock, settings: &Settings) -> Result<Store, AppError> {
    let options = StoreOptions {
        outbox_max: settings.outbox.max_messages,
        synchronous: settings.database.synchronous,
        max_size: settings.database.max_size,
        ..StoreOptions::default()
    };
    let store = tokio::task::spawn_blocking(move || Store::open_locked(lock, options))
        .await
        .map_err(|e| StoreError::Task(format!("start-up: {e}")))??;
    tracing::info!(path = %store.path().display(), "store open");
    Ok(store)
}

/// The broker MetaManager links to.
enum Broker {
    /// Started here: its address, and the account MetaManager's own clients (the watchdog's
    /// probes among them) use on it.
    Embedded {
        addr: SocketAddr,
        own_credentials: (String, String),
    },
    /// Already running elsewhere: how MetaManager connects to it.
    External(Box<LinkOptions>),
}

/// What joining the broker takes besides the settings: the credentials and TLS the files gave,
/// the broker's listener when the caller bound it, the descriptor limit, the node's topics.
struct Joining {
    credentials: Option<(String, String)>,
    tls: Option<Arc<rustls::ClientConfig>>,
    given: Option<std::net::TcpListener>,
    open_files: Option<usize>,
    topics: Topics,
}

impl Broker {
    /// Starts the embedded broker (on the caller's listener, when given) or joins the external
    /// one, and starts MetaManager's link to it.
    async fn join(
        settings: &Settings,
        joining: Joining,
    ) -> Result<(Self, Link, Incoming), AppError> {
        let client_id = format!("metamanager-{}", settings.node_id);
        if settings.mqtt.mode == BrokerMode::Embedded {
            return Self::start_embedded(settings, client_id, joining).await;
        }
        let Joining {
            credentials,
            tls,
            topics,
            ..
        } = joining;
        let mqtt = &settings.mqtt;
        // The sending connection may have an account of its own.
        let publish_credentials = credentials
            .clone()
            .map(|(user, password)| (mqtt.publish_username.clone().unwrap_or(user), password));
        let options = LinkOptions {
            client_id,
            host: mqtt.host.clone(),
            port: mqtt.port,
            offline_status: status::offline_status(&settings.node_id),
            publish_credentials,
            credentials,
            tls,
            inflight: mqtt.inflight(),
        };
        let (link, inbound) = Link::start(options.clone(), topics);
        Ok((Self::External(Box::new(options)), link, inbound))
    }

    async fn start_embedded(
        settings: &Settings,
        client_id: String,
        joining: Joining,
    ) -> Result<(Self, Link, Incoming), AppError> {
        let Joining {
            credentials,
            given,
            open_files,
            topics,
            ..
        } = joining;
        // Fresh for every start: only this process can use its client ids on its own broker,
        // and its watchdog probes with them.
        let own_credentials = ("metamanager".to_string(), uuid::Uuid::new_v4().to_string());
        let options = BrokerOptions {
            host: settings.mqtt.host.clone(),
            port: settings.mqtt.port,
            // The broker relays up to twice MetaManager's limit, so an oversized message still
            // reaches MetaManager and its sender gets an error reply instead of a disconnect.
            max_payload: settings.mqtt.max_payload_bytes.saturating_mul(2),
            auth: credentials,
            max_connections: descriptors::capped(DEFAULT_MAX_CONNECTIONS, open_files, 2),
            own_client_id: Some(client_id.clone()),
            own_credentials: own_credentials.clone(),
        };
        let started = tokio::task::spawn_blocking(move || match given {
            Some(listener) => EmbeddedBroker::start_on(options, listener),
            None => EmbeddedBroker::start(options),
        })
        .await
        .map_err(|e| BrokerError::Task(e.to_string()))??;
        let addr = broker::connect_addr(started.addr);
        let links = started.own_links.ok_or(BrokerError::Link {
            client_id,
            reason: "not registered".into(),
        })?;
        let (link, inbound) = Link::start_in_process(links, topics, settings.mqtt.inflight());
        let embedded = Self::Embedded {
            addr,
            own_credentials,
        };
        Ok((embedded, link, inbound))
    }

    /// What the readiness probe connects to.
    fn readiness(&self) -> readiness::Target {
        match self {
            Self::Embedded {
                addr,
                own_credentials,
            } => readiness::Target::Embedded {
                addr: *addr,
                credentials: Some(own_credentials.clone()),
            },
            Self::External(options) => readiness::Target::External(options.clone()),
        }
    }

    /// The embedded broker's check, with the periods of `mqtt.watchdog_*`.
    fn watchdog(&self, settings: &Settings) -> Option<Watchdog> {
        match self {
            Self::Embedded {
                addr,
                own_credentials,
            } => Some(Watchdog {
                addr: *addr,
                credentials: Some(own_credentials.clone()),
                interval: settings.mqtt.watchdog_interval,
                timeout: settings.mqtt.watchdog_timeout,
            }),
            Self::External(_) => None,
        }
    }

    fn log_start(&self, settings: &Settings) {
        let broker = match self {
            Self::Embedded { addr, .. } => addr.to_string(),
            Self::External(_) => format!("{}:{}", settings.mqtt.host, settings.mqtt.port),
        };
        tracing::info!(
            node_id = %settings.node_id,
            %broker,
            mode = match settings.mqtt.mode {
                BrokerMode::Embedded => "embedded",
                BrokerMode::External => "external",
            },
            "metamanager starting"
        );
    }
}
