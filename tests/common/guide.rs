//! Runs a document's shell blocks as an operator would paste them: in order, as one bash script
//! (`set -euo pipefail`), from the repository root, as root, with the fixed ports and paths the
//! guides name (1883, 1884, 10550, /etc/metamanager, /var/lib/metamanager, …).
//!
//! So that a guide can use those without touching this machine, the script runs in namespaces of
//! its own (`unshare --net --mount --pid`): a network with only a loopback, and overlays over
//! `/etc`, `/var`, `/usr/local`, `/root` and the repository, whose writes go to a tmpfs that ends
//! with the mount namespace. The script is the first process of its PID namespace, so when it
//! ends every process it left in the background (brokers, MetaManager) is killed with it.
//! `metamanager` is the binary under test, first on `PATH`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::markdown::{fences, Doc};
use super::process::{self, find_mosquitto, skip, Requirement};

/// How long one document's script may take.
pub const WITHIN: Duration = Duration::from_secs(240);

/// The directories a guide may write to, each overlaid so that its writes stay in the namespace.
const OVERLAID: [&str; 4] = ["/etc", "/var", "/usr/local", "/root"];

/// The script of `doc`: every `sh` block not marked `<!-- not run: … -->`, in order, each
/// after a comment naming where it comes from. `None` when every block is marked.
pub fn script(doc: &Doc) -> Option<String> {
    let mut script = String::new();
    for fence in fences(&doc.text) {
        if fence.lang == "sh" && fence.not_run.is_none() {
            script += &format!("# --- {}:{}\n{}", doc.name, fence.line, fence.body);
        }
    }
    (!script.is_empty()).then_some(script)
}

/// What a script needs that a machine may lack: root and `unshare` always, and the tools it
/// names.
pub fn requirements(script: &str) -> Vec<Requirement> {
    let mut needs = vec![Requirement::Netns];
    if script.contains("mosquitto") {
        needs.push(Requirement::Mosquitto);
    }
    if script.contains("rabbitmq") {
        needs.push(Requirement::RabbitMq);
    }
    if script.contains("kubectl") {
        needs.push(Requirement::Kubectl);
    }
    needs
}

/// Whether this machine has what `need` names; when it has not, says so the one way
/// ([`skip`]).
fn available(need: Requirement) -> bool {
    let (found, why) = match need {
        Requirement::Netns => (
            namespaces_work(),
            "cannot make namespaces and overlays here (needs root, unshare, ip and overlayfs)",
        ),
        Requirement::Mosquitto => (
            find_mosquitto().is_some() && process::mosquitto_clients(),
            "mosquitto or its clients are not installed",
        ),
        Requirement::RabbitMq => (
            Path::new("/usr/sbin/rabbitmq-server").exists(),
            "rabbitmq-server is not installed",
        ),
        Requirement::Kubectl => (
            Command::new("sh")
                .args(["-c", "command -v kubectl"])
                .env("PATH", path_for_guides())
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            "kubectl is not on PATH or in .venv",
        ),
        other => (false, other.variable()),
    };
    if !found {
        skip(need, why);
    }
    found
}

fn namespaces_work() -> bool {
    let Ok(dir) = tempfile::tempdir() else {
        return false;
    };
    let script = "PATH=\"$PATH:/usr/sbin:/sbin\"; ip link set lo up \
                  && mount -t tmpfs tmpfs \"$1\" && mkdir \"$1/u\" \"$1/w\" \
                  && mount -t overlay overlay -o lowerdir=/etc,upperdir=\"$1/u\",workdir=\"$1/w\" /etc";
    Command::new("unshare")
        .args(["--net", "--mount", "--pid", "--fork", "--kill-child"])
        .args(["sh", "-c", script, "sh"])
        .arg(dir.path())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `PATH` in the guides: the binary under test first, then kubectl's `.venv`, then this
/// process's, and the sbin directories where Debian puts brokers.
fn path_for_guides() -> String {
    let bin = Path::new(env!("CARGO_BIN_EXE_metamanager"))
        .parent()
        .expect("the binary's directory");
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin");
    let inherited = std::env::var("PATH").unwrap_or_default();
    format!(
        "{}:{}:{inherited}:/usr/local/sbin:/usr/sbin:/sbin",
        bin.display(),
        venv.display()
    )
}

/// What bash runs first in the namespaces: the loopback up, the overlays mounted, the
/// repository as the working directory.
fn prologue(scratch: &Path, trace: &Path) -> String {
    let repo = env!("CARGO_MANIFEST_DIR");
    let mut lines = vec![
        format!("exec 9>'{}'; BASH_XTRACEFD=9; set -x", trace.display()),
        "set -euo pipefail".to_owned(),
        "ip link set lo up".to_owned(),
        format!("scratch='{}'", scratch.display()),
        "mount -t tmpfs guide-scratch \"$scratch\"".to_owned(),
    ];
    for (n, dir) in OVERLAID.iter().copied().chain([repo]).enumerate() {
        lines.push(format!(
            "mkdir \"$scratch/{n}u\" \"$scratch/{n}w\" && mount -t overlay overlay \
             -o lowerdir='{dir}',upperdir=\"$scratch/{n}u\",workdir=\"$scratch/{n}w\" '{dir}'"
        ));
    }
    lines.push(format!("cd '{repo}'"));
    lines.push("unset scratch".to_owned());
    lines.join("\n") + "\n"
}

/// Runs `doc`'s script; panics with its output when it fails or outlasts [`WITHIN`]. Returns
/// false (the test skips) where the machine lacks what it needs.
pub fn run(doc: &Doc) -> bool {
    let Some(script) = script(doc) else {
        return true;
    };
    if !requirements(&script).into_iter().all(available) {
        return false;
    }
    let dir = tempfile::tempdir().expect("a directory for the script");
    let scratch = dir.path().join("ns");
    std::fs::create_dir(&scratch).expect("the scratch mount point");
    let file = dir.path().join("guide.sh");
    let output = dir.path().join("output");
    let trace = dir.path().join("trace");
    std::fs::write(&file, prologue(&scratch, &trace) + &script).expect("write the script");
    let started = Instant::now();
    let mut child = Command::new("unshare")
        .args([
            "--net",
            "--mount",
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child",
        ])
        .arg("bash")
        .arg(&file)
        .env("PATH", path_for_guides())
        .stdin(Stdio::null())
        .stdout(Stdio::from(
            std::fs::File::create(&output).expect("the output file"),
        ))
        .stderr(Stdio::from(
            std::fs::File::options()
                .append(true)
                .open(&output)
                .expect("the output file"),
        ))
        .spawn()
        .expect("start unshare");
    let status = process::exit_within(&mut child, WITHIN);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    eprintln!("{}: {:.1} s", doc.name, started.elapsed().as_secs_f64());
    let ok = status.is_some_and(|s| s.success());
    if !ok {
        panic!(
            "{} {}\n--- trace (last 60 lines) ---\n{}\n--- output (last 80 lines) ---\n{}",
            doc.name,
            match status {
                Some(s) => format!("failed ({s})"),
                None => format!("did not end within {} s", WITHIN.as_secs()),
            },
            tail(&trace, 60),
            tail(&output, 80)
        );
    }
    true
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
