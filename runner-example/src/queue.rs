//! fal's queue, runner-owned (docs/queue.md): jobs submitted to this runner stay here, with
//! their status, logs and result, under request ids that carry this runner's `queue_token`.
//!
//! * [`JobQueue`]: the token, the request ids, and the jobs (the `store` module's, under one
//!   lock).
//! * `routes`: the `/queue/...` routes (listed in [`crate::http`]) and the task that runs a
//!   job.
//!
//! A job holds its request's [`Admission`](crate::runner::Admission) until it has ended, so
//! the pending jobs are bounded by `max_concurrency + max_queue` and count in `in_flight`;
//! finished ones are kept [`QueueConfig::job_ttl`] and at most
//! [`QueueConfig::max_finished_jobs`] of them, oldest dropped first. Every operation prunes,
//! so memory stays bounded however many jobs go through.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hint_router_core::queue::{format_request_id, request_id_token, TOKEN_HEX};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::cache::CacheOutcome;
use crate::http::Answer;
use crate::runner::Starting;

pub(crate) mod routes;
mod store;

use store::{Cancel, JobError, Key, LogEntry, Phase, Store};

/// The default of [`QueueConfig::job_ttl`] (`--job-ttl-s`).
pub const DEFAULT_JOB_TTL: Duration = Duration::from_secs(600);

/// The default of [`QueueConfig::max_finished_jobs`] (`--max-finished-jobs`).
pub const DEFAULT_MAX_FINISHED_JOBS: usize = 10_000;

/// How long finished jobs are kept, and how many.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// How long a finished job's status and result stay available.
    pub job_ttl: Duration,
    /// The most finished jobs kept (at least 1); beyond, the oldest goes first.
    pub max_finished_jobs: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self { job_ttl: DEFAULT_JOB_TTL, max_finished_jobs: DEFAULT_MAX_FINISHED_JOBS }
    }
}

/// The jobs of a runner, and the token their ids carry.
#[derive(Debug)]
pub struct JobQueue {
    token: u64,
    config: QueueConfig,
    store: Mutex<Store>,
}

/// 128 bits from the OS generator, for a request id.
fn random_u128() -> Result<u128, getrandom::Error> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)?;
    Ok(u128::from_le_bytes(bytes))
}

impl JobQueue {
    /// An empty queue with a fresh random token (non-zero, from the OS generator, so a
    /// restarted runner never answers for the ids of its previous life).
    pub fn new(config: QueueConfig) -> Result<Self, getrandom::Error> {
        let token = loop {
            let token = getrandom::u64()?;
            if token != 0 {
                break token;
            }
        };
        let store = Mutex::new(Store::new(config.job_ttl, config.max_finished_jobs));
        Ok(Self { token, config, store })
    }

    /// [`JobQueue::new`], logging why when the OS has no randomness to give: the runner then
    /// serves without a queue rather than with guessable ids.
    pub(crate) fn open(config: &QueueConfig) -> Option<Arc<Self>> {
        match Self::new(config.clone()) {
            Ok(queue) => Some(Arc::new(queue)),
            Err(e) => {
                log::error!("serving without the fal queue: no random token from the OS: {e}");
                None
            }
        }
    }

    /// The token in this runner's request ids and `/hints` `queue_token`.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// The configuration in force.
    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// Jobs held now: pending ones and the finished ones kept.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no job is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        // Every store operation leaves it consistent before anything that could panic.
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The request id of `key`.
    fn id(&self, key: Key) -> String {
        format_request_id(self.token, key)
    }

    /// The key of a request id this runner issued; `None` for any other string.
    fn key(&self, id: &str) -> Option<Key> {
        if request_id_token(id.as_bytes())? != self.token {
            return None;
        }
        Key::from_str_radix(id.get(TOKEN_HEX + 1..)?, 16).ok()
    }

