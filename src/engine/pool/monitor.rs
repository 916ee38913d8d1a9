//! The blocking monitor's thread: it samples the kernel state of busy
//! workers' threads and lends or retakes their core units (the protocol is
//! in `blocking.rs`). Each tick it also runs a memory release that came due
//! (`memory::release_if_due`).

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::blocking::{
    Run, BUSY_NS, DEEP_IDLE, GIL_RECHECK, IDLE_POLL, LENT, LENT_EVERY, MAX_TICK, OPEN_WATCHES, PARK_LIMIT, READS_PER_TICK, RUNNING, TICK,
};
use super::contention::GilWatch;
use super::job::{Job, NO_CLASS};
use super::shared::Shared;
use crate::engine::sync::{Arc, Ordering};

#[cfg(target_arch = "x86_64")]
const SYS_FUTEX: u64 = 202;
#[cfg(target_arch = "aarch64")]
const SYS_FUTEX: u64 = 98;
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const SYS_FUTEX: u64 = u64::MAX;

/// What the kernel says a thread does.
#[derive(Debug, PartialEq, Eq)]
enum Kernel {
    /// On a CPU, or runnable.
    Running,
    /// Waiting for the GIL: waiting for the CPU, not blocked.
    GilWait,
    /// In any other wait.
    Blocked,
}

/// The monitor's view of one worker.
#[derive(Default)]
struct Watch {
    tid: u64,
    /// Kept open for the first `OPEN_WATCHES` workers.
    schedstat: Option<File>,
    syscall: Option<File>,
    /// The run seen at the previous look, and its CPU time then (if read).
    seen: Option<(Run, Option<u64>)>,
    /// Found waiting for the GIL: not looked at again before this tick.
    gil_until: usize,
}

/// Reads `/proc/self/task/<tid>/<name>` into `buf`, through `kept` if open.
fn read_proc(kept: Option<&File>, tid: u64, name: &str, buf: &mut [u8]) -> Option<usize> {
    match kept {
        Some(f) => f.read_at(buf, 0).ok(),
        None => File::open(format!("/proc/self/task/{tid}/{name}")).ok()?.read_at(buf, 0).ok(),
    }
}

impl Watch {
    fn keep_open(&mut self, tid: u64) {
        self.tid = tid;
        self.schedstat = File::open(format!("/proc/self/task/{tid}/schedstat")).ok();
        self.syscall = File::open(format!("/proc/self/task/{tid}/syscall")).ok();
    }

    /// Nanoseconds the thread has spent on a CPU.
    fn cpu_ns(&self) -> Option<u64> {
        let mut buf = [0u8; 96];
        let n = read_proc(self.schedstat.as_ref(), self.tid, "schedstat", &mut buf)?;
        std::str::from_utf8(&buf[..n]).ok()?.split_whitespace().next()?.parse().ok()
    }

    fn kernel(&self, gil: Option<(usize, usize)>) -> Option<Kernel> {
        let mut buf = [0u8; 256];
        let n = read_proc(self.syscall.as_ref(), self.tid, "syscall", &mut buf)?;
        let text = std::str::from_utf8(&buf[..n]).ok()?;
        let mut fields = text.split_whitespace();
        let nr = fields.next()?;
        if nr == "running" {
            return Some(Kernel::Running);
        }
        let nr: u64 = nr.parse().ok()?;
        if nr == SYS_FUTEX {
            let addr = fields.next().and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())?;
            if gil.is_some_and(|(lo, hi)| (lo as u64..hi as u64).contains(&addr)) {
                return Some(Kernel::GilWait);
            }
        }
        Some(Kernel::Blocked)
    }
}

/// Starts the monitor thread of a pool (named `{prefix}-monitor`), once
/// the workers have started. The files it keeps open are opened here,
/// before it returns: the pool's file count is the same from its start.
pub(crate) fn start_monitor<J: Job>(shared: Arc<Shared<J>>) -> std::io::Result<std::thread::JoinHandle<()>> {
    let mut watches: Vec<Watch> = (0..shared.runs.len()).map(|_| Watch::default()).collect();
    for (index, watch) in watches.iter_mut().enumerate().take(shared.config.workers) {
        let tid = shared.runs[index].tid.load(Ordering::Acquire);
        if index < OPEN_WATCHES {
            watch.keep_open(tid);
        } else {
            watch.tid = tid;
        }
    }
    let name = format!("{}-monitor", shared.config.thread_name);
    std::thread::Builder::new().name(name).stack_size(256 << 10).spawn(move || run(&shared, watches))
}

