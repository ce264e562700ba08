//! Tests of the model cache; the contention tests check [`ModelCache::validate`] as they go.

use super::*;
use crate::testing::TestBackend;
use std::time::Duration;
use tokio::time::{advance, sleep};

mod budget;

const LOAD: Duration = Duration::from_millis(100);

fn cache(backend: &Arc<TestBackend>, capacity: usize) -> ModelCache {
    ModelCache::new(backend.clone(), capacity, Duration::from_millis(1000))
}

fn hints(cache: &ModelCache) -> Vec<String> {
    cache.snapshot().hints
}

/// Lets every task that can run, run (paused clock: time does not move).
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn miss_then_hit() {
    let backend = TestBackend::new(LOAD, Duration::ZERO);
    let cache = cache(&backend, 2);
    let start = Instant::now();
    let lease = cache.acquire("a").await.unwrap();
    assert_eq!(lease.outcome(), CacheOutcome::Miss);
    assert_eq!(lease.loading(), LOAD);
    assert_eq!(lease.queued(), Duration::ZERO);
    assert_eq!(start.elapsed(), LOAD);
    assert_eq!(cache.pins("a"), Some(1));
    drop(lease);
    assert_eq!(cache.pins("a"), Some(0));

    let start = Instant::now();
    let lease = cache.acquire("a").await.unwrap();
    assert_eq!(lease.outcome(), CacheOutcome::Hit);
    assert_eq!(lease.loading(), Duration::ZERO);
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(backend.loads("a"), 1);
    assert_eq!(hints(&cache), ["a"]);
    let out = lease.model().clone().infer("p".into()).await.unwrap();
    assert_eq!(out, "a:p");
}

#[tokio::test(start_paused = true)]
async fn evicts_least_recently_used_first() {
    let backend = TestBackend::new(LOAD, Duration::ZERO);
    let cache = cache(&backend, 2);
    drop(cache.acquire("a").await.unwrap());
    drop(cache.acquire("b").await.unwrap());
    assert_eq!(hints(&cache), ["b", "a"]);
    // Using a makes b the least recently used.
    drop(cache.acquire("a").await.unwrap());
    assert_eq!(hints(&cache), ["a", "b"]);
    drop(cache.acquire("c").await.unwrap());
    assert_eq!(hints(&cache), ["c", "a"]);
    assert_eq!(backend.live(), 2);
    drop(cache.acquire("b").await.unwrap());
    assert_eq!(hints(&cache), ["b", "c"]);
    assert_eq!(backend.loads("b"), 2);
    assert_eq!(backend.max_live(), 2);
}

#[tokio::test(start_paused = true)]
async fn evicts_the_model_the_router_asks_for_when_it_can() {
    let backend = TestBackend::new(LOAD, Duration::ZERO);
    let cache = cache(&backend, 3);
    for m in ["a", "b", "c"] {
        drop(cache.acquire(m).await.unwrap());
    }
    assert_eq!(hints(&cache), ["c", "b", "a"]);
    // Asked to evict b (not the least recently used, a): b goes.
    drop(cache.acquire_evicting("d", Some("b")).await.unwrap());
    assert_eq!(hints(&cache), ["d", "c", "a"]);
    // Advice that cannot be followed (absent, then pinned) falls back to the LRU model.
    drop(cache.acquire_evicting("e", Some("nope")).await.unwrap());
    assert_eq!(hints(&cache), ["e", "d", "c"]);
    let pinned = cache.acquire("d").await.unwrap();
    drop(cache.acquire_evicting("f", Some("d")).await.unwrap());
    assert_eq!(hints(&cache), ["f", "d", "e"]);
    drop(pinned);
    // On a hit nothing is evicted, whatever is asked.
    drop(cache.acquire_evicting("f", Some("e")).await.unwrap());
    assert_eq!(hints(&cache), ["f", "d", "e"]);
    assert_eq!(backend.max_live(), 3);
    cache.validate().unwrap();
}

