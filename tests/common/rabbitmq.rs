//! RabbitMQ with its MQTT plugin, as a node of this test binary's own: its own node name, its
//! own epmd, free ports, and every file (database, logs, config, plugins list, cookie) in a
//! temporary directory. Not the system service.
//!
//! A node takes many seconds to boot, so one node serves the whole test binary, started by the
//! first test that asks. Tests take turns on it ([`lease`]): MetaManager's client id is
//! `metamanager-{node_id}` in every test, and RabbitMQ throws off a client whose id another
//! connection takes in any virtual host, so two tests at once would throw each other's
//! MetaManager off. Each turn gets a virtual host of its own, so that no retained status,
//! session queue or queued message of an earlier test is seen by a later one.
//!
//! The node is never dropped (it lives in a static): a shell beside it waits for the end of
//! its stdin, which comes when this process exits however it exits, then kills the node and
//! its epmd and removes the directory.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::process::{free_port, runs, skip, Requirement};
use super::NODE;

/// The password of every account below.
pub const PASSWORD: &str = "rabbit-pass";
/// An account with every permission, for the test's own clients (edgehub and edged at once).
pub const TESTER: &str = "tester";
/// The client id whose session the definitions hold, in the first virtual host: its queue is
/// the last thing RabbitMQ imports (see [`RabbitMq::wait_ready`]).
const LOADED: &str = "definitions-loaded";
/// Virtual hosts made at boot: one per test that uses the node, at most.
const VHOSTS: usize = 24;
/// How long the node may take to boot on a busy machine.
const BOOT_WITHIN: Duration = Duration::from_secs(120);

/// RabbitMQ's start script as Debian installs it: the one in sbin switches to the `rabbitmq`
/// user when run as root, which could not write this test's directory.
const SERVER_SCRIPTS: [&str; 2] = ["/usr/lib/rabbitmq/bin/rabbitmq-server", "rabbitmq-server"];

/// The accounts MetaManager and the node's agents have on the node (see [`definitions`]).
pub fn metamanager_account() -> String {
    format!("metamanager-{NODE}")
}
pub fn metamanager_out_account() -> String {
    format!("metamanager-{NODE}-out")
}
pub fn edgehub_account() -> String {
    format!("edgehub-{NODE}")
}
pub fn edged_account() -> String {
    format!("edged-{NODE}")
}

pub struct RabbitMq {
    pub mqtt_port: u16,
    dir: PathBuf,
    /// Held open until this process exits; its end stops the node (see the module doc).
    _lifeline: ChildStdin,
    _keeper: Child,
}

/// A turn on the shared node: a virtual host of its own until dropped.
pub struct Lease {
    pub vhost: String,
    pub port: u16,
    /// A file holding [`PASSWORD`], for MetaManager's `mqtt.password_file`.
    pub password_file: PathBuf,
    _turn: tokio::sync::MutexGuard<'static, usize>,
}

impl Lease {
    /// `account` in this lease's virtual host, as RabbitMQ's MQTT plugin reads a username.
    pub fn login(&self, account: &str) -> (String, String) {
        (format!("{}:{account}", self.vhost), PASSWORD.to_owned())
    }
}

static NODE_STARTED: OnceLock<Option<RabbitMq>> = OnceLock::new();
static TURN: tokio::sync::Mutex<usize> = tokio::sync::Mutex::const_new(0);

/// Waits for the node to be free and takes the next virtual host; starts the node first if
/// nobody has. `None` (skip) when RabbitMQ is not installed, unless
/// METAMANAGER_REQUIRE_RABBITMQ=1.
pub async fn lease() -> Option<Lease> {
    let mut turn = TURN.lock().await;
    // Started on a thread of its own: the wait for it runs a runtime of its own.
    let node = NODE_STARTED
        .get_or_init(|| std::thread::spawn(RabbitMq::start).join().unwrap())
        .as_ref()?;
    assert!(
        *turn < VHOSTS,
        "more than {VHOSTS} RabbitMQ tests in one binary"
    );
    let vhost = format!("t{turn}");
    *turn += 1;
    Some(Lease {
        vhost,
        port: node.mqtt_port,
        password_file: node.dir.join("password"),
        _turn: turn,
    })
}

