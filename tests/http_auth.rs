//! Authentication and authorization of the local API against the real binary, with kubectl
//! and raw requests: a static token file and an ABAC policy in kube-apiserver's formats,
//! 401 without a valid token, 403 where the policy says no, anonymous probes, and no anonymous
//! listener beyond loopback unless the operator says so.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::process::{self, Launch, MetaManager};
use common::{BrokerKind, Options, TestApp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKENS: &str = "alice-token,alice,1001,\"viewers,ops\"\nbob-token,bob,1002\n";
const POLICY: &str = concat!(
    r#"{"apiVersion":"abac.authorization.kubernetes.io/v1beta1","kind":"Policy","spec":{"user":"alice","namespace":"default","resource":"*","apiGroup":"*","readonly":true}}"#,
    "\n",
    r#"{"apiVersion":"abac.authorization.kubernetes.io/v1beta1","kind":"Policy","spec":{"user":"alice","nonResourcePath":"*","readonly":true}}"#,
    "\n",
);

/// A certificate for `localhost` and 127.0.0.1, self-signed, and its key, in `dir`.
fn certificate(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join("api.crt"), dir.join("api.key"));
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        // A server certificate, not a CA: rustls refuses a CA as the end entity.
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-addext", "extendedKeyUsage=serverAuth"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success(), "openssl made the certificate");
    (cert, key)
}

/// The status code and whole answer of `GET path` over HTTPS (trusting `ca`), with `token`.
async fn get(port: u16, ca: &std::path::Path, path: &str, token: Option<&str>) -> (u16, String) {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = connector.connect(name, tcp).await.unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let code = raw.split(' ').nth(1).unwrap().parse().unwrap();
    (code, raw)
}

fn kubectl(
    port: u16,
    home: &std::path::Path,
    ca: &std::path::Path,
    token: &str,
    args: &[&str],
) -> std::process::Output {
    let config = home.join("kubeconfig");
    std::fs::write(&config, "").unwrap();
    Command::new("kubectl")
        .env("HOME", home)
        .env("KUBECONFIG", &config)
        .arg(format!("--server=https://localhost:{port}"))
        .arg(format!("--certificate-authority={}", ca.display()))
        .arg(format!("--token={token}"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_https_tokens_and_an_abac_policy_decide_who_may_read_what() {
    let files = tempfile::tempdir().unwrap();
    let tokens = files.path().join("tokens.csv");
    let policy = files.path().join("policy.jsonl");
    std::fs::write(&tokens, TOKENS).unwrap();
    std::fs::write(&policy, POLICY).unwrap();
    let (ca, key) = certificate(files.path());
    let http = format!(
        "tls: {{cert_file: {}, key_file: {}}}\nauth: {{token_file: {}, policy_file: {}}}",
        ca.display(),
        key.display(),
        tokens.display(),
        policy.display()
    );
    let Some(app) = TestApp::spawn(Options::new(BrokerKind::Embedded).http(&http)).await else {
        return;
    };
    let port = app.http_port;

    // Probes stay anonymous; everything else needs a valid token.
    assert_eq!(get(port, &ca, "/healthz", None).await.0, 200);
    assert_eq!(get(port, &ca, "/readyz", None).await.0, 200);
    let (code, body) = get(port, &ca, "/api/v1/namespaces/default/pods", None).await;
    assert_eq!(code, 401, "{body}");
    assert!(body.contains(r#""reason":"Unauthorized""#), "{body}");
    assert_eq!(get(port, &ca, "/metrics", Some("wrong")).await.0, 401);

    // alice may read the default namespace and the non-resource paths; bob nothing.
    let alice = Some("alice-token");
    assert_eq!(
        get(port, &ca, "/api/v1/namespaces/default/pods", alice)
            .await
            .0,
        200
    );
    assert_eq!(get(port, &ca, "/metrics", alice).await.0, 200);
    let (code, body) = get(port, &ca, "/api/v1/namespaces/kube-system/secrets", alice).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains(r#""reason":"Forbidden""#), "{body}");
    let bob = Some("bob-token");
    assert_eq!(
        get(port, &ca, "/api/v1/namespaces/default/pods", bob)
            .await
            .0,
        403
    );

    // kubectl sends a token only over HTTPS.
    if std::env::var("METAMANAGER_REQUIRE_KUBECTL").as_deref() != Ok("1")
        && Command::new("kubectl")
            .arg("version")
            .arg("--client")
            .output()
            .is_err()
    {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let ok = kubectl(
        port,
        home.path(),
        &ca,
        "alice-token",
        &["get", "pods", "-n", "default"],
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let denied = kubectl(
        port,
        home.path(),
        &ca,
        "alice-token",
        &["get", "pods", "-n", "kube-system"],
    );
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("Forbidden"),
        "{denied:?}"
    );
    let unknown = kubectl(
        port,
        home.path(),
        &ca,
        "nobody",
        &["get", "pods", "-n", "default"],
    );
    assert!(!unknown.status.success());
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    // kubectl's words for a 401, with the Status message.
    assert!(
        stderr.contains("must be logged in") && stderr.contains("not valid"),
        "{stderr}"
    );
}

#[test]
fn an_anonymous_api_beyond_loopback_starts_only_when_the_operator_says_so() {
    let config = "mqtt:\n  port: 0\ndatabase:\n  path: data/m.db\nhttp:\n  listen: 0.0.0.0:0\n";
    let mut refused = MetaManager::in_temp_dir(Some(config), None);
    let status = refused.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(2), "{}", refused.log());
    assert!(refused.log().contains("http.listen"), "{}", refused.log());
    assert!(
        refused.log().contains("insecure_allow_anonymous"),
        "{}",
        refused.log()
    );

    let allowed = format!("{config}  insecure_allow_anonymous: true\n");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edge.yaml");
    std::fs::write(&file, allowed).unwrap();
    let log = dir.path().join("metamanager.log");
    let mut mm = MetaManager::start(Launch {
        config: Some(&file),
        cwd: Some(dir.path()),
        rust_log: None,
        log: Some(&log),
        open_files: None,
    });
    let port = mm.wait_for_log(Duration::from_secs(20), "the HTTP port", process::http_port);
    assert!(mm.still_running());
    let served = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    assert!(served, "serves once allowed");
    mm.terminate();
}
