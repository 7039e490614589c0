//! Test harness: starts the real `metamanager` binary against a real broker (its embedded
//! rumqttd, a mosquitto process started here on a free port, or a RabbitMQ node shared by the
//! test binary, see [`rabbitmq`]) with a real SQLite file, and
//! plays edgehub and edged with a real MQTT client. The processes themselves are started and
//! stopped by [`process`], which the bench shares.
#![allow(dead_code)]

pub mod guide;
pub mod kubectl;
pub mod lockdown;
pub mod markdown;
pub mod process;
pub mod rabbitmq;
pub mod scenarios;

use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::Duration;

// Where the tests have always found them; each test file uses some.
#[allow(unused_imports)]
pub use process::{
    free_port, mosquitto_binary, mosquitto_clients, skip, wait_for_port, Mosquitto, Requirement,
};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::sync::mpsc;

pub const NODE: &str = "test-node";
pub const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    Embedded,
    Mosquitto,
    /// RabbitMQ's MQTT plugin; MetaManager logs in with its per-node accounts, the test
    /// client with an account that may do anything (see [`rabbitmq::definitions`]).
    RabbitMq,
}

pub fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

pub fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Opens a TCP connection to `port`, sends an MQTT CONNECT with `client_id` and resets the
/// connection (SO_LINGER 0) at once, the way a client that crashes right after CONNECT does.
pub fn connect_then_reset(port: u16, client_id: &str) {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let connect = metamanager::broker::connect_packet(client_id, None, Duration::from_secs(30));
    stream.write_all(&connect).unwrap();
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stream);
}

/// Options for one MetaManager under test.
#[derive(Clone)]
pub struct Options {
    pub kind: BrokerKind,
    /// Extra YAML appended under the top level (e.g. a `meta:` block).
    pub extra_yaml: String,
    pub max_payload_bytes: usize,
    /// `mqtt.max_inflight_messages`, when not the default.
    pub max_inflight_messages: Option<usize>,
    /// More `mqtt:` keys, one `key: value` a line.
    pub mqtt_yaml: String,
    /// `database:` keys besides its path.
    pub database_yaml: String,
    /// More `http:` keys, one `key: value` a line.
    pub http_yaml: String,
    /// `mqtt.username`, `mqtt.publish_username` and `mqtt.password_file`, when set.
    pub username: Option<String>,
    pub publish_username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// The account the test client ([`TestApp::client`]) logs in with, if any.
    pub peer_login: Option<(String, String)>,
}

impl Options {
    pub fn new(kind: BrokerKind) -> Self {
        Self {
            kind,
            extra_yaml: String::new(),
            max_payload_bytes: 1 << 20,
            max_inflight_messages: None,
            mqtt_yaml: String::new(),
            database_yaml: String::new(),
            http_yaml: String::new(),
            username: None,
            publish_username: None,
            password_file: None,
            peer_login: None,
        }
    }

    /// Adds `mqtt:` keys (`key: value` lines).
    pub fn mqtt(mut self, lines: &str) -> Self {
        for line in lines.lines() {
            self.mqtt_yaml.push_str(&format!("  {}\n", line.trim()));
        }
        self
    }

    /// Adds `database:` keys (`key: value` lines) beside its path.
    pub fn database(mut self, lines: &str) -> Self {
        for line in lines.lines() {
            self.database_yaml.push_str(&format!("  {}\n", line.trim()));
        }
        self
    }

    /// Adds `http:` keys (`key: value` lines).
    pub fn http(mut self, lines: &str) -> Self {
        for line in lines.lines() {
            self.http_yaml.push_str(&format!("  {}\n", line.trim()));
        }
        self
    }

    /// Sets the inbound budget, so that backpressure engages early.
    pub fn inflight(mut self, messages: usize) -> Self {
        self.max_inflight_messages = Some(messages);
        self
    }

    pub fn yaml(mut self, extra: &str) -> Self {
        self.extra_yaml = extra.to_owned();
        self
    }
}

/// A running MetaManager with its broker, database and a client playing edgehub and edged.
pub struct TestApp {
    pub options: Options,
    /// Where the database lives, when not in the temporary directory.
    pub db: Option<PathBuf>,
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// Where its HTTP endpoint listens (127.0.0.1).
    pub http_port: u16,
    pub child: Option<Child>,
    pub client: Peer,
    pub mosquitto: Option<Mosquitto>,
    /// The turn on the shared RabbitMQ node, for [`BrokerKind::RabbitMq`].
    pub rabbitmq: Option<rabbitmq::Lease>,
}

