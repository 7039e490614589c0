//! The container image, checked without a container runtime (none can pull base images here):
//! the build stage's `RUN` builds, read from the Dockerfile and run as written, in a directory
//! that holds only what its `COPY` lines take from the build context, and that context is the
//! repository less what `.dockerignore` excludes. So a path the build needs that the COPY lines
//! miss or `.dockerignore` drops, or a release-only or `--locked` failure, fails here as it
//! fails `docker build`. The runtime stage's files exist in the context, the binary it copies
//! from the build stage is there after the build, the config it installs is the one its
//! entrypoint names, and that config passes the binary's own validation.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use metamanager::config::Settings;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// One `FROM` of the Dockerfile: its name (`AS …`), instructions and entrypoint.
#[derive(Debug, Default)]
struct Stage {
    name: Option<String>,
    copies: Vec<Copy>,
    runs: Vec<Run>,
    entrypoint: Option<String>,
}

/// A `COPY`: its sources (in the build context, or in stage `from`) and destination, and the
/// `WORKDIR` a relative destination is in.
#[derive(Debug)]
struct Copy {
    from: Option<String>,
    sources: Vec<String>,
    dest: String,
    workdir: Option<String>,
}

/// A `RUN`: its commands, as words, in order (a shell form's `&&` separates them), and the
/// `WORKDIR` they run in.
#[derive(Debug)]
struct Run {
    commands: Vec<Vec<String>>,
    workdir: Option<String>,
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
    let mut workdir: Option<String> = None;
    for instruction in instructions {
        let (keyword, rest) = instruction
            .split_once(char::is_whitespace)
            .unwrap_or((&instruction, ""));
        let words: Vec<&str> = rest.split_whitespace().collect();
        let keyword = keyword.to_ascii_uppercase();
        if keyword == "FROM" {
            workdir = None;
            stages.push(Stage {
                name: match words.as_slice() {
                    [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some((*name).to_owned()),
                    _ => None,
                },
                ..Stage::default()
            });
            continue;
        }
        let stage = stages.last_mut().expect("FROM first");
        match keyword.as_str() {
            "WORKDIR" => {
                let dir = Path::new(workdir.as_deref().unwrap_or("/")).join(rest);
                workdir = Some(dir.to_string_lossy().into_owned());
            }
            "ENTRYPOINT" => stage.entrypoint = Some(rest.to_owned()),
            "RUN" => stage.runs.push(Run {
                commands: commands(&instruction, rest),
                workdir: workdir.clone(),
            }),
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
                stage.copies.push(Copy {
                    from,
                    sources: paths,
                    dest,
                    workdir: workdir.clone(),
                });
            }
            _ => {}
        }
    }
    assert!(stages.len() >= 2, "a build stage and a runtime stage");
    stages
}

/// The commands of a `RUN` (`rest` follows the keyword): the exec form's one, or the shell
/// form's, `&&` between them. Any other shell syntax fails here: this test runs the commands
/// itself, without a shell, and must not run a different build from the image's.
fn commands(instruction: &str, rest: &str) -> Vec<Vec<String>> {
    if rest.trim_start().starts_with('[') {
        let argv: Vec<String> = serde_json::from_str(rest)
            .unwrap_or_else(|e| panic!("{instruction}: not a JSON array of strings: {e}"));
        return vec![argv];
    }
    let shell = rest
        .replace("&&", " ")
        .chars()
        .find(|c| ";|&<>$`'\"()\\*?~{}".contains(*c));
    if let Some(c) = shell {
        panic!(
            "{instruction}: `{c}` is shell syntax this test does not run; only plain words \
             joined by `&&`"
        );
    }
    rest.split("&&")
        .map(|command| {
            let words: Vec<String> = command.split_whitespace().map(str::to_owned).collect();
            assert!(!words.is_empty(), "{instruction}: an empty command");
            words
        })
        .collect()
}

/// A `.dockerignore` line: a path pattern (`/`-separated, `*` and `?` inside one segment), or
/// with `!`, an exception to the lines before it.
#[derive(Debug)]
struct Ignore {
    segments: Vec<String>,
    exception: bool,
}

