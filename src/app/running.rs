//! Running: the tasks started from the built parts, and their stop in the order the module doc
//! of [`crate::app`] gives.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinHandle};

use super::build::App;
use crate::cloud::CloudState;
use crate::mqtt::{Incoming, Link, Publisher};
use crate::ops::{Ops, Step};
use crate::shutdown::{self, Shutdown, Trigger};
use crate::status;
use crate::store::Store;
use crate::watchdog::BrokerUnresponsive;

/// Steps queued between the dispatcher and the pipeline; bounds memory under a burst.
const STEP_QUEUE: usize = 4096;
/// How long shutdown waits for queued work before giving up on it.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for each background task, and for the offline status to be queued.
const TASK_STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// The running parts, held in the order they stop in: [`Running::stop`] takes them one field
/// after the other.
pub(super) struct Running {
    stop: Trigger,
    /// First the HTTP endpoint: probes answer until the stop; open watches end on it.
    http: Option<JoinHandle<()>>,
    /// Then the in-flight work.
    work: Work,
    /// Then every other task, each given [`TASK_STOP_TIMEOUT`]: each may be waiting for room
    /// to publish on a connection that is down.
    background: Background,
    /// The embedded broker's watchdog, watched for failure until the stop and then one of the
    /// background tasks.
    watchdog: Option<(SocketAddr, JoinHandle<Result<(), BrokerUnresponsive>>)>,
    /// Last the offline status, the link and the store.
    closing: Closing,
}

impl Running {
    /// Starts every task of `app`.
    pub fn start(app: App) -> Self {
        let (trigger, stop) = shutdown::channel();
        let (steps_tx, steps_rx) = mpsc::channel(STEP_QUEUE);
        // The channel is empty: this first step cannot find it full.
        let _ = steps_tx.try_send(app.ops.resend_forwards());
        let work = Work {
            dispatcher: tokio::spawn(run_dispatcher(app.ops, app.inbound, steps_tx, stop.clone())),
            pipeline: tokio::spawn(run_pipeline(steps_rx)),
        };
        let mut background = Background::default();
        background.spawn(
            Session {
                publisher: app.link.publisher.clone(),
                node_id: app.node_id.clone(),
                cloud_state: app.cloud.state.clone(),
                store: app.store.clone(),
            }
            .keep(app.link.connected.clone(), stop.clone()),
        );
        background.spawn(maintain_store(app.store.clone(), stop.clone()));
        background.spawn(app.cloud.state.clone().warn_if_bridge_silent(stop.clone()));
        let metasync = app.cloud.metasync.clone();
        background.spawn(metasync.run_periodic(app.podstatus_interval, stop.clone()));
        background.spawn(app.cloud.outbox.clone().run_drain(app.outbox, stop.clone()));
        let http = app.http.map(|endpoint| {
            let serve = endpoint.listener.serve(
                endpoint.context,
                endpoint.limits,
                endpoint.tls,
                stop.clone(),
            );
            tokio::spawn(serve)
        });
        let watchdog = app.watchdog.map(|check| {
            let addr = check.addr;
            (addr, tokio::spawn(check.run(app.serving.clone(), stop)))
        });
        Self {
            stop: trigger,
            http,
            work,
            background,
            watchdog,
            closing: Closing {
                node_id: app.node_id,
                link: app.link,
                store: app.store,
            },
        }
    }

    /// Runs until `shutdown` resolves or the watchdog finds the embedded broker unresponsive,
    /// which is returned.
    pub async fn until_stopped(
        &mut self,
        shutdown: impl Future<Output = ()>,
    ) -> Option<BrokerUnresponsive> {
        let Some((addr, check)) = self.watchdog.as_mut() else {
            shutdown.await;
            return None;
        };
        tokio::select! {
            _ = shutdown => {}
            outcome = check => {
                // Before a stop the watchdog only ends by failing; a panic counts as failing too,
                // so that the service manager restarts a node whose broker is unwatched.
                let e = match outcome {
                    Ok(Err(e)) => e,
                    Ok(Ok(())) => BrokerUnresponsive::watchdog_ended(Some(*addr), "it ended".into()),
                    Err(e) => BrokerUnresponsive::watchdog_ended(Some(*addr), e.to_string()),
                };
                tracing::error!("{e}; stopping so that the service manager restarts MetaManager");
                self.watchdog = None;
                return Some(e);
            }
        }
        // Still running: it stops after the other background tasks.
        if let Some((_, check)) = self.watchdog.take() {
            self.background.adopt(check);
        }
        None
    }

