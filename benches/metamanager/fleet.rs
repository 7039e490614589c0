//! The fleet's load: what one node puts on the central broker a day, measured at the central
//! broker, and what that makes for 10 000 and 100 000 nodes (`-- --fleet`).
//!
//! Each node is a node-local mosquitto bridged to a central mosquitto as
//! conf/mosquitto-bridge.conf does it, MetaManager on the node's broker and edged played by the
//! bench ([`node`]). Every client of the central broker (the bridges and the cloud's clients)
//! connects through a [`meter::Meter`], which counts each MQTT packet both ways. Three states:
//!
//! - **idle**: 100 pods and their statuses held, nothing changes;
//! - **churn**: the same, and a pod started and stopped every minute: the cloud inserts it,
//!   edged reports it Pending then Running and answers, the cloud deletes it, edged answers;
//! - **away**: the link is cut, an hour of the cloud's churn is queued at the centre and edged
//!   reports 10 pods' restarts every minute into the outbox, then the link comes back and the
//!   cloud reconciles as topics.md 10.4 says.
//!
//! Idle and churn run at the defaults in real time (MetaSync every 60 s, the bridge's keepalive
//! 30 s), measured over whole MetaSync periods and scaled to a day. The away node's hour is
//! played quickly: nothing in it depends on time but what is sent.
//!
//! Then, when RabbitMQ is installed, 20 nodes bridge to one RabbitMQ node with MetaSync every
//! 10 s and a pod cycle each period, and the broker-level rate is set beside 20 times one
//! node's.

mod meter;
mod node;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, QoS};
use serde_json::Value;
use tokio::sync::broadcast;

use crate::harness::cloud::Cloud;
use crate::harness::Client;
use meter::{Flow, Meter, Snapshot, Traffic};
use node::{Fixtures, Node};

// tests/common/rabbitmq.rs, as the tests start it: it finds these two beside it.
use crate::harness::process;
/// The node name of the tests' per-node accounts; the bench logs in with the tests' all-topics
/// account instead.
const NODE: &str = "edge-node";
#[path = "../../tests/common/rabbitmq.rs"]
#[allow(dead_code)]
mod rabbitmq;

/// Pods (and statuses) each measured node holds.
const PODS: usize = 100;
const SECONDS_A_DAY: f64 = 86_400.0;
/// The defaults the day is made of.
const INTERVAL: Duration = Duration::from_secs(60);
const FULL_RUNS_A_DAY: f64 = 2.0;
/// The outage: an hour of the churn (a cycle a minute), and 10 pods restarting every minute.
const AWAY_MINUTES: usize = 60;
const RESTARTING: usize = 10;
/// The RabbitMQ check.
const RABBIT_NODES: usize = 20;
const RABBIT_PODS: usize = 10;
const RABBIT_INTERVAL: Duration = Duration::from_secs(10);

/// Packet types that belong to a cloud process, not to any one node: its connection and its
/// keepalive, shared by every node it serves.
const CLOUD_OWN: [usize; 6] = [
    meter::CONNECT,
    meter::CONNACK,
    meter::SUBSCRIBE,
    meter::SUBACK,
    meter::PINGREQ,
    meter::PINGRESP,
];

pub async fn run(dir: &Path, quick: bool) {
    let periods = if quick { 2 } else { 5 };
    println!("## Fleet: one node's load at the central broker\n");
    println!("load average at the start: {}\n", load());
    let fixtures = Fixtures::load();
    let central = central_mosquitto();
    let meter = Meter::start(central.port, Arc::new(label)).await;

    let idle = State::start(&meter, "fleet-idle", dir, &fixtures, None, "").await;
    let churn = State::start(&meter, "fleet-churn", dir, &fixtures, None, "").await;
    let cycling = churn.cloud.churn(&fixtures, INTERVAL);
    let (idle_m, churn_m) = tokio::join!(
        idle.measure(&meter, periods),
        churn.measure(&meter, periods)
    );
    cycling.abort();
    print_state("idle", &idle_m, periods);
    print_state(
        "churn (a pod started and stopped every minute)",
        &churn_m,
        periods,
    );
    let away = away(&meter, dir, &fixtures).await;
    print_away(&away);
    idle.node.stop();
    churn.node.stop();
    let sys = sys_check(&central, &meter).await;
    drop(meter);
    drop(central);
    print_sys(&sys);
    print_fleet(&idle_m, &churn_m, &away);
    println!("load average at the end: {}\n", load());

    match rabbit_check(dir, &fixtures, quick).await {
        Some(check) => print_rabbit(&check),
        None => println!("## RabbitMQ check\n\nskipped: rabbitmq-server is not installed\n"),
    }
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A central mosquitto as it comes (in-flight and queue limits at their defaults), with its
/// `$SYS` counters published every second for the cross-check.
fn central_mosquitto() -> crate::harness::Mosquitto {
    let binary = process::find_mosquitto().expect("mosquitto is installed");
    crate::harness::Mosquitto::start_with(&binary, |port, _| {
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             sys_interval 1\nset_tcp_nodelay true\n"
        )
    })
}

