//! Conversation turns in flight. A turn runs to its end even when its client has gone (its reply
//! is stored and priced, for the other surfaces to see), so it runs in a task of its own on the
//! HTTP worker that received it, and is counted: at a stop the server first stops accepting,
//! then waits for the turns still running (those waiting on the model provider) while the
//! workers are still up, and only then stops them (actix drops what a stopped worker runs).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use futures_util::FutureExt;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

#[derive(Clone, Default)]
pub struct Turns {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    running: AtomicUsize,
    /// Woken when the last running turn ends.
    idle: Notify,
}

/// Counts one turn while it lives, however it ends (finished, failed, cancelled).
struct Running(Arc<Inner>);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Turns {
    /// Runs `work` to its end in a task on the current runtime, counted until it ends.
    pub fn spawn<F>(&self, work: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.inner.running.fetch_add(1, Ordering::AcqRel);
        let running = Running(Arc::clone(&self.inner));
        // Counted until the task ends or is dropped. (`map`, not an async block, which would
        // hold `work` twice.)
        tokio::spawn(work.map(move |output| {
            drop(running);
            output
        }))
    }

    /// How many turns are running now.
    pub fn running(&self) -> usize {
        self.inner.running.load(Ordering::Acquire)
    }

    /// Waits until no turn is running, or until `deadline`; says whether none is.
    pub async fn wait_until_idle(&self, deadline: Instant) -> bool {
        loop {
            let idle = self.inner.idle.notified();
            tokio::pin!(idle);
            // Registered before looking, so that a turn ending in between is not missed.
            idle.as_mut().enable();
            if self.running() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline.into(), idle)
                .await
                .is_err()
            {
                return self.running() == 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn waiting_ends_when_the_last_turn_ends() {
        let turns = Turns::default();
        for ms in [20, 60] {
            turns.spawn(tokio::time::sleep(Duration::from_millis(ms)));
        }
        assert_eq!(turns.running(), 2);
        let started = Instant::now();
        assert!(
            turns
                .wait_until_idle(Instant::now() + Duration::from_secs(5))
                .await
        );
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(turns.running(), 0);
    }

    #[tokio::test]
    async fn waiting_gives_up_at_the_deadline() {
        let turns = Turns::default();
        let slow = turns.spawn(tokio::time::sleep(Duration::from_secs(30)));
        let idle = turns
            .wait_until_idle(Instant::now() + Duration::from_millis(50))
            .await;
        assert!(!idle);
        assert_eq!(turns.running(), 1);
        slow.abort();
        let _ = slow.await;
        assert_eq!(turns.running(), 0, "a cancelled turn is no longer counted");
    }
}