impl TestApp {
    /// Starts MetaManager (and mosquitto for that kind). `None` when mosquitto is needed and
    /// not installed.
    pub async fn spawn(options: Options) -> Option<Self> {
        Self::spawn_at(options, None).await
    }

    /// Starts MetaManager on its embedded broker, which needs nothing installed.
    pub async fn embedded() -> Self {
        Self::spawn_inner(Options::new(BrokerKind::Embedded), None, None, None).await
    }

    /// Like [`TestApp::spawn`], with the database at `db`.
    pub async fn spawn_with_db(options: Options, db: PathBuf) -> Option<Self> {
        Self::spawn_at(options, Some(db)).await
    }

    async fn spawn_at(mut options: Options, db: Option<PathBuf>) -> Option<Self> {
        let (mut mosquitto, mut rabbitmq) = (None, None);
        match options.kind {
            BrokerKind::Embedded => {}
            BrokerKind::Mosquitto => mosquitto = Some(Mosquitto::start(&mosquitto_binary()?)),
            BrokerKind::RabbitMq => {
                let lease = rabbitmq::lease().await?;
                options.username = Some(lease.login(&rabbitmq::metamanager_account()).0);
                options.publish_username =
                    Some(lease.login(&rabbitmq::metamanager_out_account()).0);
                options.password_file = Some(lease.password_file.clone());
                options.peer_login = Some(lease.login(rabbitmq::TESTER));
                rabbitmq = Some(lease);
            }
        }
        Some(Self::spawn_inner(options, db, mosquitto, rabbitmq).await)
    }

    /// Starts MetaManager against `mosquitto`, a broker the test configured itself.
    pub async fn spawn_on(options: Options, mosquitto: Mosquitto) -> Self {
        Self::spawn_inner(options, None, Some(mosquitto), None).await
    }

    async fn spawn_inner(
        options: Options,
        db: Option<PathBuf>,
        mosquitto: Option<Mosquitto>,
        rabbitmq: Option<rabbitmq::Lease>,
    ) -> Self {
        let mut app = Self {
            options,
            db,
            dir: tempfile::tempdir().unwrap(),
            port: 0,
            http_port: 0,
            child: None,
            client: Peer::dummy(),
            mosquitto,
            rabbitmq,
        };
        app.start().await;
        app
    }

    pub fn db_path(&self) -> PathBuf {
        self.db
            .clone()
            .unwrap_or_else(|| self.dir.path().join("data/metamanager.db"))
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("edge.yaml")
    }

    /// The port of the broker the test started, when MetaManager does not embed one.
    fn external_port(&self) -> Option<u16> {
        let rabbitmq = self.rabbitmq.as_ref().map(|r| r.port);
        self.mosquitto.as_ref().map(|m| m.port).or(rabbitmq)
    }

    fn write_config(&self, port: u16) {
        let (mode, port) = match self.external_port() {
            Some(port) => ("external", port),
            None => ("embedded", port),
        };
        let inflight = self
            .options
            .max_inflight_messages
            .map(|n| format!("  max_inflight_messages: {n}\n"))
            .unwrap_or_default();
        let mut login = String::new();
        if let Some(u) = &self.options.username {
            login += &format!("  username: {u}\n");
        }
        if let Some(u) = &self.options.publish_username {
            login += &format!("  publish_username: {u}\n");
        }
        if let Some(p) = &self.options.password_file {
            login += &format!("  password_file: {}\n", p.display());
        }
        let yaml = format!(
            "node_id: {NODE}\nmqtt:\n  mode: {mode}\n  host: 127.0.0.1\n  port: {port}\n  max_payload_bytes: {}\n{inflight}{login}{}database:\n  path: {}\n{}http:\n  listen: 127.0.0.1:{}\n{}{}",
            self.options.max_payload_bytes,
            self.options.mqtt_yaml,
            self.db_path().display(),
            self.options.database_yaml,
            self.http_port,
            self.options.http_yaml,
            self.options.extra_yaml
        );
        std::fs::write(self.config_path(), yaml).unwrap();
    }

