"""The ``weight`` tag as per-core capacity.

Each core has ``workers_per_core`` units (4): light = 1 unit, medium = 2,
heavy = the whole core. So a heavy token has its core to itself and never more
heavy tokens run at once than there are cores; medium tokens share a core two
ways. Concurrency is measured with a lock-protected counter inside bodies that
sleep briefly (sleeping releases the GIL, so the bodies really overlap). A sleeping
body stands in for one that uses its core, so these coordinators keep units bound to
running tokens (``blocking_aware=False``); test_blocking.py tests what blocking changes.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tokengate import OperationsCoordinator, current_token, task_token_guard

WAIT = 30.0  # seconds: generous, the machine is shared


def ncores() -> int:
    return len(os.sched_getaffinity(0))


class Tracker:
    """Counts bodies running at once, overall and per key (a core id, a kind)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0
        self.by_key: Counter[object] = Counter()
        self.peak_by_key: Counter[object] = Counter()

    @contextmanager
    def inside(self, key: object = None) -> Iterator[None]:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
            self.by_key[key] += 1
            self.peak_by_key[key] = max(self.peak_by_key[key], self.by_key[key])
        try:
            yield
        finally:
            with self.lock:
                self.now -= 1
                self.by_key[key] -= 1


# -- the tag itself -------------------------------------------------------------------


@pytest.mark.parametrize("value", ["HEAVY", "Heavy", "heavy"])
def test_weight_tag_is_case_insensitive(value: str) -> None:
    fn = task_token_guard(operation_type="w_case", tags={"weight": value})(lambda: None)
    assert fn.spec.weight == "heavy"
    assert fn.tags["weight"] == "heavy"


@pytest.mark.parametrize(
    ("op", "tags", "expected"),
    [
        ("resize_heavy_image", None, "heavy"),
        ("HeavyLift", None, "heavy"),
        ("light_parse", None, "light"),
        ("compute", None, "medium"),
        ("heavy_but_tagged", {"weight": "light"}, "light"),
        ("light_but_tagged", {"weight": "Medium"}, "medium"),
    ],
)
def test_weight_default_is_the_name_heuristic(op: str, tags: dict | None, expected: str) -> None:
    fn = task_token_guard(operation_type=op, tags=tags)(lambda: None)
    assert fn.spec.weight == expected
    assert fn.tags["weight"] == expected


def test_weight_heuristic_uses_the_function_name() -> None:
    def my_heavy_job() -> None:
        return None

    assert task_token_guard(my_heavy_job).spec.weight == "heavy"


def test_unknown_weight_is_rejected() -> None:
    with pytest.raises(ValueError, match="weight"):
        task_token_guard(operation_type="w_bad", tags={"weight": "huge"})


# -- heavy: at most one per core --------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "tags"),
    [("w_heavy_tag", {"weight": "heavy"}), ("w_heavy_upper", {"weight": "HEAVY"}), ("w_heavy_by_name", None)],
    ids=["tag", "uppercase-tag", "name-heuristic"],
)
def test_heavy_tokens_never_exceed_the_cores(op: str, tags: dict | None) -> None:
    tr = Tracker()

    @task_token_guard(operation_type=op, tags=tags)
    def body(i: int) -> int:
        with tr.inside(current_token().core_id):
            time.sleep(0.04)
        return i

    n = ncores()
    with OperationsCoordinator(blocking_aware=False) as coord:  # workers_per_core=4: 4 workers per core
        assert coord.total_workers > n
        tokens = [body(i) for i in range(6 * n)]
        assert [t.result(timeout=WAIT) for t in tokens] == list(range(6 * n))
        stats = coord.get_stats()["pool"]
    assert 1 <= tr.peak <= n, f"{tr.peak} heavy tokens ran at once on {n} cores"
    assert max(tr.peak_by_key.values()) == 1, f"two heavy tokens shared a core: {dict(tr.peak_by_key)}"
    assert 1 <= stats["heavy_peak"] <= n


