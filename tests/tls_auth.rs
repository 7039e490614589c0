//! Authentication and TLS against real brokers: a mosquitto started here with a TLS listener,
//! a password file and (where asked) required client certificates, with certificates made here
//! by the openssl CLI; and the embedded broker with a username and password.
//!
//! The binary runs with `RUST_LOG=info` and its log is read back, so the failure cases assert on
//! the lines an operator would see.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::process::{broker_port, missing, MetaManager};
use common::{fixture, free_port, mosquitto_binary, mosquitto_clients, Mosquitto, NODE};
use serde_json::Value;

const USER: &str = "edge";
const PASSWORD: &str = "s3cret-pass";
/// How long the failure cases watch the process retry.
const WATCH: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------------------------
// Certificates

/// A CA, a server certificate for 127.0.0.1 (IP SAN) signed by it, a client certificate signed
/// by it, and an unrelated CA.
struct Pki {
    dir: tempfile::TempDir,
}

const OPENSSL_CONF: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
authorityKeyIdentifier = keyid
[client_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
";

impl Pki {
    /// `None` (skip) when openssl is missing, unless CI requires the test tools.
    fn generate() -> Option<Self> {
        if Command::new("openssl")
            .arg("version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            missing("openssl", "apt-get install openssl");
            return None;
        }
        let pki = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::write(pki.path("openssl.cnf"), OPENSSL_CONF).unwrap();
        pki.self_signed("ca", "MetaManager test CA");
        pki.self_signed("other-ca", "Some other CA");
        pki.signed("server", "127.0.0.1", "server_ext", 2);
        pki.signed("client", "metamanager-test-node", "client_ext", 3);
        Some(pki)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `openssl req` with a new P-256 key in `{name}.key` and the subject `CN=cn`; `args` say
    /// what to make with it, and where to write it.
    fn request(&self, name: &str, cn: &str, args: &[&str]) {
        let (key, subject) = (format!("{name}.key"), format!("/CN={cn}"));
        let mut all = vec![
            "req",
            "-config",
            "openssl.cnf",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-subj",
            &subject,
        ];
        all.extend_from_slice(args);
        self.openssl(&all);
    }

    fn self_signed(&self, name: &str, cn: &str) {
        let cert = format!("{name}.crt");
        self.request(
            name,
            cn,
            &[
                "-x509",
                "-extensions",
                "ca_ext",
                "-days",
                "2",
                "-out",
                &cert,
            ],
        );
    }

    fn signed(&self, name: &str, cn: &str, extensions: &str, serial: u32) {
        self.request(name, cn, &["-new", "-out", &format!("{name}.csr")]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-set_serial",
            &serial.to_string(),
            "-days",
            "2",
            "-extfile",
            "openssl.cnf",
            "-extensions",
            extensions,
            "-out",
            &format!("{name}.crt"),
        ]);
    }
}

// ---------------------------------------------------------------------------------------------
// Brokers

/// A mosquitto with a TLS listener and a password file. `None` (skip) when mosquitto is missing.
fn tls_broker(pki: &Pki, require_certificate: bool) -> Option<Mosquitto> {
    let binary = mosquitto_binary()?;
    Some(Mosquitto::start_with(&binary, |port, dir| {
        let passwd = dir.join("passwd");
        let made = Command::new("mosquitto_passwd")
            .arg("-c")
            .arg("-b")
            .arg(&passwd)
            .args([USER, PASSWORD])
            .output()
            .expect("mosquitto_passwd (package mosquitto) runs");
        assert!(
            made.status.success(),
            "mosquitto_passwd: {}",
            String::from_utf8_lossy(&made.stderr)
        );
        format!(
            // Run as root (as in CI), mosquitto would switch to the `mosquitto` user and could
            // then not read the files in these private temp dirs.
            "user root\n\
             per_listener_settings false\n\
             allow_anonymous false\n\
             password_file {}\n\
             persistence false\n\
             log_dest stderr\n\
             listener {port} 127.0.0.1\n\
             cafile {}\n\
             certfile {}\n\
             keyfile {}\n\
             require_certificate {require_certificate}\n",
            passwd.display(),
            pki.path("ca.crt").display(),
            pki.path("server.crt").display(),
            pki.path("server.key").display(),
        )
    }))
}

// ---------------------------------------------------------------------------------------------
// MetaManager

/// The binary in a temp dir of its own, logging at info, on a config whose `mqtt:` block is
/// `mqtt_yaml` (indented two spaces).
fn start_metamanager(mqtt_yaml: &str) -> MetaManager {
    let config = format!(
        "node_id: {NODE}\nmqtt:\n{mqtt_yaml}database:\n  path: data/metamanager.db\nhttp:\n  enabled: false\n"
    );
    MetaManager::in_temp_dir(Some(&config), Some("info"))
}

/// The `mqtt:` block for the external TLS broker. `password` goes into a password file.
fn external_yaml(
    dir: &Path,
    port: u16,
    password: &str,
    ca: &Path,
    client: Option<(&Path, &Path)>,
) -> String {
    let password_file = dir.join(format!("password-{port}-{}", password.len()));
    // A trailing newline, as an editor or `echo` leaves it: it is not part of the password.
    std::fs::write(&password_file, format!("{password}\n")).unwrap();
    format!(
        "  mode: external\n  host: 127.0.0.1\n  port: {port}\n  username: {USER}\n  password_file: {}\n{}",
        password_file.display(),
        tls_yaml(ca, client)
    )
}

/// The `mqtt.tls` block: the CA to trust, and the client certificate and key if any.
fn tls_yaml(ca: &Path, client: Option<(&Path, &Path)>) -> String {
    let mut yaml = format!("  tls:\n    ca_file: {}\n", ca.display());
    if let Some((cert, key)) = client {
        yaml.push_str(&format!(
            "    cert_file: {}\n    key_file: {}\n",
            cert.display(),
            key.display()
        ));
    }
    yaml
}

// ---------------------------------------------------------------------------------------------
// mosquitto_sub / mosquitto_pub

/// A `mosquitto_sub -v` whose output lines arrive on a channel.
struct Sub {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Sub {
    fn start(connection: &[String], topic: &str) -> Self {
        let mut child = Command::new("mosquitto_sub")
            .args(connection)
            .args(["-q", "1", "-v", "-t", topic, "-W", "20"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The payload of the next line on `topic` (full topic) satisfying `pred`.
    fn wait_for(&mut self, topic: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some((t, payload)) = line.split_once(' ') {
                        if t == topic {
                            if let Ok(v) = serde_json::from_str::<Value>(payload) {
                                if pred(&v) {
                                    return v;
                                }
                            }
                        }
                    }
                    self.seen.push(line);
                }
                Err(_) => panic!("nothing on {topic} matched; saw {:#?}", self.seen),
            }
        }
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pub_status(connection: &[String], topic: &str, payload: &str) -> std::process::Output {
    Command::new("mosquitto_pub")
        .args(connection)
        .args(["-q", "1", "-t", topic, "-m", payload])
        .output()
        .unwrap()
}

/// Subscribes as edgehub, waits for MetaManager's retained online status (which it publishes
/// only after subscribing), inserts the fixture pod, and returns the ack.
fn insert_and_get_ack(connection: &[String]) -> Value {
    let mut sub = Sub::start(connection, &format!("edge/{NODE}/metamanager/#"));
    let status = sub.wait_for(&format!("edge/{NODE}/metamanager/status"), |v| {
        v["state"] == "online"
    });
    assert_eq!(status["node_id"], NODE);
    let insert = fixture("insert-pod.message.json");
    let out = pub_status(
        connection,
        &format!("edge/{NODE}/edgehub/to/metamanager"),
        &insert.to_string(),
    );
    assert!(
        out.status.success(),
        "mosquitto_pub: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ack = sub.wait_for(&format!("edge/{NODE}/metamanager/to/edgehub"), |v| {
        v["header"]["parent_msg_id"] == insert["header"]["msg_id"]
    });
    assert_eq!(ack["route"]["operation"], "response", "{ack}");
    assert_eq!(ack["content"], "OK", "{ack}");
    assert_eq!(ack["route"]["source"], "metamanager", "{ack}");
    ack
}

fn tls_connection(pki: &Pki, port: u16, password: &str) -> Vec<String> {
    [
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "--cafile",
        &pki.path("ca.crt").display().to_string(),
        "--cert",
        &pki.path("client.crt").display().to_string(),
        "--key",
        &pki.path("client.key").display().to_string(),
        "-u",
        USER,
        "-P",
        password,
    ]
    .map(String::from)
    .to_vec()
}

/// Failed attempts of the receiving connection (the sending one, `-out`, retries alongside it
/// with the same backoff).
fn connect_failures(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("cannot connect to MQTT broker") && !l.contains("-out "))
        .collect()
}

/// The process keeps retrying for [`WATCH`], with backoff, logging `expected` as the reason;
/// then SIGTERM stops it with exit 0.
fn assert_retries_with_backoff(mut mm: MetaManager, expected: &[&str]) -> String {
    std::thread::sleep(WATCH);
    assert!(
        mm.still_running(),
        "metamanager exited instead of retrying; log:\n{}",
        mm.log()
    );
    let log = mm.log();
    let failures = connect_failures(&log);
    // Backoff 100 ms doubling: attempts at about 0, 0.1, 0.3, 0.7, 1.5 and 3.1 s. Without
    // backoff there would be hundreds; a single line would mean no retry.
    assert!(
        (2..=7).contains(&failures.len()),
        "{} connection attempts in {WATCH:?}; log:\n{log}",
        failures.len()
    );
    for line in &failures {
        assert!(
            expected.iter().any(|e| line.contains(e)),
            "reason should contain one of {expected:?}: {line}"
        );
    }
    assert!(
        !log.contains("connected to MQTT broker"),
        "must not connect; log:\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    let status = mm.terminate();
    let log = mm.log();
    assert!(status.success(), "exit status {status}; log:\n{log}");
    assert!(log.contains("stopped"), "{log}");
    log
}

fn skip_without_clients() -> bool {
    !mosquitto_clients()
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn tls_with_password_file_and_client_certificate_works_end_to_end() {
    if skip_without_clients() {
        return;
    }
    let Some(pki) = Pki::generate() else { return };
    let Some(broker) = tls_broker(&pki, true) else {
        return;
    };
    let conf = tempfile::tempdir().unwrap();
    let yaml = external_yaml(
        conf.path(),
        broker.port,
        PASSWORD,
        &pki.path("ca.crt"),
        Some((&pki.path("client.crt"), &pki.path("client.key"))),
    );
    let mut mm = start_metamanager(&yaml);
    insert_and_get_ack(&tls_connection(&pki, broker.port, PASSWORD));
    let log = mm.log();
    assert!(log.contains("connected to MQTT broker"), "{log}");
    assert!(connect_failures(&log).is_empty(), "{log}");
    // The broker saw a TLS client authenticate as USER.
    assert!(
        broker.log().contains(&format!("u'{USER}'")),
        "mosquitto log:\n{}",
        broker.log()
    );
    let status = mm.terminate();
    assert!(status.success(), "{status}; log:\n{}", mm.log());
}

/// A TLS connection the broker refuses, and what MetaManager must log about it.
struct Refused<'a> {
    /// Whether the broker asks for a client certificate.
    client_certificate_required: bool,
    password: &'a str,
    /// The CA file MetaManager trusts, in the test PKI.
    ca: &'a str,
    /// Whether MetaManager presents the client certificate.
    client_certificate: bool,
    /// One of these is the logged reason of every failed attempt.
    reasons: &'a [&'a str],
    /// The log names each of these, to point the operator at what to fix.
    hints: &'a [&'a str],
}

/// Runs MetaManager against a TLS broker that refuses it as `case` says, and checks that it
/// logs why and retries with backoff.
fn refused_and_retried_with_backoff(case: Refused) {
    let Some(pki) = Pki::generate() else { return };
    let Some(broker) = tls_broker(&pki, case.client_certificate_required) else {
        return;
    };
    let conf = tempfile::tempdir().unwrap();
    let (cert, key) = (pki.path("client.crt"), pki.path("client.key"));
    let yaml = external_yaml(
        conf.path(),
        broker.port,
        case.password,
        &pki.path(case.ca),
        case.client_certificate
            .then_some((cert.as_path(), key.as_path())),
    );
    let mm = start_metamanager(&yaml);
    let log = assert_retries_with_backoff(mm, case.reasons);
    for hint in case.hints {
        assert!(log.contains(hint), "{hint:?} missing from:\n{log}");
    }
}

#[test]
fn wrong_password_is_logged_and_retried_with_backoff() {
    refused_and_retried_with_backoff(Refused {
        client_certificate_required: true,
        password: "not-the-password",
        ca: "ca.crt",
        client_certificate: true,
        reasons: &["not authorized", "bad username or password"],
        hints: &["mqtt.password_file"],
    });
}

#[test]
fn broker_certificate_from_another_ca_is_logged_and_retried_with_backoff() {
    refused_and_retried_with_backoff(Refused {
        client_certificate_required: false,
        password: PASSWORD,
        ca: "other-ca.crt",
        client_certificate: false,
        reasons: &["TLS handshake failed: invalid peer certificate"],
        hints: &["UnknownIssuer", "mqtt.tls.ca_file"],
    });
}

#[test]
fn missing_client_certificate_is_logged_and_retried_with_backoff() {
    refused_and_retried_with_backoff(Refused {
        client_certificate_required: true,
        password: PASSWORD,
        ca: "ca.crt",
        client_certificate: false,
        reasons: &["TLS handshake failed"],
        hints: &["client certificate"],
    });
}

/// Unusable TLS files stop start-up with exit code 2 (a bad configuration), before the database is created, with an
/// error naming the key and the file.
#[test]
fn unusable_tls_files_stop_start_up_naming_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "this is not a certificate\n").unwrap();
    let broken = dir.path().join("broken.pem");
    std::fs::write(
        &broken,
        "-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let missing = dir.path().join("no-such-dir/ca.pem");
    let port = free_port();
    let external = |ca: &Path, client: Option<(&Path, &Path)>| {
        format!(
            "  mode: external\n  host: 127.0.0.1\n  port: {port}\n{}",
            tls_yaml(ca, client)
        )
    };
    let mut cases = vec![
        (
            external(&missing, None),
            "mqtt.tls.ca_file",
            missing.clone(),
        ),
        (
            external(&garbage, None),
            "mqtt.tls.ca_file",
            garbage.clone(),
        ),
        (external(&broken, None), "mqtt.tls.ca_file", broken.clone()),
    ];
    let pki = Pki::generate();
    if let Some(pki) = &pki {
        let (ca, cert, key) = (
            pki.path("ca.crt"),
            pki.path("client.crt"),
            pki.path("client.key"),
        );
        cases.push((
            external(&ca, Some((&missing, &key))),
            "mqtt.tls.cert_file",
            missing.clone(),
        ));
        // A key file with no key in it.
        cases.push((
            external(&ca, Some((&cert, &cert))),
            "mqtt.tls.key_file",
            cert.clone(),
        ));
        // A key that does not belong to the certificate.
        cases.push((
            external(&ca, Some((&cert, &pki.path("server.key")))),
            "mqtt.tls.key_file",
            pki.path("server.key"),
        ));
    }
    for (yaml, key, file) in cases {
        let mut mm = start_metamanager(&yaml);
        let status = mm.wait_exit(Duration::from_secs(10));
        let log = mm.log();
        assert_eq!(status.code(), Some(2), "{yaml}\n{log}");
        assert!(log.contains(key), "{yaml}: should name {key}:\n{log}");
        assert!(
            log.contains(&file.display().to_string()),
            "{yaml}: should name {}:\n{log}",
            file.display()
        );
        assert!(
            !mm.dir().join("data").exists(),
            "{yaml}: nothing may be created before the TLS files are read"
        );
    }
}

