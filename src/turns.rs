//! Conversation turns in flight. A turn runs to its end even when its client has gone (its reply
//! is stored and priced, for the other surfaces to see), so it cannot live on the HTTP worker
//! that received the request: actix stops its workers, and drops what they run, as soon as
//! their connections are closed. Turns run on the server's own runtime instead, and are
//! counted, so that a stop can wait for those still waiting on the model provider.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

#[derive(Clone)]
pub struct Turns {
    inner: Arc<Inner>,
}

struct Inner {
    /// The runtime that outlives the HTTP workers (the one `Application` was built in).
    runtime: Handle,
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
    /// Turns that will run on the current runtime. Must be called within one.
    pub fn on_current_runtime() -> Self {
        Self {
            inner: Arc::new(Inner {
                runtime: Handle::current(),
                running: AtomicUsize::new(0),
                idle: Notify::new(),
            }),
        }
    }

    /// Runs `work` to its end on the server's runtime, counted until it ends.
    pub fn spawn<F>(&self, work: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.inner.running.fetch_add(1, Ordering::AcqRel);
        let running = Running(Arc::clone(&self.inner));
        self.inner.runtime.spawn(async move {
            let _running = running;
            work.await
        })
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
        let turns = Turns::on_current_runtime();
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
        let turns = Turns::on_current_runtime();
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