def test_light_tokens_do_share_a_core() -> None:
    """The control for the heavy test: the same pool runs more light tokens than cores at once."""
    tr = Tracker()

    @task_token_guard(operation_type="w_light_share", tags={"weight": "light"})
    def body(i: int) -> int:
        with tr.inside(current_token().core_id):
            time.sleep(0.1)
        return i

    n = ncores()
    with OperationsCoordinator(blocking_aware=False) as coord:
        tokens = [body(i) for i in range(4 * coord.total_workers)]
        for t in tokens:
            t.result(timeout=WAIT)
    assert tr.peak > n, f"light tokens never ran more than {tr.peak} at once on {n} cores"
    assert max(tr.peak_by_key.values()) >= 2


def test_a_heavy_token_has_its_core_to_itself() -> None:
    lock = threading.Lock()
    running: dict[int, Counter[str]] = {}
    violations: list[str] = []

    def enter(kind: str) -> int:
        core = current_token().core_id
        with lock:
            c = running.setdefault(core, Counter())
            if kind == "heavy" and sum(c.values()) > 0:
                violations.append(f"heavy started on core {core} beside {dict(c)}")
            if c["heavy"] > 0:
                violations.append(f"{kind} started on core {core} beside a heavy token")
            c[kind] += 1
        return core

    def leave(core: int, kind: str) -> None:
        with lock:
            running[core][kind] -= 1

    @task_token_guard(operation_type="w_own_core_heavy", tags={"weight": "heavy"})
    def heavy(i: int) -> int:
        core = enter("heavy")
        time.sleep(0.03)
        leave(core, "heavy")
        return i

    @task_token_guard(operation_type="w_own_core_light", tags={"weight": "light"})
    def light(i: int) -> int:
        core = enter("light")
        time.sleep(0.01)
        leave(core, "light")
        return i

    with OperationsCoordinator(blocking_aware=False):
        tokens = []
        for i in range(60):
            tokens.append(light(i))
            if i % 10 == 5:
                tokens.append(heavy(i))
        for t in tokens:
            t.result(timeout=WAIT)
    assert violations == []


def test_mixed_burst_starves_neither_kind() -> None:
    heavy_tr = Tracker()

    @task_token_guard(operation_type="w_mix_heavy", tags={"weight": "heavy"})
    def heavy(i: int) -> int:
        with heavy_tr.inside():
            time.sleep(0.05)
        return i

    @task_token_guard(operation_type="w_mix_light", tags={"weight": "light"})
    def light(i: int) -> int:
        time.sleep(0.005)
        return i

    with OperationsCoordinator(blocking_aware=False):
        lights = [light(i) for i in range(150)]
        heavies = [heavy(i) for i in range(6)]
        lights += [light(i) for i in range(150, 600)]
        assert [t.result(timeout=WAIT) for t in heavies] == list(range(6))
        assert [t.result(timeout=WAIT) for t in lights] == list(range(600))

    h_start = min(t.started_at for t in heavies)
    h_end = max(t.finished_at for t in heavies)
    last_light = max(t.finished_at for t in lights)
    # Heavy tokens are not starved until the light stream is over ...
    early = [t for t in heavies if t.started_at < last_light]
    assert len(early) >= 2, "heavy tokens only ran after (nearly) every light token"
    # ... and light tokens keep completing while heavy ones run.
    during = [t for t in lights if h_start <= t.finished_at <= h_end]
    assert during, "no light token completed while heavy tokens ran"
    assert heavy_tr.peak <= ncores()


# -- core_id is real --------------------------------------------------------------------


@pytest.mark.parametrize("weight", ["light", "medium", "heavy"])
def test_core_id_is_the_core_the_worker_is_pinned_to(weight: str) -> None:
    @task_token_guard(operation_type=f"w_pin_{weight}", tags={"weight": weight})
    def where(i: int) -> tuple[int | None, int | None, set[int]]:
        t = current_token()
        time.sleep(0.002)
        return t.core_id, t.worker_id, os.sched_getaffinity(0)

    with OperationsCoordinator(blocking_aware=False) as coord:
        pinned = coord.get_stats()["topology"]["pinned_cores"]
        tokens = [where(i) for i in range(40)]
        results = [t.result(timeout=WAIT) for t in tokens]
    assert len(pinned) == coord.total_workers
    assert set(pinned) <= os.sched_getaffinity(0)
    for tok, (core, worker, affinity) in zip(tokens, results):
        assert core is not None and worker is not None
        assert tok.core_id == core and tok.worker_id == worker
        assert core in pinned
        assert pinned[worker] == core, f"worker {worker} is pinned to {pinned[worker]}, token says core {core}"
        assert affinity == {core}, f"the thread may run on {affinity}, token says core {core}"


