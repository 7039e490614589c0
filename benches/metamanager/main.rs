//! MetaManager's benchmark: `cargo bench --bench metamanager` (add `-- --quick` for a short run,
//! `-- --burst` for the burst and the embedded query round trip alone, with their yardsticks,
//! `-- --reconnect` for the reconnect after an outage alone, `-- --idle` for the idle uplink
//! and the digest's read cost alone, `-- --fleet` for one node's load at a central broker and
//! the fleet's derived from it; the last is not part of the full run: it waits in real time,
//! about 13 minutes; `-- --storage` for the disk as a governed resource (storage.rs): the files
//! against the live data through churn and compaction, the one-time conversion of an earlier
//! version's database, and backup and check where the binary has them; not part of the full
//! run either, and `--quick` makes it smaller).
//!
//! Every figure is set beside a yardstick measured in the same run on the same broker: a null
//! relay (subscribe, republish unchanged, nothing else) for the MQTT figures, and a plain
//! rusqlite loop for the store. The ratios mean something on a noisy machine where the absolute
//! numbers do not. The report is Markdown on stdout; BENCHMARKS.md explains it.

mod fleet;
mod harness;
mod idle;
mod reconnect;
mod storage;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use std::sync::Arc;

use harness::{percentiles, start_metamanager, Broker, Client, Percentiles, Progress};
use metamanager::store::settings::Synchronous;
use metamanager::store::{Store, StoreOptions, Write};

struct Sizes {
    inserts: usize,
    queries: usize,
    scale: usize,
    store_rows: usize,
}

const LONG: Duration = Duration::from_secs(600);

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let burst_only = std::env::args().any(|a| a == "--burst");
    let reconnect_only = std::env::args().any(|a| a == "--reconnect");
    let idle_only = std::env::args().any(|a| a == "--idle");
    let fleet_only = std::env::args().any(|a| a == "--fleet");
    let storage_only = std::env::args().any(|a| a == "--storage");
    let sizes = if quick {
        Sizes {
            inserts: 10_000,
            queries: 1_000,
            scale: 100_000,
            store_rows: 20_000,
        }
    } else {
        Sizes {
            inserts: 100_000,
            queries: 5_000,
            scale: 1_000_000,
            store_rows: 100_000,
        }
    };
    let dir = tempfile::Builder::new()
        .prefix("metamanager-bench")
        .tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "target".into()))
        .expect("bench directory");
    let pod = compact_fixture("pod.json");
    let configmap = compact_fixture("configmap.json");
    if storage_only {
        // The store alone, in-process: no broker.
        println!("# MetaManager benchmark\n");
        println!("{}", machine());
        storage::run(dir.path(), &pod, &configmap, quick).await;
        return;
    }
    let broker = harness::start_mosquitto();
    let port = broker.port;

    println!("# MetaManager benchmark\n");
    println!("{}", machine());
    println!(
        "sizes: {} inserts of the {}-byte pod fixture (at most {} unanswered at a time), {} sequential queries, {} objects for the scale run, {} rows for the store run\n",
        sizes.inserts,
        std::fs::read(fixture_path("pod.json")).map(|b| b.len()).unwrap_or(0),
        harness::WINDOW,
        sizes.queries,
        sizes.scale,
        sizes.store_rows
    );

    if fleet_only {
        fleet::run(dir.path(), quick).await;
        drop(broker);
        return;
    }
    if idle_only {
        idle_figures(port, dir.path(), &pod, &sizes).await;
        drop(broker);
        return;
    }
    if reconnect_only {
        reconnect::print(&reconnect::run(port, dir.path(), &pod).await);
        drop(broker);
        return;
    }
    let pipe_rate = pipe_throughput(port, &pod, sizes.inserts.min(20_000)).await;
    if !burst_only {
        inserts_and_queries(port, dir.path(), &pod, &sizes, pipe_rate).await;
    }
    burst_and_embedded_queries(port, dir.path(), &pod, &sizes, pipe_rate).await;
    if !burst_only {
        scale_and_storage(port, dir.path(), &configmap, &pod, &sizes).await;
        reconnect::print(&reconnect::run(port, dir.path(), &pod).await);
        idle_figures(port, dir.path(), &pod, &sizes).await;
    }
    drop(broker);
}