    /// Starts (or restarts) the binary and waits until its status is online. The first start
    /// lets MetaManager bind its ports (port 0; it logs what it got), so no port can be lost
    /// to another process between choosing it and binding it; later starts reuse those ports.
    pub async fn start(&mut self) {
        self.write_config(self.external_port().unwrap_or(self.port));
        let log_from = self.log().len();
        let log = self.log_path();
        let mut child = process::Launch {
            config: Some(&self.config_path()),
            cwd: Some(self.dir.path()),
            rust_log: Some("info,metamanager=debug,rumqttd=warn"),
            log: Some(&log),
            open_files: None,
            private_network: false,
        }
        .spawn();
        let (broker, http) = process::wait_for_log(
            &mut child,
            &log,
            log_from,
            Duration::from_secs(15),
            "the ports it bound",
            |text| Some((process::broker_port(text)?, process::http_port(text)?)),
        );
        self.port = broker;
        self.http_port = http;
        self.child = Some(child);
        // The old client goes first: with mosquitto's use_username_as_clientid, two clients
        // of one account would take each other's client id in turn.
        self.client = Peer::dummy();
        self.client = Peer::connect_as(self.port, self.options.peer_login.clone()).await;
        // RabbitMQ stores a retained message a moment after routing it: a subscription made in
        // between gets neither the message nor, yet, its retained copy. Subscribing again
        // fetches the copy (mosquitto and the embedded broker answer the first time).
        let online = |v: &Value| v["state"] == "online";
        for _ in 0..4 {
            let within = Duration::from_secs(3);
            if let Some(_status) = self
                .client
                .try_wait_for("metamanager/status", online, within)
                .await
            {
                return;
            }
            self.client.resubscribe("metamanager/status").await;
        }
        self.client.wait_for("metamanager/status", online).await;
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("metamanager.log")
    }

    pub fn log(&self) -> String {
        process::read_log(&self.log_path())
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        process::sigterm(&child);
        let status = process::exit_within(&mut child, process::STOP_WITHIN);
        status.unwrap_or_else(|| {
            let _ = process::kill9(&mut child);
            panic!("metamanager ignored SIGTERM");
        })
    }

    /// Kills the process with SIGKILL, the way a power cut or the OOM killer would.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        process::kill9(&mut child).unwrap();
    }

    /// Stops cleanly and starts again on the same database (and, embedded, the same port).
    pub async fn restart(&mut self) {
        let status = self.terminate();
        assert!(status.success(), "exit status {status}");
        self.start().await;
    }

    /// Another client like [`TestApp::client`], with its login.
    pub async fn peer(&self) -> Peer {
        Peer::connect_as(self.port, self.options.peer_login.clone()).await
    }

    /// The retained status as a client newly connecting with the test client's login sees it.
    pub async fn retained_status(&self) -> Value {
        retained_status(self.port, self.options.peer_login.clone()).await
    }

    pub async fn set_cloud(&mut self, connected: bool) {
        let content = if connected {
            "cloud_connected"
        } else {
            "cloud_disconnected"
        };
        let want = if connected {
            "connected"
        } else {
            "disconnected"
        };
        self.client
            .publish(
                "edgehub",
                &message("connect", "default/node/edge-node", json!(content)),
            )
            .await;
        self.client
            .wait_for("metamanager/status", |v| v["cloud"] == want)
            .await;
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = process::kill9(&mut child);
        }
        if std::thread::panicking() {
            eprintln!("--- metamanager log ---\n{}", self.log());
        }
    }
}

/// One number read from the app's database with `sql` (a count, usually).
pub fn count_rows(app: &TestApp, sql: &str) -> i64 {
    rusqlite::Connection::open(app.db_path())
        .unwrap()
        .query_row(sql, [], |r| r.get(0))
        .unwrap()
}

/// A new message with a fresh msg_id.
/// `object`, stored at `key`, as the local API serves it: with the node's version of it (the
/// number of its last change, read from the database) where the store keeps the cloud's.
#[allow(dead_code)]
pub fn served(app: &TestApp, key: &str, object: &Value) -> Value {
    let number = count_rows(
        app,
        &format!("SELECT change_seq FROM meta WHERE key = '{key}'"),
    );
    let mut object = object.clone();
    object["metadata"]["resourceVersion"] = json!(number.to_string());
    object
}