#[tokio::test(start_paused = true)]
async fn pinned_models_are_never_evicted_the_miss_waits() {
    let backend = TestBackend::new(LOAD, Duration::ZERO);
    let cache = cache(&backend, 2);
    let a = cache.acquire("a").await.unwrap();
    let b = cache.acquire("b").await.unwrap();
    // a is the least recently used, but pinned; so is b.
    let c = tokio::spawn({
        let cache = cache.clone();
        async move { cache.acquire("c").await }
    });
    settle().await;
    advance(LOAD * 10).await;
    settle().await;
    assert!(!c.is_finished());
    assert_eq!(backend.loads("c"), 0);
    // c is advertised while it waits (a request for it here joins the queued load).
    assert_eq!(hints(&cache), ["c", "b", "a"]);
    assert_eq!(cache.snapshot().loading, ["c"]);
    assert_eq!(cache.queued(), [("c".to_string(), 1)]);

    drop(b); // b unpinned: it is evicted (a is still pinned), c loads in its place
    settle().await;
    assert_eq!(cache.snapshot().loading, ["c"]);
    assert_eq!(hints(&cache), ["c", "a"]);
    let c = c.await.unwrap().unwrap();
    assert_eq!(c.outcome(), CacheOutcome::Miss);
    assert_eq!(c.queued(), LOAD * 10);
    assert_eq!(c.loading(), LOAD);
    assert_eq!(backend.loads("c"), 1);
    assert_eq!(backend.max_live(), 2);
    drop(a);
}

#[tokio::test(start_paused = true)]
async fn loading_models_are_not_evicted_either() {
    let backend = TestBackend::new(LOAD, Duration::ZERO);
    let cache = cache(&backend, 1);
    // A load nobody waits for any more still holds its slot until it completes.
    let a = tokio::spawn({
        let cache = cache.clone();
        async move { cache.acquire("a").await }
    });
    settle().await;
    a.abort();
    let b = tokio::spawn({
        let cache = cache.clone();
        async move { cache.acquire("b").await }
    });
    settle().await;
    assert_eq!(cache.snapshot().loading, ["b", "a"]); // b queued, a loading
    assert_eq!(cache.queued(), [("b".to_string(), 1)]);
    let b = b.await.unwrap().unwrap();
    assert_eq!(b.queued(), LOAD);
    assert_eq!(backend.loads("a"), 1);
    assert_eq!(backend.completed("a"), 1);
    assert_eq!(hints(&cache), ["b"]);
    assert_eq!(backend.max_live(), 1);
}