/// The build context `docker build` sends: the repository less what `.dockerignore` excludes.
/// Read as Docker reads the file: a line matches a path when it matches the path or one of
/// its parent directories, segment by segment from the context's root (`*.db` is a file in the
/// root, not one anywhere), and the last line that matches decides. The forms read are plain
/// paths, `*` and `?`, a leading or trailing `/`, and `!`; a line with another (`**`, `[…]`,
/// `\`) fails the test, rather than be read otherwise than Docker reads it.
struct Context {
    ignores: Vec<Ignore>,
}

impl Context {
    fn read() -> Context {
        Context::parse(&std::fs::read_to_string(repo().join(".dockerignore")).unwrap_or_default())
    }

    fn parse(text: &str) -> Context {
        let ignores = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(|line| {
                let (exception, pattern) = match line.strip_prefix('!') {
                    Some(pattern) => (true, pattern.trim()),
                    None => (false, line),
                };
                for form in ["**", "[", "]", "\\"] {
                    assert!(
                        !pattern.contains(form),
                        ".dockerignore line {line:?}: `{form}` is a pattern form this test does \
                         not read; teach Context::parse before using it"
                    );
                }
                let segments: Vec<String> = pattern
                    .split('/')
                    .filter(|s| !s.is_empty() && *s != ".")
                    .map(str::to_owned)
                    .collect();
                assert!(
                    !segments.is_empty() && segments.iter().all(|s| s != ".."),
                    ".dockerignore line {line:?}: not a path in the context"
                );
                Ignore {
                    segments,
                    exception,
                }
            })
            .collect();
        Context { ignores }
    }

    /// Whether `path`, relative to the context's root, is left out of the context.
    fn excludes(&self, path: &Path) -> bool {
        let segments: Vec<&str> = path
            .components()
            .map(|c| match c {
                Component::Normal(s) => s.to_str().expect("a UTF-8 path"),
                other => panic!("{path:?}: {other:?} in a context path"),
            })
            .collect();
        let mut excluded = false;
        for ignore in &self.ignores {
            let matches = (1..=segments.len()).any(|n| {
                n == ignore.segments.len()
                    && ignore
                        .segments
                        .iter()
                        .zip(&segments[..n])
                        .all(|(pattern, segment)| glob(pattern, segment))
            });
            if matches {
                excluded = !ignore.exception;
            }
        }
        excluded
    }

    /// Whether a directory's contents all stay out with it: no exception can bring one back.
    fn prunes(&self, dir: &Path) -> bool {
        self.excludes(dir) && self.ignores.iter().all(|i| !i.exception)
    }

    /// The files under `source` (a file or directory of the context) that the context holds,
    /// each as its path under `source` (empty for `source` itself) and its path in the
    /// repository.
    fn files(&self, source: &Path) -> Vec<(PathBuf, PathBuf)> {
        let mut found = Vec::new();
        self.collect(source, Path::new(""), &mut found);
        found
    }

    fn collect(&self, path: &Path, under: &Path, found: &mut Vec<(PathBuf, PathBuf)>) {
        let in_repo = repo().join(path);
        let meta = std::fs::symlink_metadata(&in_repo)
            .unwrap_or_else(|e| panic!("{path:?} in the build context: {e}"));
        assert!(
            !meta.file_type().is_symlink(),
            "{path:?}: a symbolic link, which this test does not copy as COPY does"
        );
        if meta.is_dir() {
            if self.prunes(path) {
                return;
            }
            let mut entries: Vec<_> = std::fs::read_dir(&in_repo)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            entries.sort();
            for name in entries {
                self.collect(&path.join(&name), &under.join(&name), found);
            }
        } else if !self.excludes(path) {
            found.push((under.to_path_buf(), in_repo));
        }
    }
}

/// Go's `filepath.Match` for one segment, as Docker uses it: `*` is any run of characters,
/// `?` one.
fn glob(pattern: &str, name: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let name: Vec<char> = name.chars().collect();
    fn at(p: &[char], n: &[char]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some(('*', rest)) => (0..=n.len()).any(|skip| at(rest, &n[skip..])),
            Some(('?', rest)) => !n.is_empty() && at(rest, &n[1..]),
            Some((c, rest)) => n.first() == Some(c) && at(rest, &n[1..]),
        }
    }
    at(&pattern, &name)
}