pub fn message(operation: &str, resource: &str, content: Value) -> Value {
    json!({
        "header": {"msg_id": uuid::Uuid::new_v4().to_string(), "timestamp": 1795774500123i64},
        "route": {"source": "test", "group": "resource", "operation": operation, "resource": resource},
        "content": content,
    })
}

pub fn msg_id(m: &Value) -> &str {
    m["header"]["msg_id"].as_str().unwrap()
}

/// An MQTT client that plays edgehub and edged and records what MetaManager publishes.
pub struct Peer {
    client: Option<AsyncClient>,
    /// QoS 1 publishes the broker has acknowledged to this client.
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    received: mpsc::UnboundedReceiver<(String, Value)>,
    seen: Vec<(String, Value)>,
}

impl Peer {
    fn dummy() -> Self {
        Self {
            client: None,
            accepted: Default::default(),
            received: mpsc::unbounded_channel().1,
            seen: Vec::new(),
        }
    }

    pub async fn connect(port: u16) -> Self {
        Self::connect_as(port, None).await
    }

    /// Like [`Peer::connect`], logged in as `login` (username, password) when set.
    pub async fn connect_as(port: u16, login: Option<(String, String)>) -> Self {
        let id = format!("test-{}", uuid::Uuid::new_v4());
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        if let Some((user, password)) = login {
            options.set_credentials(user, password);
        }
        options.set_max_packet_size(64 << 20, 64 << 20);
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(options, 1000);
        let (tx, received) = mpsc::unbounded_channel();
        let (subscribed_tx, mut subscribed) = mpsc::unbounded_channel();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accepted_by_broker = accepted.clone();
        let resubscribe = client.clone();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    // On every connection: rumqttc drops a queued subscription when a connection
                    // attempt fails before the broker is ready. The topics one by one, not
                    // `metamanager/#`: RabbitMQ sends a retained message (the status) only to
                    // a subscription without wildcards.
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let topics = [
                            "metamanager/status",
                            "metamanager/to/edgehub",
                            "metamanager/to/edged",
                        ]
                        .map(|t| {
                            rumqttc::SubscribeFilter::new(
                                format!("edge/{NODE}/{t}"),
                                QoS::AtLeastOnce,
                            )
                        });
                        let _ = resubscribe.try_subscribe_many(topics);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let value = serde_json::from_slice(&p.payload).unwrap_or_else(|_| {
                            Value::String(String::from_utf8_lossy(&p.payload).into())
                        });
                        let suffix = p
                            .topic
                            .strip_prefix(&format!("edge/{NODE}/"))
                            .unwrap_or(&p.topic)
                            .to_owned();
                        if tx.send((suffix, value)).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subscribed_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        accepted_by_broker.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    // Dropped: stop rather than reconnect.
                    Err(_) if tx.is_closed() => return,
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(WAIT, subscribed.recv())
            .await
            .expect("test client subscribed");
        Self {
            client: Some(client),
            accepted,
            received,
            seen: Vec::new(),
        }
    }

