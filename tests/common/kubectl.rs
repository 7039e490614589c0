//! kubectl pointed at a MetaManager under test, skipped where kubectl is not installed unless
//! `METAMANAGER_REQUIRE_KUBECTL=1`.

use std::process::{Command, Stdio};

use super::process::Requirement;

/// `Some` when kubectl can be run.
pub fn kubectl() -> Option<()> {
    let ok = Command::new("kubectl")
        .args(["version", "--client"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(());
    }
    super::process::skip(Requirement::Kubectl, "kubectl is not installed");
    None
}

/// A fresh home for kubectl (its cache), or `None` (skip) as [`kubectl`] says.
pub fn kubectl_home() -> Option<tempfile::TempDir> {
    kubectl().map(|()| tempfile::tempdir().unwrap())
}

/// kubectl pointed at the node, reading no user configuration and caching in `home`.
pub fn kubectl_cmd(port: u16, home: &std::path::Path, args: &[&str]) -> Command {
    let config = home.join("kubeconfig");
    if !config.exists() {
        std::fs::write(&config, "").unwrap();
    }
    let mut cmd = Command::new("kubectl");
    cmd.env("HOME", home)
        .env("KUBECONFIG", &config)
        .arg("--kubeconfig")
        .arg(&config)
        .args(["--server", &format!("http://127.0.0.1:{port}")])
        .args(args);
    cmd
}

pub fn kubectl_out(port: u16, home: &std::path::Path, args: &[&str]) -> String {
    let out = kubectl_cmd(port, home, args).output().unwrap();
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