/// `dest` of a COPY, or a path a `RUN` names, inside a stage's file system: relative to the
/// stage root (`/` left off), a relative one taken from `workdir`.
fn in_stage(workdir: Option<&str>, dest: &str) -> PathBuf {
    let absolute = Path::new(workdir.unwrap_or("/")).join(dest);
    absolute.strip_prefix("/").unwrap().to_path_buf()
}

/// The files the stage's `COPY` lines put in its file system, by their path there (relative to
/// its root), each with its file in the repository; a COPY that finds nothing in the context
/// fails, as it fails `docker build`.
fn copied(stage: &Stage, context: &Context) -> BTreeMap<PathBuf, PathBuf> {
    let mut files = BTreeMap::new();
    for copy in &stage.copies {
        assert!(
            copy.from.is_none(),
            "the build stage copies from the context"
        );
        let dest = in_stage(copy.workdir.as_deref(), &copy.dest);
        let into_dir = copy.dest.ends_with('/') || copy.sources.len() > 1;
        for source in &copy.sources {
            assert!(
                repo().join(source).exists(),
                "COPY {source}: not in the repository"
            );
            let found = context.files(Path::new(source));
            assert!(
                !found.is_empty(),
                "COPY {source}: .dockerignore leaves nothing of it in the build context"
            );
            for (under, file) in found {
                let target = if under.as_os_str().is_empty() {
                    if into_dir {
                        dest.join(file.file_name().unwrap())
                    } else {
                        dest.clone()
                    }
                } else {
                    dest.join(under)
                };
                files.insert(target, file);
            }
        }
    }
    files
}

/// Makes `root` hold exactly `files` (by path under `root`, each from its file in the
/// repository), but for what is under `kept`, the build's own output. A file already there with
/// the same bytes is left alone, so its time stays and cargo takes it as unchanged.
fn sync(root: &Path, files: &BTreeMap<PathBuf, PathBuf>, kept: &Path) {
    fn prune(root: &Path, dir: &Path, files: &BTreeMap<PathBuf, PathBuf>, kept: &Path) {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            return;
        };
        for entry in entries {
            let entry = entry.unwrap();
            let path = dir.join(entry.file_name());
            if path == kept {
                continue;
            }
            if entry.file_type().unwrap().is_dir() {
                prune(root, &path, files, kept);
                if std::fs::read_dir(entry.path()).unwrap().next().is_none() {
                    std::fs::remove_dir(entry.path()).unwrap();
                }
            } else if !files.contains_key(&path) {
                std::fs::remove_file(entry.path()).unwrap();
            }
        }
    }
    prune(root, Path::new(""), files, kept);
    for (path, source) in files {
        let target = root.join(path);
        let bytes = std::fs::read(source).unwrap_or_else(|e| panic!("read {source:?}: {e}"));
        if std::fs::read(&target).is_ok_and(|there| there == bytes) {
            continue;
        }
        if target.is_dir() {
            std::fs::remove_dir_all(&target).unwrap();
        }
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(source, &target).unwrap_or_else(|e| panic!("copy {source:?}: {e}"));
    }
}

