//! Bounded password verification. An argon2id verification takes about
//! 19 MiB and 30 ms of CPU; unbounded, 100 sessions logging in at once took
//! the agent to 3.2-3.5 GB of RSS that was never returned (issue 12).
//! Verifications run on a small fixed pool of threads, at most one each: a
//! login storm queues instead of multiplying memory, and the memory the
//! hashes use stays in the same few threads' allocator arenas, where it is
//! reused, instead of spreading over every blocking thread tokio has.
//! Unknown users go through here too (they are verified against a dummy
//! hash), so unauthenticated clients cannot bypass the bound.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Semaphore, oneshot};

type Job = Box<dyn FnOnce() + Send>;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("all {slots} password verification slots stayed busy for {waited:?}")]
    Busy { slots: usize, waited: Duration },
    #[error("password verifier threads are gone")]
    Gone,
    #[error("starting password verifier thread: {source}")]
    Spawn {
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug)]
pub struct Verifier {
    slots: usize,
    permits: Semaphore,
    jobs: Mutex<mpsc::Sender<Job>>,
    wait: Duration,
}

impl Verifier {
    /// Starts `slots` verifier threads; `run` waits at most `wait` for one.
    pub fn new(slots: usize, wait: Duration) -> Result<Arc<Self>, VerifyError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for n in 0..slots {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("auth-verify-{n}"))
                .spawn(move || {
                    loop {
                        // Ends when the Verifier (the only sender) is dropped.
                        let job = match rx
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .recv()
                        {
                            Ok(j) => j,
                            Err(_) => return,
                        };
                        job();
                    }
                })
                .map_err(|source| VerifyError::Spawn { source })?;
        }
        Ok(Arc::new(Self {
            slots,
            permits: Semaphore::new(slots),
            jobs: Mutex::new(tx),
            wait,
        }))
    }

    /// Runs `f` on a verifier thread once a slot is free. A permit is held
    /// for the whole job, so there are never more jobs than threads and
    /// none waits inside the pool.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, VerifyError> {
        let permit = match tokio::time::timeout(self.wait, self.permits.acquire()).await {
            Ok(Ok(p)) => p,
            Ok(Err(_)) => return Err(VerifyError::Gone),
            Err(_) => {
                return Err(VerifyError::Busy {
                    slots: self.slots,
                    waited: self.wait,
                });
            }
        };
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(f());
        });
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .send(job)
            .map_err(|_| VerifyError::Gone)?;
        // If the session goes away meanwhile, the job still finishes (a
        // hash cannot be interrupted) and the permit is released only then:
        // dropping the session must not let more hashes run at once.
        let out = result.await.map_err(|_| VerifyError::Gone);
        drop(permit);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_most_slots_run_and_the_rest_wait_or_are_refused() {
        let v = Verifier::new(2, Duration::from_millis(600)).unwrap();
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..6 {
            let (v, running, peak) = (v.clone(), running.clone(), peak.clone());
            tasks.push(tokio::spawn(async move {
                v.run(move || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(400));
                    running.fetch_sub(1, Ordering::SeqCst);
                    7
                })
                .await
            }));
        }
        let mut ok = 0;
        let mut busy = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(7) => ok += 1,
                Err(VerifyError::Busy { slots: 2, .. }) => busy += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(peak.load(Ordering::SeqCst), 2, "never more than 2 at once");
        // Two run at once for 400 ms each; within a 600 ms wait the second
        // pair gets its turn, the third does not.
        assert_eq!((ok, busy), (4, 2));
    }
}