#[tokio::test(start_paused = true)]
async fn slot_waiters_are_served_in_order() {
    let backend = TestBackend::new(LOAD, Duration::ZERO);
    let cache = cache(&backend, 1);
    let a = cache.acquire("a").await.unwrap();
    let mut waiters = Vec::new();
    for model in ["b", "c", "b", "d"] {
        let cache = cache.clone();
        waiters.push(tokio::spawn(async move { cache.acquire(model).await }));
        settle().await;
    }
    // The second request for b joined b's place in the queue.
    assert_eq!(cache.queued(), [("b".to_string(), 2), ("c".to_string(), 1), ("d".to_string(), 1)]);
    // The next to load is advertised (at most `capacity` queued models), before the slots.
    assert_eq!(hints(&cache), ["b", "a"]);
    drop(a);
    settle().await;
    assert_eq!(cache.snapshot().loading, ["c", "b"]);
    let mut waiters = waiters.into_iter();
    let b1 = waiters.next().unwrap();
    let c = waiters.next().unwrap();
    let b2 = waiters.next().unwrap();
    let d = waiters.next().unwrap();
    let b1 = b1.await.unwrap().unwrap();
    let b2 = b2.await.unwrap().unwrap();
    assert_eq!(cache.pins("b"), Some(2));
    drop(b1);
    settle().await;
    assert!(!c.is_finished());
    assert_eq!(hints(&cache), ["c", "b"]);
    drop(b2);
    let c = c.await.unwrap().unwrap();
    assert_eq!(hints(&cache), ["d", "c"]);
    drop(c);
    let d = d.await.unwrap().unwrap();
    assert_eq!(hints(&cache), ["d"]);
    drop(d);
    assert_eq!(backend.loads("b"), 1);
    assert_eq!(backend.max_live(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_queued_model_nobody_waits_for_is_never_loaded() {
    let backend = TestBackend::new(LOAD, Duration::ZERO);
    let cache = cache(&backend, 1);
    let a = cache.acquire("a").await.unwrap();
    let b = tokio::spawn({
        let cache = cache.clone();
        async move { cache.acquire("b").await }
    });
    settle().await;
    assert_eq!(cache.queued().len(), 1);
    b.abort();
    settle().await;
    assert!(cache.queued().is_empty());
    drop(a);
    advance(LOAD * 2).await;
    settle().await;
    assert_eq!(backend.loads("b"), 0);
    assert_eq!(hints(&cache), ["a"]);
}

#[tokio::test(start_paused = true)]
async fn hundred_concurrent_requests_share_one_load() {
    let backend = TestBackend::new(LOAD, Duration::ZERO);
    let cache = cache(&backend, 2);
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.acquire("m").await })
        })
        .collect();
    settle().await;
    assert_eq!(cache.snapshot().loading, ["m"]);
    assert_eq!(cache.pins("m"), Some(100));
    let mut leases = Vec::new();
    for task in tasks {
        let lease = task.await.unwrap().unwrap();
        assert_eq!(lease.outcome(), CacheOutcome::Miss);
        leases.push(lease);
    }
    assert_eq!(backend.loads("m"), 1);
    assert_eq!(cache.pins("m"), Some(100));
    drop(leases);
    assert_eq!(cache.pins("m"), Some(0));
}

#[tokio::test(start_paused = true)]
async fn a_dropped_waiter_does_not_cancel_the_load() {
    let backend = TestBackend::new(LOAD, Duration::ZERO);
    let cache = cache(&backend, 2);
    let first = tokio::spawn({
        let cache = cache.clone();
        async move { cache.acquire("m").await }
    });
    let second = tokio::spawn({
        let cache = cache.clone();
        async move { cache.acquire("m").await }
    });
    sleep(LOAD / 2).await;
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    assert_eq!(cache.pins("m"), Some(1));
    let lease = second.await.unwrap().unwrap();
    assert_eq!(lease.outcome(), CacheOutcome::Miss);
    drop(lease);

    // Now with nobody left waiting at all.
    let lonely = tokio::spawn({
        let cache = cache.clone();
        async move { cache.acquire("n").await }
    });
    sleep(LOAD / 2).await;
    lonely.abort();
    settle().await;
    assert_eq!(cache.pins("n"), Some(0));
    assert_eq!(cache.snapshot().loading, ["n"]);
    sleep(LOAD).await;
    assert_eq!(backend.completed("n"), 1);
    assert!(cache.snapshot().loading.is_empty());
    assert_eq!(hints(&cache), ["n", "m"]);
    let lease = cache.acquire("n").await.unwrap();
    assert_eq!(lease.outcome(), CacheOutcome::Hit);
    assert_eq!(backend.loads("m"), 1);
    assert_eq!(backend.loads("n"), 1);
}

