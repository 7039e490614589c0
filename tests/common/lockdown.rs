//! The shipped mosquitto lock-down (a conf/ file with conf/mosquitto.acl), made runnable in a
//! test broker's directory: the accounts' password file, the ACL and MetaManager's password
//! file written there, and the file's paths, port and node id replaced by the test's.

use std::path::Path;
use std::process::Command;

use super::NODE;

/// A file of the repository, as shipped.
pub fn repo_file(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(name)).unwrap()
}

/// The shipped configuration `conf_file` for a broker on `port` whose directory is `dir`:
/// - `accounts` (username, password) in a password file, conf/mosquitto.acl (node `edge-node`
///   rewritten to the test node), and `mm-password` holding `mm_password` for MetaManager's
///   `mqtt.password_file`;
/// - the listener, the password and ACL files and the persistence directory pointed there, and
///   each key of `replace` (which the file must have) set to its line;
/// - run as root, as in CI: mosquitto would otherwise switch to the `mosquitto` user and could
///   not read the files in this private directory.
pub fn shipped_conf(
    conf_file: &str,
    port: u16,
    dir: &Path,
    accounts: &[(String, String)],
    mm_password: &str,
    replace: &[(&str, String)],
) -> String {
    let passwd = dir.join("passwd");
    for (i, (user, password)) in accounts.iter().enumerate() {
        let mut cmd = Command::new("mosquitto_passwd");
        if i == 0 {
            cmd.arg("-c");
        }
        let out = cmd
            .arg("-b")
            .arg(&passwd)
            .args([user, password])
            .output()
            .expect("mosquitto_passwd runs");
        assert!(out.status.success(), "{out:?}");
    }
    let acl = dir.join("mosquitto.acl");
    std::fs::write(
        &acl,
        repo_file("conf/mosquitto.acl").replace("edge-node", NODE),
    )
    .unwrap();
    std::fs::write(dir.join("mm-password"), format!("{mm_password}\n")).unwrap();
    let store = dir.join("store");
    std::fs::create_dir(&store).unwrap();
    let mut conf = String::from("user root\nlog_dest stderr\nlog_type all\n");
    let mut replaced = Vec::new();
    for line in repo_file(conf_file).lines() {
        let key = line.split_whitespace().next().unwrap_or("");
        conf += &match key {
            "listener" => format!("listener {port} 127.0.0.1"),
            "password_file" => format!("password_file {}", passwd.display()),
            "acl_file" => format!("acl_file {}", acl.display()),
            "persistence_location" => format!("persistence_location {}/", store.display()),
            _ => match replace.iter().find(|(k, _)| *k == key) {
                Some((k, line)) => {
                    replaced.push(*k);
                    line.clone()
                }
                None => line.replace("edge-node", NODE),
            },
        };
        conf.push('\n');
    }
    for (key, _) in replace {
        assert!(
            replaced.contains(key),
            "{conf_file} has no `{key}` line to replace"
        );
    }
    conf
}
