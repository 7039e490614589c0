//! Starts the parts in order, runs them, and stops them in reverse order.
//!
//! Shutdown finishes in-flight work before anything closes: the dispatcher stops taking messages
//! and hands on what it already received, the pipeline runs every queued step (commits, replies,
//! broker acks), then the offline status goes out, the MQTT connection closes, and last the
//! store commits what remains and closes the database.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::broker::{BrokerError, BrokerOptions, EmbeddedBroker, DEFAULT_MAX_CONNECTIONS};
use crate::cloud::metasync::SyncPlan;
use crate::cloud::{Cloud, CloudState};
use crate::config::{ConfigError, Settings};
use crate::descriptors;
use crate::http::{self, HttpError};
use crate::metrics::{Exporter, Metrics};
use crate::mqtt::settings::BrokerMode;
use crate::mqtt::{Incoming, Link, LinkOptions, Publisher};
use crate::ops::api_write::ApiWrites;
use crate::ops::{self, Step};
use crate::readiness::{self, Readiness};
use crate::shutdown::{self, Shutdown};
use crate::status;
use crate::store::{InstanceLock, Store, StoreError, StoreOptions};
use crate::tls::{self, TlsError};
use crate::topics::Topics;
use crate::watchdog::{BrokerServing, BrokerUnresponsive, Watchdog};

/// Steps queued between the dispatcher and the pipeline; bounds memory under a burst.
const STEP_QUEUE: usize = 4096;
/// How long shutdown waits for queued work before giving up on it.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for each background task, and for the offline status to be queued.
const TASK_STOP_TIMEOUT: Duration = Duration::from_secs(3);

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

/// Runs MetaManager until `shutdown` resolves, binding the addresses of `settings`.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> Result<(), AppError> {
    run_with(settings, Listeners::default(), shutdown).await
}

