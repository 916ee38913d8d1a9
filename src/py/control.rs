//! The control plane of a running engine: pause and resume (admission, or
//! one operation), drain and kill. One implementation, for the `Engine`
//! class's methods and for the dashboard's admin actions.
//!
//! A pause sets its flag under the lock of the queue it parks jobs in (the
//! engine's, or the operation's), so a job is never parked after a resume
//! has emptied that queue (see `crate::engine::ledger`). Workers park a
//! queued job whose pause began after it was queued (`run::execute`).

use pyo3::prelude::*;

use super::engine_shared::EngineShared;
use crate::engine::sync::Ordering;

impl EngineShared {
    /// No queued token starts (and new ones wait) until `resume_admission`.
    /// Returns how many unstarted tokens it holds back now.
    pub(crate) fn pause_admission(&self) -> usize {
        let lg = &self.ledger;
        {
            let _parked = lg.parked.lock();
            lg.admission_paused.store(true, Ordering::SeqCst);
        }
        lg.live_tokens(None).iter().filter(|t| t.cell.state().is_pending()).count()
    }

    /// Lets held tokens go; returns how many were released.
    pub(crate) fn resume_admission(&self, py: Python<'_>) -> usize {
        let lg = &self.ledger;
        let jobs = {
            let mut parked = lg.parked.lock();
            lg.admission_paused.store(false, Ordering::SeqCst);
            std::mem::take(&mut *parked)
        };
        self.release_parked(py, jobs)
    }

    /// Tokens of `op` wait (others flow) until `resume_operation`. Returns
    /// how many unstarted tokens of `op` it holds back now.
    pub(crate) fn pause_operation(&self, op: &str) -> usize {
        let state = self.ledger.op(op);
        {
            let _parked = state.parked.lock();
            state.paused.store(true, Ordering::SeqCst);
        }
        self.ledger.live_tokens(Some(op)).iter().filter(|t| t.cell.state().is_pending()).count()
    }

    /// Releases the tokens of `op` held by `pause_operation`; returns how many.
    pub(crate) fn resume_operation(&self, py: Python<'_>, op: &str) -> usize {
        let Some(state) = self.ledger.find_op(op) else {
            return 0;
        };
        let jobs = {
            let mut parked = state.parked.lock();
            state.paused.store(false, Ordering::SeqCst);
            std::mem::take(&mut *parked)
        };
        self.release_parked(py, jobs)
    }

    /// Cancels every token of `op` that has not started; returns how many.
    pub(crate) fn drain_operation(&self, py: Python<'_>, op: &str) -> usize {
        let mut n = 0;
        for token in self.ledger.live_tokens(Some(op)) {
            if token.cancel_pending(py) {
                n += 1;
            }
        }
        // Forget the parked jobs of tokens just cancelled.
        if let Some(state) = self.ledger.find_op(op) {
            state.parked.lock().retain(|j| !j.token().cell.is_done());
        }
        self.ledger.parked.lock().retain(|j| !j.token().cell.is_done());
        n
    }

    /// Kills every unresolved token of `op` (all operations when None); returns how many.
    pub(crate) fn kill_operation(&self, py: Python<'_>, op: Option<&str>, reason: &str) -> PyResult<usize> {
        let mut n = 0;
        for t in self.ledger.live_tokens(op) {
            if t.kill(py, reason)? {
                n += 1;
            }
        }
        Ok(n)
    }
}