fn server_script() -> Option<&'static str> {
    let found = SERVER_SCRIPTS
        .into_iter()
        .find(|s| Path::new(s).is_file() || runs("sh", &["-c", &format!("command -v {s}")]));
    let epmd = runs("epmd", &["-help"]);
    if found.is_none() || !epmd {
        skip(
            Requirement::RabbitMq,
            "rabbitmq-server is not installed (apt-get install rabbitmq-server)",
        );
        return None;
    }
    found
}

impl RabbitMq {
    fn start() -> Option<Self> {
        let script = server_script()?;
        let dir = tempfile::tempdir().expect("RabbitMQ's directory").keep();
        let mqtt_port = free_port();
        let amqp_port = free_port();
        let epmd_port = free_port();
        let dist_port = free_port();
        let defs = dir.join("definitions.json");
        std::fs::write(&defs, definitions().to_string()).unwrap();
        let password = dir.join("password");
        std::fs::write(&password, format!("{PASSWORD}\n")).unwrap();
        // Readable by its owner only, or MetaManager warns about it.
        let owner_only = std::os::unix::fs::PermissionsExt::from_mode(0o600);
        std::fs::set_permissions(&password, owner_only).unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[rabbitmq_mqtt].\n").unwrap();
        std::fs::write(dir.join("rabbitmq-env.conf"), "").unwrap();
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.default = 127.0.0.1:{amqp_port}\n\
                 mqtt.listeners.tcp.default = 127.0.0.1:{mqtt_port}\n\
                 mqtt.allow_anonymous = false\n\
                 mqtt.prefetch = 100\n\
                 mqtt.subscription_ttl = infinity\n\
                 load_definitions = {}\n",
                defs.display()
            ),
        )
        .unwrap();
        let mut keeper = Command::new("sh")
            .arg("-c")
            .arg(KEEPER)
            .arg(script)
            .env("DIR", &dir)
            .env("HOME", &dir)
            .env("ERL_EPMD_PORT", epmd_port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env(
                "RABBITMQ_NODENAME",
                format!("metamanager-test-{}@localhost", std::process::id()),
            )
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_PID_FILE", dir.join("beam.pid"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start RabbitMQ's keeper shell");
        let lifeline = keeper.stdin.take().expect("keeper's stdin");
        let node = Self {
            mqtt_port,
            dir,
            _lifeline: lifeline,
            _keeper: keeper,
        };
        node.wait_ready();
        Some(node)
    }

    /// Until the definitions are loaded, all of them. The listener opens before RabbitMQ 3.10
    /// imports them, and it imports them kind by kind (users, virtual hosts, permissions,
    /// topic permissions, ..., queues), each kind's several at once: a login that succeeds
    /// proves only its own permission, and a test could otherwise find another account still
    /// without its permission (refused for that, CONNACK 5) or without its topic permissions
    /// (allowed every topic). Queues come last, so the [`LOADED`] session's queue existing
    /// (the CONNACK's session present flag) says everything is in.
    fn wait_ready(&self) {
        let started = Instant::now();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        loop {
            if runtime.block_on(self.loaded()) {
                eprintln!("RabbitMQ ready after {:?}", started.elapsed());
                return;
            }
            let log = self.log();
            assert!(
                started.elapsed() < BOOT_WITHIN && !log.contains("BOOT FAILED"),
                "RabbitMQ did not start within {BOOT_WITHIN:?}; its output:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Whether [`TESTER`], as the client [`LOADED`] in the first virtual host, finds its
    /// session there. False while the node cannot be reached or refuses the login.
    async fn loaded(&self) -> bool {
        let mut options = rumqttc::MqttOptions::new(LOADED, "127.0.0.1", self.mqtt_port);
        options.set_credentials(format!("t0:{TESTER}"), PASSWORD);
        options.set_clean_session(false);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1);
        let answer = tokio::time::timeout(Duration::from_secs(2), eventloop.poll()).await;
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
        matches!(
            answer,
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack)))) if ack.session_present
        )
    }

    /// What the node wrote to stdout and stderr.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.join("server.log")) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }
}

