//! The job store: jobs by key, their states and logs, queue positions, and the bounded
//! retention of finished jobs. Plain data under the [`JobQueue`](super::JobQueue)'s lock; every
//! operation takes the time, so tests drive the clock.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, SystemTime};

use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::http::Answer;

/// A job's key: the random part of its request id (the token is the same for all).
pub(crate) type Key = u128;

/// How a job ended with an error, for its status (`error`, `error_type`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JobError {
    /// What went wrong, for people.
    pub(crate) message: String,
    /// A stable name for the kind of failure.
    pub(crate) kind: &'static str,
}

/// How a job ended.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// It ran (or failed before it could): the answer `POST /` would have given.
    Answered {
        answer: Answer,
        error: Option<JobError>,
        /// How long the inference took; `None` when none started (a failed load).
        inference_time: Option<Duration>,
    },
    /// Cancelled while queued: nothing ran.
    Cancelled,
}

#[derive(Debug)]
enum State {
    /// Waiting for a model load or an inference slot; `task` runs it, and aborting it cancels
    /// the job (its admission goes with the task).
    Queued {
        task: Option<AbortHandle>,
    },
    /// The inference runs; it cannot be stopped, only finished.
    Running {
        started: Instant,
    },
    Done(Outcome),
}

/// A log line of a job, as `?logs=1` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LogEntry {
    pub(crate) message: String,
    /// `INFO`, `WARNING` or `ERROR`.
    pub(crate) level: &'static str,
    pub(crate) at: SystemTime,
}

#[derive(Debug)]
struct Job {
    /// Order of acceptance, for queue positions.
    seq: u64,
    state: State,
    /// A few lines: accepted, loaded, running, cancellation asked, ended.
    logs: Vec<LogEntry>,
}

/// What a status call sees of a job.
#[derive(Debug, Clone)]
pub(crate) enum Phase {
    /// Not started; `position` jobs accepted before it have not started either.
    Queued {
        position: usize,
    },
    Running,
    Done(Outcome),
}

/// What cancelling a job did.
#[derive(Debug)]
pub(crate) enum Cancel {
    /// It was queued and is now cancelled: the caller aborts its task, if any.
    Cancelled(Option<AbortHandle>),
    /// It runs; it will finish and keep its answer.
    Requested,
    /// It had ended already.
    AlreadyDone,
    NotFound,
}

/// The jobs of one runner.
#[derive(Debug)]
pub(crate) struct Store {
    jobs: HashMap<Key, Job>,
    /// The `seq` of every queued job, for queue positions.
    queued: BTreeSet<u64>,
    /// Finished jobs by the time they finished (so oldest first): who expires next.
    finished: VecDeque<(Instant, Key)>,
    next_seq: u64,
    ttl: Duration,
    max_finished: usize,
}

fn log(message: impl Into<String>, level: &'static str) -> LogEntry {
    LogEntry { message: message.into(), level, at: SystemTime::now() }
}

impl Store {
    /// A store keeping finished jobs for `ttl`, and at most `max_finished` of them (at least 1).
    pub(crate) fn new(ttl: Duration, max_finished: usize) -> Self {
        Self {
            jobs: HashMap::new(),
            queued: BTreeSet::new(),
            finished: VecDeque::new(),
            next_seq: 0,
            ttl,
            max_finished: max_finished.max(1),
        }
    }

    /// Jobs held, pending and finished.
    pub(crate) fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Finished jobs held.
    #[cfg(test)]
    pub(crate) fn finished_len(&self) -> usize {
        self.finished.len()
    }

    pub(crate) fn contains(&self, key: Key) -> bool {
        self.jobs.contains_key(&key)
    }

    /// Takes in a queued job (`key` unused: see [`Store::contains`]) and returns its queue
    /// position: the jobs accepted before it that have not started.
    pub(crate) fn accept(&mut self, key: Key, now: Instant, message: String) -> usize {
        self.prune(now);
        let seq = self.next_seq;
        self.next_seq += 1;
        let position = self.queued.len();
        self.queued.insert(seq);
        let job = Job { seq, state: State::Queued { task: None }, logs: vec![log(message, "INFO")] };
        self.jobs.insert(key, job);
        position
    }

    /// Gives a queued job the task that runs it, so cancelling it can abort the task.
    pub(crate) fn set_task(&mut self, key: Key, handle: AbortHandle) {
        if let Some(Job { state: State::Queued { task }, .. }) = self.jobs.get_mut(&key) {
            *task = Some(handle);
        }
    }