/// What an idle node sends the cloud a day, and the digest's read cost at 10 and at the scale
/// run's number of objects.
async fn idle_figures(port: u16, dir: &Path, pod: &str, sizes: &Sizes) {
    let idle = idle::run(port, dir, pod).await;
    let small = idle::digest_read(dir, 10).await;
    let (read, counted) = idle::digest_read(dir, sizes.scale).await;
    idle::print(&idle, small, (sizes.scale, read, counted));
}

/// Insert throughput and query round trip through mosquitto, against the relays.
async fn inserts_and_queries(port: u16, dir: &Path, pod: &str, sizes: &Sizes, pipe_rate: f64) {
    let relay_rate = relay_throughput(port, pod, sizes.inserts).await;
    let fanout_rate = fanout_throughput(port, pod, sizes.inserts).await;
    let normal = metamanager_inserts(port, dir, "NORMAL", pod, sizes).await;
    let full = metamanager_inserts(port, dir, "FULL", pod, sizes).await;
    let relay_rtt = relay_latency(port, sizes.queries).await;

    println!("## Inserts (QoS 1, until every ack is back)\n");
    println!("| processor | msgs/s | ÷ relay |");
    println!("|---|---:|---:|");
    println!("| null relay (rumqttc) | {relay_rate:.0} | 1.00 |");
    println!(
        "| null relay with MetaManager's fan-out (forward + ack per message) | {fanout_rate:.0} | {:.2} |",
        fanout_rate / relay_rate
    );
    println!(
        "| mosquitto_sub \\| mosquitto_pub -l | {pipe_rate:.0} | {:.2} |",
        pipe_rate / relay_rate
    );
    for run in [&normal, &full] {
        println!(
            "| MetaManager, synchronous={} | {:.0} | {:.2} |",
            run.synchronous,
            run.rate,
            run.rate / relay_rate
        );
    }
    println!(
        "\nMetaManager (FULL) ÷ the fan-out relay: {:.2}\n",
        full.rate / fanout_rate
    );
    println!("\n## Query round trip (sequential, stored pods)\n");
    println!("| path | p50 µs | p99 µs | p99.9 µs |");
    println!("|---|---:|---:|---:|");
    print_latency("null relay round trip", &relay_rtt);
    print_latency("MetaManager query (FULL run's store)", &full.query);
    println!(
        "\nquery p99 ÷ relay p99: {:.2}\n",
        full.query.p99 / relay_rtt.p99
    );
    println!("## Memory (RSS)\n");
    println!("| when | MiB |");
    println!("|---|---:|");
    println!("| idle after start | {:.1} |", kib(full.idle_rss));
    println!("| peak during the insert run | {:.1} |", kib(full.peak_rss));
    println!(
        "| after {} pods stored | {:.1} |",
        sizes.inserts,
        kib(full.rss_after)
    );
}