/// Runs one command of the build stage's `RUN` in `workdir` (its path on this machine), its
/// stage's file system rooted at `root`. `cargo` runs as written, offline (the dependencies are
/// the ones Cargo.lock names, which the test build fetched), and without the `CARGO…`
/// variables of this process's environment, which the image's build does not have: cargo's
/// settings (a target directory among them, where the image's `install` line names cargo's
/// default) and those cargo sets for a test (a build script that reruns when one changes, as
/// ring's does for `CARGO_MANIFEST_DIR`, would build again on every other run). `install` is
/// done here. Anything else fails: the test does not know how to run it outside a container.
fn run(command: &[String], root: &Path, workdir: &Path, stage_workdir: Option<&str>) {
    let shown = command.join(" ");
    match command[0].as_str() {
        "cargo" => {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cargo = Command::new(cargo);
            for (name, _) in std::env::vars_os() {
                let name = name.to_string_lossy();
                if (name.starts_with("CARGO") && name != "CARGO_HOME") || name == "RUSTFLAGS" {
                    cargo.env_remove(name.as_ref());
                }
            }
            let out = cargo
                .args(&command[1..])
                .current_dir(workdir)
                .env("CARGO_NET_OFFLINE", "true")
                .output()
                .expect("run cargo");
            if !out.status.success() {
                let stderr = String::from_utf8_lossy(&out.stderr);
                let lines: Vec<&str> = stderr
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("Compiling "))
                    .collect();
                panic!(
                    "the build stage's `{shown}` fails ({}), in {workdir:?}:\n{}",
                    out.status,
                    lines[lines.len().saturating_sub(200)..].join("\n")
                );
            }
        }
        "install" => {
            let (mode, paths) = match &command[1..] {
                [flag, mode, paths @ ..] if flag == "-m" => (Some(mode), paths),
                paths => (None, paths),
            };
            let [source, dest] = paths else {
                panic!("`{shown}`: this test reads `install [-m MODE] SOURCE DEST` only");
            };
            let source = root.join(in_stage(stage_workdir, source));
            assert!(source.is_file(), "`{shown}`: the build made no {source:?}");
            let dest = root.join(in_stage(stage_workdir, dest));
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            std::fs::copy(&source, &dest).unwrap_or_else(|e| panic!("`{shown}`: {e}"));
            if let Some(mode) = mode {
                use std::os::unix::fs::PermissionsExt;
                let mode = u32::from_str_radix(mode, 8)
                    .unwrap_or_else(|e| panic!("`{shown}`: mode {mode}: {e}"));
                std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode)).unwrap();
            }
        }
        _ => panic!("`{shown}`: this test cannot run it outside a container; teach `run`"),
    }
}

/// Builds as `docker build` does: the build stage's file system is `target/dockerfile-build`,
/// kept between runs (the first build is a whole release build, minutes; later ones build what
/// changed), holding what the COPY lines take from the context and the build's own output
/// (cargo's `target` in the WORKDIR). The repository's Cargo.toml is not a workspace, so cargo
/// does not take the copy under it for a member.
#[test]
fn the_build_stage_builds_from_its_context_what_the_runtime_stage_copies() {
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
    assert!(!builder.runs.is_empty(), "the build stage has a RUN");

    let files = copied(builder, &Context::read());
    let root = repo().join("target/dockerfile-build");
    let workdirs: Vec<Option<&str>> = builder.runs.iter().map(|r| r.workdir.as_deref()).collect();
    assert!(
        workdirs.windows(2).all(|w| w[0] == w[1]),
        "the build stage's RUN lines share one WORKDIR, whose target/ is the build's output"
    );
    sync(&root, &files, &in_stage(workdirs[0], "target"));

    for step in &builder.runs {
        let workdir = root.join(in_stage(step.workdir.as_deref(), "."));
        assert!(
            workdir.join("Cargo.toml").is_file(),
            "the build stage's COPY lines put no Cargo.toml in its WORKDIR"
        );
        for command in &step.commands {
            run(command, &root, &workdir, step.workdir.as_deref());
        }
    }
    for copy in runtime.copies.iter().filter(|c| c.from == builder.name) {
        for source in &copy.sources {
            assert!(
                root.join(in_stage(None, source)).is_file(),
                "COPY --from={} {source}: the build stage did not make it",
                copy.from.as_deref().unwrap()
            );
        }
    }
}

/// The forms `.dockerignore` may use here, read as Docker reads them.
#[test]
fn the_dockerignore_reader_reads_its_forms_as_docker_does() {
    let context = Context::parse("# a comment\n\ntarget\n*.db\nfuzz/target/\n/logs\n!logs/keep\n");
    let excluded = |path: &str| context.excludes(Path::new(path));
    assert!(excluded("target") && excluded("target/debug/x"));
    assert!(
        !excluded("src/target"),
        "a plain name is a path from the root"
    );
    assert!(
        excluded("a.db") && !excluded("data/a.db"),
        "`*` stays in one segment"
    );
    assert!(excluded("fuzz/target/x") && !excluded("fuzz/src/x"));
    assert!(excluded("logs/x") && !excluded("logs/keep") && !excluded("logs/keep/y"));
    assert!(!excluded("src/lib.rs"));
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

    let context = Context::read();
    let mut installed = None;
    for copy in runtime.copies.iter().filter(|c| c.from.is_none()) {
        for source in &copy.sources {
            assert!(
                repo().join(source).exists(),
                "COPY {source}: not in the repository"
            );
            assert!(
                !context.files(Path::new(source)).is_empty(),
                "COPY {source}: .dockerignore leaves nothing of it in the build context"
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