    /// Turns a queued job running, with its log lines; `false` (and nothing changes) when it is
    /// not queued: it was cancelled, so it must not run.
    pub(crate) fn start(&mut self, key: Key, now: Instant, messages: Vec<String>) -> bool {
        let Some(job) = self.jobs.get_mut(&key) else { return false };
        if !matches!(job.state, State::Queued { .. }) {
            return false;
        }
        self.queued.remove(&job.seq);
        job.state = State::Running { started: now };
        job.logs.extend(messages.into_iter().map(|m| log(m, "INFO")));
        true
    }

    /// Records a pending job's answer; `false` when it had ended already (cancelled), which
    /// keeps the first ending.
    pub(crate) fn finish(&mut self, key: Key, now: Instant, answer: Answer, error: Option<JobError>) -> bool {
        let Some(job) = self.jobs.get_mut(&key) else { return false };
        let inference_time = match job.state {
            State::Queued { .. } => None,
            State::Running { started } => Some(now.saturating_duration_since(started)),
            State::Done(_) => return false,
        };
        let line = match &error {
            Some(e) => log(format!("failed: {}", e.message), "ERROR"),
            None => log("completed", "INFO"),
        };
        job.logs.push(line);
        job.state = State::Done(Outcome::Answered { answer, error, inference_time });
        self.queued.remove(&job.seq);
        self.finished.push_back((now, key));
        self.prune(now);
        true
    }

    /// Cancels a queued job, asks a running one (it goes on), or says why not.
    pub(crate) fn cancel(&mut self, key: Key, now: Instant) -> Cancel {
        self.prune(now);
        let Some(job) = self.jobs.get_mut(&key) else { return Cancel::NotFound };
        match &mut job.state {
            State::Queued { task } => {
                let task = task.take();
                self.queued.remove(&job.seq);
                job.state = State::Done(Outcome::Cancelled);
                job.logs.push(log("cancelled before it started", "WARNING"));
                self.finished.push_back((now, key));
                self.prune(now);
                Cancel::Cancelled(task)
            }
            State::Running { .. } => {
                const ASKED: &str = "cancellation asked for: the running inference goes on";
                // Once: the logs stay a few lines however often a client asks.
                if job.logs.last().is_none_or(|l| l.message != ASKED) {
                    job.logs.push(log(ASKED, "WARNING"));
                }
                Cancel::Requested
            }
            State::Done(_) => Cancel::AlreadyDone,
        }
    }

    /// A job's phase, and its logs when `logs`.
    pub(crate) fn status(
        &mut self,
        key: Key,
        now: Instant,
        logs: bool,
    ) -> Option<(Phase, Option<Vec<LogEntry>>)> {
        self.prune(now);
        let job = self.jobs.get(&key)?;
        let phase = match &job.state {
            State::Queued { .. } => Phase::Queued { position: self.queued.range(..job.seq).count() },
            State::Running { .. } => Phase::Running,
            State::Done(outcome) => Phase::Done(outcome.clone()),
        };
        Some((phase, logs.then(|| job.logs.clone())))
    }

    /// Drops finished jobs older than the ttl, then the oldest beyond `max_finished`.
    pub(crate) fn prune(&mut self, now: Instant) {
        while let Some(&(finished, key)) = self.finished.front() {
            let expired = now.saturating_duration_since(finished) >= self.ttl;
            if !expired && self.finished.len() <= self.max_finished {
                break;
            }
            self.finished.pop_front();
            self.jobs.remove(&key);
        }
    }
}

