//! Start-up and shutdown, in two steps: [`build`] makes every part from the settings, and
//! [`running`] runs them until the stop and then stops them.
//!
//! Building goes in the order that lets a mistake stop start-up before anything is touched:
//! the settings are checked and the files they name read, then the database's lock is claimed,
//! the HTTP port bound, the store opened, and only then the broker started or joined.
//!
//! Shutdown finishes in-flight work before anything closes: the dispatcher stops taking messages
//! and hands on what it already received, the pipeline runs every queued step (commits, replies,
//! broker acks), then the offline status goes out, the MQTT connection closes, and last the
//! store commits what remains and closes the database. [`running::Running`] holds the tasks in
//! that order, so a task started with the others is stopped with them.

mod build;
mod running;

use std::future::Future;

pub use build::{AppError, Listeners};

use crate::config::Settings;

/// Runs MetaManager until `shutdown` resolves, binding the addresses of `settings`.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> Result<(), AppError> {
    run_with(settings, Listeners::default(), shutdown).await
}

/// [`run`] on listeners the caller bound, where given.
pub async fn run_with(
    settings: Settings,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AppError> {
    let app = build::App::build(settings, listeners).await?;
    let mut running = running::Running::start(app);
    let failure = running.until_stopped(shutdown).await;
    running.stop().await;
    match failure {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}