#[tokio::test(start_paused = true)]
async fn failed_load_is_not_advertised_and_backs_off_before_retrying() {
    let backend = TestBackend::new(LOAD, Duration::ZERO);
    backend.set_failing("x", true);
    let cache = cache(&backend, 2);
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.acquire("x").await })
        })
        .collect();
    settle().await;
    assert_eq!(hints(&cache), ["x"]); // advertised while loading
    for task in tasks {
        let err = task.await.unwrap().unwrap_err();
        assert_eq!(err.model, "x");
        assert!(matches!(err.error, BackendError::Failed(_)));
        assert_eq!(err.retry_after, Duration::from_millis(1000));
        assert!(err.to_string().starts_with("loading model x failed: "));
    }
    assert_eq!(backend.loads("x"), 1);
    assert!(hints(&cache).is_empty());
    assert_eq!(cache.pins("x"), None);

    // Within the backoff: fails at once, no new load.
    backend.set_failing("x", false);
    sleep(Duration::from_millis(400)).await;
    let start = Instant::now();
    let err = cache.acquire("x").await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(err.retry_after, Duration::from_millis(600));
    assert_eq!(backend.loads("x"), 1);
    assert!(hints(&cache).is_empty());

    // After it: the next request loads again (and now succeeds).
    sleep(Duration::from_millis(600)).await;
    let lease = cache.acquire("x").await.unwrap();
    assert_eq!(lease.outcome(), CacheOutcome::Miss);
    assert_eq!(backend.loads("x"), 2);
    assert_eq!(hints(&cache), ["x"]);
}

#[tokio::test(start_paused = true)]
async fn a_failed_load_frees_its_slot_for_queued_models() {
    let backend = TestBackend::new(LOAD, Duration::ZERO);
    backend.set_failing("x", true);
    let cache = cache(&backend, 1);
    let x = tokio::spawn({
        let cache = cache.clone();
        async move { cache.acquire("x").await }
    });
    settle().await;
    let y = cache.acquire("y").await.unwrap();
    assert_eq!(y.queued(), LOAD);
    assert!(x.await.unwrap().is_err());
    assert_eq!(hints(&cache), ["y"]);
}

#[tokio::test(start_paused = true)]
async fn zero_backoff_retries_at_once() {
    let backend = TestBackend::new(LOAD, Duration::ZERO);
    backend.set_failing("x", true);
    let cache = ModelCache::new(backend.clone(), 1, Duration::ZERO);
    assert!(cache.acquire("x").await.is_err());
    assert!(cache.acquire("x").await.is_err());
    assert_eq!(backend.loads("x"), 2);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_load_is_a_failed_load() {
    let backend = TestBackend::new(LOAD, Duration::ZERO);
    backend.set_panicking("p");
    let cache = cache(&backend, 1);
    let err = cache.acquire("p").await.unwrap_err();
    assert!(matches!(err.error, BackendError::Failed(_)), "{err:?}");
    assert!(hints(&cache).is_empty());
    drop(cache.acquire("q").await.unwrap());
    assert_eq!(hints(&cache), ["q"]);
}

#[tokio::test(start_paused = true)]
async fn snapshot_lists_loading_models_and_sums_bytes() {
    let backend = TestBackend::new(LOAD, Duration::ZERO);
    backend.set_bytes(10);
    let cache = cache(&backend, 3);
    drop(cache.acquire("a").await.unwrap());
    drop(cache.acquire("b").await.unwrap());
    let c = tokio::spawn({
        let cache = cache.clone();
        async move { cache.acquire("c").await }
    });
    settle().await;
    let snap = cache.snapshot();
    assert_eq!(snap.hints, ["c", "b", "a"]);
    assert_eq!(snap.loading, ["c"]);
    assert_eq!(snap.resident_bytes, Some(20));
    drop(c.await.unwrap().unwrap());
    assert_eq!(cache.snapshot().resident_bytes, Some(30));
}

#[tokio::test(start_paused = true)]
async fn without_byte_counts_resident_bytes_is_none() {
    let backend = TestBackend::new(LOAD, Duration::ZERO);
    let cache = cache(&backend, 3);
    drop(cache.acquire("a").await.unwrap());
    assert_eq!(cache.snapshot().resident_bytes, None);
}
