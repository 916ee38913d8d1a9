//! Engine tests with plain closures as jobs: no interpreter involved.

use super::*;
use std::sync::atomic::AtomicUsize as StdAtomicUsize;
use std::sync::mpsc;

type Job = Box<dyn FnOnce(&WorkerInfo) + Send>;

impl super::Job for Job {}

/// A test job that is a closure, with or without a weight or a spent flag.
trait Closure {
    fn run(self, worker: &WorkerInfo);
}

impl Closure for Job {
    fn run(self, worker: &WorkerInfo) {
        self(worker);
    }
}

/// Runs every test job type: its closure, on the worker.
struct ClosureHost;

struct Hooks;

impl<J: super::Job + Closure> WorkerHooks<J> for Hooks {
    fn execute(&mut self, job: J, worker: &WorkerInfo) {
        job.run(worker);
    }
}

impl<J: super::Job + Closure> Host<J> for ClosureHost {
    fn run_worker(&self, worker: WorkerLoop<J>) {
        worker.run(&mut Hooks);
    }
}

fn pool(workers: usize) -> Pool<Job> {
    let mut config = PoolConfig::new(workers);
    config.pin_cores = false;
    Pool::start(&config, Arc::new(ClosureHost)).unwrap()
}

#[test]
fn runs_every_job_exactly_once() {
    let p = pool(4);
    let n = 20_000;
    let hits: Arc<Vec<StdAtomicUsize>> = Arc::new((0..n).map(|_| StdAtomicUsize::new(0)).collect());
    let (tx, rx) = mpsc::channel();
    for i in 0..n {
        let hits = hits.clone();
        let tx = tx.clone();
        p.submit(Box::new(move |_| {
            hits[i].fetch_add(1, Ordering::SeqCst);
            tx.send(()).unwrap();
        }))
        .map_err(|(e, _)| e)
        .unwrap();
    }
    for _ in 0..n {
        rx.recv_timeout(Duration::from_secs(20)).unwrap();
    }
    assert!(hits.iter().all(|h| h.load(Ordering::SeqCst) == 1));
    p.shutdown();
    assert!(p.join(Some(Duration::from_secs(5))));
}