/// The burst (`mosquitto_pub -l`, no window) against both brokers, and the query round trip
/// through the embedded broker.
async fn burst_and_embedded_queries(
    port: u16,
    dir: &Path,
    pod: &str,
    sizes: &Sizes,
    pipe_rate: f64,
) {
    let burst_external = burst(Broker::External(port), port, dir, pod, sizes).await;
    let burst_embedded = burst(Broker::Embedded, port, dir, pod, sizes).await;
    println!(
        "\n## Burst (mosquitto_pub -q 1 -l, no window, {} pods, {} publishers)\n",
        sizes.inserts,
        sizes.inserts.div_ceil(BURST_LINES)
    );
    println!("| broker | stored | msgs/s | ÷ mosquitto_sub \\| mosquitto_pub -l | peak RSS MiB |");
    println!("|---|---:|---:|---:|---:|");
    for run in [&burst_external, &burst_embedded] {
        println!(
            "| {} | {}/{} | {} | {} | {:.1} |",
            run.broker,
            run.stored,
            sizes.inserts,
            run.rate.map_or("timed out".into(), |r| format!("{r:.0}")),
            run.rate
                .map_or("-".into(), |r| format!("{:.2}", r / pipe_rate)),
            kib(run.peak_rss)
        );
    }
    println!(
        "\ntargets: every message stored ({}), peak RSS ≤ 64 MiB ({}), embedded rate ≥ the pipe relay rate ({})\n",
        verdict([&burst_external, &burst_embedded].iter().all(|r| r.stored == sizes.inserts)),
        verdict([&burst_external, &burst_embedded].iter().all(|r| r.peak_rss <= 64 * 1024)),
        verdict(burst_embedded.rate.is_some_and(|r| r >= pipe_rate))
    );
    println!("## Query round trip through the embedded broker (sequential, stored pods)\n");
    println!("| path | p50 µs | p99 µs | p99.9 µs |");
    println!("|---|---:|---:|---:|");
    if let Some(Alternated { relay, metamanager }) = &burst_embedded.query {
        print_latency("null relay round trip (mosquitto), alternating", relay);
        print_latency(
            "MetaManager query (embedded broker), alternating",
            metamanager,
        );
        println!(
            "\nquery ÷ relay through mosquitto: p50 {:.2}, p99 {:.2} (target p99 ≤ 1.5: {})\n",
            metamanager.p50 / relay.p50,
            metamanager.p99 / relay.p99,
            verdict(metamanager.p99 / relay.p99 <= 1.5)
        );
    }
}

/// Start-up and reads at scale, and the store alone against plain rusqlite.
async fn scale_and_storage(port: u16, dir: &Path, configmap: &str, pod: &str, sizes: &Sizes) {
    let small = scale_run(port, dir, configmap, pod, 1_000, sizes.queries).await;
    let large = scale_run(port, dir, configmap, pod, sizes.scale, sizes.queries).await;
    println!("\n## Scale\n");
    println!(
        "| objects stored | start-up to online ms | get p50 µs | get p99 µs | list 10k pods ms |"
    );
    println!("|---:|---:|---:|---:|---:|");
    for run in [&small, &large] {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {} |",
            run.objects,
            run.startup.as_secs_f64() * 1e3,
            run.get.p50,
            run.get.p99,
            run.list
                .map(|d| format!("{:.0}", d.as_secs_f64() * 1e3))
                .unwrap_or_else(|| "-".into())
        );
    }
    println!(
        "\nget p50 at {} ÷ at 1000: {:.2}\n",
        large.objects,
        large.get.p50 / small.get.p50
    );

    // Storage alone.
    let (store_rate, plain_rate) = storage_alone(dir, pod, sizes.store_rows).await;
    println!("## Storage alone (synchronous=FULL)\n");
    println!("| writer | upserts/s | ÷ plain |");
    println!("|---|---:|---:|");
    println!("| plain rusqlite, 512 rows per transaction | {plain_rate:.0} | 1.00 |");
    println!(
        "| MetaManager store (group commit) | {store_rate:.0} | {:.2} |",
        store_rate / plain_rate
    );
}

fn kib(v: u64) -> f64 {
    v as f64 / 1024.0
}

fn print_latency(name: &str, p: &Percentiles) {
    println!("| {name} | {:.0} | {:.0} | {:.0} |", p.p50, p.p99, p.p999);
}

