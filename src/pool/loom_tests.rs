//! loom models of the sleep/wake protocol (`sleep.rs`), run with
//! `scripts/loom.sh` (`RUSTFLAGS="--cfg loom"`, `LOOM_MAX_PREEMPTIONS=2`).
//! A lost wake-up shows up as a deadlock, which loom reports.

use super::sleep::Sleep;
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use loom::sync::Arc;

/// An idle worker's loop reduced to its handshake: stop when work is visible,
/// else park (re-checking after registering). A woken worker is counted as a
/// spinner; it gives that role back before looking again.
fn idle_worker(sleep: &Sleep, index: usize, work: &AtomicUsize, stop: &AtomicBool) {
    loop {
        if work.load(SeqCst) > 0 || stop.load(SeqCst) {
            return;
        }
        if sleep.sleep(index, false, || work.load(SeqCst) > 0 || stop.load(SeqCst)) {
            sleep.end_spin();
        }
    }
}

#[test]
fn a_submission_racing_a_sleeper_is_never_lost() {
    loom::model(|| {
        let sleep = Arc::new(Sleep::new(1, 1));
        let work = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let t = {
            let (sleep, work, stop) = (sleep.clone(), work.clone(), stop.clone());
            loom::thread::spawn(move || idle_worker(&sleep, 0, &work, &stop))
        };
        work.fetch_add(1, SeqCst);
        sleep.notify_work(|_| true);
        t.join().unwrap();
    });
}

#[test]
fn shutdown_wakes_every_sleeper() {
    loom::model(|| {
        let sleep = Arc::new(Sleep::new(2, 1));
        let work = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..2)
            .map(|i| {
                let (sleep, work, stop) = (sleep.clone(), work.clone(), stop.clone());
                loom::thread::spawn(move || idle_worker(&sleep, i, &work, &stop))
            })
            .collect();
        stop.store(true, SeqCst);
        sleep.wake_all();
        for t in threads {
            t.join().unwrap();
        }
    });
}

#[test]
fn a_job_pinned_to_a_worker_wakes_that_worker() {
    loom::model(|| {
        let sleep = Arc::new(Sleep::new(2, 1));
        let inbox = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let target = {
            let (sleep, inbox, stop) = (sleep.clone(), inbox.clone(), stop.clone());
            loom::thread::spawn(move || idle_worker(&sleep, 1, &inbox, &stop))
        };
        inbox.fetch_add(1, SeqCst);
        sleep.wake_worker(1);
        target.join().unwrap();
    });
}
