//! What every token of one decorated function shares, fixed at decoration:
//! `SpecShared` (the function, its operation, its tags and the scheduling
//! they ask for) and the per-call options its tags give by default.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use crate::engine::pool::Weight;

/// Storage tiers of the I/O lane, in order (the `storage_speed` tag values).
pub(crate) const STORAGE_TIERS: [&str; 4] = ["SLOW", "MODERATE", "FAST", "INSANE"];

/// Per-call scheduling options (from tags, overridden per call).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CallOptions {
    /// Higher runs first; 0 is the plain FIFO path.
    pub(crate) priority: i64,
    /// Seconds from the call to the token's deadline.
    pub(crate) timeout: Option<f64>,
    /// Extra attempts after a failure.
    pub(crate) retries: u32,
    /// First back-off between attempts, in seconds (doubles each time).
    pub(crate) retry_backoff: f64,
}

/// What a decorated function's tokens share.
#[derive(Debug)]
pub(crate) struct SpecShared {
    pub(crate) func: Py<PyAny>,
    pub(crate) operation_type: Py<PyString>,
    pub(crate) op_name: String,
    /// A read-only view (`types.MappingProxyType`) of the validated tags.
    pub(crate) tags: Py<PyAny>,
    pub(crate) min_pos: usize,
    pub(crate) max_pos: usize,
    pub(crate) fast_arity: bool,
    pub(crate) binder: Option<Py<PyAny>>,
    pub(crate) defaults: CallOptions,
    /// Core capacity a token needs (see `crate::engine::pool::capacity`).
    pub(crate) weight: Weight,
    /// I/O lane tier (`storage_speed`), or None for the CPU pool.
    pub(crate) storage_tier: Option<usize>,
    /// `external_calls` of a lead token, as digest input.
    pub(crate) lead_calls: Option<String>,
    pub(crate) digest_policy: String,
}

impl SpecShared {
    /// A plain dict copy of the tags.
    pub(crate) fn tags_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.update(self.tags.bind(py).cast::<pyo3::types::PyMapping>()?)?;
        Ok(d)
    }
}