fn fixture_path(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A fixture on one line, so that `mosquitto_pub -l` carries it as one message too.
fn compact_fixture(name: &str) -> String {
    let text = std::fs::read_to_string(fixture_path(name)).expect("fixture");
    let value: serde_json::Value = serde_json::from_str(&text).expect("fixture JSON");
    value.to_string()
}

fn insert_message(i: usize, namespace: &str, rtype: &str, content: &str) -> String {
    insert_of(i, &format!("{namespace}/{rtype}/obj-{i:07}"), content)
}

fn insert_of(i: usize, resource: &str, content: &str) -> String {
    format!(
        r#"{{"header":{{"msg_id":"bench-{i}-{}","timestamp":1795774500123}},"route":{{"source":"bench","group":"resource","operation":"insert","resource":"{resource}"}},"content":{content}}}"#,
        uuid::Uuid::new_v4()
    )
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let mosquitto = std::process::Command::new("mosquitto")
        .arg("-h")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_default();
    format!("machine: {cpu}, {cores} cores; commit {commit}; {mosquitto}\n")
}

/// The yardstick: subscribe, republish unchanged, nothing else.
async fn run_relay(port: u16, id: &str, input: &str, output: &str) -> tokio::task::JoinHandle<()> {
    let mut relay = Client::connect(port, id, &[input]).await;
    let output = output.to_owned();
    tokio::spawn(async move {
        while let Some((_, payload)) = relay.received.recv().await {
            relay.publish(&output, payload.to_vec()).await;
        }
    })
}

async fn relay_throughput(port: u16, content: &str, n: usize) -> f64 {
    let relay = run_relay(port, "relay", "bench/relay/in", "bench/relay/out").await;
    let rate = stream_through(
        port,
        "relay",
        "bench/relay/in",
        "bench/relay/out",
        content,
        n,
    )
    .await;
    relay.abort();
    rate
}

/// The null relay doing the broker traffic MetaManager does per insert: the message passed on
/// whole to one topic (edged's), a small ack to another (edgehub's). Its rate is what the broker
/// allows for that pattern; MetaManager ÷ this isolates MetaManager's own cost.
async fn fanout_throughput(port: u16, content: &str, n: usize) -> f64 {
    let mut relay = Client::connect(port, "fanout", &["bench/fanout/in"]).await;
    let ack = r#"{"header":{"msg_id":"a","parent_msg_id":"p"},"route":{"source":"metamanager","group":"meta","operation":"response","resource":"default/pod/x"},"content":"OK"}"#;
    let relaying = tokio::spawn(async move {
        while let Some((_, payload)) = relay.received.recv().await {
            relay
                .publish("bench/fanout/forward", payload.to_vec())
                .await;
            relay.publish("bench/fanout/out", ack).await;
        }
    });
    let mut edged = Client::connect(port, "fanout-edged", &["bench/fanout/forward"]).await;
    let draining = tokio::spawn(async move { while edged.received.recv().await.is_some() {} });
    let rate = stream_through(
        port,
        "fanout",
        "bench/fanout/in",
        "bench/fanout/out",
        content,
        n,
    )
    .await;
    relaying.abort();
    draining.abort();
    rate
}

/// The relay anyone can reproduce without Rust.
async fn pipe_throughput(port: u16, content: &str, n: usize) -> f64 {
    let p = port.to_string();
    let mut pipe = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "mosquitto_sub -p {p} -q 1 -t bench/pipe/in | mosquitto_pub -p {p} -q 1 -t bench/pipe/out -l"
        ))
        .spawn()
        .expect("mosquitto_sub | mosquitto_pub");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rate = stream_through(port, "pipe", "bench/pipe/in", "bench/pipe/out", content, n).await;
    let _ = std::process::Command::new("pkill")
        .args(["-f", "bench/pipe/"])
        .status();
    let _ = pipe.wait();
    rate
}

/// Publishes `n` messages to `input` and times until `n` have come out of `output`.
async fn stream_through(
    port: u16,
    name: &str,
    input: &str,
    output: &str,
    content: &str,
    n: usize,
) -> f64 {
    let mut counter = Client::connect(port, &format!("{name}-counter"), &[output]).await;
    let publisher = Client::connect(port, &format!("{name}-publisher"), &[]).await;
    let messages: Vec<String> = (0..n)
        .map(|i| insert_message(i, "default", "pod", content))
        .collect();
    let progress = Arc::new(Progress::default());
    let start = Instant::now();
    let feeding = harness::feed(publisher, input.to_owned(), messages, progress.clone());
    let done = counter.count(output, n, LONG, &progress, |_| true).await;
    let _ = feeding.await;
    let end = done.expect("every message came through");
    n as f64 / (end - start).as_secs_f64()
}

async fn relay_latency(port: u16, n: usize) -> Percentiles {
    let relay = run_relay(port, "relay-rtt", "bench/rtt/in", "bench/rtt/out").await;
    let mut client = Client::connect(port, "rtt-client", &["bench/rtt/out"]).await;
    let query = r#"{"header":{"msg_id":"q"},"route":{"operation":"query","resource":"default/pod/obj-0000001"}}"#;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        samples.push(relay_round_trip(&mut client, "bench/rtt", query.to_owned()).await);
    }
    relay.abort();
    percentiles(samples)
}