#[test]
fn many_producers_no_lost_wakeups() {
    let p = Arc::new(pool(3));
    let done = Arc::new(StdAtomicUsize::new(0));
    let producers: Vec<_> = (0..4)
        .map(|_| {
            let p = p.clone();
            let done = done.clone();
            std::thread::spawn(move || {
                for k in 0..5_000 {
                    let done = done.clone();
                    p.submit(Box::new(move |_| {
                        done.fetch_add(1, Ordering::SeqCst);
                    }))
                    .map_err(|(e, _)| e)
                    .unwrap();
                    if k % 512 == 0 {
                        // let the workers go back to sleep now and then
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
            })
        })
        .collect();
    for t in producers {
        t.join().unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while done.load(Ordering::SeqCst) < 20_000 {
        assert!(Instant::now() < deadline, "lost work: {}", done.load(Ordering::SeqCst));
        std::thread::sleep(Duration::from_millis(1));
    }
    p.shutdown();
    assert!(p.join(Some(Duration::from_secs(5))));
}

#[test]
fn idle_pool_sleeps_and_wakes_for_a_single_job() {
    let p = pool(4);
    std::thread::sleep(Duration::from_millis(100));
    let stats = p.stats();
    assert_eq!(stats.sleeping, 4, "{stats:?}");
    for _ in 0..50 {
        let (tx, rx) = mpsc::channel();
        p.submit(Box::new(move |_| tx.send(()).unwrap())).map_err(|(e, _)| e).unwrap();
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    p.shutdown();
    assert!(p.join(Some(Duration::from_secs(5))));
}

#[test]
fn burst_wakes_at_most_one_sleeper_per_submission_burst() {
    let p = pool(4);
    std::thread::sleep(Duration::from_millis(100));
    let before = p.stats().wakes;
    let (tx, rx) = mpsc::channel();
    // Jobs are pushed in one burst from this thread; the wake-up chain may
    // wake the other workers, but the burst itself wakes one.
    p.submit_batch((0..1000).map(|_| {
        let tx = tx.clone();
        Box::new(move |_: &WorkerInfo| tx.send(()).unwrap()) as Job
    }))
    .unwrap();
    for _ in 0..1000 {
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
    }
    let wakes = p.stats().wakes - before;
    assert!(wakes <= 4, "a burst of 1000 jobs on 4 workers caused {wakes} wake-ups");
    p.shutdown();
    assert!(p.join(Some(Duration::from_secs(5))));
}

#[test]
fn panicking_job_does_not_kill_the_worker() {
    let p = pool(1);
    p.submit(Box::new(|_| panic!("boom"))).map_err(|(e, _)| e).unwrap();
    let (tx, rx) = mpsc::channel();
    p.submit(Box::new(move |w| tx.send(w.index).unwrap())).map_err(|(e, _)| e).unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 0);
    assert_eq!(p.stats().panics, 1);
    p.shutdown();
    assert!(p.join(Some(Duration::from_secs(5))));
}

#[test]
fn shutdown_runs_queued_work_then_refuses_new() {
    let p = pool(2);
    let done = Arc::new(StdAtomicUsize::new(0));
    for _ in 0..1000 {
        let done = done.clone();
        p.submit(Box::new(move |_| {
            done.fetch_add(1, Ordering::SeqCst);
        }))
        .map_err(|(e, _)| e)
        .unwrap();
    }
    p.shutdown();
    assert!(p.join(Some(Duration::from_secs(10))));
    assert_eq!(done.load(Ordering::SeqCst) + p.take_unstarted().len(), 1000);
    assert!(matches!(p.submit(Box::new(|_| ())), Err((Error::ShutDown, _))));
}

#[test]
fn take_unstarted_returns_jobs_that_did_not_start() {
    let p = pool(1);
    let (gate_tx, gate_rx) = mpsc::channel::<()>();
    p.submit(Box::new(move |_| {
        gate_rx.recv().unwrap();
    }))
    .map_err(|(e, _)| e)
    .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    for _ in 0..10 {
        p.submit(Box::new(|_| ())).map_err(|(e, _)| e).unwrap();
    }
    assert_eq!(p.take_unstarted().len(), 10);
    gate_tx.send(()).unwrap();
    p.shutdown();
    assert!(p.join(Some(Duration::from_secs(5))));
}

#[test]
fn join_times_out_on_a_stuck_job() {
    let p = pool(1);
    let (gate_tx, gate_rx) = mpsc::channel::<()>();
    p.submit(Box::new(move |_| {
        gate_rx.recv().unwrap();
    }))
    .map_err(|(e, _)| e)
    .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    p.shutdown();
    assert!(!p.join(Some(Duration::from_millis(50))));
    gate_tx.send(()).unwrap();
    assert!(p.join(Some(Duration::from_secs(5))));
}

#[test]
fn workers_have_large_stacks_and_names() {
    let p = pool(1);
    let (tx, rx) = mpsc::channel();
    p.submit(Box::new(move |_| {
        // 6 MiB on the stack would overflow a 2 MiB default thread stack.
        let big = [1u8; 6 << 20];
        let name = std::thread::current().name().map(str::to_owned);
        tx.send((std::hint::black_box(&big).iter().map(|&b| b as usize).sum::<usize>(), name)).unwrap();
    }))
    .map_err(|(e, _)| e)
    .unwrap();
    let (sum, name) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(sum, 6 << 20);
    assert_eq!(name.as_deref(), Some("tokengate-worker_0")); // as ThreadPoolExecutor names its threads
    p.shutdown();
    p.join(None);
}

#[test]
fn pinning_reports_real_cores() {
    let mut config = PoolConfig::new(3);
    config.pin_cores = true;
    let p: Pool<Job> = Pool::start(&config, Arc::new(ClosureHost)).unwrap();
    let (tx, rx) = mpsc::channel();
    for _ in 0..3 {
        let tx = tx.clone();
        p.submit(Box::new(move |w| tx.send(w.core).unwrap())).map_err(|(e, _)| e).unwrap();
    }
    let topo = Topology::detect();
    for _ in 0..3 {
        if let Some(core) = rx.recv_timeout(Duration::from_secs(5)).unwrap() {
            assert!(topo.core_ids.contains(&core));
        }
    }
    p.shutdown();
    p.join(None);
}

#[test]
fn zero_workers_is_rejected() {
    let Err(err) = Pool::<Job>::start(&PoolConfig::new(0), Arc::new(ClosureHost)) else { panic!("accepted 0 workers") };
    assert_eq!(err.to_string(), "invalid configuration: workers must be greater than 0");
}

#[test]
fn current_worker_is_set_only_on_workers() {
    assert_eq!(current_worker(), None);
    let p = pool(1);
    let (tx, rx) = mpsc::channel();
    p.submit(Box::new(move |_| tx.send(current_worker()).unwrap())).map_err(|(e, _)| e).unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), Some((p.id(), 0)));
    p.shutdown();
    p.join(None);
}

#[test]
fn priorities_run_highest_first_fifo_within_a_level() {
    let p = pool(1);
    let (gate_tx, gate_rx) = mpsc::channel::<()>();
    p.submit(Box::new(move |_| gate_rx.recv().unwrap())).map_err(|(e, _)| e).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let plan: [(i64, u32); 7] = [(0, 0), (1, 10), (5, 50), (1, 11), (-3, 99), (5, 51), (0, 1)];
    for (prio, tag) in plan {
        let order = order.clone();
        let job: Job = Box::new(move |_| order.lock().unwrap().push(tag));
        if prio == 0 {
            p.submit(job).map_err(|(e, _)| e).unwrap();
        } else {
            p.submit_prioritized(job, prio).map_err(|(e, _)| e).unwrap();
        }
    }
    gate_tx.send(()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while order.lock().unwrap().len() < plan.len() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(*order.lock().unwrap(), vec![50, 51, 10, 11, 0, 1, 99]);
    p.shutdown();
    p.join(None);
}

#[test]
fn aging_lets_a_low_priority_job_overtake() {
    let mut config = PoolConfig::new(1);
    config.pin_cores = false;
    config.aging = Duration::from_millis(10);
    let p: Pool<Job> = Pool::start(&config, Arc::new(ClosureHost)).unwrap();
    let (gate_tx, gate_rx) = mpsc::channel::<()>();
    p.submit(Box::new(move |_| gate_rx.recv().unwrap())).map_err(|(e, _)| e).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let o = order.clone();
    p.submit_prioritized(Box::new(move |_| o.lock().unwrap().push("old-low")), -1).map_err(|(e, _)| e).unwrap();
    std::thread::sleep(Duration::from_millis(60)); // waited 6 aging intervals: now outranks priority 0..4
    let o = order.clone();
    p.submit_prioritized(Box::new(move |_| o.lock().unwrap().push("new-high")), 2).map_err(|(e, _)| e).unwrap();
    let o = order.clone();
    p.submit(Box::new(move |_| o.lock().unwrap().push("new-default"))).map_err(|(e, _)| e).unwrap();
    gate_tx.send(()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while order.lock().unwrap().len() < 3 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(*order.lock().unwrap(), vec!["old-low", "new-high", "new-default"]);
    p.shutdown();
    p.join(None);
}

mod capacity;

#[test]
fn jobs_start_in_submission_order() {
    // A waiter and then its setter, 20 times, on 2 workers: taken oldest first, a setter
    // is always taken before the next waiter, so a waiter never waits long. Workers
    // that took batches left both workers in waiters whose setters sat in a batch.
    let p = pool(2);
    let flags: Arc<Vec<(Mutex<bool>, Condvar)>> = Arc::new((0..20).map(|_| (Mutex::new(false), Condvar::new())).collect());
    let (tx, rx) = mpsc::channel();
    for i in 0..20 {
        let (wait_flags, set_flags, tx) = (flags.clone(), flags.clone(), tx.clone());
        p.submit(Box::new(move |_| {
            let (flag, cv) = &wait_flags[i];
            let mut set = flag.lock();
            let deadline = Instant::now() + Duration::from_secs(10);
            while !*set && Instant::now() < deadline {
                cv.wait_until(&mut set, deadline);
            }
            tx.send((i, *set)).unwrap();
        }))
        .map_err(|(e, _)| e)
        .unwrap();
        p.submit(Box::new(move |_| {
            let (flag, cv) = &set_flags[i];
            *flag.lock() = true;
            cv.notify_all();
        }))
        .map_err(|(e, _)| e)
        .unwrap();
    }
    let mut stuck: Vec<usize> =
        (0..20).map(|_| rx.recv_timeout(Duration::from_secs(60)).unwrap()).filter(|(_, set)| !set).map(|(i, _)| i).collect();
    stuck.sort_unstable();
    assert!(stuck.is_empty(), "waiters {stuck:?} gave up: a later job was taken before their setter");
    p.shutdown();
    assert!(p.join(Some(Duration::from_secs(5))));
}

#[test]
fn a_deferred_job_runs_on_an_idle_pool() {
    // What a worker that helps while it waits hands back (`defer`) wakes a sleeping worker.
    let p = pool(2);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(p.stats().sleeping, 2);
    let (tx, rx) = mpsc::channel();
    p.defer(Box::new(move |_: &WorkerInfo| tx.send(()).unwrap()));
    rx.recv_timeout(Duration::from_secs(10)).expect("the deferred job never ran");
    p.shutdown();
    assert!(p.join(Some(Duration::from_secs(5))));
}