# -- medium: two per core ---------------------------------------------------------------


@contextmanager
def one_core() -> Iterator[int]:
    """Restricts this thread (and so the workers a coordinator started here inherit) to one core."""
    before = os.sched_getaffinity(0)
    core = min(before)
    os.sched_setaffinity(0, {core})
    try:
        yield core
    finally:
        os.sched_setaffinity(0, before)


@pytest.mark.parametrize(("weight", "bound"), [("medium", 2), ("heavy", 1)])
def test_weights_on_one_core_with_four_workers(weight: str, bound: int) -> None:
    tr = Tracker()

    @task_token_guard(operation_type=f"w_one_core_{weight}", tags={"weight": weight})
    def body(i: int) -> int:
        with tr.inside(current_token().core_id):
            time.sleep(0.05)
        return i

    with one_core() as core:
        coord = OperationsCoordinator(max_workers=4, workers_per_core=4, blocking_aware=False).start()
    try:
        assert coord.get_stats()["topology"]["pinned_cores"] == [core] * 4
        tokens = [body(i) for i in range(12)]
        assert [t.result(timeout=WAIT) for t in tokens] == list(range(12))
    finally:
        coord.stop(timeout=10)
    assert 1 <= tr.peak <= bound, f"{tr.peak} {weight} tokens ran at once on one core with 4 workers (at most {bound})"


def test_light_tokens_use_all_four_units_of_one_core() -> None:
    """The control for the test above: the same one-core pool runs 4 light tokens at once."""
    tr = Tracker()

    @task_token_guard(operation_type="w_one_core_light", tags={"weight": "light"})
    def body(i: int) -> int:
        with tr.inside():
            time.sleep(0.1)
        return i

    with one_core():
        coord = OperationsCoordinator(max_workers=4, workers_per_core=4, blocking_aware=False).start()
    try:
        tokens = [body(i) for i in range(16)]
        for t in tokens:
            t.result(timeout=WAIT)
    finally:
        coord.stop(timeout=10)
    assert tr.peak > 2, f"light tokens never ran more than {tr.peak} at once on 4 workers"


def test_medium_tokens_share_each_core_two_ways() -> None:
    tr = Tracker()

    @task_token_guard(operation_type="w_medium_cores", tags={"weight": "medium"})
    def body(i: int) -> int:
        with tr.inside(current_token().core_id):
            time.sleep(0.04)
        return i

    n = ncores()
    with OperationsCoordinator(workers_per_core=4, blocking_aware=False) as coord:
        assert coord.total_workers == 4 * n
        tokens = [body(i) for i in range(8 * n)]
        for t in tokens:
            t.result(timeout=WAIT)
    assert max(tr.peak_by_key.values()) <= 2, f"more than two medium tokens shared a core: {dict(tr.peak_by_key)}"
    assert tr.peak <= 2 * n


# -- nested waits must not bypass the capacity ------------------------------------------


def test_heavy_limit_holds_when_waiting_tasks_run_heavy_children_inline() -> None:
    """Tasks that wait on heavy children (help while waiting) must not run more
    heavy tokens at once than there are cores."""
    tr = Tracker()

    @task_token_guard(operation_type="w_nested_heavy_child", tags={"weight": "heavy"})
    def child(i: int) -> int:
        with tr.inside(current_token().core_id):
            time.sleep(0.05)
        return i

    @task_token_guard(operation_type="w_nested_light_parent", tags={"weight": "light"})
    def parent(i: int) -> int:
        t = child(i)
        time.sleep(0.01)
        return t.result(timeout=WAIT)

    n = ncores()
    with OperationsCoordinator(blocking_aware=False):
        tokens = [parent(i) for i in range(16)]
        assert [t.result(timeout=WAIT) for t in tokens] == list(range(16))
    assert tr.peak <= n, f"{tr.peak} heavy tokens ran at once on {n} cores (per core: {dict(tr.peak_by_key)})"