/// One message through the null relay on `{topics}/in` and back on `{topics}/out`, timed.
async fn relay_round_trip(client: &mut Client, topics: &str, payload: String) -> Duration {
    let start = Instant::now();
    client.publish(&format!("{topics}/in"), payload).await;
    client
        .count(
            &format!("{topics}/out"),
            1,
            Duration::from_secs(10),
            &Progress::default(),
            |_| true,
        )
        .await
        .expect("relay answered");
    start.elapsed()
}

struct InsertRun {
    synchronous: &'static str,
    rate: f64,
    idle_rss: u64,
    peak_rss: u64,
    rss_after: u64,
    query: Percentiles,
}

/// Plays edged: subscribes to the forwards and reads them all, as a real node's edged does.
async fn drain_as_edged(port: u16, node: &str, prefix: &str) -> tokio::task::JoinHandle<()> {
    let mut edged = Client::connect(
        port,
        &format!("{node}-edged"),
        &[&format!("{prefix}/metamanager/to/edged")],
    )
    .await;
    tokio::spawn(async move { while edged.received.recv().await.is_some() {} })
}

async fn metamanager_inserts(
    port: u16,
    dir: &Path,
    synchronous: &'static str,
    content: &str,
    sizes: &Sizes,
) -> InsertRun {
    let node = format!("bench-{}", synchronous.to_lowercase());
    let prefix = format!("edge/{node}");
    let mut cloud = Client::connect(
        port,
        &format!("{node}-cloud"),
        &[
            &format!("{prefix}/metamanager/to/edgehub"),
            &format!("{prefix}/metamanager/status"),
        ],
    )
    .await;
    // edged is there, as on a real node, and takes every forward.
    let draining = drain_as_edged(port, &node, &prefix).await;
    let db = dir.join(format!("{node}.db"));
    let (_, mut mm) = start_metamanager(Broker::External(port), &node, &db, synchronous, dir);
    assert!(
        cloud
            .next_containing(
                &format!("{prefix}/metamanager/status"),
                "\"online\"",
                Duration::from_secs(10)
            )
            .await,
        "MetaManager came online"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss = mm.memory_kib().rss_kib;

    let n = sizes.inserts;
    let messages: Vec<String> = (0..n)
        .map(|i| insert_message(i, "default", "pod", content))
        .collect();
    let publisher = Client::connect(port, &format!("{node}-publisher"), &[]).await;
    let topic = format!("{prefix}/edgehub/to/metamanager");
    let progress = Arc::new(Progress::default());
    let start = Instant::now();
    let feeding = harness::feed(publisher, topic, messages, progress.clone());
    let acks = cloud
        .count(
            &format!("{prefix}/metamanager/to/edgehub"),
            n,
            LONG,
            &progress,
            |p| harness::contains(p, br#""content":"OK""#),
        )
        .await
        .expect("every insert acked");
    let rate = n as f64 / (acks - start).as_secs_f64();
    let publisher = feeding.await.expect("publisher");
    assert_eq!(publisher.accepted.load(Ordering::Relaxed), n);
    let memory = mm.memory_kib();
    let (rss_after, peak_rss) = (memory.rss_kib, memory.peak_kib);
    draining.abort();

    let stored: i64 = rusqlite::Connection::open(&db)
        .and_then(|c| c.query_row("SELECT count(*) FROM meta", [], |r| r.get(0)))
        .expect("count stored");
    assert_eq!(stored as usize, n, "every acked insert is committed");

    let query = sequential_queries(port, &node, sizes.queries, |i| {
        format!("default/pod/obj-{:07}", (i * 7919) % n)
    })
    .await;
    mm.stop(LONG);
    InsertRun {
        synchronous,
        rate,
        idle_rss,
        peak_rss,
        rss_after,
        query,
    }
}

/// edged's side of sequential queries: one query at a time, timed until its answer.
struct EdgedQueries {
    edged: Client,
    topic: String,
    answers: String,
}

impl EdgedQueries {
    async fn connect(port: u16, node: &str) -> Self {
        let prefix = format!("edge/{node}");
        let answers = format!("{prefix}/metamanager/to/edged");
        let edged = Client::connect(port, &format!("{node}-edged-q"), &[&answers]).await;
        Self {
            edged,
            topic: format!("{prefix}/edged/to/metamanager"),
            answers,
        }
    }

    /// The round trip of query `i` for `resource`.
    async fn round_trip(&mut self, i: usize, resource: &str) -> Duration {
        let id = format!("q-{i}");
        let start = Instant::now();
        self.edged
            .publish(&self.topic, query_message(&id, resource))
            .await;
        let needle = format!(r#""parent_msg_id":"{id}""#);
        assert!(
            self.edged
                .next_containing(&self.answers, &needle, Duration::from_secs(10))
                .await,
            "query answered"
        );
        start.elapsed()
    }
}

/// edged's query `msg_id` of one object or list.
fn query_message(msg_id: &str, resource: &str) -> String {
    format!(
        r#"{{"header":{{"msg_id":"{msg_id}"}},"route":{{"operation":"query","resource":"{resource}"}}}}"#
    )
}

/// `n` queries from edged, one after another, each timed until its answer.
async fn sequential_queries(
    port: u16,
    node: &str,
    n: usize,
    resource: impl Fn(usize) -> String,
) -> Percentiles {
    let mut edged = EdgedQueries::connect(port, node).await;
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        samples.push(edged.round_trip(i, &resource(i)).await);
    }
    percentiles(samples)
}

/// [`sequential_queries`] through MetaManager on `port`, each followed by one round trip
/// through the null relay on mosquitto (`relay_port`).
async fn alternating_queries(
    relay_port: u16,
    port: u16,
    node: &str,
    n: usize,
    resource: impl Fn(usize) -> String,
) -> Alternated {
    let relay = run_relay(relay_port, "relay-alt", "bench/alt/in", "bench/alt/out").await;
    let mut relay_client = Client::connect(relay_port, "alt-client", &["bench/alt/out"]).await;
    let mut edged = EdgedQueries::connect(port, node).await;
    let mut through_relay = Vec::with_capacity(n);
    let mut through_metamanager = Vec::with_capacity(n);
    for i in 0..n {
        through_metamanager.push(edged.round_trip(i, &resource(i)).await);
        // The same message as the query, so both carry the same bytes in.
        let query = query_message(&format!("q-{i}"), &resource(i));
        through_relay.push(relay_round_trip(&mut relay_client, "bench/alt", query).await);
    }
    relay.abort();
    Alternated {
        relay: percentiles(through_relay),
        metamanager: percentiles(through_metamanager),
    }
}

struct ScaleRun {
    objects: usize,
    startup: Duration,
    get: Percentiles,
    list: Option<Duration>,
}

/// A database with `objects` objects (configmaps across namespaces, plus 10 000 pods in one
/// namespace when there is room), written directly with rusqlite, then served.
async fn scale_run(
    port: u16,
    dir: &Path,
    configmap: &str,
    pod: &str,
    objects: usize,
    queries: usize,
) -> ScaleRun {
    let node = format!("scale-{objects}");
    let db = dir.join(format!("{node}.db"));
    let pods = if objects >= 100_000 { 10_000 } else { 0 };
    let configmaps = objects - pods;
    {
        let mut conn = plain_db(&db, "OFF");
        let tx = conn.transaction().expect("tx");
        {
            let mut stmt = tx
                .prepare("INSERT INTO meta (key, type, value) VALUES (?1, ?2, ?3)")
                .expect("prepare");
            for i in 0..configmaps {
                let key = format!("ns-{:03}/configmap/obj-{i:07}", i % 100);
                stmt.execute((key, "configmap", configmap)).expect("insert");
            }
            for i in 0..pods {
                stmt.execute((format!("big/pod/obj-{i:07}"), "pod", pod))
                    .expect("insert");
            }
        }
        tx.commit().expect("commit");
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
            .expect("checkpoint");
    }
    // Rows written with SQL are counted into the digest the first time a store opens them;
    // done here, so that the start-up measured is that of a node's every start, not its first.
    Store::open(&db, StoreOptions::default())
        .expect("count the rows once")
        .close()
        .await;
    let prefix = format!("edge/{node}");
    let status = format!("{prefix}/metamanager/status");
    let mut watcher = Client::connect(port, &format!("{node}-watch"), &[&status]).await;
    let start = Instant::now();
    let (_, mut mm) = start_metamanager(Broker::External(port), &node, &db, "FULL", dir);
    assert!(
        watcher
            .next_containing(&status, "\"online\"", Duration::from_secs(60))
            .await,
        "online"
    );
    let startup = start.elapsed();
    let get = sequential_queries(port, &node, queries, |i| {
        let k = (i * 7919) % configmaps;
        format!("ns-{:03}/configmap/obj-{k:07}", k % 100)
    })
    .await;
    let list = if pods > 0 {
        let answers = format!("{prefix}/metamanager/to/edged");
        let mut edged = Client::connect(port, &format!("{node}-lister"), &[&answers]).await;
        let mut times = Vec::new();
        for i in 0..5 {
            let id = format!("list-{i}");
            let query = format!(
                r#"{{"header":{{"msg_id":"{id}"}},"route":{{"operation":"query","resource":"big/pod"}}}}"#
            );
            let t = Instant::now();
            edged
                .publish(&format!("{prefix}/edged/to/metamanager"), query)
                .await;
            assert!(
                edged
                    .next_containing(
                        &answers,
                        &format!(r#""parent_msg_id":"{id}""#),
                        Duration::from_secs(60)
                    )
                    .await
            );
            times.push(t.elapsed());
        }
        times.sort();
        Some(times[times.len() / 2])
    } else {
        None
    };
    mm.stop(LONG);
    let _ = std::fs::remove_file(&db);
    ScaleRun {
        objects,
        startup,
        get,
        list,
    }
}

/// A database with MetaManager's table and index, for plain rusqlite to fill.
fn plain_db(path: &Path, synchronous: &str) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(path).expect("open plain database");
    conn.execute_batch(&format!(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous={synchronous};
         CREATE TABLE meta (key TEXT PRIMARY KEY, type TEXT NOT NULL, value TEXT NOT NULL);
         CREATE INDEX meta_type ON meta(type);"
    ))
    .expect("schema");
    conn
}

/// The store's writer against the physical limit: the same upserts in batched transactions.
async fn storage_alone(dir: &Path, content: &str, n: usize) -> (f64, f64) {
    let keys: Vec<String> = (0..n).map(|i| format!("default/pod/obj-{i:07}")).collect();

    let mut conn = plain_db(&dir.join("plain.db"), "FULL");
    let start = Instant::now();
    for chunk in keys.chunks(512) {
        let tx = conn.transaction().expect("tx");
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO meta (key, type, value) VALUES (?1, ?2, ?3)
                     ON CONFLICT(key) DO UPDATE SET type = excluded.type, value = excluded.value",
                )
                .expect("prepare");
            for key in chunk {
                stmt.execute((key, "pod", content)).expect("upsert");
            }
        }
        tx.commit().expect("commit");
    }
    let plain = n as f64 / start.elapsed().as_secs_f64();
    drop(conn);

    let store = Store::open(
        &dir.join("store.db"),
        StoreOptions {
            synchronous: Synchronous::Full,
            ..StoreOptions::default()
        },
    )
    .expect("store");
    let start = Instant::now();
    let mut pending = Vec::with_capacity(n);
    for key in &keys {
        let write = Write::Put {
            key: key.clone(),
            rtype: "pod".into(),
            value: content.to_owned().into(),
        };
        pending.push(store.submit(write).await.expect("submit"));
    }
    for committed in pending {
        committed.await.expect("answer").expect("stored");
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    store.close().await;
    (rate, plain)
}

/// Lines per `mosquitto_pub -l` in the burst: below its 65 535 packet ids.
const BURST_LINES: usize = 50_000;

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}

