//! The processes tests and the bench run: mosquitto on a free port, and the `metamanager` binary
//! on a config file with its log in a file. Only std and tempfile, so that the bench can include
//! this file as it is (`#[path]`) without the tests' MQTT and JSON helpers.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The binary Cargo built for this run (it sets the variable for tests and benches alike).
pub const METAMANAGER: &str = env!("CARGO_BIN_EXE_metamanager");

/// How long a signalled process may take to exit before it counts as hung.
pub const STOP_WITHIN: Duration = Duration::from_secs(15);

/// How often a wait looks again: short beside start-up, long beside a syscall.
const POLL: Duration = Duration::from_millis(20);

/// How many free ports a broker is tried on before giving up: another process can take the
/// port between choosing it and the broker binding it.
const PORT_ATTEMPTS: usize = 5;

// ---------------------------------------------------------------------------------------------
// Ports

/// A port nobody listens on right now, for mosquitto, which cannot be told to take any free
/// port and say which: callers retry when another process takes the port first. (MetaManager
/// itself can be started on port 0 and logs what it got; see [`broker_port`].)
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Whether something listens on loopback `port` within `within`: mosquitto says nothing when
/// it is ready, so a connection that succeeds is the sign.
pub fn wait_for_port(port: u16, within: Duration) -> bool {
    wait_until(within, || TcpStream::connect(("127.0.0.1", port)).is_ok())
}

/// Whether `done` holds within `within`, asked again every few milliseconds.
pub fn wait_until(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

// ---------------------------------------------------------------------------------------------
// External tools

/// What a test needs that a machine may lack, each named by the variable that makes it
/// required: `METAMANAGER_REQUIRE_<name>=1` (CI sets every one in `.ci/run`).
#[derive(Clone, Copy, Debug)]
pub enum Requirement {
    /// mosquitto and its clients.
    Mosquitto,
    /// RabbitMQ with its MQTT plugin.
    RabbitMq,
    /// kubectl.
    Kubectl,
    /// Python's kubernetes client.
    PythonK8s,
    /// Mounting a small tmpfs, to fill a real disk (root).
    Tmpfs,
    /// A private network namespace, for ports a test must own (root, `unshare`).
    Netns,
    /// Prometheus's promtool, for the alert rules' unit tests.
    Promtool,
}

impl Requirement {
    /// Every requirement, so that a test can check `.ci/run` requires each.
    pub const ALL: [Requirement; 7] = [
        Requirement::Mosquitto,
        Requirement::RabbitMq,
        Requirement::Kubectl,
        Requirement::PythonK8s,
        Requirement::Tmpfs,
        Requirement::Netns,
        Requirement::Promtool,
    ];

    /// The variable that turns a skip into a failure.
    pub fn variable(self) -> &'static str {
        match self {
            Requirement::Mosquitto => "METAMANAGER_REQUIRE_MOSQUITTO",
            Requirement::RabbitMq => "METAMANAGER_REQUIRE_RABBITMQ",
            Requirement::Kubectl => "METAMANAGER_REQUIRE_KUBECTL",
            Requirement::PythonK8s => "METAMANAGER_REQUIRE_PYTHON_K8S",
            Requirement::Tmpfs => "METAMANAGER_REQUIRE_TMPFS",
            Requirement::Netns => "METAMANAGER_REQUIRE_NETNS",
            Requirement::Promtool => "METAMANAGER_REQUIRE_PROMTOOL",
        }
    }

    /// Whether this run asks for the tests that need it.
    pub fn required(self) -> bool {
        std::env::var(self.variable()).as_deref() == Ok("1")
    }
}

/// The one way a test gives up on a machine that lacks `what` needs: a `skipped:` line on
/// stderr, or, when the run requires it, a panic, so that CI cannot pass by skipping.
pub fn skip(what: Requirement, why: &str) {
    if what.required() {
        panic!("{why}, and {}=1 requires this test", what.variable());
    }
    eprintln!("skipped: {why} (set {}=1 to fail instead)", what.variable());
}

/// Reports `tool` missing ([`skip`] for mosquitto).
pub fn missing(tool: &str, install: &str) {
    skip(
        Requirement::Mosquitto,
        &format!("{tool} is not installed ({install})"),
    );
}