/// What a publish carries, for the report's rows.
fn label(topic: &str, payload: &[u8]) -> String {
    if topic.ends_with("/metamanager/status") {
        return "status (retained)".into();
    }
    let Ok(m) = serde_json::from_slice::<Value>(payload) else {
        return "not JSON".into();
    };
    let route = &m["route"];
    let operation = route["operation"].as_str().unwrap_or("?");
    let resource = route["resource"].as_str().unwrap_or_default();
    let parts: Vec<&str> = resource.split('/').collect();
    let rtype = parts.get(1).copied().unwrap_or_default();
    let held = parts.get(2).is_some_and(|n| n.starts_with("pod-"));
    let of = if held { " (a held pod)" } else { "" };
    if route["source"] == "metamanager" {
        return match operation {
            "digest" => "digest".into(),
            "response" if m["content"] == "OK" => "ack from MetaManager".into(),
            "response" => format!("answer to a query of {rtype}"),
            "update" if parts.len() == 2 => "MetaSync statuses".into(),
            _ => format!("{operation} {rtype} from MetaManager"),
        };
    }
    match operation {
        "response" => format!("response {rtype} from edged"),
        "query" if m["content"]["versions"] == true => format!("versions query {rtype}"),
        _ => format!("{operation} {rtype}{of}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The cloud's side of one node

/// The cloud's client for one node, on the central broker: it reads what the node sends,
/// tells its digests apart, and can play the pod churn.
struct CloudSide {
    node: String,
    client: AsyncClient,
    digests: broadcast::Sender<()>,
    reading: tokio::task::JoinHandle<()>,
}

impl CloudSide {
    async fn connect(port: u16, node: &str, login: Option<&(String, String)>) -> Self {
        let uplink = format!("edge/{node}/metamanager/to/edgehub");
        let status = format!("edge/{node}/metamanager/status");
        let mut c =
            Client::connect_as(port, &format!("cloud-{node}"), &[&uplink, &status], login).await;
        let client = c.client.clone();
        let (digests, _) = broadcast::channel(64);
        let tx = digests.clone();
        let reading = tokio::spawn(async move {
            while let Some((_, payload)) = c.received.recv().await {
                if crate::harness::contains(&payload, br#""operation":"digest""#) {
                    let _ = tx.send(());
                }
            }
        });
        Self {
            node: node.to_owned(),
            client,
            digests,
            reading,
        }
    }

    /// After each digest: a quarter of `period` later the cloud inserts a pod, three quarters
    /// later it deletes it (15 and 45 s at the default interval). Aligned on MetaSync, so that
    /// every measured period holds exactly one cycle.
    fn churn(&self, fixtures: &Fixtures, period: Duration) -> tokio::task::JoinHandle<()> {
        let mut digests = self.digests.subscribe();
        let client = self.client.clone();
        let node = self.node.clone();
        let template = fixtures.pod.clone();
        tokio::spawn(async move {
            for k in 0.. {
                if next_digest(&mut digests, period * 3).await.is_none() {
                    continue;
                }
                let name = format!("cycle-{k}");
                let resource = format!("default/pod/{name}");
                let pod = node::pod(&template, &name, 1000 + k);
                tokio::time::sleep(period / 4).await;
                send(&client, &node, format!("i{k}"), "insert", &resource, pod).await;
                tokio::time::sleep(period / 2).await;
                let delete = node::pod_ref(&name);
                send(&client, &node, format!("d{k}"), "delete", &resource, delete).await;
            }
        })
    }
}

/// The cloud's `operation` of `resource` to `node`, at QoS 1; its msg_id ends in `id`.
async fn send(
    client: &AsyncClient,
    node: &str,
    id: String,
    operation: &str,
    resource: &str,
    content: Value,
) {
    let m = node::message(
        &format!("cloud-{node}-{id}"),
        "edgecontroller",
        operation,
        resource,
        content,
    );
    let topic = format!("edge/{node}/edgehub/to/metamanager");
    let _ = client.publish(topic, QoS::AtLeastOnce, false, m).await;
}

impl Drop for CloudSide {
    fn drop(&mut self) {
        self.reading.abort();
    }
}

async fn next_digest(digests: &mut broadcast::Receiver<()>, within: Duration) -> Option<()> {
    loop {
        match tokio::time::timeout(within, digests.recv()).await {
            Ok(Ok(())) => return Some(()),
            Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
            _ => return None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Idle and churn

/// A node and its cloud client.
struct State {
    node: Node,
    cloud: CloudSide,
    /// The node's link and its cloud client's traffic from the start until the connect's
    /// MetaSync run (statuses and digest) was through.
    startup: (Traffic, Traffic),
}

/// A node's traffic over whole MetaSync periods, and at start-up.
struct Measured {
    node: String,
    /// The node's link (its bridge's connection).
    link: Traffic,
    /// Its cloud client's, without the client's own connection and keepalive.
    cloud: Traffic,
    periods: usize,
    took: Duration,
    startup: (Traffic, Traffic),
}

impl State {
    async fn start(
        meter: &Meter,
        id: &str,
        dir: &Path,
        fixtures: &Fixtures,
        login: Option<(String, String)>,
        meta: &str,
    ) -> State {
        let cloud = CloudSide::connect(meter.port, id, login.as_ref()).await;
        let mut first = cloud.digests.subscribe();
        let node = Node::start(id, PODS, meter.port, login, dir, meta, fixtures).await;
        next_digest(&mut first, Duration::from_secs(120))
            .await
            .expect("the connect's digest");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let s = meter.snapshot();
        let startup = (s.of(|c| c == node.bridge_id), s.of(cloud_of(id)));
        State {
            node,
            cloud,
            startup,
        }
    }

    /// `n` whole MetaSync periods, from a second after one digest to a second after the n-th
    /// next.
    async fn measure(&self, meter: &Meter, n: usize) -> Measured {
        let mut digests = self.cloud.digests.subscribe();
        let within = INTERVAL * 3;
        next_digest(&mut digests, within).await.expect("a digest");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (a, started) = (meter.snapshot(), Instant::now());
        for _ in 0..n {
            next_digest(&mut digests, within).await.expect("a digest");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let b = meter.snapshot();
        let id = self.node.id.clone();
        let (link, cloud) = between(&a, &b, &self.node.bridge_id, &id);
        Measured {
            node: id,
            link,
            cloud,
            periods: n,
            took: started.elapsed(),
            startup: self.startup.clone(),
        }
    }
}

fn cloud_of(node: &str) -> impl Fn(&str) -> bool + '_ {
    move |c: &str| {
        c.strip_prefix("cloud-")
            .and_then(|rest| rest.strip_prefix(node))
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
    }
}

/// The node's link and its cloud client's traffic between two snapshots.
fn between(a: &Snapshot, b: &Snapshot, bridge: &str, node: &str) -> (Traffic, Traffic) {
    let link = b.of(|c| c == bridge).minus(&a.of(|c| c == bridge));
    let cloud = b.of(cloud_of(node)).minus(&a.of(cloud_of(node)));
    (link, cloud.without(&CLOUD_OWN))
}

// ---------------------------------------------------------------------------------------------
// Away for an hour

struct Away {
    link: Traffic,
    cloud: Traffic,
    /// What the central broker received from the cloud client while the link was cut (the
    /// meter's count).
    cloud_sent: Flow,
    /// How many more messages the central broker held, not retained, at the end of the outage
    /// than at its start: its `$SYS` store count less its retained count (`None` when `$SYS`
    /// could not be read).
    held: Option<i64>,
    /// What edged reported into the outbox while the link was cut.
    outbox_updates: usize,
    scopes_differing: Vec<String>,
    sent: usize,
    deleted: usize,
    until_quiet: Duration,
    /// The node's digest of the pods equals the cloud's afterwards.
    agrees_after: bool,
}

async fn away(meter: &Meter, dir: &Path, fixtures: &Fixtures) -> Away {
    let id = "fleet-away";
    let mut cloud = Cloud::connect(meter.port, "edge", id).await;
    for i in 0..PODS {
        let name = format!("pod-{i:03}");
        cloud.objects.insert(
            format!("default/pod/{name}"),
            node::pod(&fixtures.pod, &name, 1),
        );
    }
    let node = Node::start(id, PODS, meter.port, None, dir, "", fixtures).await;
    node.cloud_is("connected").await;
    // The node holds what the cloud holds before it goes away.
    assert!(
        cloud.agrees_on(|s| s.ends_with("/pod")).await,
        "{id} agrees with the cloud"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    cloud.forget_unread();
    meter.cut(&node.bridge_id);
    node.cloud_is("disconnected").await;
    let cut = meter.snapshot();
    // The central broker's store, before the outage's messages: `$SYS` is published every
    // second.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held_before = held_at(meter).await;
    let acked_before = node.edged_acked.load(std::sync::atomic::Ordering::Relaxed);
    for k in 0..AWAY_MINUTES {
        let name = format!("cycle-{k}");
        let resource = format!("default/pod/{name}");
        cloud
            .send(
                "insert",
                &resource,
                node::pod(&fixtures.pod, &name, 2000 + k as u64),
            )
            .await;
        cloud.send("delete", &resource, node::pod_ref(&name)).await;
        for p in 0..RESTARTING {
            node.edged_status_update(&format!("pod-{p:03}"), k as u64 + 1, fixtures)
                .await;
        }
    }
    let updates = AWAY_MINUTES * RESTARTING;
    let acked = || node.edged_acked.load(std::sync::atomic::Ordering::Relaxed);
    let waiting = Instant::now();
    while acked() < acked_before + updates {
        assert!(
            waiting.elapsed() < Duration::from_secs(120),
            "MetaManager acked edged's updates"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The cloud's publishes reach the central broker's queue for the bridge's session.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held_after = held_at(meter).await;

    let before = meter.snapshot();
    let cloud_sent = before
        .of(cloud_of(id))
        .minus(&cut.of(cloud_of(id)))
        .to_broker;
    let restored = Instant::now();
    meter.restore(&node.bridge_id);
    let done = cloud.reconcile_scopes(|s| s.ends_with("/pod")).await;
    // Until the link has been quiet for 5 s: the edged replies to the queued churn, the
    // outbox and the full MetaSync run are through.
    let mut last = meter.snapshot().of(|c| c == node.bridge_id);
    let mut quiet = 0;
    while quiet < 5 && restored.elapsed() < Duration::from_secs(180) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = meter.snapshot().of(|c| c == node.bridge_id);
        quiet = if now == last { quiet + 1 } else { 0 };
        last = now;
    }
    let until_quiet = restored.elapsed() - Duration::from_secs(5);
    let after = meter.snapshot();
    let (link, cloud_traffic) = between(&before, &after, &node.bridge_id, id);
    let agrees_after = cloud.agrees_on(|s| s.ends_with("/pod")).await;
    node.stop();
    Away {
        link,
        cloud: cloud_traffic,
        cloud_sent,
        held: held_before.zip(held_after).map(|(a, b)| b - a),
        outbox_updates: updates,
        scopes_differing: done.scopes,
        sent: done.sent,
        deleted: done.deleted,
        until_quiet,
        agrees_after,
    }
}

// ---------------------------------------------------------------------------------------------
// mosquitto's own count

struct SysCheck {
    /// `$SYS/broker/...` topic → value, as the central broker published it last.
    sys: BTreeMap<String, u64>,
    metered: Traffic,
}

/// The central broker's own counters beside the meter's, the nodes stopped: read with
/// `mosquitto_sub`, which connects directly (not through the meter), from the retained values
/// of the last `$SYS` update before it connected.
async fn sys_check(central: &crate::harness::Mosquitto, meter: &Meter) -> SysCheck {
    tokio::time::sleep(Duration::from_secs(3)).await;
    let metered = meter.snapshot().all();
    let sys = read_sys(
        central.port,
        None,
        &[
            "$SYS/broker/bytes/+",
            "$SYS/broker/messages/+",
            "$SYS/broker/publish/messages/+",
        ],
    )
    .await;
    SysCheck { sys, metered }
}

/// The retained values of `topics` (`$SYS` counters) on the broker on `port` (the broker's
/// own, or the meter's), read with `mosquitto_sub` as client `id` if given.
async fn read_sys(port: u16, id: Option<&str>, topics: &[&str]) -> BTreeMap<String, u64> {
    let mut args = vec!["-p".to_owned(), port.to_string(), "-v".into(), "-W".into()];
    args.push("1".into());
    if let Some(id) = id {
        args.extend(["-i".to_owned(), id.to_owned()]);
    }
    for t in topics {
        args.extend(["-t".to_owned(), (*t).to_owned()]);
    }
    let read = tokio::task::spawn_blocking(move || {
        std::process::Command::new("mosquitto_sub")
            .args(&args)
            .output()
    })
    .await
    .expect("mosquitto_sub ran")
    .expect("mosquitto_sub (mosquitto-clients) is installed");
    let mut sys = BTreeMap::new();
    // A topic may hold a space (`retained messages/count`); the values do not.
    for line in String::from_utf8_lossy(&read.stdout).lines() {
        if let Some((topic, value)) = line.rsplit_once(' ') {
            sys.entry(topic.to_owned())
                .or_insert(value.trim().parse().unwrap_or(0));
        }
    }
    sys
}

/// The messages the central broker holds that are not retained (queued for sessions, in
/// flight): its store's count less its retained messages', as its `$SYS` says. Read through
/// the meter, so that the meter and `$SYS` both count the reading (see [`sys_check`]); its
/// client id is no node's and no cloud client's.
async fn held_at(meter: &Meter) -> Option<i64> {
    const STORE: &str = "$SYS/broker/store/messages/count";
    const RETAINED: &str = "$SYS/broker/retained messages/count";
    let sys = read_sys(meter.port, Some("fleet-sys-reader"), &[STORE, RETAINED]).await;
    Some(*sys.get(STORE)? as i64 - *sys.get(RETAINED)? as i64)
}

// ---------------------------------------------------------------------------------------------
// RabbitMQ

struct RabbitCheck {
    /// One node alone: per second, over whole periods (link and cloud client, all packets).
    one: Traffic,
    one_seconds: f64,
    /// All 20 at once, at the broker: every connection, over a fixed window.
    all: Traffic,
    all_seconds: f64,
    nodes: usize,
}

async fn rabbit_check(dir: &Path, fixtures: &Fixtures, quick: bool) -> Option<RabbitCheck> {
    let lease = rabbitmq::lease().await?;
    let login = lease.login(rabbitmq::TESTER);
    let meter = Meter::start(lease.port, Arc::new(label)).await;
    let meta = format!(
        "meta:\n  sync:\n    podstatus:\n      interval: {}\n",
        RABBIT_INTERVAL.as_secs()
    );
    let start = |id: String| {
        let (meter, login, meta) = (&meter, login.clone(), meta.clone());
        async move {
            let cloud = CloudSide::connect(meter.port, &id, Some(&login)).await;
            let cycling = cloud.churn(fixtures, RABBIT_INTERVAL);
            let mut first = cloud.digests.subscribe();
            let node = Node::start(
                &id,
                RABBIT_PODS,
                meter.port,
                Some(login),
                dir,
                &meta,
                fixtures,
            )
            .await;
            next_digest(&mut first, Duration::from_secs(120))
                .await
                .expect("the connect's digest");
            (node, cloud, cycling)
        }
    };

    // One node, over whole periods.
    let (node, cloud, cycling) = start("rmq-one".into()).await;
    let mut digests = cloud.digests.subscribe();
    let periods = if quick { 2 } else { 4 };
    // One periodic run after the connect's, then whole periods.
    next_digest(&mut digests, RABBIT_INTERVAL * 3)
        .await
        .expect("a digest");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let a = meter.snapshot();
    for _ in 0..periods {
        next_digest(&mut digests, RABBIT_INTERVAL * 3)
            .await
            .expect("a digest");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b = meter.snapshot();
    let mine = |c: &str| c == node.bridge_id || cloud_of("rmq-one")(c);
    let one = b.of(mine).minus(&a.of(mine));
    let one_seconds = (RABBIT_INTERVAL * periods as u32).as_secs_f64();
    cycling.abort();
    node.stop();
    drop(cloud);

    // Twenty.
    let mut fleet = Vec::new();
    for i in 0..RABBIT_NODES {
        fleet.push(start(format!("rmq-{i:02}")).await);
    }
    // Two periods for the last connect's burst to pass.
    tokio::time::sleep(RABBIT_INTERVAL * 2).await;
    let window = if quick {
        Duration::from_secs(40)
    } else {
        Duration::from_secs(120)
    };
    let of_fleet = |c: &str| c.contains("rmq-") && !c.contains("rmq-one");
    let a = meter.snapshot().of(of_fleet);
    tokio::time::sleep(window).await;
    let all = meter.snapshot().of(of_fleet).minus(&a);
    for (node, cloud, cycling) in fleet {
        cycling.abort();
        node.stop();
        drop(cloud);
    }
    drop(lease);
    Some(RabbitCheck {
        one,
        one_seconds,
        all,
        all_seconds: window.as_secs_f64(),
        nodes: RABBIT_NODES,
    })
}

// ---------------------------------------------------------------------------------------------
// The report

/// Counts of one direction, scaled (a day, a second).
#[derive(Debug, Clone, Copy, Default)]
struct Rate {
    publishes: f64,
    packets: f64,
    payload: f64,
    mqtt: f64,
}

impl Rate {
    fn of(flow: &Flow, factor: f64) -> Rate {
        Rate {
            publishes: flow.packets[meter::PUBLISH] as f64 * factor,
            packets: flow.all_packets() as f64 * factor,
            payload: flow.payload_bytes() as f64 * factor,
            mqtt: flow.all_bytes() as f64 * factor,
        }
    }

    fn plus(self, o: Rate) -> Rate {
        Rate {
            publishes: self.publishes + o.publishes,
            packets: self.packets + o.packets,
            payload: self.payload + o.payload,
            mqtt: self.mqtt + o.mqtt,
        }
    }

    fn times(self, f: f64) -> Rate {
        Rate {
            publishes: self.publishes * f,
            packets: self.packets * f,
            payload: self.payload * f,
            mqtt: self.mqtt * f,
        }
    }
}

/// IPv4 and TCP headers with the timestamp option, a segment.
const TCP_IP: f64 = 52.0;
/// A TLS 1.3 record with AES-GCM: header, content type, tag.
const TLS_RECORD: f64 = 22.0;

/// One node's four flows at the central broker.
#[derive(Debug, Clone, Copy, Default)]
struct Day {
    link_up: Rate,
    link_down: Rate,
    cloud_in: Rate,
    cloud_out: Rate,
}

impl Day {
    fn central_in(&self) -> Rate {
        self.link_up.plus(self.cloud_in)
    }

    fn central_out(&self) -> Rate {
        self.link_down.plus(self.cloud_out)
    }
}

/// The label of MetaSync's status updates.
const FULL_RUN: &str = "MetaSync statuses";

/// The MetaSync full run's statuses in the start-up traffic, and their PUBACKs, as the meter
/// counted them (each PUBACK matched to its publish by packet id).
fn full_run(startup: &(Traffic, Traffic)) -> Day {
    let (link, cloud) = startup;
    let publishes = |f: &Flow| {
        let k = f.publishes.get(FULL_RUN).copied().unwrap_or_default();
        Rate {
            publishes: k.count as f64,
            packets: k.count as f64,
            payload: k.payload_bytes as f64,
            mqtt: k.mqtt_bytes as f64,
        }
    };
    let acks = |f: &Flow| {
        let k = f.acks.get(FULL_RUN).copied().unwrap_or_default();
        Rate {
            publishes: 0.0,
            packets: k.count as f64,
            payload: 0.0,
            mqtt: k.mqtt_bytes as f64,
        }
    };
    Day {
        link_up: publishes(&link.to_broker),
        link_down: acks(&link.from_broker),
        cloud_in: acks(&cloud.to_broker),
        cloud_out: publishes(&cloud.from_broker),
    }
}

impl Measured {
    /// The measured periods scaled to a day at the default interval, plus two full runs.
    fn day(&self) -> Day {
        let f = SECONDS_A_DAY / INTERVAL.as_secs_f64() / self.periods as f64;
        let full = full_run(&self.startup);
        Day {
            link_up: Rate::of(&self.link.to_broker, f).plus(full.link_up.times(FULL_RUNS_A_DAY)),
            link_down: Rate::of(&self.link.from_broker, f)
                .plus(full.link_down.times(FULL_RUNS_A_DAY)),
            cloud_in: Rate::of(&self.cloud.to_broker, f).plus(full.cloud_in.times(FULL_RUNS_A_DAY)),
            cloud_out: Rate::of(&self.cloud.from_broker, f)
                .plus(full.cloud_out.times(FULL_RUNS_A_DAY)),
        }
    }
}

fn kb(bytes: f64) -> String {
    format!("{:.1} KB", bytes / 1000.0)
}

fn print_publishes(flow: &Flow, per: f64) {
    for (label, k) in &flow.publishes {
        println!(
            "| {label} | {:.2} | {:.0} | {:.0} |",
            k.count as f64 / per,
            k.payload_bytes as f64 / per,
            k.mqtt_bytes as f64 / per
        );
    }
    let others: Vec<String> = [
        (meter::PUBACK, "PUBACK"),
        (meter::PINGREQ, "PINGREQ"),
        (meter::PINGRESP, "PINGRESP"),
        (meter::CONNECT, "CONNECT"),
        (meter::CONNACK, "CONNACK"),
        (meter::SUBSCRIBE, "SUBSCRIBE"),
        (meter::SUBACK, "SUBACK"),
        (meter::UNSUBSCRIBE, "UNSUBSCRIBE"),
        (meter::UNSUBACK, "UNSUBACK"),
    ]
    .iter()
    .filter(|(t, _)| flow.packets[*t] > 0)
    .map(|(t, name)| {
        format!(
            "{name} {:.2} ({:.0} B)",
            flow.packets[*t] as f64 / per,
            flow.bytes[*t] as f64 / per
        )
    })
    .collect();
    println!(
        "| *other packets: {}* | | | |",
        if others.is_empty() {
            "none".to_owned()
        } else {
            others.join(", ")
        }
    );
}

/// What `mqtt` bytes in `packets` packets make on the wire, estimated (derived, not measured):
/// each packet in a TCP segment of its own in a TLS record, and at most a pure ACK back.
fn on_the_wire(mqtt: f64, packets: f64) -> String {
    format!(
        "{} – {}",
        kb(mqtt + packets * (TCP_IP + TLS_RECORD)),
        kb(mqtt + packets * (2.0 * TCP_IP + TLS_RECORD))
    )
}

fn print_day_table(day: &Day) {
    println!("| flow | publishes | MQTT packets | payload | MQTT bytes | est. on the wire, derived (+74 / +126 B a packet) |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, r) in [
        ("node → centre (the bridge)", day.link_up),
        ("centre → node", day.link_down),
        ("cloud client → centre (this node's messages)", day.cloud_in),
        ("centre → cloud client", day.cloud_out),
    ] {
        println!(
            "| {name} | {:.0} | {:.0} | {} | {} | {} |",
            r.publishes,
            r.packets,
            kb(r.payload),
            kb(r.mqtt),
            on_the_wire(r.mqtt, r.packets)
        );
    }
}

fn print_state(name: &str, m: &Measured, periods: usize) {
    println!(
        "\n### {name}: node `{}`, {PODS} pods with statuses\n",
        m.node
    );
    println!(
        "{periods} MetaSync periods measured ({:.0} s), scaled to a day (×{:.0}), plus {FULL_RUNS_A_DAY} full MetaSync runs (`full_interval: 12h`) taken from the connect's run.\n",
        m.took.as_secs_f64(),
        SECONDS_A_DAY / INTERVAL.as_secs_f64() / periods as f64
    );
    println!("What crosses the node's link in one period (60 s), on average (measured):\n");
    println!("| node → centre | count | payload B | MQTT B |");
    println!("|---|---:|---:|---:|");
    print_publishes(&m.link.to_broker, periods as f64);
    println!("\n| centre → node | count | payload B | MQTT B |");
    println!("|---|---:|---:|---:|");
    print_publishes(&m.link.from_broker, periods as f64);
    let full = full_run(&m.startup);
    println!(
        "\nA full MetaSync run (measured, the connect's): {:.0} status updates, {} of payload, {} as MQTT; their PUBACKs {:.0} ({:.0} B) from the centre on the link, {:.0} ({:.0} B) from the cloud client.\n",
        full.link_up.publishes,
        kb(full.link_up.payload),
        kb(full.link_up.mqtt),
        full.link_down.packets,
        full.link_down.mqtt,
        full.cloud_in.packets,
        full.cloud_in.mqtt
    );
    println!("Per day (derived from the measured periods and full run):\n");
    print_day_table(&m.day());
}

fn print_away(a: &Away) {
    println!("\n### Away for an hour, then back: node `fleet-away`, {PODS} pods with statuses\n");
    let received: Vec<String> = a
        .cloud_sent
        .publishes
        .iter()
        .map(|(label, k)| format!("{} {label}", k.count))
        .collect();
    println!(
        "While the link was cut: the cloud played {AWAY_MINUTES} minutes of the churn, and the centre received from it {} publishes ({}; {} as MQTT; measured), to queue for the bridge's session; the centre held {} more messages, not retained, at the end of the outage than at its start (its `$SYS` store count less its retained count). edged sent {} status updates of {RESTARTING} pods (the outbox keeps the latest of each). From the link's return until it was quiet for 5 s ({:.1} s, the bridge's reconnect back-off included; measured):\n",
        a.cloud_sent.packets[meter::PUBLISH],
        if received.is_empty() { "none".to_owned() } else { received.join(", ") },
        kb(a.cloud_sent.bytes[meter::PUBLISH] as f64),
        a.held.map_or("? ($SYS not read)".to_owned(), |n| n.to_string()),
        a.outbox_updates,
        a.until_quiet.as_secs_f64()
    );
    println!("| node → centre | count | payload B | MQTT B |");
    println!("|---|---:|---:|---:|");
    print_publishes(&a.link.to_broker, 1.0);
    println!("\n| centre → node | count | payload B | MQTT B |");
    println!("|---|---:|---:|---:|");
    print_publishes(&a.link.from_broker, 1.0);
    println!(
        "\nThe cloud's reconciliation: scopes whose digest differed: {:?}; sent {} changes and {} deletes; the node's pods agree with the cloud's afterwards: {}.\n",
        a.scopes_differing,
        a.sent,
        a.deleted,
        if a.agrees_after { "yes" } else { "NO" }
    );
    let day = Day {
        link_up: Rate::of(&a.link.to_broker, 1.0),
        link_down: Rate::of(&a.link.from_broker, 1.0),
        cloud_in: Rate::of(&a.cloud.to_broker, 1.0),
        cloud_out: Rate::of(&a.cloud.from_broker, 1.0),
    };
    println!("The reconnect, once (measured):\n");
    print_day_table(&day);
}

fn print_sys(s: &SysCheck) {
    let get = |k: &str| s.sys.get(&format!("$SYS/broker/{k}")).copied();
    println!("\n### The meter beside the central mosquitto's own `$SYS` counters\n");
    println!("| counter | `$SYS` | meter |");
    println!("|---|---:|---:|");
    let rows = [
        ("bytes/received", s.metered.to_broker.all_bytes()),
        ("bytes/sent", s.metered.from_broker.all_bytes()),
        ("messages/received", s.metered.to_broker.all_packets()),
        ("messages/sent", s.metered.from_broker.all_packets()),
        (
            "publish/messages/received",
            s.metered.to_broker.packets[meter::PUBLISH],
        ),
        (
            "publish/messages/sent",
            s.metered.from_broker.packets[meter::PUBLISH],
        ),
    ];
    for (k, metered) in rows {
        println!(
            "| {k} | {} | {metered} |",
            get(k).map_or("–".into(), |v| v.to_string())
        );
    }
    println!(
        "\nmosquitto leaves publishes with the retain flag out of `publish/messages/received` (it counts a packet when `command & 0xF5` is PUBLISH, which the retain bit fails); the meter saw {} of them.\n",
        s.metered.to_broker.retained
    );
    let unmatched = |f: &Flow| f.acks.get(meter::UNMATCHED).map_or(0, |k| k.count);
    println!(
        "PUBACKs the meter matched to their publish by packet id: {} of {} (both ways).\n",
        s.metered.to_broker.packets[meter::PUBACK] + s.metered.from_broker.packets[meter::PUBACK]
            - unmatched(&s.metered.to_broker)
            - unmatched(&s.metered.from_broker),
        s.metered.to_broker.packets[meter::PUBACK] + s.metered.from_broker.packets[meter::PUBACK]
    );
}

fn print_fleet(idle: &Measured, churn: &Measured, away: &Away) {
    println!("\n### The fleet, derived: N × one node\n");
    println!("Every figure here is derived: N times one node's day above (the measured periods and full run), per second.\n");
    println!("| state | nodes | publishes/s in | publishes/s out | MQTT packets/s in / out | MQTT bytes/s in | MQTT bytes/s out | est. on the wire in / out (+74 / +126 B a packet) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (name, m) in [("idle", idle), ("churn", churn)] {
        let day = m.day();
        for n in [10_000.0, 100_000.0] {
            let f = n / SECONDS_A_DAY;
            let (i, o) = (day.central_in().times(f), day.central_out().times(f));
            println!(
                "| {name} | {n:.0} | {:.0} | {:.0} | {:.0} / {:.0} | {} | {} | {} / {} |",
                i.publishes,
                o.publishes,
                i.packets,
                o.packets,
                kb(i.mqtt),
                kb(o.mqtt),
                on_the_wire(i.mqtt, i.packets),
                on_the_wire(o.mqtt, o.packets)
            );
        }
    }
    println!();
    for (name, m) in [("idle", idle), ("churn", churn)] {
        let seconds = INTERVAL.as_secs_f64() * m.periods as f64;
        let pings = m.link.to_broker.packets[meter::PINGREQ] as f64 / seconds;
        println!(
            "PINGREQ/s at the centre, {name} (derived: N × the {:.2} a minute measured on one node's link): 10 000 nodes {:.0}, 100 000 nodes {:.0}.",
            pings * 60.0,
            pings * 1e4,
            pings * 1e5
        );
    }
    let queued: Vec<meter::Kind> = ["insert pod", "delete pod"]
        .iter()
        .filter_map(|l| away.link.from_broker.publishes.get(*l).copied())
        .collect();
    let (count, bytes) = queued
        .iter()
        .fold((0, 0), |(c, b), k| (c + k.count, b + k.mqtt_bytes));
    let once = away.link.to_broker.all_bytes()
        + away.link.from_broker.all_bytes()
        + away.cloud.to_broker.all_bytes()
        + away.cloud.from_broker.all_bytes();
    println!(
        "\nQueued at the centre for one node away an hour (measured: the inserts and deletes the centre delivered on the link's return; held by the broker over the outage per its `$SYS`: {} messages): {count} messages, {}; derived (N ×): for 10 000 nodes {:.1} MB, for 100 000 {:.1} MB.",
        away.held.map_or("?".to_owned(), |n| n.to_string()),
        kb(bytes as f64),
        bytes as f64 * 1e4 / 1e6,
        bytes as f64 * 1e5 / 1e6
    );
    println!(
        "One reconnect at the centre (measured, both flows of link and cloud client): {}; derived (N × it / 30 s): 10 000 nodes coming back within the bridge's 30 s back-off cap: {:.1} MB/s, 100 000: {:.1} MB/s.\n",
        kb(once as f64),
        once as f64 * 1e4 / 30.0 / 1e6,
        once as f64 * 1e5 / 30.0 / 1e6
    );
}

/// One figure of a flow.
type Measure = fn(&Flow) -> u64;

fn print_rabbit(c: &RabbitCheck) {
    println!(
        "\n## RabbitMQ check: {} nodes bridged to one RabbitMQ, MetaSync every {} s, a pod cycle each period, {RABBIT_PODS} pods each\n",
        c.nodes,
        RABBIT_INTERVAL.as_secs()
    );
    println!(
        "| at the broker | one node ×{} | {} nodes measured | ratio |",
        c.nodes, c.nodes
    );
    println!("|---|---:|---:|---:|");
    let n = c.nodes as f64;
    let measures: [(&str, Measure); 3] = [
        ("publishes/s", |f| f.packets[meter::PUBLISH]),
        ("MQTT packets/s", Flow::all_packets),
        ("MQTT bytes/s", Flow::all_bytes),
    ];
    let mut rows = Vec::new();
    for (name, measure) in measures {
        rows.push((
            format!("{name} in"),
            measure(&c.one.to_broker) as f64,
            measure(&c.all.to_broker) as f64,
        ));
        rows.push((
            format!("{name} out"),
            measure(&c.one.from_broker) as f64,
            measure(&c.all.from_broker) as f64,
        ));
    }
    for (name, one, all) in rows {
        let expected = one / c.one_seconds * n;
        let measured = all / c.all_seconds;
        println!(
            "| {name} | {expected:.1} | {measured:.1} | {:.3} |",
            measured / expected
        );
    }
    println!(
        "\none node over {:.0} s of whole periods; the {} over a {:.0} s window\n",
        c.one_seconds, c.nodes, c.all_seconds
    );
}
