//! How a long task tells whoever waits how far it got: `backup`, `check` and `export` on the
//! command line, and the one-time digest count of an earlier version's database when the
//! service opens it. A long copy, check or count on a slow edge disk must not look hung.
//!
//! On a terminal, a bar on stderr. Otherwise a plain line now and then (a bar's redraws would
//! fill a log file or a journal with control characters): written to stderr by the commands,
//! and logged by the service, so that its log stays one format (`--log-format json` included).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often a progress line is written when stderr is not a terminal, in milliseconds: often
/// enough that a log shows the task is alive, rarely enough that a long run does not flood it.
/// Process-wide, since the service's digest count has no command line of its own to take it
/// from; `--progress-every` sets it before anything runs.
static LINE_EVERY_MS: AtomicU64 = AtomicU64::new(5_000);

/// The interval of progress lines, from now on.
pub fn set_line_every(every: Duration) {
    let ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
    LINE_EVERY_MS.store(ms, Ordering::Relaxed);
}

fn line_every() -> Duration {
    Duration::from_millis(LINE_EVERY_MS.load(Ordering::Relaxed))
}

/// Progress of one task. Cheap to clone, so that a SQLite progress handler can hold one while a
/// long statement runs.
#[derive(Clone)]
pub struct Progress {
    /// `backup`, `check`, `export`, or what the service is doing: the start of every line.
    command: &'static str,
    mode: Mode,
}

#[derive(Clone)]
enum Mode {
    Bar(indicatif::ProgressBar),
    /// Lines on stderr.
    Lines(Arc<Mutex<Lines>>),
    /// Lines in the service's log.
    Log(Arc<Mutex<Lines>>),
    /// Nothing: what is written shows the progress itself.
    Quiet,
}

struct Lines {
    last: Instant,
    started: Instant,
}

impl Progress {
    /// Draws a bar when stderr is a terminal, plain lines otherwise.
    pub fn on_stderr(command: &'static str) -> Self {
        if std::io::stderr().is_terminal() {
            Self::bar(command)
        } else {
            Self::lines(command)
        }
    }

    /// For a command whose output is stdout: as [`Progress::on_stderr`], except that nothing
    /// is shown when stdout is the same terminal (the output scrolling by is the progress, and
    /// a bar would garble it).
    pub fn beside_stdout(command: &'static str) -> Self {
        match (
            std::io::stderr().is_terminal(),
            std::io::stdout().is_terminal(),
        ) {
            (true, true) => Self {
                command,
                mode: Mode::Quiet,
            },
            _ => Self::on_stderr(command),
        }
    }

    /// For the service: a bar when stderr is a terminal (someone watches it start), else lines
    /// in its log.
    pub fn in_log(command: &'static str) -> Self {
        if std::io::stderr().is_terminal() {
            Self::bar(command)
        } else {
            Self {
                command,
                mode: Mode::Log(Arc::new(Mutex::new(Lines::now()))),
            }
        }
    }

    /// Plain lines on stderr only, whatever stderr is.
    pub fn lines(command: &'static str) -> Self {
        Self {
            command,
            mode: Mode::Lines(Arc::new(Mutex::new(Lines::now()))),
        }
    }

    fn bar(command: &'static str) -> Self {
        let bar =
            indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
        Self {
            command,
            mode: Mode::Bar(bar),
        }
    }

    /// `done` of `total` `unit`s (pages, objects) are through.
    pub fn update(&self, done: u64, total: u64, unit: &str) {
        match &self.mode {
            Mode::Bar(bar) => {
                if bar.length() != Some(total) {
                    bar.set_length(total);
                    bar.set_style(
                        indicatif::ProgressStyle::with_template(&format!(
                            "{}: {{bar:40}} {{percent:>3}} % {{msg}} {{elapsed}}",
                            self.command
                        ))
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                    );
                }
                // Counts as on the plain lines: grouped by spaces, not commas.
                bar.set_message(format!("({} of {} {unit})", grouped(done), grouped(total)));
                bar.set_position(done);
            }
            Mode::Lines(lines) | Mode::Log(lines) => {
                if due(lines).is_some() {
                    let percent = (done * 100).checked_div(total).unwrap_or(100);
                    let (done, total) = (grouped(done), grouped(total));
                    self.line(&format!("{percent} % ({done} of {total} {unit})"));
                }
            }
            Mode::Quiet => {}
        }
    }

    /// A step whose length is not known (SQLite's integrity check) is still running.
    pub fn busy(&self, what: &str) {
        match &self.mode {
            Mode::Bar(bar) => {
                bar.set_style(
                    indicatif::ProgressStyle::with_template(&format!(
                        "{}: {{spinner}} {what} {{elapsed}}",
                        self.command
                    ))
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
                );
                bar.tick();
            }
            Mode::Lines(lines) | Mode::Log(lines) => {
                if let Some(elapsed) = due(lines) {
                    self.line(&format!("{what} ({} s)", elapsed.as_secs()));
                }
            }
            Mode::Quiet => {}
        }
    }

    /// A line for the operator that stays on screen above the bar.
    pub fn note(&self, text: &str) {
        match &self.mode {
            Mode::Bar(bar) => bar.suspend(|| eprintln!("{}: {text}", self.command)),
            Mode::Lines(_) | Mode::Log(_) => self.line(text),
            Mode::Quiet => {}
        }
    }

    fn line(&self, text: &str) {
        if let Mode::Log(_) = self.mode {
            tracing::info!("{}: {text}", self.command);
        } else {
            eprintln!("{}: {text}", self.command);
        }
    }

    /// Runs `f` (a write to stdout) with the bar taken off the terminal meanwhile, so that the
    /// two do not garble each other.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.mode {
            Mode::Bar(bar) => bar.suspend(f),
            _ => f(),
        }
    }

    /// Takes the bar off the screen, so that the final line stands alone.
    pub fn finish(&self) {
        if let Mode::Bar(bar) = &self.mode {
            bar.finish_and_clear();
        }
    }
}

impl Lines {
    fn now() -> Self {
        let now = Instant::now();
        Self {
            last: now,
            started: now,
        }
    }
}

/// The time since the start when a line is due now, and marks it written.
fn due(lines: &Mutex<Lines>) -> Option<Duration> {
    let mut lines = lines.lock().unwrap_or_else(|p| p.into_inner());
    if lines.last.elapsed() < line_every() {
        return None;
    }
    lines.last = Instant::now();
    Some(lines.started.elapsed())
}

/// `31000` as `31 000`: long counts in a log are read at a glance, and a space cannot be taken
/// for a decimal mark in any locale.
pub fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// A byte count as an operator reads it: `12.3 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for next in &UNITS[1..] {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = next;
    }
    format!("{value:.1} {unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_grouped_by_thousands() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1 000");
        assert_eq!(grouped(12_800), "12 800");
        assert_eq!(grouped(31_000_000), "31 000 000");
    }

    #[test]
    fn sizes_are_in_binary_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 << 20), "5.0 MiB");
    }
}