/// A small tmpfs mounted on a temporary directory, unmounted on drop: a real disk that fills.
/// Needs root; `None` (the test is skipped, see [`skip`]) where it cannot be mounted.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().expect("a mount point");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            skip(
                Requirement::Tmpfs,
                "cannot mount a tmpfs here (needs root), so no disk can be filled",
            );
            return None;
        }
        Some(Self { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Whether `program` can be run at all (`args` keep it from doing anything).
pub fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// The mosquitto broker binary, if installed: it lives in sbin, which a user's PATH may lack.
pub fn find_mosquitto() -> Option<PathBuf> {
    [
        "mosquitto",
        "/usr/sbin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ]
    .into_iter()
    .find(|c| runs(c, &["-h"]))
    .map(PathBuf::from)
}

/// [`find_mosquitto`] for a test: `None` means skip (see [`missing`]).
pub fn mosquitto_binary() -> Option<PathBuf> {
    let found = find_mosquitto();
    if found.is_none() {
        missing("mosquitto", "apt-get install mosquitto mosquitto-clients");
    }
    found
}

/// Whether the mosquitto_pub/mosquitto_sub clients are available (same skip rule).
pub fn mosquitto_clients() -> bool {
    let found = runs("mosquitto_pub", &["--help"]);
    if !found {
        missing("mosquitto-clients", "apt-get install mosquitto-clients");
    }
    found
}

// ---------------------------------------------------------------------------------------------
// mosquitto

/// A mosquitto process, killed on drop, with a temporary directory for its configuration, the
/// files that configuration names, and its log (stderr).
pub struct Mosquitto {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl Mosquitto {
    /// The broker most tests share: anonymous, nothing kept, nothing queued for clients that
    /// are away, so that what a test sees is what MetaManager sent while it listened.
    pub fn start(binary: &Path) -> Self {
        Self::start_with(binary, plain_conf)
    }

    /// The plain broker on `port` (to restart it where clients expect it); `None` if it did
    /// not come up.
    pub fn start_on(binary: &Path, port: u16) -> Option<Self> {
        Self::start_conf(binary, port, plain_conf)
    }

    /// Starts mosquitto on a free port with the configuration `conf(port, dir)` returns; `dir`
    /// is the broker's temporary directory, where `conf` may write files it refers to.
    pub fn start_with(binary: &Path, conf: impl Fn(u16, &Path) -> String) -> Self {
        (0..PORT_ATTEMPTS)
            .find_map(|_| Self::start_conf(binary, free_port(), &conf))
            .expect("mosquitto did not start")
    }

    /// Kills the broker with SIGKILL: no goodbye to its clients, no saved state.
    pub fn kill(&mut self) {
        let _ = kill9(&mut self.child);
    }

    /// The broker's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The broker's own log (stderr).
    pub fn log(&self) -> String {
        read_log(&self.dir.path().join("mosquitto.log"))
    }

    /// Stops the broker as a service manager does (SIGTERM): it says goodbye to its clients and
    /// bridges, and saves what its configuration keeps.
    pub fn stop(&mut self) {
        sigterm(&self.child);
        if exit_within(&mut self.child, STOP_WITHIN).is_none() {
            self.kill();
        }
    }

    /// Starts the stopped broker again: the same port, configuration and directory (so what it
    /// saved is restored). `false` if it did not come up.
    pub fn start_again(&mut self, binary: &Path) -> bool {
        self.child = Self::spawn(binary, self.dir.path());
        wait_for_port(self.port, Duration::from_secs(5))
    }

    fn start_conf(binary: &Path, port: u16, conf: impl Fn(u16, &Path) -> String) -> Option<Self> {
        let dir = tempfile::tempdir().expect("mosquitto's directory");
        let conf_file = dir.path().join("mosquitto.conf");
        std::fs::write(&conf_file, conf(port, dir.path())).expect("write mosquitto.conf");
        let child = Self::spawn(binary, dir.path());
        let mut broker = Self { port, child, dir };
        if wait_for_port(port, Duration::from_secs(5)) {
            return Some(broker);
        }
        broker.kill();
        eprintln!("mosquitto did not listen on {port}: {}", broker.log());
        None
    }

    /// mosquitto on `dir`'s mosquitto.conf, its stderr appended to `dir`'s mosquitto.log.
    fn spawn(binary: &Path, dir: &Path) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("mosquitto.log"))
            .expect("mosquitto.log");
        Command::new(binary)
            .arg("-c")
            .arg(dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start mosquitto")
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

fn plain_conf(port: u16, _dir: &Path) -> String {
    format!(
        "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\nset_tcp_nodelay true\n"
    )
}

// ---------------------------------------------------------------------------------------------
// metamanager

/// How to start the binary; the defaults run it as a shell would, on its built-in config.
#[derive(Default, Clone, Copy)]
pub struct Launch<'a> {
    /// `--config FILE`.
    pub config: Option<&'a Path>,
    /// Working directory; without one, relative paths in `config` resolve against the caller's.
    pub cwd: Option<&'a Path>,
    /// `RUST_LOG`; without one, the caller's environment decides.
    pub rust_log: Option<&'a str>,
    /// The file its log (stderr) is appended to, so that a restart adds to one log; without
    /// one the log is discarded.
    pub log: Option<&'a Path>,
    /// A limit on open files (soft and hard), set by the shell before it becomes MetaManager;
    /// without one, the caller's.
    pub open_files: Option<u32>,
    /// A network namespace of its own, with only a loopback that is up: its fixed ports are
    /// free there whatever this machine runs. Reach it with [`in_network_of`].
    pub private_network: bool,
}

impl Launch<'_> {
    /// Starts the process; stdout is discarded (MetaManager writes nothing there).
    pub fn spawn(&self) -> Child {
        let mut steps = Vec::new();
        if let Some(n) = self.open_files {
            steps.push(format!("ulimit -n {n}"));
        }
        if self.private_network {
            steps.push("PATH=\"$PATH:/usr/sbin:/sbin\" ip link set lo up".to_owned());
        }
        let mut command = if steps.is_empty() {
            Command::new(METAMANAGER)
        } else {
            // `exec` keeps the pid (unshare without --fork execs too): the child is
            // MetaManager itself, not a shell around it.
            let mut shell = if self.private_network {
                let mut unshare = Command::new("unshare");
                unshare.args(["--net", "sh"]);
                unshare
            } else {
                Command::new("sh")
            };
            let script = format!(r#"{} && exec "$@""#, steps.join(" && "));
            shell.args(["-c", &script, "sh", METAMANAGER]);
            shell
        };
        if let Some(config) = self.config {
            command.arg("--config").arg(config);
        }
        if let Some(cwd) = self.cwd {
            command.current_dir(cwd);
        }
        if let Some(filter) = self.rust_log {
            command.env("RUST_LOG", filter);
        }
        let stderr = match self.log {
            Some(path) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .expect("open metamanager's log"),
            ),
            None => Stdio::null(),
        };
        command
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start metamanager")
    }
}

/// A command run in the network namespace of process `pid` (one started with
/// [`Launch::private_network`]), to reach what listens there.
pub fn in_network_of(pid: u32, program: &str) -> Command {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .arg("--")
        .arg(program);
    command
}

/// The broker port in MetaManager's start-up line `metamanager starting ... broker=HOST:PORT`:
/// the embedded broker's bound port (it may be configured as 0), or the external one's.
pub fn broker_port(log: &str) -> Option<u16> {
    port_after(log, "metamanager starting", "broker=")
}

/// The HTTP port in `HTTP endpoint listening addr=HOST:PORT`.
pub fn http_port(log: &str) -> Option<u16> {
    port_after(log, "HTTP endpoint listening", "addr=")
}

fn port_after(log: &str, line_has: &str, key: &str) -> Option<u16> {
    let line = log.lines().find(|l| l.contains(line_has))?;
    let value = &line[line.find(key)? + key.len()..];
    let addr = value.split([' ', ')']).next()?;
    addr.rsplit(':').next()?.parse().ok()
}

/// What `found` reads in the log at `log` past byte `from`, once it is there; panics (with the
/// log) when the process exits first or nothing turns up within `within`. `what` names what
/// is awaited, for the panic.
pub fn wait_for_log<T>(
    child: &mut Child,
    log: &Path,
    from: usize,
    within: Duration,
    what: &str,
    found: impl Fn(&str) -> Option<T>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        let text = read_log(log);
        if let Some(value) = found(text.get(from..).unwrap_or_default()) {
            return value;
        }
        if let Some(status) = child.try_wait().expect("poll metamanager") {
            panic!("metamanager exited with {status} before logging {what}; log:\n{text}");
        }
        assert!(
            Instant::now() < deadline,
            "metamanager did not log {what} within {within:?}; log:\n{text}"
        );
        std::thread::sleep(POLL);
    }
}

/// A log file's text so far; empty before the process has written any.
pub fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Sends SIGTERM, MetaManager's signal to stop cleanly. Through kill(1): std can only SIGKILL.
pub fn sigterm(child: &Child) {
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -TERM {}: {sent}", child.id());
}

/// The exit status, once the process has exited within `within`.
pub fn exit_within(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let mut status = None;
    wait_until(within, || {
        status = child.try_wait().expect("poll the process");
        status.is_some()
    });
    status
}

/// Kills with SIGKILL, the way a power cut or the OOM killer would, and reaps the process.
pub fn kill9(child: &mut Child) -> std::io::Result<ExitStatus> {
    child.kill()?;
    child.wait()
}

/// Resident and peak resident memory of a process, from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    pub rss_kib: u64,
    pub peak_kib: u64,
}

/// Zero for what /proc does not tell (the process is gone, or this is not Linux).
pub fn memory_kib(pid: u32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Memory {
        rss_kib: field("VmRSS:"),
        peak_kib: field("VmHWM:"),
    }
}

/// MetaManager as a process this code owns, killed on drop, with its log.
pub struct MetaManager {
    child: Option<Child>,
    log: Option<PathBuf>,
    /// Where it runs, when it has a temporary directory of its own.
    dir: Option<tempfile::TempDir>,
}

impl MetaManager {
    pub fn start(launch: Launch) -> Self {
        Self {
            child: Some(launch.spawn()),
            log: launch.log.map(Path::to_path_buf),
            dir: None,
        }
    }

    /// Starts it in a fresh temporary directory, on `config` (written there as `edge.yaml`;
    /// `None` leaves it on its defaults), its log in `metamanager.log` there.
    pub fn in_temp_dir(config: Option<&str>, rust_log: Option<&str>) -> Self {
        Self::in_temp_dir_with(config, rust_log, false)
    }

    /// [`MetaManager::in_temp_dir`] on its defaults, in a network namespace of its own (see
    /// [`Launch::private_network`]); `None` (the test is skipped, see [`skip`]) where no
    /// namespace can be made.
    pub fn on_private_network() -> Option<Self> {
        let works = Command::new("unshare")
            .args([
                "--net",
                "sh",
                "-c",
                "PATH=\"$PATH:/usr/sbin:/sbin\" ip link set lo up",
            ])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !works {
            skip(
                Requirement::Netns,
                "cannot make a network namespace here (needs root, unshare and ip)",
            );
            return None;
        }
        Some(Self::in_temp_dir_with(None, None, true))
    }

    fn in_temp_dir_with(
        config: Option<&str>,
        rust_log: Option<&str>,
        private_network: bool,
    ) -> Self {
        let dir = tempfile::tempdir().expect("metamanager's directory");
        let config_file = dir.path().join("edge.yaml");
        if let Some(yaml) = config {
            std::fs::write(&config_file, yaml).expect("write edge.yaml");
        }
        let log = dir.path().join("metamanager.log");
        let mut mm = Self::start(Launch {
            config: config.map(|_| config_file.as_path()),
            cwd: Some(dir.path()),
            rust_log,
            log: Some(&log),
            open_files: None,
            private_network,
        });
        mm.dir = Some(dir);
        mm
    }

    /// The temporary directory of [`MetaManager::in_temp_dir`].
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("started in_temp_dir").path()
    }

    pub fn pid(&self) -> u32 {
        self.running_child().id()
    }

    /// Its log so far (empty when it is discarded).
    pub fn log(&self) -> String {
        self.log.as_deref().map(read_log).unwrap_or_default()
    }

    pub fn still_running(&mut self) -> bool {
        let child = self.child.as_mut().expect("started");
        child.try_wait().expect("poll metamanager").is_none()
    }

    /// See [`wait_for_log`]; reads the whole log.
    pub fn wait_for_log<T>(
        &mut self,
        within: Duration,
        what: &str,
        found: impl Fn(&str) -> Option<T>,
    ) -> T {
        let log = self.log.clone().expect("a log file to read");
        let child = self.child.as_mut().expect("started");
        wait_for_log(child, &log, 0, within, what, found)
    }

    /// SIGTERM, then the exit status within `within`; `None` if it is still running then
    /// (it is killed on drop).
    pub fn stop(&mut self, within: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("started");
        sigterm(child);
        let status = exit_within(child, within)?;
        self.child = None;
        Some(status)
    }

    /// [`MetaManager::stop`] within [`STOP_WITHIN`], or a panic with the log.
    pub fn terminate(&mut self) -> ExitStatus {
        match self.stop(STOP_WITHIN) {
            Some(status) => status,
            None => self.fail(&format!("ignored SIGTERM for {STOP_WITHIN:?}")),
        }
    }

    /// Waits for the process to exit by itself; a panic with the log after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("started");
        match exit_within(child, within) {
            Some(status) => {
                self.child = None;
                status
            }
            None => self.fail(&format!("did not exit within {within:?}")),
        }
    }

    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("started");
        kill9(&mut child).expect("SIGKILL metamanager");
    }

    pub fn memory_kib(&self) -> Memory {
        memory_kib(self.pid())
    }

    fn running_child(&self) -> &Child {
        self.child.as_ref().expect("started")
    }

    /// Kills the process first, so that the panic does not leave it behind.
    fn fail(&mut self, what: &str) -> ! {
        if let Some(mut child) = self.child.take() {
            let _ = kill9(&mut child);
        }
        panic!("metamanager {what}; log:\n{}", self.log());
    }
}

impl Drop for MetaManager {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill9(&mut child);
        }
    }
}
