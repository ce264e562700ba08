//! The memory budget, slow releases and contention (with [`ModelCache::validate`]).

use super::*;

fn budget_cache(backend: &Arc<TestBackend>, capacity: usize, budget: u64) -> ModelCache {
    ModelCache::with_memory_budget(backend.clone(), capacity, Some(budget), Duration::from_millis(1000))
}

/// Gives `model` a size of `bytes`, hinted and resident.
/// 400 tasks acquiring and releasing models m0..m7 at once, checking the invariants around
/// each step.
async fn contend(cache: &ModelCache) {
    let tasks: Vec<_> = (0..400)
        .map(|i| {
            let cache = cache.clone();
            tokio::spawn(async move {
                let model = format!("m{}", (i * 7) % 8);
                let lease = cache.acquire(&model).await.unwrap();
                cache.validate().unwrap();
                tokio::task::yield_now().await;
                drop(lease);
                cache.validate().unwrap();
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

fn sized(backend: &TestBackend, model: &str, bytes: u64) {
    backend.set_size(model, Some(bytes), Some(bytes));
}

#[tokio::test(start_paused = true)]
async fn budget_evicts_least_recently_used_models_until_the_new_one_fits() {
    let backend = TestBackend::new(LOAD, Duration::ZERO);
    for (model, bytes) in [("a", 40), ("b", 40), ("c", 40), ("d", 90), ("e", 100)] {
        sized(&backend, model, bytes);
    }
    let cache = budget_cache(&backend, 10, 100);
    assert_eq!(cache.memory_budget(), Some(100));
    drop(cache.acquire("a").await.unwrap());
    drop(cache.acquire("b").await.unwrap());
    assert_eq!(cache.snapshot().resident_bytes, Some(80));
    // 80 + 40 > 100: the least recently used, a, goes.
    drop(cache.acquire("c").await.unwrap());
    assert_eq!(hints(&cache), ["c", "b"]);
    assert_eq!(backend.live(), 2);
    assert_eq!(cache.snapshot().resident_bytes, Some(80));
    // 90 needs both b and c gone, b first.
    drop(cache.acquire("d").await.unwrap());
    assert_eq!(hints(&cache), ["d"]);
    assert_eq!(backend.live(), 1);
    let snap = cache.snapshot();
    assert_eq!((snap.resident_bytes, snap.reserved_bytes), (Some(90), 90));
    // Exactly the budget fits.
    drop(cache.acquire("e").await.unwrap());
    assert_eq!(hints(&cache), ["e"]);
    assert_eq!(backend.max_live(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_model_bigger_than_the_budget_fails_at_once_and_is_never_loaded() {
    let backend = TestBackend::new(LOAD, Duration::ZERO);
    sized(&backend, "a", 40);
    sized(&backend, "huge", 101);
    let limited = budget_cache(&backend, 10, 100);
    drop(limited.acquire("a").await.unwrap());
    let start = Instant::now();
    let err = limited.acquire("huge").await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert!(matches!(err.error, BackendError::TooLarge(_)), "{err:?}");
    assert!(err.to_string().contains("101 bytes"), "{err}");
    assert!(err.to_string().contains("100 bytes"), "{err}");
    assert_eq!(err.retry_after, Duration::ZERO);
    assert_eq!(backend.loads("huge"), 0);
    // Nothing was evicted for it, and it is not advertised.
    assert_eq!(hints(&limited), ["a"]);
    // Without a budget, sizes do not matter.
    let unlimited = cache(&backend, 1);
    drop(unlimited.acquire("huge").await.unwrap());
}

#[tokio::test(start_paused = true)]
async fn pinned_models_hold_their_bytes_the_miss_waits() {
    let backend = TestBackend::new(LOAD, Duration::ZERO);
    sized(&backend, "a", 60);
    sized(&backend, "b", 60);
    let cache = budget_cache(&backend, 10, 100);
    let a = cache.acquire("a").await.unwrap();
    let b = tokio::spawn({
        let cache = cache.clone();
        async move { cache.acquire("b").await }
    });
    settle().await;
    advance(LOAD * 10).await;
    settle().await;
    assert!(!b.is_finished());
    assert_eq!(backend.loads("b"), 0);
    assert_eq!(cache.queued(), [("b".to_string(), 1)]);
    drop(a); // a unpinned: evicted to make room, and b loads
    settle().await;
    assert_eq!(cache.snapshot().loading, ["b"]);
    let b = b.await.unwrap().unwrap();
    assert_eq!(b.queued(), LOAD * 10);
    assert_eq!(hints(&cache), ["b"]);
    assert_eq!(backend.max_live(), 1);
}

#[tokio::test(start_paused = true)]
async fn loading_models_count_at_their_size_hint() {
    let backend = TestBackend::new(LOAD, Duration::ZERO);
    sized(&backend, "a", 60);
    sized(&backend, "b", 60);
    sized(&backend, "small", 30);
    let cache = budget_cache(&backend, 10, 100);
    let a = tokio::spawn({
        let cache = cache.clone();
        async move { cache.acquire("a").await }
    });
    settle().await;
    a.abort(); // nobody waits for a any more; its load still holds 60 bytes
    let b = tokio::spawn({
        let cache = cache.clone();
        async move { cache.acquire("b").await }
    });
    settle().await;
    let snap = cache.snapshot();
    // b is queued (listed first), a still loading.
    let loading = vec!["b".to_string(), "a".to_string()];
    assert_eq!((snap.loading, snap.reserved_bytes, snap.resident_bytes), (loading, 60, None));
    assert_eq!(cache.queued(), [("b".to_string(), 1)]);
    let b = b.await.unwrap().unwrap();
    assert_eq!(b.queued(), LOAD);
    assert_eq!(backend.completed("a"), 1);
    assert_eq!(hints(&cache), ["b"]);
    // A model that fits beside the pinned b loads at once.
    let small = cache.acquire("small").await.unwrap();
    assert_eq!(small.queued(), Duration::ZERO);
    assert_eq!(cache.snapshot().resident_bytes, Some(90));
}

#[tokio::test(start_paused = true)]
async fn a_model_bigger_than_its_hint_brings_the_cache_back_under_budget() {
    let backend = TestBackend::new(LOAD, Duration::ZERO);
    sized(&backend, "a", 50);
    backend.set_size("liar", Some(10), Some(80));
    backend.set_size("unknown", None, Some(70));
    let cache = budget_cache(&backend, 10, 100);
    drop(cache.acquire("a").await.unwrap());
    // 50 + 10 fits; once loaded, 50 + 80 does not: a goes.
    drop(cache.acquire("liar").await.unwrap());
    assert_eq!(hints(&cache), ["liar"]);
    assert_eq!(cache.snapshot().resident_bytes, Some(80));
    // A model of unknown size counts as 0 until loaded, then at its real size.
    drop(cache.acquire("unknown").await.unwrap());
    assert_eq!(hints(&cache), ["unknown"]);
    assert_eq!(backend.live(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_count_still_limits_a_cache_with_a_budget() {
    let backend = TestBackend::new(LOAD, Duration::ZERO);
    for model in ["a", "b", "c"] {
        sized(&backend, model, 1);
    }
    let cache = budget_cache(&backend, 2, 100);
    for model in ["a", "b", "c"] {
        drop(cache.acquire(model).await.unwrap());
    }
    assert_eq!(hints(&cache), ["c", "b"]);
}

/// Issue 9, item 5: a model the backend does not know fails at once and evicts nothing,
/// so requests for made-up names cannot flush the cache.
#[tokio::test(start_paused = true)]
async fn unknown_models_fail_at_once_and_evict_nothing() {
    let backend = TestBackend::new(LOAD, Duration::ZERO);
    sized(&backend, "a", 50);
    sized(&backend, "b", 50);
    let cache = budget_cache(&backend, 2, 100);
    drop(cache.acquire("a").await.unwrap());
    drop(cache.acquire("b").await.unwrap());
    for i in 0..50 {
        let start = Instant::now();
        let err = cache.acquire(&format!("nope-{i}")).await.unwrap_err();
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert!(matches!(err.error, BackendError::NotFound(_)), "{err:?}");
        assert_eq!(err.retry_after, Duration::ZERO);
        cache.validate().unwrap();
    }
    assert_eq!(hints(&cache), ["b", "a"]);
    assert_eq!(backend.live(), 2);
    assert_eq!(backend.loads("a") + backend.loads("b"), 2);
    assert!(cache.queued().is_empty());
    // And they are hits still.
    assert_eq!(cache.acquire("a").await.unwrap().outcome(), CacheOutcome::Hit);
}

/// A queued model whose waiters all went away leaves the queue, and the next one in line
/// is admitted at once when it fits where the first did not.
#[tokio::test(start_paused = true)]
async fn an_abandoned_queue_head_lets_the_next_in_line_in() {
    let backend = TestBackend::new(LOAD, Duration::ZERO);
    sized(&backend, "a", 60);
    sized(&backend, "big", 60);
    sized(&backend, "small", 30);
    let cache = budget_cache(&backend, 10, 100);
    let a = cache.acquire("a").await.unwrap();
    let big = tokio::spawn({
        let cache = cache.clone();
        async move { cache.acquire("big").await }
    });
    settle().await;
    let small = tokio::spawn({
        let cache = cache.clone();
        async move { cache.acquire("small").await }
    });
    settle().await;
    assert_eq!(cache.queued().len(), 2);
    big.abort();
    settle().await;
    cache.validate().unwrap();
    assert_eq!(cache.snapshot().loading, ["small"]);
    assert_eq!(small.await.unwrap().unwrap().queued(), Duration::ZERO);
    drop(a);
}

/// Issue 9, item 14: models whose memory is released slowly (device memory) are dropped
/// off the async threads, and their bytes count as held until released: no load starts
/// while the device has no room for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_load_starts_before_the_evicted_memory_is_released() {
    const BUDGET: u64 = 100;
    let backend =
        TestBackend::on_device(Duration::from_millis(2), Duration::ZERO, BUDGET, Duration::from_millis(20));
    for i in 0..6u64 {
        sized(&backend, &format!("m{i}"), 30 + i * 10);
    }
    let cache = budget_cache(&backend, 6, BUDGET);
    // One after the other: each miss needs the memory of the model evicted before it.
    for i in [0, 5, 1, 4, 2, 3, 5, 0] {
        let started = std::time::Instant::now();
        drop(cache.acquire(&format!("m{i}")).await.unwrap());
        let took = started.elapsed();
        cache.validate().unwrap();
        let device = backend.device().unwrap();
        assert!(device.live() <= BUDGET, "{} bytes live", device.live());
        println!("m{i}: {took:?}, {} bytes live", device.live());
    }
    let tasks: Vec<_> = (0..120)
        .map(|i| {
            let cache = cache.clone();
            tokio::spawn(async move {
                let lease = cache.acquire(&format!("m{}", (i * 7) % 6)).await.unwrap();
                tokio::task::yield_now().await;
                drop(lease);
                cache.validate().unwrap();
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let device = backend.device().unwrap();
    println!("device: at most {} of {BUDGET} bytes live", device.max_live());
    assert_eq!(device.overcommits(), 0, "loads started without room on the device");
    assert!(device.max_live() <= BUDGET);
    let snap = cache.snapshot();
    assert_eq!(snap.releasing_bytes, 0);
    cache.validate().unwrap();
}

/// Issue 9, item 14: a slow release runs off the async threads (a one-thread runtime keeps
/// serving hits meanwhile), and the load that needs its memory waits for it.
#[tokio::test(flavor = "current_thread")]
async fn a_slow_release_blocks_no_async_thread_and_the_load_waits_for_it() {
    const RELEASE: Duration = Duration::from_millis(300);
    let backend = TestBackend::on_device(Duration::from_millis(1), Duration::ZERO, 100, RELEASE);
    for model in ["a", "b", "c"] {
        sized(&backend, model, 50);
    }
    let cache = budget_cache(&backend, 10, 100);
    drop(cache.acquire("a").await.unwrap());
    drop(cache.acquire("b").await.unwrap());
    let started = std::time::Instant::now();
    let c = tokio::spawn({
        let cache = cache.clone();
        async move { cache.acquire("c").await }
    });
    tokio::task::yield_now().await; // c evicts a, whose release begins
    assert_eq!(cache.snapshot().releasing_bytes, 50);
    let hit = cache.acquire("b").await.unwrap();
    let hit_after = started.elapsed();
    println!("a hit during the release: after {hit_after:?}");
    assert_eq!(hit.outcome(), CacheOutcome::Hit);
    assert!(hit_after < RELEASE / 2, "the hit waited {hit_after:?} for the release");
    let c = c.await.unwrap().unwrap();
    println!("c waited {:?} for a's memory", c.queued());
    assert!(c.queued() >= RELEASE - Duration::from_millis(50), "c was admitted after {:?}", c.queued());
    assert_eq!(backend.device().unwrap().overcommits(), 0);
    assert_eq!(hints(&cache), ["c", "b"]);
    cache.validate().unwrap();
}

/// Many requests over more models than slots, from several threads: the cache never
/// holds more than its capacity, and every request gets its model.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn never_exceeds_capacity_under_contention() {
    let backend = TestBackend::new(Duration::from_millis(1), Duration::ZERO);
    let cache = cache(&backend, 3);
    let watcher = tokio::spawn({
        let cache = cache.clone();
        async move {
            for _ in 0..200 {
                // At most 3 models in the slots, and at most 3 queued ones listed besides.
                let snap = cache.snapshot();
                assert!(snap.hints.len() - snap.loading.len() <= 3 && snap.hints.len() <= 6);
                cache.validate().unwrap();
                tokio::task::yield_now().await;
            }
        }
    });
    contend(&cache).await;
    watcher.await.unwrap();
    assert!(backend.max_live() <= 3, "max live {}", backend.max_live());
    assert!(cache.queued().is_empty());
    assert_eq!(hints(&cache).len(), 3);
}

/// The same with a memory budget and models of different sizes: the models held never
/// take more than the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn never_exceeds_the_budget_under_contention() {
    let backend = TestBackend::new(Duration::from_millis(1), Duration::ZERO);
    for i in 0..8u64 {
        sized(&backend, &format!("m{i}"), 10 + i * 10);
    }
    let cache = budget_cache(&backend, 8, 150);
    let watcher = tokio::spawn({
        let cache = cache.clone();
        async move {
            for _ in 0..200 {
                let snap = cache.snapshot();
                assert!(snap.reserved_bytes <= 150, "{snap:?}");
                assert!(snap.resident_bytes.unwrap_or(0) <= 150, "{snap:?}");
                tokio::task::yield_now().await;
            }
        }
    });
    contend(&cache).await;
    watcher.await.unwrap();
    assert!(cache.queued().is_empty());
    assert!(cache.snapshot().reserved_bytes <= 150);
}
