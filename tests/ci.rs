//! What CI runs: every test that can run on CI's machine is required there, so a green run
//! cannot hide a skip. Each skip goes through one helper ([`process::skip`]) and names a
//! [`Requirement`]; `.ci/run` must set each one's variable.

#[path = "common/process.rs"]
mod process;

use process::Requirement;

#[test]
fn ci_requires_every_test_that_can_skip() {
    let script = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/run"))
        .expect("read .ci/run");
    let exported: Vec<&str> = script
        .lines()
        .filter_map(|l| l.trim().strip_prefix("export "))
        .collect();
    for requirement in Requirement::ALL {
        let wanted = format!("{}=1", requirement.variable());
        assert!(
            exported.contains(&wanted.as_str()),
            ".ci/run does not require {requirement:?}: no `export {wanted}`"
        );
    }
}

/// Every skip in the tests goes through [`process::skip`]: a test that prints its own
/// `skipped:` line and returns is one CI cannot require.
#[test]
fn every_skip_goes_through_the_one_helper() {
    let tests = concat!(env!("CARGO_MANIFEST_DIR"), "/tests");
    let mut offenders = Vec::new();
    let mut dirs = vec![std::path::PathBuf::from(tests)];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read tests/") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read a test file");
            for (n, line) in text.lines().enumerate() {
                let prints_a_skip = line.contains("eprintln!(\"skipped");
                let in_the_helper = path.ends_with("common/process.rs");
                if prints_a_skip && !in_the_helper {
                    offenders.push(format!("{}:{}", path.display(), n + 1));
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "skips that CI cannot require: {offenders:?}"
    );
}
