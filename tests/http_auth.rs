//! Authentication and authorization of the local API against the real binary, with kubectl
//! and raw requests: a static token file, client certificates and an ABAC policy in
//! kube-apiserver's formats, 401 without a valid credential, 403 where the policy says no,
//! anonymous probes, and no anonymous listener beyond loopback unless the operator says so.

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
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            // A server certificate, not a CA: rustls refuses a CA as the end entity.
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "extendedKeyUsage=serverAuth",
            "-keyout",
            "api.key",
            "-out",
            "api.crt",
        ],
    );
    (dir.join("api.crt"), dir.join("api.key"))
}

/// The status code and whole answer of `GET path` over HTTPS (trusting `ca`), with `token`.
async fn get(port: u16, ca: &std::path::Path, path: &str, token: Option<&str>) -> (u16, String) {
    get_as(port, ca, None, path, token).await.unwrap()
}

/// [`get`] with a client certificate and key; `Err` when the TLS handshake fails.
async fn get_as(
    port: u16,
    ca: &std::path::Path,
    identity: Option<(&std::path::Path, &std::path::Path)>,
    path: &str,
    token: Option<&str>,
) -> std::io::Result<(u16, String)> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
    };
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = connector.connect(name, tcp).await?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    // TLS 1.3 reports a refused client certificate after the handshake: no answer at all.
    let code = raw
        .split(' ')
        .nth(1)
        .ok_or_else(|| std::io::Error::other("no HTTP answer"))?
        .parse()
        .unwrap();
    Ok((code, raw))
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
    let Some(home) = common::kubectl::kubectl_home() else {
        return;
    };
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
        private_network: false,
    });
    let port = mm.wait_for_log(Duration::from_secs(20), "the HTTP port", process::http_port);
    assert!(mm.still_running());
    let served = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    assert!(served, "serves once allowed");
    mm.terminate();
}

/// Runs openssl with `args` in `dir`.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A client CA in `dir` (`{ca}.crt`, `{ca}.key`) and a client certificate it signs for
/// `subject` (`{name}.crt`, `{name}.key`).
fn client_certificate(dir: &std::path::Path, ca: &str, name: &str, subject: &str) {
    if !dir.join(format!("{ca}.crt")).exists() {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                &format!("/CN={ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.crt"),
            ],
        );
    }
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            subject,
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    let ext = dir.join("client.ext");
    std::fs::write(
        &ext,
        "basicConstraints=critical,CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "client.ext",
            "-out",
            &format!("{name}.crt"),
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_name_the_user_and_groups_the_policy_decides_on() {
    let files = tempfile::tempdir().unwrap();
    let dir = files.path();
    let (server_cert, server_key) = certificate(dir);
    client_certificate(dir, "client-ca", "carol", "/CN=carol/O=ops/O=edge");
    client_certificate(dir, "client-ca", "dave", "/CN=dave/O=guests");
    client_certificate(dir, "rogue-ca", "mallory", "/CN=carol/O=ops");
    // Group ops may read the default namespace; every authenticated user, discovery.
    let policy = dir.join("policy.jsonl");
    std::fs::write(
        &policy,
        concat!(
            r#"{"apiVersion":"abac.authorization.kubernetes.io/v1beta1","kind":"Policy","spec":{"group":"ops","namespace":"default","resource":"*","apiGroup":"*","readonly":true}}"#,
            "\n",
            r#"{"apiVersion":"abac.authorization.kubernetes.io/v1beta1","kind":"Policy","spec":{"group":"system:authenticated","nonResourcePath":"*","readonly":true}}"#,
            "\n",
        ),
    )
    .unwrap();
    let http = format!(
        "tls: {{cert_file: {}, key_file: {}, client_ca_file: {}}}\nauth: {{policy_file: {}}}",
        server_cert.display(),
        server_key.display(),
        dir.join("client-ca.crt").display(),
        policy.display()
    );
    let Some(app) = TestApp::spawn(Options::new(BrokerKind::Embedded).http(&http)).await else {
        return;
    };
    let port = app.http_port;
    let pods = "/api/v1/namespaces/default/pods";
    let identity = |name: &str| {
        (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        )
    };
    let (carol_cert, carol_key) = identity("carol");
    let (dave_cert, dave_key) = identity("dave");
    let (mallory_cert, mallory_key) = identity("mallory");

    // carol is in ops; dave is not.
    for (cert, key, want) in [(&carol_cert, &carol_key, 200), (&dave_cert, &dave_key, 403)] {
        let (code, body) = get_as(port, &server_cert, Some((cert, key)), pods, None)
            .await
            .unwrap();
        assert_eq!(code, want, "{body}");
    }
    let (code, body) = get(port, &server_cert, pods, None).await;
    assert_eq!(code, 401, "no certificate: {body}");
    assert!(body.contains("client certificate"), "{body}");
    assert_eq!(get(port, &server_cert, "/healthz", None).await.0, 200);
    let rogue = get_as(
        port,
        &server_cert,
        Some((&mallory_cert, &mallory_key)),
        pods,
        None,
    )
    .await;
    assert!(
        rogue.is_err(),
        "another CA's certificate fails the handshake: {rogue:?}"
    );

    if common::kubectl::kubectl().is_none() {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("kubeconfig");
    std::fs::write(&config, "").unwrap();
    let out = Command::new("kubectl")
        .env("HOME", home.path())
        .env("KUBECONFIG", &config)
        .arg(format!("--server=https://localhost:{port}"))
        .arg(format!("--certificate-authority={}", server_cert.display()))
        .arg(format!("--client-certificate={}", carol_cert.display()))
        .arg(format!("--client-key={}", carol_key.display()))
        .args(["get", "pods", "-n", "default"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