struct BurstRun {
    broker: &'static str,
    /// `None` when not every ack came back.
    rate: Option<f64>,
    stored: usize,
    peak_rss: u64,
    /// Sequential queries of the burst's pods, alternating with relay round trips (embedded
    /// broker only).
    query: Option<Alternated>,
}

/// Round trips measured one of each in turn, so that both meet the same machine state.
struct Alternated {
    /// Through the null relay on mosquitto.
    relay: Percentiles,
    /// Through MetaManager.
    metamanager: Percentiles,
}

/// `sizes.inserts` inserts of distinct pods, one per line in a file, published by
/// `mosquitto_pub -q 1 -l` (no window of its own); timed from the first publish to the last
/// ack MetaManager sends edgehub.
async fn burst(
    broker: Broker,
    relay_port: u16,
    dir: &Path,
    content: &str,
    sizes: &Sizes,
) -> BurstRun {
    let (name, embedded) = match broker {
        Broker::External(_) => ("mosquitto", false),
        Broker::Embedded => ("embedded", true),
    };
    let node = format!("burst-{name}");
    let prefix = format!("edge/{node}");
    let db = dir.join(format!("{node}.db"));
    let n = sizes.inserts;
    // mosquitto_pub -l takes the ack of the last line's packet id as the end of its input: past
    // 65 535 lines that id has wrapped and was already used, so it disconnects early and drops
    // what it still had queued. Hence one publisher per 50 000 lines, all started at once.
    let files: Vec<std::path::PathBuf> = (0..n)
        .step_by(BURST_LINES)
        .map(|first| {
            let lines: String = (first..n.min(first + BURST_LINES))
                .map(|i| insert_of(i, &format!("default/pod/burst-{i}"), content) + "\n")
                .collect();
            let file = dir.join(format!("{node}-{first}.lines"));
            std::fs::write(&file, lines).expect("write burst file");
            file
        })
        .collect();

    let status = format!("{prefix}/metamanager/status");
    let acks = format!("{prefix}/metamanager/to/edgehub");
    let (port, mut mm) = start_metamanager(broker, &node, &db, "FULL", dir);
    let mut cloud = Client::connect(port, &format!("{node}-cloud"), &[&acks, &status]).await;
    let draining = drain_as_edged(port, &node, &prefix).await;
    // The status is retained: it is there whether MetaManager came online before or after.
    assert!(
        cloud
            .next_containing(&status, "\"online\"", Duration::from_secs(10))
            .await,
        "MetaManager came online"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    let start = Instant::now();
    let mut publishers: Vec<std::process::Child> = files
        .iter()
        .enumerate()
        .map(|(k, file)| {
            std::process::Command::new("mosquitto_pub")
                .args(["-p", &port.to_string(), "-i", &format!("{node}-pub-{k}")])
                .args(["-q", "1", "-l", "-t"])
                .arg(format!("{prefix}/edgehub/to/metamanager"))
                .stdin(std::fs::File::open(file).expect("burst file"))
                .spawn()
                .expect("mosquitto_pub")
        })
        .collect();
    let done = cloud
        .count(
            &acks,
            n,
            Duration::from_secs(300),
            &Progress::default(),
            |p| harness::contains(p, br#""operation":"response""#),
        )
        .await;
    let rate = done.map(|end| n as f64 / (end - start).as_secs_f64());
    let peak_rss = mm.memory_kib().peak_kib;
    for publisher in &mut publishers {
        if rate.is_none() {
            let _ = publisher.kill();
        }
        let _ = publisher.wait();
    }
    draining.abort();

    let stored: i64 = rusqlite::Connection::open_with_flags(
        &db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .and_then(|c| {
        c.query_row("SELECT count(*) FROM meta WHERE type = 'pod'", [], |r| {
            r.get(0)
        })
    })
    .expect("count stored");

    let query = if embedded && rate.is_some() {
        Some(
            alternating_queries(relay_port, port, &node, sizes.queries, |i| {
                format!("default/pod/burst-{}", (i * 7919) % n)
            })
            .await,
        )
    } else {
        None
    };
    mm.stop(LONG);
    for file in &files {
        let _ = std::fs::remove_file(file);
    }
    BurstRun {
        broker: if embedded {
            "MetaManager's embedded broker"
        } else {
            "mosquitto (external)"
        },
        rate,
        stored: stored as usize,
        peak_rss,
        query,
    }
}
