"""Test helpers: prove that a function really runs concurrently on tokengate.

>>> import time
>>> from tokengate.testing import prove_concurrency
>>> report = prove_concurrency(time.sleep, [0.02] * 4)
>>> report.assert_speedup(at_least=2)     # serial time / parallel wall time
>>> report.assert_in_flight(at_least=2)   # sum of task durations / parallel wall time

``prove_concurrency`` runs the same calls one after another and then all at
once on the worker pool, in the same process, and reports both: the **real
speedup** (how much faster all at once was) and the **in-flight ratio** (how
many tasks were running at the same moment, on average). The two differ when
the function holds the GIL: pure-Python tasks are in flight together but take
turns, so their in-flight ratio is high and their real speedup about 1.

With pytest, the ``tokengate`` plugin (``tokengate.testing.plugin``) adds a
``tokengate_coordinator`` fixture and ``--tokengate-report``, which prints
every report made during the run in the terminal summary.

This module does not import tokengate's native extension until it is used.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokengate import OperationsCoordinator

__all__ = [
    "ConcurrencyReport",
    "CpuMeter",
    "PriorityReport",
    "RunFigures",
    "assert_no_leaks",
    "peak_overlap",
    "prove_concurrency",
    "prove_priority_order",
    "unfinished_tokens",
]

#: Callables given every report ``prove_concurrency`` makes (the pytest plugin adds one).
_report_hooks: list[Callable[[ConcurrencyReport], None]] = []


class CpuMeter:
    """CPU time that other processes used (in CPUs, on average) between two snapshots; Linux only
    (elsewhere ``ok`` is False and readings are None). "Other" leaves out this process and its
    descendants (the process lane's workers, say): their CPU time is the run's own. A descendant
    whose parent exits before it does is adopted by another process and counts as other from then."""

    def __init__(self) -> None:
        try:
            self._tick = os.sysconf("SC_CLK_TCK")
            self.snapshot()
            self.ok = True
        except (OSError, ValueError, AttributeError, IndexError):
            self.ok = False

    def snapshot(self) -> tuple[float, float, float]:
        """(host CPU time, host idle time, CPU time of this process and its descendants), in ticks."""
        with open("/proc/stat", encoding="ascii") as f:
            lines = f.readlines()
        # The first line adds up every CPU of the host, not only those this process may use.
        self.host_cpus = max(1, sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit()))
        fields = [float(x) for x in lines[0].split()[1:]]
        total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
        idle = fields[3] + fields[4]
        # Children it waited for are in os.times(), live descendants are read from /proc. A
        # child reaped by another thread during the scan (the process lane's supervisor reaps
        # its retired workers) would be in neither: read again when os.times() moved meanwhile.
        for _ in range(5):
            t = os.times()
            live = _descendants_ticks(os.getpid())
            after = os.times()
            if (after.children_user, after.children_system) == (t.children_user, t.children_system):
                break
        own = (t.user + t.system + t.children_user + t.children_system) * self._tick
        return total, idle, own + live

    def start(self) -> tuple[float, float, float] | None:
        return self.snapshot() if self.ok else None

    def other_cpus(self, since: tuple[float, float, float] | None) -> float | None:
        """CPUs of the host that other processes kept busy since ``since``, on average."""
        if since is None:
            return None
        total, idle, own = self.snapshot()
        d_total = total - since[0]
        if d_total <= 0:
            return None
        busy = d_total - (idle - since[1]) - (own - since[2])
        return max(0.0, busy / (d_total / self.host_cpus))


def _descendants_ticks(root: int) -> float:
    """CPU time (ticks) of the live descendants of process ``root``, with that of the
    children they waited for; 0 where ``/proc`` cannot be read."""
    parents: dict[int, list[tuple[int, float]]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return 0.0
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        # After the command: state ppid ...; utime stime cutime cstime are fields 11 to 14.
        parents.setdefault(int(rest[1]), []).append((int(name), sum(float(x) for x in rest[11:15])))
    ticks = 0.0
    todo = [root]
    while todo:
        for pid, t in parents.get(todo.pop(), ()):
            ticks += t
            todo.append(pid)
    return ticks


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


#: Other processes using more CPUs than this during a proof get the report flagged.
BUSY_MACHINE_CPUS = 0.25


def _gil_enabled() -> bool:
    probe = getattr(sys, "_is_gil_enabled", None)
    return True if probe is None else bool(probe())


@dataclass(frozen=True)
class RunFigures:
    """One repeat: the calls one after another, then all at once on the pool."""

    serial_s: float
    wall_s: float
    serial_durations_s: tuple[float, ...]
    durations_s: tuple[float, ...]
    start_offsets_s: tuple[float, ...]
    submit_s: float
    #: The most tasks that ran at the same moment (from their start and finish times).
    peak_in_flight: int = 0

    @property
    def real_speedup(self) -> float:
        return self.serial_s / self.wall_s if self.wall_s > 0 else math.inf

    @property
    def in_flight(self) -> float:
        return math.fsum(self.durations_s) / self.wall_s if self.wall_s > 0 else math.inf

    @property
    def jitter_s(self) -> float:
        return statistics.pstdev(self.start_offsets_s) if len(self.start_offsets_s) > 1 else 0.0


@dataclass(frozen=True)
class ConcurrencyReport:
    """What ``prove_concurrency`` measured. Figures over several repeats are medians.

    * ``real_speedup``: time of the calls one after another / wall time of the
      same calls all at once (first submit to last result). 1.0 means no gain;
      the most it can be is ``max_speedup`` = min(tasks, workers).
    * ``in_flight``: sum of the tasks' own durations (start to finish on a
      worker) / that wall time: how many tasks were running at once, on
      average. Time a task spends waiting for the GIL counts as running, so
      this is not a measure of parallel work.
    * ``jitter_s``: population standard deviation of the tasks' start times
      (offsets from the first start). Small when they all started together.
    """

    name: str
    tasks: int
    workers: int
    repeat: int
    gil_enabled: bool
    serial_s: float
    wall_s: float
    real_speedup: float
    in_flight: float
    jitter_s: float
    durations_s: tuple[float, ...]
    start_offsets_s: tuple[float, ...]
    serial_durations_s: tuple[float, ...]
    runs: tuple[RunFigures, ...] = field(repr=False)
    #: The operation's weight (``light``, ``medium``, ``heavy``) as the coordinator ran it.
    weight: str = "medium"
    #: How many tokens of that weight may compute at once: cores x tokens per core.
    weight_cap: int = 0
    #: The most tasks that ran at the same moment, over every repeat.
    peak_in_flight: int = 0
    #: CPUs that other processes kept busy during the proof, on average (None where unknown).
    other_cpus: float | None = None
    #: CPUs of the host (the unit of ``other_cpus``).
    cpus: int = 1

    @property
    def max_speedup(self) -> int:
        """The most the real speedup can be: min(tasks, workers). A function that computes
        (holds its core) is further capped at ``weight_cap``; one that blocks (sleeps, waits
        for I/O) lends its core's units while it waits, and is not."""
        return max(1, min(self.tasks, self.workers))

    @property
    def speedup_spread(self) -> tuple[float, float]:
        """The lowest and highest real speedup over the repeats."""
        values = [r.real_speedup for r in self.runs] or [self.real_speedup]
        return min(values), max(values)

    @property
    def machine_busy(self) -> bool:
        """True when other processes used more than :data:`BUSY_MACHINE_CPUS` CPUs during the proof."""
        return self.other_cpus is not None and self.other_cpus > BUSY_MACHINE_CPUS

    def to_dict(self) -> dict[str, Any]:
        """The figures as plain data (what ``--tokengate-report=json:PATH`` writes)."""
        return {
            "name": self.name,
            "tasks": self.tasks,
            "workers": self.workers,
            "repeat": self.repeat,
            "gil_enabled": self.gil_enabled,
            "real_speedup": self.real_speedup,
            "speedup_spread": list(self.speedup_spread),
            "max_speedup": self.max_speedup,
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "weight": self.weight,
            "weight_cap": self.weight_cap,
            "serial_s": self.serial_s,
            "wall_s": self.wall_s,
            "jitter_s": self.jitter_s,
            "other_cpus": self.other_cpus,
            "cpus": self.cpus,
            "one_line": self.one_line(),
        }

    def ceiling(self) -> str:
        """Why the real speedup can be no more than it is here, in words."""
        why = [f"at most {self.max_speedup}x here: min({self.tasks} tasks, {self.workers} workers)"]
        if 0 < self.weight_cap < self.max_speedup:
            why.append(
                f"while they compute, {self.weight} tokens run at most {self.weight_cap} at once "
                f"(the weight's share of each core); tokens that block (sleep, I/O, locks) lend their share "
                f"and can reach {self.max_speedup}"
            )
        return "; ".join(why)

    def one_line(self) -> str:
        return (
            f"{self.name}: {self.tasks} tasks on {self.workers} workers, real speedup {self.real_speedup:.2f}x "
            f"(of at most {self.max_speedup}x), in flight {self.in_flight:.2f}x (peak {self.peak_in_flight}), "
            f"serial {self.serial_s * 1000:.2f} ms, "
            f"parallel wall {self.wall_s * 1000:.2f} ms, start jitter {self.jitter_s * 1000:.3f} ms"
            + (f" (median of {self.repeat})" if self.repeat > 1 else "")
            + (f"; machine busy: {self.other_cpus:.2f} CPUs used by other processes" if self.machine_busy else "")
        )

    def summary(self) -> str:
        """Every figure with what it means (the body of the assertion messages)."""
        med = "median of " + str(self.repeat) + " repeats" if self.repeat > 1 else "1 repeat"
        gil = "GIL enabled" if self.gil_enabled else "GIL disabled (free-threaded)"
        lines = [
            f"  {self.tasks} tasks on {self.workers} workers; {med}; {gil}",
            f"  one after another (serial):     {self.serial_s * 1000:10.3f} ms",
            f"  all at once (parallel wall):    {self.wall_s * 1000:10.3f} ms   first submit -> last result",
            f"  real speedup = serial / wall:   {self.real_speedup:10.2f}x     1.0x = no gain; {self.ceiling()}",
            (
                f"  in-flight ratio:                {self.in_flight:10.2f}x     sum of task durations / wall: tasks "
                "running at once on average (GIL waits count as running)"
            ),
            f"  peak in flight:                 {self.peak_in_flight:10d}      most tasks running at the same moment",
            f"  start jitter (stdev):           {self.jitter_s * 1000:10.3f} ms   spread of the tasks' start times",
            "  per-task durations (ms):        " + " ".join(f"{d * 1000:.2f}" for d in self.durations_s),
            "  serial durations (ms):          " + " ".join(f"{d * 1000:.2f}" for d in self.serial_durations_s),
        ]
        if self.machine_busy:
            lines.append(
                f"  outside load: other processes kept {self.other_cpus:.2f} of {self.cpus} CPUs busy during the "
                "proof; the figures are lower than this machine gives when idle"
            )
        if self.repeat > 1:
            low, high = self.speedup_spread
            lines.append(
                f"  real speedup per repeat:        {' '.join(f'{r.real_speedup:.2f}x' for r in self.runs)}"
                f"   (spread {low:.2f}x-{high:.2f}x)"
            )
        return "\n".join(lines)

    def _hint(self) -> str:
        if self.in_flight >= 1.5 and self.real_speedup < 1.3:
            if self.gil_enabled:
                return (
                    "  The tasks were in flight together but took turns: the function most likely holds the GIL "
                    "(pure-Python code). Threads, tokengate's included, only run in parallel code that releases it "
                    "(I/O, time.sleep, hashlib/zlib on large buffers, NumPy, ...)."
                )
            return "  The tasks were in flight together but took turns: they may contend on a shared lock."
        if self.in_flight < 1.5:
            return (
                "  The tasks hardly overlapped: too few workers, tasks too short for the submission cost, "
                "or the machine was busy."
            )
        return ""

    def _fail(self, what: str) -> AssertionError:
        __tracebackhide__ = True
        hint = self._hint()
        return AssertionError(f"{self.name}: {what}\n{self.summary()}" + (f"\n{hint}" if hint else ""))

    def assert_speedup(self, at_least: float | None = None, *, at_most: float | None = None) -> ConcurrencyReport:
        """Fails unless ``at_least <= real_speedup`` (and ``real_speedup <= at_most`` when given)."""
        __tracebackhide__ = True
        if at_least is None and at_most is None:
            raise TypeError("assert_speedup() needs at_least or at_most")
        if at_least is not None and not self.real_speedup >= at_least:
            raise self._fail(f"real speedup {self.real_speedup:.2f}x is below the required {at_least:.2f}x")
        if at_most is not None and not self.real_speedup <= at_most:
            raise self._fail(f"real speedup {self.real_speedup:.2f}x is above the allowed {at_most:.2f}x")
        return self

    def assert_in_flight(self, at_least: float) -> ConcurrencyReport:
        """Fails unless ``in_flight >= at_least``."""
        __tracebackhide__ = True
        if not self.in_flight >= at_least:
            raise self._fail(f"in-flight ratio {self.in_flight:.2f}x is below the required {at_least:.2f}x")
        return self

    def assert_max_in_flight(self, n: int) -> ConcurrencyReport:
        """Fails if more than ``n`` tasks ever ran at the same moment (in any repeat): the check
        a rate-limited client or a bounded resource needs."""
        __tracebackhide__ = True
        if self.peak_in_flight > n:
            raise self._fail(f"{self.peak_in_flight} tasks ran at the same moment, more than the allowed {n}")
        return self

    def assert_jitter(self, at_most: float) -> ConcurrencyReport:
        """Fails unless the tasks' start times have a standard deviation of at most ``at_most`` seconds."""
        __tracebackhide__ = True
        if not self.jitter_s <= at_most:
            raise self._fail(f"start jitter {self.jitter_s * 1000:.3f} ms is above the allowed {at_most * 1000:.3f} ms")
        return self