/// `at` as RFC 3339 in UTC with milliseconds, `2024-05-01T12:34:56.789Z`.
pub(crate) fn rfc3339(at: SystemTime) -> String {
    let since = at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        since.subsec_millis()
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    const TTL: Duration = Duration::from_secs(600);

    fn answer() -> Answer {
        Answer::error(StatusCode::OK, "done")
    }

    fn position(store: &mut Store, key: Key, now: Instant) -> Option<usize> {
        match store.status(key, now, false)?.0 {
            Phase::Queued { position } => Some(position),
            _ => None,
        }
    }

    #[test]
    fn a_job_goes_queued_running_done_with_its_logs() {
        let now = Instant::now();
        let mut store = Store::new(TTL, 10);
        assert_eq!(store.accept(1, now, "accepted".into()), 0);
        assert!(matches!(store.status(1, now, false), Some((Phase::Queued { position: 0 }, None))));
        assert!(store.start(1, now, vec!["running".into()]));
        assert!(!store.start(1, now, vec![]), "starts once");
        assert!(matches!(store.status(1, now, false), Some((Phase::Running, None))));
        assert!(matches!(store.cancel(1, now), Cancel::Requested));
        assert!(matches!(store.cancel(1, now), Cancel::Requested));
        let later = now + Duration::from_millis(1500);
        assert!(store.finish(1, later, answer(), None));
        assert!(!store.finish(1, later, answer(), None), "finishes once");
        let (phase, logs) = store.status(1, later, true).unwrap();
        let ran = Some(Duration::from_millis(1500));
        assert!(
            matches!(&phase, Phase::Done(Outcome::Answered { inference_time, error: None, .. }) if *inference_time == ran),
            "{phase:?}"
        );
        let messages: Vec<_> = logs.unwrap().into_iter().map(|l| l.message).collect();
        assert_eq!(
            messages,
            ["accepted", "running", "cancellation asked for: the running inference goes on", "completed"]
        );
        assert!(matches!(store.cancel(1, later), Cancel::AlreadyDone));
        assert!(matches!(store.cancel(2, later), Cancel::NotFound));
        assert!(store.status(2, later, true).is_none());
    }

    #[test]
    fn queue_positions_count_earlier_jobs_not_started() {
        let now = Instant::now();
        let mut store = Store::new(TTL, 10);
        for key in 0..5 {
            assert_eq!(store.accept(key, now, String::new()), usize::try_from(key).unwrap());
        }
        assert!(store.start(0, now, vec![]));
        assert!(matches!(store.cancel(2, now), Cancel::Cancelled(None)));
        assert_eq!(position(&mut store, 1, now), Some(0));
        assert_eq!(position(&mut store, 3, now), Some(1));
        assert_eq!(position(&mut store, 4, now), Some(2));
        // A job that fails before it starts (a failed load) leaves the queue too.
        assert!(store.finish(3, now, answer(), Some(JobError { message: "x".into(), kind: "LoadFailed" })));
        assert_eq!(position(&mut store, 4, now), Some(1));
        assert_eq!(store.accept(5, now, String::new()), 2);
        assert!(!store.start(2, now, vec![]), "a cancelled job never runs");
        assert!(!store.finish(2, now, answer(), None), "a cancelled job keeps its ending");
        assert!(matches!(store.status(2, now, false), Some((Phase::Done(Outcome::Cancelled), None))));
    }

    /// 100,000 jobs through the store: it never holds more than `max_finished` finished ones,
    /// drops the oldest first, and lets all go once the ttl has passed.
    #[test]
    fn retention_is_bounded_under_100_000_jobs() {
        const MAX: usize = 1000;
        let start = Instant::now();
        let mut store = Store::new(TTL, MAX);
        let mut now = start;
        for key in 0..100_000u128 {
            now += Duration::from_millis(1);
            store.accept(key, now, "accepted".into());
            assert!(store.start(key, now, vec!["running".into()]));
            assert!(store.finish(key, now, answer(), None));
            assert!(store.len() <= MAX, "{} jobs held after {key}", store.len());
        }
        assert_eq!((store.len(), store.finished_len()), (MAX, MAX));
        assert!(store.status(100_000 - MAX as u128 - 1, now, false).is_none(), "oldest dropped");
        assert!(store.status(100_000 - MAX as u128, now, false).is_some(), "newest kept");
        // Expiry: the first half of the kept ones finished more than a ttl ago.
        let half = now + TTL - Duration::from_millis(MAX as u64 / 2);
        store.prune(half);
        assert_eq!(store.len(), MAX / 2);
        store.prune(now + TTL);
        assert_eq!((store.len(), store.finished_len()), (0, 0));
        // Pending jobs are not the store's to drop (their admissions bound them).
        store.accept(7, now, String::new());
        store.prune(now + TTL * 10);
        assert_eq!(store.len(), 1);
        assert!(store.queued.len() == 1);
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let at =
            |secs, millis| SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis);
        assert_eq!(rfc3339(at(0, 0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(at(951_782_400, 5)), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339(at(1_700_000_000, 123)), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(at(4_107_542_399, 999)), "2100-02-28T23:59:59.999Z");
        assert_eq!(rfc3339(at(1_709_164_800, 0)), "2024-02-29T00:00:00.000Z");
    }
}
