//! The container image, checked without a container runtime (none can pull base images here):
//! the crate builds from exactly the files the Dockerfile's build stage copies, read from the
//! Dockerfile itself, so a path dependency it misses fails here; and the runtime stage's files
//! exist, the config it installs is the one its entrypoint names, and that config passes the
//! binary's own validation.

use std::path::{Path, PathBuf};
use std::process::Command;

use metamanager::config::Settings;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// One `FROM` of the Dockerfile: its name (`AS …`), working directory and instructions.
#[derive(Debug, Default)]
struct Stage {
    name: Option<String>,
    workdir: Option<String>,
    copies: Vec<Copy>,
    entrypoint: Option<String>,
}

/// A `COPY`: its sources (in the build context, or in stage `from`) and destination.
#[derive(Debug)]
struct Copy {
    from: Option<String>,
    sources: Vec<String>,
    dest: String,
}

/// The Dockerfile's stages, continuation lines joined and comments dropped.
fn stages() -> Vec<Stage> {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).expect("read the Dockerfile");
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stages: Vec<Stage> = Vec::new();
    for instruction in instructions {
        let (keyword, rest) = instruction
            .split_once(char::is_whitespace)
            .unwrap_or((&instruction, ""));
        let words: Vec<&str> = rest.split_whitespace().collect();
        match keyword.to_ascii_uppercase().as_str() {
            "FROM" => stages.push(Stage {
                name: match words.as_slice() {
                    [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some((*name).to_owned()),
                    _ => None,
                },
                ..Stage::default()
            }),
            "WORKDIR" => stages.last_mut().expect("FROM first").workdir = Some(rest.to_owned()),
            "ENTRYPOINT" => {
                stages.last_mut().expect("FROM first").entrypoint = Some(rest.to_owned())
            }
            "COPY" | "ADD" => {
                assert!(
                    !rest.trim_start().starts_with('['),
                    "{instruction}: the JSON form is not read here; write it plainly"
                );
                let mut from = None;
                let mut paths = Vec::new();
                for word in words {
                    match word.strip_prefix("--") {
                        Some(flag) => {
                            if let Some(stage) = flag.strip_prefix("from=") {
                                from = Some(stage.to_owned());
                            }
                        }
                        None => paths.push(word.to_owned()),
                    }
                }
                let dest = paths.pop().expect("a COPY has a destination");
                assert!(!paths.is_empty(), "{instruction}: no source");
                stages.last_mut().expect("FROM first").copies.push(Copy {
                    from,
                    sources: paths,
                    dest,
                });
            }
            _ => {}
        }
    }
    assert!(stages.len() >= 2, "a build stage and a runtime stage");
    stages
}

/// Copies `source` (a file or a directory) of the repository into the context copy at `dest`,
/// as `COPY` does: a directory's contents go into `dest`; a file goes into `dest` when it is a
/// directory (ends in `/`), else becomes `dest`.
fn copy_in(source: &Path, dest: &Path, dest_is_dir: bool) {
    if source.is_dir() {
        std::fs::create_dir_all(dest).unwrap();
        for entry in std::fs::read_dir(source).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let target = dest.join(entry.file_name());
            if path.is_dir() {
                copy_in(&path, &target, true);
            } else {
                std::fs::copy(&path, &target).unwrap();
            }
        }
    } else {
        let target = if dest_is_dir {
            std::fs::create_dir_all(dest).unwrap();
            dest.join(source.file_name().unwrap())
        } else {
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            dest.to_path_buf()
        };
        std::fs::copy(source, &target).unwrap_or_else(|e| panic!("copy {source:?}: {e}"));
    }
}

/// `dest` of a COPY inside the stage's file system, rooted at `root`.
fn in_stage(root: &Path, workdir: Option<&str>, dest: &str) -> PathBuf {
    let absolute = if dest.starts_with('/') {
        PathBuf::from(dest)
    } else {
        Path::new(workdir.unwrap_or("/")).join(dest)
    };
    root.join(absolute.strip_prefix("/").unwrap())
}

/// Builds the crate (`cargo check`, locked and offline, as the image's `cargo build --locked`
/// resolves) in a directory that holds only what the build stage copies from the context. It
/// has a target directory of its own under `target/`, kept between runs so that only the crate
/// and the patched rumqttd are checked again.
#[test]
fn the_crate_builds_from_what_the_build_stage_copies() {
    let stages = stages();
    let runtime = stages.last().unwrap();
    let builders: Vec<&Stage> = stages[..stages.len() - 1]
        .iter()
        .filter(|s| {
            runtime
                .copies
                .iter()
                .any(|c| c.from.is_some() && c.from == s.name)
        })
        .collect();
    assert_eq!(builders.len(), 1, "one build stage the runtime copies from");
    let builder = builders[0];

    let root = tempfile::tempdir().unwrap();
    let workdir = builder
        .workdir
        .as_deref()
        .expect("the build stage has a WORKDIR");
    for copy in &builder.copies {
        assert!(
            copy.from.is_none(),
            "the build stage copies from the context"
        );
        let dest = in_stage(root.path(), Some(workdir), &copy.dest);
        let into_dir = copy.dest.ends_with('/') || copy.sources.len() > 1;
        for source in &copy.sources {
            let path = repo().join(source);
            assert!(path.exists(), "COPY {source}: not in the repository");
            copy_in(&path, &dest, into_dir);
        }
    }
    let crate_dir = in_stage(root.path(), None, workdir);
    assert!(
        crate_dir.join("Cargo.toml").is_file(),
        "Cargo.toml is not copied"
    );

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(&crate_dir)
        .env("CARGO_TARGET_DIR", repo().join("target/dockerfile-check"))
        .args(["check", "--locked", "--offline", "--quiet"])
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "the crate does not build from the Dockerfile's build-stage COPY lines ({}):\n{}",
        copy_list(builder),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn copy_list(stage: &Stage) -> String {
    stage
        .copies
        .iter()
        .flat_map(|c| c.sources.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The runtime stage's context files exist, and the config it installs is the file its
/// entrypoint runs with, valid by the same check `metamanager --config` makes at start-up.
#[test]
fn the_runtime_stage_installs_a_valid_config_for_its_entrypoint() {
    let stages = stages();
    let runtime = stages.last().unwrap();
    let entrypoint = runtime.entrypoint.as_deref().expect("an ENTRYPOINT");
    let argv: Vec<String> =
        serde_json::from_str(entrypoint).expect("the ENTRYPOINT in JSON (exec) form");
    let config_flag = argv
        .iter()
        .position(|a| a == "--config" || a == "-c")
        .expect("the entrypoint names its config");
    let config_in_image = &argv[config_flag + 1];

    let mut installed = None;
    for copy in runtime.copies.iter().filter(|c| c.from.is_none()) {
        for source in &copy.sources {
            assert!(
                repo().join(source).exists(),
                "COPY {source}: not in the repository"
            );
            if copy.dest == *config_in_image {
                installed = Some(source.clone());
            }
        }
    }
    let installed = installed
        .unwrap_or_else(|| panic!("no COPY installs {config_in_image}, the entrypoint's config"));
    if let Err(e) = Settings::from_file(&repo().join(&installed)) {
        panic!("{installed}, installed as {config_in_image}, is not a valid config: {e}");
    }
}
