use super::*;

/// The two tests below claim shards: one at a time.
static CLAIMS: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn owned_and_shared_shards_lose_no_count() {
    let _one_at_a_time = CLAIMS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    // More threads at once than owned shards: the latecomers share one shard with atomic adds.
    let m = std::sync::Arc::new(OpMetrics::default());
    let gate = std::sync::Arc::new(std::sync::Barrier::new(OWNED + 8));
    let threads: Vec<_> = (0..OWNED + 8)
        .map(|_| {
            let (m, gate) = (m.clone(), gate.clone());
            std::thread::spawn(move || {
                m.submitted();
                gate.wait(); // every thread holds its claim before any counts on
                for i in 0..10_000u64 {
                    m.submitted();
                    m.resolved(Outcome::Ok, Some(i));
                    m.ran(i % 2 == 0, 1_000);
                }
                writer()
            })
        })
        .collect();
    let shards: Vec<usize> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(shards.iter().filter(|&&s| s < OWNED).count() <= OWNED);
    assert!(shards.contains(&OWNED), "the latecomers wrote the shared shard");
    let snap = m.snapshot();
    let n = (OWNED as u64 + 8) * 10_000;
    assert_eq!(snap.submitted, n + OWNED as u64 + 8);
    assert_eq!(snap.outcomes[Outcome::Ok as usize], n);
    assert_eq!(snap.queue_wait.count(), n);
    assert_eq!(snap.execution.count(), n);
    assert_eq!(m.runs(), RunCounts { runs: n, failed: n / 2, total_ns: n * 1_000 });
}

#[test]
fn a_thread_that_exits_gives_its_shard_back() {
    let _one_at_a_time = CLAIMS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    // One after the other, each thread finds an owned shard free.
    for _ in 0..3 * OWNED {
        let owned = std::thread::spawn(|| writer() < OWNED).join().unwrap();
        assert!(owned);
    }
}

#[test]
fn an_engine_renders_a_bounded_number_of_operations() {
    let view = |i: usize, submitted: u64| OpView {
        pool: "1".into(),
        operation: format!("op{i:03}"),
        metrics: OpSnapshot { submitted, ..OpSnapshot::default() },
        paused: false,
        blocked: false,
        health: "excellent",
    };
    let few: Vec<OpView> = (0..3).map(|i| view(i, 1)).collect();
    assert_eq!(cap_operations(few).len(), 3);
    // 250 operations: the busiest 199 keep their names, the other 51 add up.
    let many: Vec<OpView> = (0..250).map(|i| view(i, i as u64 + 1)).collect();
    let total: u64 = many.iter().map(|o| o.metrics.submitted).sum();
    let capped = cap_operations(many);
    assert_eq!(capped.len(), MAX_OPERATION_LABELS);
    assert_eq!(capped.iter().map(|o| o.metrics.submitted).sum::<u64>(), total, "nothing is lost");
    let other = capped.iter().find(|o| o.operation == OTHER_OPERATIONS).expect("an _other operation");
    assert_eq!(other.metrics.submitted, (1..=51).sum::<u64>());
    assert!(capped.iter().any(|o| o.operation == "op249") && !capped.iter().any(|o| o.operation == "op000"));
}

#[test]
fn observations_land_in_their_buckets_and_add_up_across_shards() {
    let m = OpMetrics::default();
    m.submitted();
    m.submitted();
    m.resolved(Outcome::Ok, Some(50_000)); // 50 us wait
    m.ran(true, 2_000_000); // 2 ms run
    m.resolved(Outcome::Error, Some(100_000)); // on a bound: counted in it
    m.ran(false, 100_000);
    m.resolved(Outcome::Cancelled, None);
    m.resolved(Outcome::Ok, Some(4_000_000_000_000)); // past the last bounds
    m.ran(true, 1_000_000_000_000);
    m.rejected(Rejection::MaxPending);
    let s = m.snapshot();
    assert_eq!(s.submitted, 2);
    assert_eq!(s.outcomes, [2, 1, 1, 0, 0]);
    assert_eq!(s.rejected, [0, 1, 0]);
    assert_eq!(s.queue_wait.count(), 3);
    assert_eq!(s.queue_wait.counts[0], 2, "50 us and 100 us are in the 0.0001 s bucket");
    assert_eq!(s.queue_wait.counts[BUCKETS], 1, "an hour is past 30 minutes: +Inf only");
    assert_eq!(s.execution.counts[0], 1);
    assert_eq!(s.execution.counts[3], 1, "2 ms is in the 0.0025 s bucket");
    assert_eq!(s.queue_wait.sum_ns, 4_000_000_150_000);
    let runs = m.runs();
    assert_eq!((runs.runs, runs.failed, runs.total_ns), (3, 1, 1_000_002_100_000));
    assert_eq!(runs.since(RunCounts { runs: 1, failed: 1, total_ns: 100_000 }).failed, 0);
}

#[test]
fn bounds_in_nanoseconds_match_their_rendered_form() {
    for (ns, text) in [(&QUEUE_WAIT_NS, &QUEUE_WAIT_BOUNDS), (&EXECUTION_NS, &EXECUTION_BOUNDS)] {
        assert!(ns.windows(2).all(|w| w[0] < w[1]));
        for (n, t) in ns.iter().zip(text.iter()) {
            let seconds: f64 = t.parse().unwrap();
            assert_eq!(*n, (seconds * 1e9).round() as u64, "{t}");
        }
    }
}

#[test]
fn render_gives_each_family_once_with_cumulative_buckets() {
    let m = OpMetrics::default();
    m.submitted();
    m.resolved(Outcome::Ok, Some(1_000));
    m.ran(true, 3_000_000);
    let op = |name: &str| OpView {
        pool: "1".into(),
        operation: name.into(),
        metrics: m.snapshot(),
        paused: false,
        blocked: true,
        health: "unknown",
    };
    let pools = [PoolView { pool: "1".into(), queued: 3, workers: vec![("cpu".into(), 8), ("io".into(), 0)], ..PoolView::default() }];
    let text = render(&pools, &[op("a"), op("say \"hi\"\\\n")]);
    for fam in ["tokengate_tokens_submitted_total", "tokengate_execution_seconds", "tokengate_workers"] {
        assert_eq!(text.matches(&format!("# TYPE {fam} ")).count(), 1, "{fam}");
    }
    assert!(text.contains("tokengate_execution_seconds_bucket{pool=\"1\",operation=\"a\",le=\"0.0025\"} 0\n"));
    assert!(text.contains("tokengate_execution_seconds_bucket{pool=\"1\",operation=\"a\",le=\"0.005\"} 1\n"));
    assert!(text.contains("tokengate_execution_seconds_bucket{pool=\"1\",operation=\"a\",le=\"+Inf\"} 1\n"));
    assert!(text.contains("tokengate_execution_seconds_sum{pool=\"1\",operation=\"a\"} 0.003\n"));
    assert!(text.contains("operation=\"say \\\"hi\\\"\\\\\\n\""), "label values are escaped");
    assert!(text.contains("tokengate_operation_blocked{pool=\"1\",operation=\"a\"} 1\n"));
    assert!(text.contains("tokengate_tokens_queued{pool=\"1\"} 3\n"));
    assert!(text.contains("tokengate_workers{pool=\"1\",lane=\"cpu\"} 8\n"));
}