    /// Takes in a job: draws its id, records it queued, and calls `spawn` (under the lock, so
    /// the task finds its job) for the task that runs it. Returns the id and queue position.
    fn accept(
        &self,
        model: &str,
        spawn: impl FnOnce(Key) -> AbortHandle,
    ) -> Result<(String, usize), getrandom::Error> {
        let mut store = self.lock();
        let key = loop {
            let key = random_u128()?;
            if !store.contains(key) {
                break key;
            }
        };
        let position = store.accept(key, Instant::now(), format!("accepted for model {model}"));
        store.set_task(key, spawn(key));
        Ok((self.id(key), position))
    }

    /// The job's inference starts now; `false` when it was cancelled (it must not run).
    fn start(&self, key: Key, starting: &Starting) -> bool {
        let mut messages = Vec::new();
        if starting.cache == CacheOutcome::Miss {
            messages.push(format!("model loaded: waited {} ms for the load", starting.load.as_millis()));
        }
        messages.push("running".to_string());
        self.lock().start(key, Instant::now(), messages)
    }

    /// Records the job's answer (no-op when it was cancelled meanwhile).
    fn finish(&self, key: Key, answer: Answer, error: Option<JobError>) {
        self.lock().finish(key, Instant::now(), answer, error);
    }

    /// Cancels a queued job (aborting its task, outside the lock) or asks a running one.
    fn cancel(&self, key: Key) -> Cancel {
        let outcome = self.lock().cancel(key, Instant::now());
        if let Cancel::Cancelled(Some(task)) = &outcome {
            task.abort();
        }
        outcome
    }

    fn status(&self, key: Key, logs: bool) -> Option<(Phase, Option<Vec<LogEntry>>)> {
        self.lock().status(key, Instant::now(), logs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::{InferError, Runner, RunnerConfig};
    use crate::testing::TestBackend;

    #[test]
    fn ids_carry_the_token_and_are_read_back() {
        let queue = JobQueue::new(QueueConfig::default()).unwrap();
        assert_ne!(queue.token(), 0);
        let other = JobQueue::new(QueueConfig::default()).unwrap();
        assert_ne!(queue.token(), other.token(), "64 random bits each");
        let id = queue.id(0xabc);
        assert_eq!(request_id_token(id.as_bytes()), Some(queue.token()));
        assert_eq!(queue.key(&id), Some(0xabc));
        assert_eq!(other.key(&id), None, "another runner's id");
        assert_eq!(queue.key(&id.to_uppercase()), None);
        assert_eq!(queue.key(&id[1..]), None);
        assert_eq!(queue.key(""), None);
        assert_eq!(queue.key("../hints"), None);
    }

    /// A job cancelled in the instant its inference would start does not run: the start is
    /// refused, and its slot, pin and admission go.
    #[tokio::test(start_paused = true)]
    async fn a_job_cancelled_before_its_start_never_runs() {
        let backend = TestBackend::new(Duration::from_millis(100), Duration::from_millis(10));
        let runner = Runner::new(RunnerConfig::new("127.0.0.1:1"), backend.clone());
        let queue = Arc::clone(runner.queue().unwrap());
        let (id, position) = queue.accept("a", |_| tokio::spawn(async {}).abort_handle()).unwrap();
        assert_eq!(position, 0);
        let key = queue.key(&id).unwrap();
        assert!(matches!(queue.cancel(key), Cancel::Cancelled(Some(_))));
        let admission = runner.admit().unwrap();
        let result =
            runner.infer_admitted_with(admission, "a", None, String::new(), |s| queue.start(key, s)).await;
        assert_eq!(result.unwrap_err(), InferError::Cancelled);
        assert_eq!((runner.in_flight(), runner.running(), backend.max_infers()), (0, 0, 0));
        assert!(matches!(queue.status(key, false), Some((Phase::Done(store::Outcome::Cancelled), None))));
        // The model stays loaded and unpinned: the next request is a hit.
        let next = runner.infer("a", String::new()).await.unwrap();
        assert_eq!(next.cache, crate::cache::CacheOutcome::Hit);
    }
}