fn run<J: Job>(shared: &Arc<Shared<J>>, mut watches: Vec<Watch>) {
    let n = shared.runs.len();
    let kept = OPEN_WATCHES.min(shared.config.workers);
    let gil = shared.config.gil_window;
    let mut idle_since: Option<std::time::Instant> = None;
    let mut tick: usize = 0;
    let mut cursor = 0;
    let mut interval = TICK;
    let mut gil_watch = GilWatch::default();
    loop {
        if shared.terminate.load(Ordering::SeqCst) && *shared.alive.lock() == 0 {
            shared.gil_bound.store(false, Ordering::Relaxed);
            return;
        }
        tick = tick.wrapping_add(1);
        crate::engine::memory::release_if_due();
        let mut any = false;
        // Something to follow closely: a loan made or ended.
        let mut eventful = false;
        let mut reads = 0;
        let mut resume_at = None;
        for k in 0..n {
            let index = (cursor + k) % n;
            let watch = &mut watches[index];
            let now = shared.runs[index].load();
            if now.state != RUNNING && now.state != LENT {
                watch.seen = None;
                continue;
            }
            if index >= kept {
                // Files opened per read; a spare's index changes threads.
                watch.tid = shared.runs[index].tid.load(Ordering::Acquire);
            }
            any = true;
            if watch.tid == 0 {
                continue;
            }
            if watch.seen.is_none_or(|(r, _)| r.run != now.run) {
                // A new run: decide nothing before it has lasted a tick.
                watch.seen = Some((now, None));
                watch.gil_until = 0;
                continue;
            }
            let due = match now.state {
                LENT => (tick + index) % LENT_EVERY == 0,
                _ => watch.gil_until <= tick,
            };
            if !due {
                continue;
            }
            if reads >= READS_PER_TICK {
                resume_at.get_or_insert(index);
                continue;
            }
            reads += 1;
            let cpu = watch.cpu_ns();
            let before = watch.seen.and_then(|(_, c)| c);
            watch.seen = Some((now, cpu));
            let (Some(cpu), Some(before)) = (cpu, before) else {
                continue; // the first reading of this run is its baseline
            };
            let busy = cpu.saturating_sub(before) > BUSY_NS;
            if now.state == LENT {
                if busy && shared.retake(index, now) {
                    eventful = true;
                }
                continue;
            }
            if busy {
                continue;
            }
            reads += 1;
            match watch.kernel(gil) {
                Some(Kernel::Blocked) => {
                    // Read before the lend: a class written for a later run
                    // comes after this run's end, so the lend then fails.
                    let class = shared.runs[index].class();
                    if Shared::lend(shared, index, now) {
                        eventful = true;
                        if let (Some(hook), true) = (&shared.config.on_lend, class != NO_CLASS) {
                            (hook.0)(class);
                        }
                        Shared::ensure_taker(shared);
                    }
                }
                // Waiting for the GIL stays so for a while: look again in a few ticks.
                Some(Kernel::GilWait) => watch.gil_until = tick + GIL_RECHECK,
                _ => {}
            }
        }
        if gil.is_some() && gil_watch.sample_due() {
            // Any job, however young: a thread waiting for the GIL mid-job is a contender.
            let running: Vec<usize> = (0..n).filter(|&i| shared.runs[i].load().state == RUNNING).collect();
            let (mut contended, mut holder) = (false, None);
            if running.len() >= 2 {
                for &i in running.iter().filter(|&&i| watches[i].tid != 0).take(READS_PER_TICK) {
                    match watches[i].kernel(gil) {
                        Some(Kernel::GilWait) => contended = true,
                        // The runner: a worker on a CPU (not one blocked in I/O, nor one not read).
                        Some(Kernel::Running) => {
                            holder.get_or_insert(i);
                        }
                        _ => {}
                    }
                    if contended && holder.is_some() {
                        break;
                    }
                }
            }
            if gil_watch.after_sample(shared, contended, holder.or_else(|| running.first().copied())) {
                eventful = true; // held-back workers were woken: see a new contender soon
            }
        }
        // Round robin: the next tick starts where the reads ran out.
        cursor = resume_at.unwrap_or((cursor + 1) % n.max(1));
        if any {
            if idle_since.take().is_some() {
                eventful = true; // work again after an idle spell: look closely
            }
        } else {
            let fresh = idle_since.is_none();
            let since = *idle_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() >= DEEP_IDLE {
                park(shared);
                // Woken with nothing running (a timed-out park): park again at once.
                idle_since = Some(std::time::Instant::now() - DEEP_IDLE);
                interval = TICK;
                continue;
            }
            // Idle for a short while: look again after one tick, then twice as
            // long each time up to IDLE_POLL. A burst of short jobs never has to
            // wake the monitor from the hot path, and a burst of blocking jobs
            // right after an idle spell (or a pool's start) is seen within a few
            // ticks, not only at the next IDLE_POLL.
            interval = if fresh { TICK } else { (interval * 2).min(IDLE_POLL) };
            std::thread::sleep(interval);
            continue;
        }
        // A steady state (only busy or long-blocked jobs) is looked at less often.
        interval = if eventful { TICK } else { (interval * 2).min(MAX_TICK) };
        std::thread::sleep(interval);
    }
}

/// Parks until a worker begins a job (or the pool terminates). The flag
/// is stored before the run words are read, and a worker stores its run
/// word before it reads the flag (both SeqCst): one of them sees the other.
fn park<J: Job>(shared: &Shared<J>) {
    *shared.monitor_thread.lock() = Some(std::thread::current());
    shared.monitor_parked.store(true, Ordering::SeqCst);
    let running = shared.runs.iter().any(|r| r.load().state == RUNNING);
    if !running && !shared.terminate.load(Ordering::SeqCst) {
        // A bounded park: a lost wake-up costs at most this delay.
        std::thread::park_timeout(PARK_LIMIT);
    }
    shared.monitor_parked.store(false, Ordering::SeqCst);
}