    /// Stops everything, finishing in-flight work first.
    pub async fn stop(self) {
        tracing::info!("shutting down: finishing in-flight work");
        self.stop.fire();
        if let Some(http) = self.http {
            // Probes answer until here; open watches end on the stop flag.
            if tokio::time::timeout(DRAIN_TIMEOUT, http).await.is_err() {
                tracing::warn!("HTTP endpoint did not stop within {DRAIN_TIMEOUT:?}");
            }
        }
        self.work.finish().await;
        self.background.stop().await;
        self.closing.close().await;
        tracing::info!("stopped");
    }
}

/// The dispatcher and the pipeline: what has been received and not yet finished.
struct Work {
    dispatcher: JoinHandle<()>,
    pipeline: JoinHandle<()>,
}

impl Work {
    /// Lets the dispatcher hand on what it received and the pipeline run every queued step,
    /// for at most [`DRAIN_TIMEOUT`].
    async fn finish(self) {
        let Self {
            mut dispatcher,
            mut pipeline,
        } = self;
        let drained = async {
            let _ = (&mut dispatcher).await;
            let _ = (&mut pipeline).await;
        };
        if tokio::time::timeout(DRAIN_TIMEOUT, drained).await.is_err() {
            tracing::warn!("in-flight work did not finish within {DRAIN_TIMEOUT:?}; unacknowledged messages will be redelivered by the broker where it keeps the session");
            dispatcher.abort();
            pipeline.abort();
        }
    }
}

/// Tasks that end on the stop signal, stopped in the order they were started.
#[derive(Default)]
struct Background(Vec<(AbortHandle, Ended)>);

/// Resolves when a task has ended, whatever its outcome.
type Ended = Pin<Box<dyn Future<Output = ()> + Send>>;

impl Background {
    fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.adopt(tokio::spawn(task));
    }

    /// Takes a task already running, to be stopped with the others.
    fn adopt<T: Send + 'static>(&mut self, task: JoinHandle<T>) {
        let abort = task.abort_handle();
        self.0.push((
            abort,
            Box::pin(async move {
                let _ = task.await;
            }),
        ));
    }

    /// Waits for each task in turn, at most [`TASK_STOP_TIMEOUT`], and aborts it after that.
    async fn stop(self) {
        for (abort, ended) in self.0 {
            if tokio::time::timeout(TASK_STOP_TIMEOUT, ended)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

/// What closes last: the offline status and the link, then the store.
struct Closing {
    node_id: String,
    link: Link,
    store: Store,
}

impl Closing {
    async fn close(self) {
        let offline = self
            .link
            .publisher
            .status(status::offline_status(&self.node_id));
        if tokio::time::timeout(TASK_STOP_TIMEOUT, offline)
            .await
            .is_err()
        {
            tracing::warn!(
                "could not publish the offline status; the broker publishes the last will instead"
            );
        }
        self.link.shutdown().await;
        self.store.close().await;
    }
}

async fn run_dispatcher(
    ops: Arc<Ops>,
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

/// What the retained status is made of, republished when any of it changes.
struct Session {
    publisher: Publisher,
    node_id: String,
    cloud_state: CloudState,
    store: Store,
}

impl Session {
    /// On every broker (re)connection: republish the online status (the link resubscribes).
    /// On every change of the cloud state or of the store's room: republish the status.
    async fn keep(self, mut connected: watch::Receiver<bool>, mut stop: Shutdown) {
        let mut cloud = self.cloud_state.watch();
        let mut room = self.store.space().watch();
        let online = || {
            status::online_status(
                &self.node_id,
                self.cloud_state.connected(),
                self.store.space().full().is_some(),
            )
        };
        loop {
            // Whether to republish now; `None` once the stop comes or a source is gone.
            let republish = tokio::select! {
                changed = connected.changed() => {
                    changed.is_ok().then(|| *connected.borrow_and_update())
                }
                changed = cloud.changed() => changed.is_ok().then(|| {
                    cloud.borrow_and_update();
                    *connected.borrow()
                }),
                changed = room.changed() => changed.is_ok().then(|| {
                    room.borrow_and_update();
                    *connected.borrow()
                }),
                _ = stop.wait() => None,
            };
            match republish {
                Some(true) => self.publisher.status(online()).await,
                Some(false) => {}
                None => return,
            }
        }
    }
}

/// How often the store's writer compacts, and, while the store is full, looks for room.
const MAINTAIN_EVERY: Duration = Duration::from_secs(10);

/// Asks the store for its periodic work ([`Store::maintain`]) until the stop.
async fn maintain_store(store: Store, mut stop: Shutdown) {
    let mut every = tokio::time::interval(MAINTAIN_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        tokio::select! {
            _ = every.tick() => {
                if store.maintain().await.is_err() {
                    return;
                }
            }
            _ = stop.wait() => return,
        }
    }
}