    /// Waits until a `mosquitto_sub` writing to `output` has subscribed: a broker sends a
    /// filter's retained messages once the subscription is live, so a retained probe published
    /// here on `probe_topic`, which the subscriber's last filter covers, shows up in `output`
    /// only after every filter before it is live too.
    pub async fn await_subscribed(&self, probe_topic: &str, output: &Path) {
        let probe = format!("probe-{}", uuid::Uuid::new_v4());
        self.publish_retained(probe_topic, &probe).await;
        let deadline = tokio::time::Instant::now() + WAIT;
        while !std::fs::read_to_string(output)
            .unwrap_or_default()
            .contains(&probe)
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "mosquitto_sub did not subscribe within {WAIT:?}: no retained probe on {probe_topic}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Publishes `msg` as `peer` ("edgehub" or "edged").
    pub async fn publish(&self, peer: &str, msg: &Value) {
        self.publish_raw(peer, serde_json::to_vec(msg).unwrap())
            .await;
    }

    /// Publishes `msg` as `peer` and waits for MetaManager's reply to it on that peer's topic.
    pub async fn request(&mut self, peer: &str, msg: &Value) -> Value {
        self.publish(peer, msg).await;
        let topic = format!("metamanager/to/{peer}");
        let id = msg["header"]["msg_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        self.reply_to(&topic, &id).await
    }

    /// Waits until the broker has acknowledged `n` QoS 1 publishes from this client.
    pub async fn wait_accepted(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.accepted.load(std::sync::atomic::Ordering::SeqCst) < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "broker did not accept {n} publishes"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Publishes at QoS 0, as a fire-and-forget sender would.
    pub async fn publish_qos0(&self, peer: &str, msg: &Value) {
        self.client
            .as_ref()
            .unwrap()
            .publish(
                format!("edge/{NODE}/{peer}/to/metamanager"),
                QoS::AtMostOnce,
                false,
                serde_json::to_vec(msg).unwrap(),
            )
            .await
            .unwrap();
    }

    /// Publishes `payload` on `topic`, retained, at QoS 1.
    pub async fn publish_retained(&self, topic: &str, payload: &str) {
        self.client
            .as_ref()
            .unwrap()
            .publish(topic, QoS::AtLeastOnce, true, payload.as_bytes().to_vec())
            .await
            .unwrap();
    }

    pub async fn publish_raw(&self, peer: &str, payload: Vec<u8>) {
        self.client
            .as_ref()
            .unwrap()
            .publish(
                format!("edge/{NODE}/{peer}/to/metamanager"),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .unwrap();
    }

    /// The first message on `topic` (a suffix after `edge/NODE/`) that satisfies `pred`,
    /// among those set aside earlier or arriving within [`WAIT`]; others are set aside.
    pub async fn wait_for(&mut self, topic: &str, pred: impl Fn(&Value) -> bool) -> Value {
        match self.try_wait_for(topic, &pred, WAIT).await {
            Some(v) => v,
            None => panic!(
                "nothing on {topic} matched within {WAIT:?}; saw: {:#?}",
                self.seen
            ),
        }
    }

    /// As [`Peer::wait_for`], giving up after `within`.
    pub async fn try_wait_for(
        &mut self,
        topic: &str,
        pred: impl Fn(&Value) -> bool,
        within: Duration,
    ) -> Option<Value> {
        // Messages set aside while waiting for something else count too, so callers need not
        // know in which order two replies arrive.
        if let Some(i) = self.seen.iter().position(|(t, v)| t == topic && pred(v)) {
            return Some(self.seen.remove(i).1);
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let next = tokio::time::timeout_at(deadline, self.received.recv()).await;
            match next {
                Ok(Some((t, v))) => {
                    if t == topic && pred(&v) {
                        return Some(v);
                    }
                    self.seen.push((t, v));
                }
                _ => return None,
            }
        }
    }

    /// Subscribes to `topic` (a suffix after `edge/NODE/`) again, which has the broker send its
    /// retained message again.
    pub async fn resubscribe(&self, topic: &str) {
        if let Some(client) = &self.client {
            let _ = client
                .subscribe(format!("edge/{NODE}/{topic}"), QoS::AtLeastOnce)
                .await;
        }
    }

    /// The reply on `topic` whose parent_msg_id is `parent`.
    pub async fn reply_to(&mut self, topic: &str, parent: &str) -> Value {
        let parent = parent.to_owned();
        self.wait_for(topic, move |v| {
            v["header"]["parent_msg_id"] == parent.as_str()
        })
        .await
    }

    /// The next message received, in arrival order, ignoring anything set aside.
    pub async fn next(&mut self) -> Option<(String, Value)> {
        self.received.recv().await
    }

    /// Everything received so far, and whatever arrives within `quiet`.
    pub async fn drain(&mut self, quiet: Duration) -> Vec<(String, Value)> {
        while let Ok(Some(m)) = tokio::time::timeout(quiet, self.received.recv()).await {
            self.seen.push(m);
        }
        std::mem::take(&mut self.seen)
    }

    /// Queries `resource` as `peer` and returns the reply's content.
    pub async fn query(&mut self, peer: &str, resource: &str) -> Value {
        let q = message("query", resource, Value::Null);
        self.publish(peer, &q).await;
        let topic = format!("metamanager/to/{peer}");
        let reply = self.reply_to(&topic, msg_id(&q)).await;
        assert_eq!(reply["route"]["operation"], "response", "{reply}");
        reply["content"].clone()
    }
}

/// The query MetaManager forwarded to the cloud, the next one on edgehub's topic.
pub async fn forwarded_query(app: &mut TestApp) -> Value {
    app.client
        .wait_for("metamanager/to/edgehub", |v| {
            v["route"]["operation"] == "query"
        })
        .await
}

/// Plays the cloud: answers the forwarded query `asked` with `operation` and `content`.
pub async fn answer_as_cloud(app: &TestApp, asked: &Value, operation: &str, content: Value) {
    let resource = asked["route"]["resource"].as_str().unwrap();
    let mut answer = message(operation, resource, content);
    answer["header"]["parent_msg_id"] = asked["header"]["msg_id"].clone();
    app.client.publish("edgehub", &answer).await;
}

/// The retained status as a client newly connecting to `port` as `login` sees it.
pub async fn retained_status(port: u16, login: Option<(String, String)>) -> Value {
    let mut c = Peer::connect_as(port, login).await;
    c.wait_for("metamanager/status", |_| true).await
}

/// Sends `operation` of `object` at `key` as the cloud would, and waits for its `OK`.
pub async fn write_as_cloud(app: &mut TestApp, operation: &str, key: &str, object: Value) {
    let m = message(operation, key, object);
    let reply = app.client.request("edgehub", &m).await;
    assert_eq!(reply["content"], "OK", "{reply}");
}

/// Inserts `object` at `key` as the cloud would, and waits for its `OK`.
pub async fn insert(app: &mut TestApp, key: &str, object: Value) {
    write_as_cloud(app, "insert", key, object).await;
}

/// MetaManager's forward of `sent` to edged (the message with its msg_id), as `edged` got it.
pub async fn forward_to_edged(edged: &mut Peer, sent: &Value) -> Value {
    edged
        .wait_for("metamanager/to/edged", |v| {
            v["header"]["msg_id"] == sent["header"]["msg_id"]
        })
        .await
}

/// Asserts that MetaManager answered `sent`, which edgehub sent, with `OK`.
pub async fn assert_acked(edgehub: &mut Peer, sent: &Value) {
    let ack = edgehub
        .reply_to("metamanager/to/edgehub", msg_id(sent))
        .await;
    assert_eq!(ack["content"], "OK", "{ack}");
}

/// With the cloud connected, edged asks for a secret the node does not hold: the key, edged's
/// query, and the query MetaManager forwarded to the cloud for it.
pub async fn ask_for_a_remote_secret(app: &mut TestApp) -> (&'static str, Value, Value) {
    app.set_cloud(true).await;
    let key = "default/secret/db-credentials";
    let query = message("query", key, Value::Null);
    app.client.publish("edged", &query).await;
    let asked = forwarded_query(app).await;
    (key, query, asked)
}

/// Plays the cloud answering the forwarded query `asked` with a `response` of `content`;
/// MetaManager's reply to edged's `query`.
pub async fn cloud_answers(
    app: &mut TestApp,
    asked: &Value,
    query: &Value,
    content: Value,
) -> Value {
    answer_as_cloud(app, asked, "response", content).await;
    app.client
        .reply_to("metamanager/to/edged", msg_id(query))
        .await
}

/// Declares one test per broker kind from an async fn taking a [`BrokerKind`].
#[macro_export]
macro_rules! both_brokers {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::BrokerKind::Embedded).await
                }
            )*
        }
        mod mosquitto {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::BrokerKind::Mosquitto).await
                }
            )*
        }
    };
}

/// Sends `GET path` on a connection with a 4 KiB receive buffer and returns it unread: a client
/// that stops reading, so the answer fills the connection after a few KiB.
pub async fn request_unread(port: u16, path: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
        .await
        .unwrap();
    stream
}

/// One HTTP/1.1 exchange on a fresh connection: status, headers (lower-cased), body.
pub async fn http(port: u16, method: &str, path: &str) -> (u16, String, String) {
    http_with(port, method, path, "application/json", "").await
}

/// [`http`] with a body of type `content_type`.
pub async fn http_with(
    port: u16,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> (u16, String, String) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(
        WAIT,
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut raw),
    )
    .await
    .expect("response within WAIT")
    .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    let head = head.to_lowercase();
    let body = if head.contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (code, head, body)
}

/// The body of a `Transfer-Encoding: chunked` answer (streamed lists are sent so).
pub fn dechunk(mut rest: &str) -> String {
    let mut body = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").expect("chunk size line");
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
        if size == 0 {
            return body;
        }
        body.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
}