def _spec_and_body(fn: Callable[..., Any]) -> tuple[Any, Callable[..., Any]]:
    """(its OperationSpec, the plain function) of a ``@task_token_guard`` function; (None, fn) else."""
    from tokengate import _tokengate

    spec = getattr(fn, "spec", None)
    if isinstance(spec, _tokengate.OperationSpec):
        return spec, getattr(fn, "__wrapped__")  # noqa: B009 - fn is typed as a plain callable
    return None, fn


def peak_overlap(intervals: Iterable[tuple[float, float]]) -> int:
    """The most intervals (start, finish) that contain one moment; one that finishes as another
    starts does not overlap it."""
    events = []
    for start, finish in intervals:
        events.append((start, 1))
        events.append((finish, -1))
    events.sort()  # at equal times, finishes (-1) come before starts
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


#: Below this parallel wall time a proof repeats by default (short runs are noisy).
SHORT_RUN_S = 0.2
#: Repeats of a short proof when ``repeat`` is not given.
SHORT_RUN_REPEATS = 5


def _median_run(runs: list[RunFigures]) -> RunFigures:
    order = sorted(range(len(runs)), key=lambda k: runs[k].real_speedup)
    return runs[order[len(order) // 2]]


def serial_run(fn: Callable[..., Any], args_list: Iterable[tuple[Any, ...]]) -> tuple[float, list[float]]:
    """Runs ``fn(*args)`` for each args, one after another: (total seconds, each call's seconds)."""
    durations = []
    t_all = time.perf_counter()
    for args in args_list:
        t0 = time.perf_counter()
        fn(*args)
        durations.append(time.perf_counter() - t0)
    return time.perf_counter() - t_all, durations


def prove_concurrency(
    fn: Callable[..., Any],
    inputs: Iterable[Any],
    *,
    repeat: int | None = None,
    coordinator: OperationsCoordinator | None = None,
    workers: int | None = None,
    unpack: bool = False,
    warmup: bool = True,
    timeout: float = 60.0,
    name: str | None = None,
) -> ConcurrencyReport:
    """Runs ``fn(x)`` for every ``x`` in ``inputs`` one after another, then all at once on tokengate, and compares.

    ``fn``: a synchronous function, plain or decorated with ``@task_token_guard``
    (the serial runs call the undecorated body). ``inputs``: one positional
    argument per call, or with ``unpack=True`` a tuple of arguments per call.
    ``repeat``: repeats of (serial, parallel); the report holds the medians and the spread.
    By default one, or :data:`SHORT_RUN_REPEATS` when the first parallel run took under
    :data:`SHORT_RUN_S` seconds.
    ``coordinator``: a running ``OperationsCoordinator`` to run the tasks on
    (the ``tokengate_coordinator`` fixture, say); by default a temporary one
    with ``workers`` workers (default: one per input) is started and stopped.
    ``warmup``: run the first input once each way first, unmeasured.
    ``timeout``: seconds to wait for each parallel batch.

    The task's own exceptions propagate. Returns a :class:`ConcurrencyReport`.
    """
    import tokengate
    from tokengate import OperationsCoordinator, task_token_guard

    items = [tuple(x) if unpack else (x,) for x in inputs]
    if not items:
        raise ValueError("prove_concurrency() needs at least one input")
    if repeat is not None and (not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 1):
        raise ValueError(f"repeat must be a positive int or None, got {repeat!r}")
    spec, body = _spec_and_body(fn)
    if spec is None:
        label = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
        spec = getattr(task_token_guard(operation_type=f"prove_concurrency.{label}")(fn), "spec")  # noqa: B009
    label = name or getattr(body, "__qualname__", None) or getattr(body, "__name__", None) or repr(body)

    own = coordinator is None
    if coordinator is None:
        coordinator = OperationsCoordinator(max_workers=workers or min(max(len(items), 1), 256))
        coordinator.start()
    elif not coordinator.is_running:
        raise ValueError("prove_concurrency(): the coordinator given is not running (call start() first)")
    try:
        engine = coordinator._engine
        submit = spec.submit_call

        def parallel() -> tuple[float, float, list[Any]]:
            t0 = time.perf_counter()
            tokens = [submit(body, args, None, engine) for args in items]
            t_sub = time.perf_counter()
            tokengate.gather(tokens, timeout=timeout)
            return time.perf_counter() - t0, t_sub - t0, tokens

        def serial() -> tuple[float, list[float]]:
            return serial_run(body, items)

        if warmup:
            body(*items[0])
            submit(body, items[0], None, engine).result(timeout=timeout)
        meter = CpuMeter()
        since = meter.start()
        runs: list[RunFigures] = []
        r = 0
        while r < (repeat or 1) or (repeat is None and len(runs) < SHORT_RUN_REPEATS and runs[0].wall_s < SHORT_RUN_S):
            if r % 2 == 0:
                serial_s, serial_durs = serial()
                wall, submit_s, tokens = parallel()
            else:
                wall, submit_s, tokens = parallel()
                serial_s, serial_durs = serial()
            starts = [t.started_at for t in tokens]
            first = min(s for s in starts if s is not None)
            runs.append(
                RunFigures(
                    serial_s=serial_s,
                    wall_s=wall,
                    serial_durations_s=tuple(serial_durs),
                    durations_s=tuple(t.execution_time() or 0.0 for t in tokens),
                    start_offsets_s=tuple((s - first) if s is not None else 0.0 for s in starts),
                    submit_s=submit_s,
                    peak_in_flight=peak_overlap(
                        (t.started_at, t.finished_at)
                        for t in tokens
                        if t.started_at is not None and t.finished_at is not None
                    ),
                )
            )
            r += 1
        other_cpus = meter.other_cpus(since)
        total_workers = coordinator.total_workers
        stats = coordinator.get_stats()
        cores = len(stats["pool"]["core_units"])
        budget = max(1, min(int(stats["pool"]["active_per_core"]), int(stats["topology"]["workers_per_core"])))
        weight = str(spec.weight)
        per_core = {"light": budget, "medium": max(1, budget // min(2, budget)), "heavy": 1}[weight]
    finally:
        if own:
            coordinator.stop(cancel_pending=True, timeout=timeout)

    mid = _median_run(runs)
    report = ConcurrencyReport(
        name=label,
        tasks=len(items),
        workers=total_workers,
        repeat=len(runs),
        gil_enabled=_gil_enabled(),
        serial_s=statistics.median(r.serial_s for r in runs),
        wall_s=statistics.median(r.wall_s for r in runs),
        real_speedup=statistics.median(r.real_speedup for r in runs),
        in_flight=statistics.median(r.in_flight for r in runs),
        jitter_s=statistics.median(r.jitter_s for r in runs),
        durations_s=mid.durations_s,
        start_offsets_s=mid.start_offsets_s,
        serial_durations_s=mid.serial_durations_s,
        runs=tuple(runs),
        weight=weight,
        weight_cap=cores * per_core,
        peak_in_flight=max(r.peak_in_flight for r in runs),
        other_cpus=other_cpus,
        cpus=getattr(meter, "host_cpus", _cpus()),
    )
    for hook in _report_hooks:
        hook(report)
    return report


# -- leaks ----------------------------------------------------------------------------------


def _os_threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # pragma: no cover - not Linux
        return threading.active_count()


def unfinished_tokens(coordinator: OperationsCoordinator) -> dict[str, int]:
    """Unresolved tokens of a coordinator, per operation (only operations that have some)."""
    ops = coordinator.get_stats().get("operations", {})
    return {op: int(d["pending"]) for op, d in ops.items() if d.get("pending")}


@contextlib.contextmanager
def assert_no_leaks(timeout: float = 5.0) -> Iterator[None]:
    """Fails if the block leaves tokengate running: a coordinator or Executor it started and did not
    stop, a token of one of them unresolved, or more OS threads than before it (worker threads that
    were not joined). Waits up to ``timeout`` seconds for things to settle first::

        with assert_no_leaks():
            with OperationsCoordinator():
                ...
    """
    __tracebackhide__ = True
    from tokengate import _coordinator

    before = [weakref.ref(c) for c in _coordinator._live.values()]
    threads = _os_threads()
    yield
    deadline = time.monotonic() + timeout

    def leftovers() -> list[str]:
        out = []
        for c in list(_coordinator._live.values()):
            if any(r() is c for r in before) or not c.is_running:
                continue
            unresolved = unfinished_tokens(c)
            what = f"a coordinator ({c.total_workers} workers) still running"
            if unresolved:
                what += ", with unresolved tokens: " + ", ".join(f"{op} ({n})" for op, n in sorted(unresolved.items()))
            out.append(what)
        extra = _os_threads() - threads
        if extra > 0:
            out.append(f"{extra} more OS thread(s) than before (worker threads not joined)")
        return out

    left = leftovers()
    while left and time.monotonic() < deadline:
        time.sleep(0.01)
        left = leftovers()
    if left:
        raise AssertionError("tokengate left running after the block: " + "; ".join(left))


# -- priorities -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PriorityReport:
    """What :func:`prove_priority_order` saw: the priorities, in the order their calls started."""

    name: str
    submitted: tuple[int, ...]
    started: tuple[int, ...]

    @property
    def expected(self) -> tuple[int, ...]:
        """Highest priority first; equal priorities in submission order."""
        return tuple(sorted(self.submitted, key=lambda p: -p))

    def assert_ordered(self) -> PriorityReport:
        """Fails unless the calls started highest priority first."""
        __tracebackhide__ = True
        if self.started != self.expected:
            raise AssertionError(
                f"{self.name}: calls started in priority order {list(self.started)}, "
                f"expected {list(self.expected)} (submitted as {list(self.submitted)})"
            )
        return self


def prove_priority_order(
    fn: Callable[..., Any], priorities: Iterable[int], *, arg: Any = None, timeout: float = 30.0
) -> PriorityReport:
    """Queues one call ``fn(arg)`` per priority behind a busy single worker, lets the worker go, and
    reports the order in which the calls started. ``fn`` may be decorated (its body is used)."""
    from tokengate import OperationsCoordinator, task_token_guard

    prios = list(priorities)
    _, body = _spec_and_body(fn)
    label = getattr(body, "__qualname__", None) or repr(body)
    release = threading.Event()
    order: list[int] = []

    gate = task_token_guard(operation_type="prove_priority_order.gate", tags={"weight": "heavy"})(
        lambda: release.wait(timeout)
    )

    def record(p: int) -> Any:
        order.append(p)
        return body(arg)

    guarded = task_token_guard(operation_type=f"prove_priority_order.{label}", tags={"weight": "heavy"})(record)
    # aging: no queued call gains priority by waiting while the others are submitted
    with OperationsCoordinator(max_workers=1, workers_per_core=1, caller_runs=False, aging=3600.0):
        held = gate()
        try:
            deadline = time.monotonic() + timeout
            while not held.running():
                if held.done() or time.monotonic() > deadline:
                    raise RuntimeError(f"prove_priority_order: the worker was not held ({held.state})")
                time.sleep(0.001)
            tokens = [guarded.options(priority=p)(p) for p in prios]
        finally:
            release.set()
        for t in [held, *tokens]:
            t.result(timeout=timeout)
    return PriorityReport(name=label, submitted=tuple(prios), started=tuple(order))