/// Starts epmd on its port and waits for it (else the node would start one as a daemon that
/// outlives the test), starts the node, then waits for the end of stdin and cleans up.
const KEEPER: &str = r#"
script="$0"
epmd -port "$ERL_EPMD_PORT" >/dev/null 2>&1 &
epmd_pid=$!
i=0
until epmd -port "$ERL_EPMD_PORT" -names >/dev/null 2>&1; do
    i=$((i + 1)); [ "$i" -gt 200 ] && break; sleep 0.05
done
"$script" </dev/null >"$DIR/server.log" 2>&1 &
server_pid=$!
cat >/dev/null
kill -9 "$(cat "$DIR/beam.pid" 2>/dev/null)" "$server_pid" "$epmd_pid" 2>/dev/null
wait
rm -rf "$DIR"
"#;

/// A regex matching exactly `s` (only `.` needs escaping in the names used here).
fn exact(s: &str) -> String {
    s.replace('.', r"\.")
}

/// Accounts, virtual hosts, permissions and the [`LOADED`] session's queue, loaded at boot:
/// [`TESTER`] may do anything; each per-node account may use only the session queues named
/// after it (so only it can use its client id's session) and only its topics. Topics are in
/// AMQP form in RabbitMQ's topic permissions: `/` becomes `.`.
pub fn definitions() -> Value {
    let node = exact(NODE);
    let t = |rest: &str| format!(r"^edge\.{node}\.{rest}$");
    let own_queues = |account: &str, extra: &str| {
        format!(
            r"^(amq\.topic|mqtt-subscription-{}{extra}qos[01])$",
            exact(account)
        )
    };
    // MetaManager's readiness probe connects with `{client_id}-ready-{random}` and a clean
    // session, which makes RabbitMQ check `configure` on that id's session queues.
    let mm_extra = "(-ready-[0-9a-f]+)?";
    let accounts: Vec<(String, String, String, String)> = vec![
        (
            metamanager_account(),
            mm_extra.into(),
            t(r"(edgehub|edged)\.to\.metamanager"),
            t(r"metamanager\.status"),
        ),
        (
            metamanager_out_account(),
            mm_extra.into(),
            "^$".into(),
            t(r"metamanager\.(to\.edgehub|to\.edged|status)"),
        ),
        (
            edgehub_account(),
            String::new(),
            t(r"metamanager\.(to\.edgehub|status)"),
            t(r"edgehub\.to\.metamanager"),
        ),
        (
            edged_account(),
            String::new(),
            t(r"metamanager\.(to\.edged|status)"),
            t(r"edged\.to\.metamanager"),
        ),
    ];
    let vhosts: Vec<String> = (0..VHOSTS).map(|i| format!("t{i}")).collect();
    let mut users = vec![json!({"name": TESTER, "password": PASSWORD, "tags": ""})];
    let mut permissions = Vec::new();
    let mut topic_permissions = Vec::new();
    for vhost in &vhosts {
        permissions.push(json!({"user": TESTER, "vhost": vhost,
            "configure": ".*", "write": ".*", "read": ".*"}));
    }
    for (name, extra, read, write) in &accounts {
        users.push(json!({"name": name, "password": PASSWORD, "tags": ""}));
        let queues = own_queues(name, extra);
        let configure = format!(r"^mqtt-subscription-{}{extra}qos[01]$", exact(name));
        for vhost in &vhosts {
            permissions.push(json!({"user": name, "vhost": vhost,
                "configure": configure, "write": queues, "read": queues}));
            topic_permissions.push(json!({"user": name, "vhost": vhost,
                "exchange": "amq.topic", "write": write, "read": read}));
        }
    }
    // As the MQTT plugin declares a session's queue with `mqtt.subscription_ttl = infinity`.
    let loaded = json!({"name": format!("mqtt-subscription-{LOADED}qos1"), "vhost": "t0",
        "durable": true, "auto_delete": false, "arguments": {}});
    json!({
        "users": users,
        "vhosts": vhosts.iter().map(|v| json!({"name": v})).collect::<Vec<_>>(),
        "permissions": permissions,
        "topic_permissions": topic_permissions,
        "queues": [loaded],
    })
}
