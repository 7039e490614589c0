//! The one signal to stop: `app` fires it once, and every task that runs until shutdown holds a
//! [`Shutdown`] and waits on it the same way.

use tokio::sync::watch;

/// Fires the signal; held by `app`.
pub struct Trigger(watch::Sender<bool>);

/// A task's view of the signal. Cheap to clone.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A new, unfired signal.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    pub fn fire(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    /// Whether stopping has begun.
    pub fn is_shutdown(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once stopping has begun, at once if it already has, or when the trigger is
    /// gone. Cancel-safe, so it can stand in any `select!`.
    pub async fn wait(&mut self) {
        while !*self.0.borrow_and_update() {
            if self.0.changed().await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_clone_sees_the_signal_even_after_it_fired() {
        let within = std::time::Duration::from_secs(5);
        let (trigger, mut early) = channel();
        assert!(!early.is_shutdown());
        let waiting = tokio::spawn(async move { early.wait().await });
        trigger.fire();
        tokio::time::timeout(within, waiting)
            .await
            .expect("a waiting task sees the signal")
            .unwrap();
        let (trigger, late) = channel();
        trigger.fire();
        let mut late = late.clone();
        assert!(late.is_shutdown());
        tokio::time::timeout(within, late.wait())
            .await
            .expect("a clone made after the signal sees it at once");
    }
}
