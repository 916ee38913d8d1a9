//! CPU topology: which cores this process may run on, and how many are physical.

/// What the machine offers this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Logical CPUs this process may run on (its affinity mask).
    pub logical_cores: usize,
    /// Physical cores behind them (equal to `logical_cores` when SMT is off or unknown).
    pub physical_cores: usize,
    /// The OS ids of the usable logical cores, in order; worker `i` is pinned to `core_ids[i % n]`.
    pub core_ids: Vec<usize>,
}

impl Topology {
    /// Reads the topology of the current process.
    pub fn detect() -> Topology {
        let core_ids: Vec<usize> = core_affinity::get_core_ids().map(|ids| ids.into_iter().map(|c| c.id).collect()).unwrap_or_default();
        let core_ids =
            if core_ids.is_empty() { (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect() } else { core_ids };
        let logical_cores = core_ids.len();
        let physical_cores = physical_core_count(&core_ids).unwrap_or(logical_cores).clamp(1, logical_cores);
        Topology { logical_cores, physical_cores, core_ids }
    }
}

/// Counts distinct (package, core) pairs among `cpus` from Linux sysfs.
fn physical_core_count(cpus: &[usize]) -> Option<usize> {
    let mut seen = std::collections::HashSet::new();
    for cpu in cpus {
        let base = format!("/sys/devices/system/cpu/cpu{cpu}/topology");
        let core = std::fs::read_to_string(format!("{base}/core_id")).ok()?;
        let pkg = std::fs::read_to_string(format!("{base}/physical_package_id")).ok()?;
        seen.insert((pkg.trim().to_owned(), core.trim().to_owned()));
    }
    Some(seen.len())
}