/// [`run`] on listeners the caller bound, where given.
pub async fn run_with(
    settings: Settings,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AppError> {
    // Settings built in code rather than read from a file are held to the same bounds.
    settings.validate()?;
    let credentials = match (&settings.mqtt.username, settings.mqtt.resolved_password()?) {
        (Some(user), password) => Some((user.clone(), password.unwrap_or_default())),
        (None, _) => None,
    };
    // Checked before anything is created, like the password file.
    let tls = match &settings.mqtt.tls {
        Some(t) => Some(tls::client_config(
            &t.ca_file,
            t.client_cert(),
            &settings.mqtt.host,
        )?),
        None => None,
    };
    // The API's certificate, tokens and policy, read like the other files a config key names.
    let api_tls = match &settings.http.tls {
        Some(t) => Some(tokio_rustls::TlsAcceptor::from(tls::server_config(
            &t.cert_file,
            &t.key_file,
            t.client_ca_file.as_deref(),
        )?)),
        None => None,
    };
    let client_certificates = settings
        .http
        .tls
        .as_ref()
        .is_some_and(|t| t.client_ca_file.is_some());
    let api_auth = Arc::new(http::auth::Auth::load(
        settings
            .http
            .auth
            .as_ref()
            .and_then(|a| a.token_file.as_deref()),
        settings
            .http
            .auth
            .as_ref()
            .and_then(|a| a.policy_file.as_deref()),
        client_certificates,
    )?);
    // Claimed before anything is created, bound or connected (after the files above, which
    // only read): a second MetaManager on this database stops here, saying which process has it.
    let lock = InstanceLock::acquire(&settings.database.path).map_err(StoreError::from)?;
    // Bound next, so a taken port stops start-up before anything connects or opens.
    let Listeners {
        http: http_given,
        broker: broker_given,
    } = listeners;
    let http_listener = match (settings.http.enabled, http_given) {
        (false, _) => None,
        (true, Some(listener)) => Some(listener),
        (true, None) => Some(http::Listener::bind(settings.http.listen_addr()?).await?),
    };
    if let Some(addr) = http_listener.as_ref().and_then(http::Listener::local_addr) {
        http::auth::check_exposure(addr, &api_auth, settings.http.insecure_allow_anonymous)?;
    }
    let store = {
        let options = StoreOptions {
            outbox_max: settings.outbox.max_messages,
            synchronous: settings.database.synchronous,
            ..StoreOptions::default()
        };
        tokio::task::spawn_blocking(move || Store::open_locked(lock, options))
            .await
            .map_err(|e| StoreError::Task(format!("start-up: {e}")))??
    };
    tracing::info!(path = %store.path().display(), "store open");

    // Each listener's connections are capped to its share of the descriptors (see
    // `descriptors`), so that a flood of clients cannot starve the database and the links.
    let open_files = descriptors::open_files_limit();
    tracing::info!(open_files = ?open_files, "file descriptor limit");
    let client_id = format!("metamanager-{}", settings.node_id);
    let topics = Topics::new(&settings.mqtt.topic_prefix, &settings.node_id);
    // The embedded broker's address and the account its watchdog probes it with; or how to
    // reach the external broker, for the readiness probe.
    let mut embedded = None;
    let mut external = None;
    let (link, inbound) = match settings.mqtt.mode {
        BrokerMode::Embedded => {
            // Fresh for every start: only this process can use its client ids on its own
            // broker, and its watchdog probes with them.
            let own_credentials = ("metamanager".to_string(), uuid::Uuid::new_v4().to_string());
            let options = BrokerOptions {
                host: settings.mqtt.host.clone(),
                port: settings.mqtt.port,
                // The broker relays up to twice MetaManager's limit, so an oversized message
                // still reaches MetaManager and its sender gets an error reply instead of a
                // disconnect.
                max_payload: settings.mqtt.max_payload_bytes.saturating_mul(2),
                auth: credentials,
                max_connections: descriptors::capped(DEFAULT_MAX_CONNECTIONS, open_files, 2),
                own_client_id: Some(client_id.clone()),
                own_credentials: own_credentials.clone(),
            };
            let broker = tokio::task::spawn_blocking(move || match broker_given {
                Some(listener) => EmbeddedBroker::start_on(options, listener),
                None => EmbeddedBroker::start(options),
            })
            .await
            .map_err(|e| BrokerError::Task(e.to_string()))??;
            embedded = Some((crate::broker::connect_addr(broker.addr), own_credentials));
            let links = broker.own_links.ok_or(BrokerError::Link {
                client_id: client_id.clone(),
                reason: "not registered".into(),
            })?;
            Link::start_in_process(links, topics.clone(), settings.mqtt.inflight())
        }
        BrokerMode::External => {
            // The sending connection may have an account of its own.
            let publish_credentials = credentials.clone().map(|(user, password)| {
                (
                    settings.mqtt.publish_username.clone().unwrap_or(user),
                    password,
                )
            });
            let options = LinkOptions {
                client_id,
                host: settings.mqtt.host.clone(),
                port: settings.mqtt.port,
                offline_status: status::offline_status(&settings.node_id),
                publish_credentials,
                credentials,
                tls,
                inflight: settings.mqtt.inflight(),
            };
            external = Some(options.clone());
            Link::start(options, topics.clone())
        }
    };
    let readiness = Arc::new(Readiness::new(match (&embedded, external) {
        (Some((addr, credentials)), _) => readiness::Target::Embedded {
            addr: *addr,
            credentials: Some(credentials.clone()),
        },
        (None, Some(options)) => readiness::Target::External(Box::new(options)),
        (None, None) => unreachable!("one broker mode or the other"),
    }));
    store.track_delivery(link.publisher.delivery.clone());
    let replies = ops::Replies {
        publisher: link.publisher.clone(),
        metrics: Arc::new(Metrics::new(store.metrics().clone())),
    };
    let remote_timeout = settings.meta.remote_query_timeout;
    let sync = SyncPlan {
        node_id: settings.node_id.clone(),
        max_payload: settings.mqtt.max_payload_bytes,
        full_interval: settings.meta.sync.podstatus.full_interval,
    };
    let cloud = Cloud::new(
        &store,
        &link.publisher,
        replies.metrics.clone(),
        remote_timeout,
        sync,
    );
    let rules = Arc::new(ops::Rules::from_settings(&settings));
    let ops = Arc::new(ops::Ops::new(
        Arc::new(topics),
        replies.clone(),
        store.clone(),
        cloud.clone(),
        rules.clone(),
    ));
    let serving = BrokerServing::default();
    let broker = match &embedded {
        Some((addr, _)) => addr.to_string(),
        None => format!("{}:{}", settings.mqtt.host, settings.mqtt.port),
    };
    tracing::info!(
        node_id = %settings.node_id,
        %broker,
        mode = ?settings.mqtt.mode,
        "metamanager starting"
    );

    let (stop_tx, stop) = shutdown::channel();
    let (steps_tx, steps_rx) = mpsc::channel(STEP_QUEUE);
    let dispatcher = tokio::spawn(run_dispatcher(ops.clone(), inbound, steps_tx, stop.clone()));
    let pipeline = tokio::spawn(run_pipeline(steps_rx));
    let session = tokio::spawn(keep_session(
        link.publisher.clone(),
        settings.node_id.clone(),
        cloud.state.clone(),
        link.connected.clone(),
        stop.clone(),
    ));
    let sync = tokio::spawn(
        cloud
            .metasync
            .clone()
            .run_periodic(settings.meta.sync.podstatus.interval, stop.clone()),
    );
    let drain = tokio::spawn(
        cloud
            .outbox
            .clone()
            .run_drain(settings.outbox.clone(), stop.clone()),
    );

    let http = http_listener.map(|listener| {
        let ctx = http::Context {
            store: store.clone(),
            exporter: Exporter {
                metrics: replies.metrics.clone(),
                store: store.clone(),
                outbox: cloud.outbox.clone(),
                remote: cloud.remote.clone(),
                cloud: cloud.state.clone(),
                broker_connected: link.connected.clone(),
                publisher: link.publisher.clone(),
            },
            broker_connected: link.connected.clone(),
            serving: serving.clone(),
            readiness,
            auth: api_auth,
            writes: ApiWrites::new(store.clone(), cloud.clone(), replies, rules),
        };
        let configured = &settings.http;
        let limits = http::Limits {
            connections: http::server::ConnectionLimits {
                max_connections: descriptors::capped(configured.max_connections, open_files, 4),
                header_timeout: configured.header_timeout,
                idle_timeout: configured.idle_timeout,
            },
            max_requests: configured.max_requests,
            max_watches: configured.max_watches,
            allowed_hosts: configured.allowed_hosts.clone(),
        };
        tokio::spawn(listener.serve(ctx, limits, api_tls, stop.clone()))
    });

    let embedded_addr = embedded.as_ref().map(|(addr, _)| *addr);
    let mut watchdog = embedded.map(|(addr, credentials)| {
        let check = Watchdog {
            addr,
            credentials: Some(credentials),
            interval: settings.mqtt.watchdog_interval,
            timeout: settings.mqtt.watchdog_timeout,
        };
        tokio::spawn(check.run(serving.clone(), stop.clone()))
    });
    let mut failure = None;
    match watchdog.as_mut() {
        Some(check) => tokio::select! {
            _ = shutdown => {}
            outcome = check => {
                // Before a stop the watchdog only ends by failing; a panic counts as failing too,
                // so that the service manager restarts a node whose broker is unwatched.
                let e = match outcome {
                    Ok(Err(e)) => e,
                    Ok(Ok(())) => BrokerUnresponsive::watchdog_ended(embedded_addr, "it ended".into()),
                    Err(e) => BrokerUnresponsive::watchdog_ended(embedded_addr, e.to_string()),
                };
                tracing::error!("{e}; stopping so that the service manager restarts MetaManager");
                failure = Some(e);
                watchdog = None;
            }
        },
        None => shutdown.await,
    }
    tracing::info!("shutting down: finishing in-flight work");
    stop_tx.fire();
    if let Some(http) = http {
        // Probes answer until here; open watches end on the stop flag.
        if tokio::time::timeout(DRAIN_TIMEOUT, http).await.is_err() {
            tracing::warn!("HTTP endpoint did not stop within {DRAIN_TIMEOUT:?}");
        }
    }
    let mut dispatcher = dispatcher;
    let mut pipeline = pipeline;
    let drained = async {
        let _ = (&mut dispatcher).await;
        let _ = (&mut pipeline).await;
    };
    if tokio::time::timeout(DRAIN_TIMEOUT, drained).await.is_err() {
        tracing::warn!("in-flight work did not finish within {DRAIN_TIMEOUT:?}; unacknowledged messages will be redelivered by the broker where it keeps the session");
        dispatcher.abort();
        pipeline.abort();
    }
    // Each may be waiting for room to publish on a connection that is down: bounded too.
    for mut task in [session, sync, drain] {
        if tokio::time::timeout(TASK_STOP_TIMEOUT, &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
    if let Some(mut check) = watchdog {
        if tokio::time::timeout(TASK_STOP_TIMEOUT, &mut check)
            .await
            .is_err()
        {
            check.abort();
        }
    }
    let offline = link
        .publisher
        .status(status::offline_status(&settings.node_id));
    if tokio::time::timeout(TASK_STOP_TIMEOUT, offline)
        .await
        .is_err()
    {
        tracing::warn!(
            "could not publish the offline status; the broker publishes the last will instead"
        );
    }
    link.shutdown().await;
    store.close().await;
    tracing::info!("stopped");
    match failure {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

async fn run_dispatcher(
    ops: Arc<ops::Ops>,
    mut inbound: Incoming,
    steps: mpsc::Sender<Step>,
    mut stop: Shutdown,
) {
    loop {
        let publish = tokio::select! {
            next = inbound.recv() => next,
            _ = stop.wait() => None,
        };
        let Some(publish) = publish else {
            break;
        };
        let step = ops.dispatch(publish).await;
        if steps.send(step).await.is_err() {
            return;
        }
    }
    // Stopping: hand on what already arrived (the broker sees it acknowledged once handled),
    // then end; what arrives later stays unacknowledged and is redelivered.
    while let Some(publish) = inbound.try_recv() {
        let step = ops.dispatch(publish).await;
        if steps.send(step).await.is_err() {
            return;
        }
    }
}

/// Runs the steps in arrival order.
async fn run_pipeline(mut steps: mpsc::Receiver<Step>) {
    while let Some(step) = steps.recv().await {
        step.await;
    }
}

/// On every broker (re)connection: republish the online status (the link resubscribes). On every
/// change of the cloud state: republish the status.
async fn keep_session(
    publisher: Publisher,
    node_id: String,
    cloud_state: CloudState,
    mut connected: watch::Receiver<bool>,
    mut stop: Shutdown,
) {
    let mut cloud = cloud_state.watch();
    let online = || status::online_status(&node_id, cloud_state.connected());
    loop {
        tokio::select! {
            changed = connected.changed() => {
                if changed.is_err() {
                    return;
                }
                if *connected.borrow_and_update() {
                    publisher.status(online()).await;
                }
            }
            changed = cloud.changed() => {
                if changed.is_err() {
                    return;
                }
                cloud.borrow_and_update();
                if *connected.borrow() {
                    publisher.status(online()).await;
                }
            }
            _ = stop.wait() => return,
        }
    }
}
