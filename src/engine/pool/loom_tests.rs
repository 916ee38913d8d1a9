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
            sleep.end_spin(index);
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

/// The run word (`blocking.rs`): a worker ends its run while the monitor
/// lends its units and then takes them back. Whatever the interleaving,
/// the units go back to the core exactly once and no loan stays counted.
#[test]
fn a_loan_racing_the_end_of_a_run_settles_exactly_once() {
    use super::blocking::{RunCell, RUNNING};
    use super::capacity::CoreBudget;
    loom::model(|| {
        let core = Arc::new(CoreBudget::new(2));
        let run = Arc::new(RunCell::new());
        // the worker took 2 units and began its run
        assert!(core.try_acquire(2, 2));
        run.begin(2);
        let monitor = {
            let (core, run) = (core.clone(), run.clone());
            loom::thread::spawn(move || {
                // Shared::lend, then Shared::retake, on the run seen
                let seen = run.load();
                if seen.state != RUNNING {
                    return; // the run ended first: the monitor leaves it
                }
                core.lend();
                if !run.try_lend(seen) {
                    core.end_loan();
                    return;
                }
                core.release(seen.units);
                let lent = run.load();
                core.force_acquire(lent.units);
                if run.try_retake(lent) {
                    core.end_loan();
                } else {
                    core.release(lent.units);
                }
            })
        };
        // the worker's end of the run (worker.rs: execute)
        if run.end() {
            core.release(2);
        } else {
            core.end_loan();
        }
        monitor.join().unwrap();
        assert_eq!(core.used(), 0, "units held after the run ended");
        assert_eq!(core.lent(), 0, "a loan still counted");
    });
}