/// The embedded broker requires the configured credentials: MetaManager's own client uses them,
/// a client with them works, a client with a wrong password or none is refused.
#[test]
fn embedded_broker_requires_the_configured_credentials() {
    if skip_without_clients() {
        return;
    }
    // Port 0: the broker binds a free port and MetaManager logs which, once it listens.
    let mut mm = start_metamanager(&format!(
        "  mode: embedded\n  host: 127.0.0.1\n  port: 0\n  username: {USER}\n  password: {PASSWORD}\n"
    ));
    let port = mm.wait_for_log(Duration::from_secs(10), "its broker's port", broker_port);
    let plain = |user: Option<(&str, &str)>| {
        let mut args = ["-h", "127.0.0.1", "-p", &port.to_string()]
            .map(String::from)
            .to_vec();
        if let Some((u, p)) = user {
            args.extend(["-u", u, "-P", p].map(String::from));
        }
        args
    };
    insert_and_get_ack(&plain(Some((USER, PASSWORD))));

    let topic = format!("edge/{NODE}/edgehub/to/metamanager");
    let payload = fixture("insert-pod.message.json").to_string();
    for (who, connection) in [
        ("wrong password", plain(Some((USER, "wrong")))),
        ("no credentials", plain(None)),
    ] {
        let out = pub_status(&connection, &topic, &payload);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // rumqttd drops a client with bad credentials ("The connection was lost"); a broker
        // that answers with a CONNACK refusal gives "Connection Refused". Either way it is the
        // connection that failed, not the command line.
        assert!(
            !out.status.success() && stderr.to_lowercase().contains("connection"),
            "{who}: mosquitto_pub should be refused: {:?} {stderr}",
            out.status
        );
    }
    let status = mm.terminate();
    assert!(status.success(), "{status}; log:\n{}", mm.log());
}
