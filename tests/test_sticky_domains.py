"""Sticky anchors and lead domains.

* ``sticky_anchor``: tokens sharing a routing key run on the same worker while
  any of them is in flight; the registry (``sticky_snapshot()``) is empty once
  they all resolved, however they ended.
* ``external_calls`` marks a lead; decorated calls made inside a running lead
  (or its children) inherit its seed and run on its core; the domain table
  (``domain_snapshot()``) is empty once the lead and its children resolved.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import threading
import time

import pytest

import support
from tokengate import OperationsCoordinator, current_token, task_token_guard

WAIT = 30.0


wait_until = functools.partial(support.wait_until, interval=0.01)


def routing(coord: OperationsCoordinator) -> dict:
    return coord.get_stats()["routing"]


# -- sticky anchors ---------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["none", "standard", "fast", "full"])
def test_every_token_of_an_anchor_reports_the_same_worker(policy: str) -> None:
    gate = threading.Event()

    first_run = threading.Lock()

    @task_token_guard(operation_type=f"st_same_{policy}", tags={"sticky_anchor": "account-7", "hash_policy": policy})
    def op(x: int, y: str) -> tuple[int | None, int]:
        if first_run.acquire(blocking=False):  # the first body to run holds the key in flight
            gate.wait(WAIT)
        time.sleep(0.001)
        return current_token().worker_id, threading.get_ident()

    with OperationsCoordinator() as coord:
        assert coord.total_workers > 1
        try:
            # Same arguments, so the key is the same under every policy.
            first = op(1, "a")
            rest = [op(1, "a") for _ in range(40)]
            snap = coord.sticky_snapshot()
            assert len(snap) == 1
            ((key, (worker, in_flight)),) = snap.items()
            assert key.startswith("account-7")
            assert in_flight >= 1
        finally:
            gate.set()
        results = [t.result(timeout=WAIT) for t in [first, *rest]]
        tokens = [first, *rest]
    workers = {r[0] for r in results}
    assert workers == {worker}, f"tokens of one sticky key ran on workers {workers}"
    assert len({r[1] for r in results}) == 1
    assert {t.worker_id for t in tokens} == {worker}


def test_the_sticky_registry_is_empty_after_all_complete() -> None:
    gate = threading.Event()

    @task_token_guard(operation_type="st_registry", tags={"sticky_anchor": "reg", "hash_policy": "standard"})
    def op(key: int, mode: str) -> int:
        gate.wait(WAIT)
        if mode == "fail":
            raise ValueError("boom")
        return key

    with OperationsCoordinator() as coord:
        try:
            tokens = [op(k, mode) for k in range(5) for mode in ("ok", "fail", "ok")]
            snap = coord.sticky_snapshot()
            # STANDARD keys include the arguments: 5 keys x 2 modes.
            assert len(snap) == 10, snap
            assert sum(n for _, n in snap.values()) == 15
            assert routing(coord)["sticky_keys"] == 10
        finally:
            gate.set()
        for t in tokens:
            t.exception(timeout=WAIT)
        assert wait_until(lambda: coord.sticky_snapshot() == {}, 5), coord.sticky_snapshot()
        assert routing(coord)["sticky_keys"] == 0
        assert sum(t.state == "failed" for t in tokens) == 5


def test_the_sticky_registry_is_released_by_cancel_kill_and_timeout() -> None:
    gate = threading.Event()

    @task_token_guard(operation_type="st_release", tags={"sticky_anchor": "rel", "hash_policy": "none"})
    def op(i: int) -> int:
        gate.wait(WAIT)
        return i

    with OperationsCoordinator() as coord:
        try:
            first = op(0)
            assert wait_until(first.running, 10)
            queued = [op(i) for i in range(1, 6)]  # pinned behind `first` on its worker
            assert coord.sticky_snapshot() == {"rel": (first.worker_id, 6)}
            assert queued[0].cancel()
            assert coord.kill_token(queued[1].token_id, "test") == 1
            timed = op.options(timeout=0.05)(99)
            assert wait_until(lambda: timed.state == "timeout", 10)
            assert coord.sticky_snapshot() == {"rel": (first.worker_id, 4)}
        finally:
            gate.set()
        for t in [first, *queued[2:]]:
            t.result(timeout=WAIT)
        assert wait_until(lambda: coord.sticky_snapshot() == {}, 5), coord.sticky_snapshot()


def test_different_anchors_in_flight_use_different_workers() -> None:
    gate = threading.Event()
    started = threading.Semaphore(0)

    def make(anchor: str):  # type: ignore[no-untyped-def]
        @task_token_guard(operation_type=f"st_spread_{anchor}", tags={"sticky_anchor": anchor, "hash_policy": "none"})
        def op() -> int | None:
            started.release()
            gate.wait(WAIT)
            return current_token().worker_id

        return op

    ops = [make(a) for a in ("a", "b", "c", "d")]
    with OperationsCoordinator() as coord:
        try:
            tokens = [op() for op in ops]
            snap = coord.sticky_snapshot()
            assert set(snap) == {"a", "b", "c", "d"}
            assert len({w for w, _ in snap.values()}) == 4, f"four keys pinned to workers {snap}"
            for _ in tokens:
                assert started.acquire(timeout=10), "a pinned token did not start on its own worker"
        finally:
            gate.set()
        assert len({t.result(timeout=WAIT) for t in tokens}) == 4


def test_a_key_can_move_once_it_is_no_longer_in_flight() -> None:
    @task_token_guard(operation_type="st_repin", tags={"sticky_anchor": "repin", "hash_policy": "none"})
    def op() -> int | None:
        return current_token().worker_id

    with OperationsCoordinator() as coord:
        for _ in range(5):
            t = op()
            assert t.result(timeout=WAIT) is not None
            assert wait_until(lambda: coord.sticky_snapshot() == {}, 5)


# -- lead domains -----------------------------------------------------------------------


def _lead_ops(prefix: str, children: int, *, pause: float = 0.005):  # type: ignore[no-untyped-def]
    @task_token_guard(operation_type=f"{prefix}_child")
    def child(i: int) -> tuple[int | None, str | None, bool]:
        t = current_token()
        time.sleep(pause)
        return t.core_id, t.conductor_seed, t.is_lead

    @task_token_guard(operation_type=f"{prefix}_lead", tags={"external_calls": [f"{prefix}_child"]})
    def lead() -> tuple[int | None, str | None, list]:
        me = current_token()
        toks = [child(i) for i in range(children)]
        return me.core_id, me.conductor_seed, [(t, t.result(timeout=WAIT)) for t in toks]

    return lead, child


def test_three_leads_with_four_children_share_the_leads_core_and_seed() -> None:
    lead, _ = _lead_ops("dom34", 4)
    with OperationsCoordinator() as coord:
        leads = [lead() for _ in range(3)]
        assert all(t.is_lead for t in leads)
        seeds = [t.conductor_seed for t in leads]
        assert len(set(seeds)) == 3, "each lead has its own seed"
        assert all(isinstance(s, str) and len(s) == 64 for s in seeds)
        out = [t.result(timeout=WAIT) for t in leads]
        assert wait_until(lambda: coord.domain_snapshot() == {}, 5), coord.domain_snapshot()
        assert routing(coord)["domains"] == 0
    for lead_tok, (core, seed, kids) in zip(leads, out):
        assert core is not None and core == lead_tok.core_id
        assert seed == lead_tok.conductor_seed
        assert len(kids) == 4
        for child_tok, (c_core, c_seed, c_is_lead) in kids:
            assert c_seed == seed and child_tok.conductor_seed == seed
            assert c_core == core and child_tok.core_id == core, f"child ran on core {c_core}, its lead on {core}"
            assert not c_is_lead and not child_tok.is_lead


def test_the_domain_table_is_populated_while_a_lead_runs_and_empty_after() -> None:
    gate = threading.Event()
    seen: dict = {}

    @task_token_guard(operation_type="domtab_child")
    def child() -> int:
        gate.wait(WAIT)
        return 1

    @task_token_guard(operation_type="domtab_lead", tags={"external_calls": ["domtab_child"]})
    def lead() -> int:
        toks = [child() for _ in range(3)]
        return sum(t.result(timeout=WAIT) for t in toks)

    with OperationsCoordinator() as coord:
        t = lead()
        try:
            assert wait_until(lambda: coord.domain_snapshot().get(t.conductor_seed, (None, 0))[1] == 4, 10), (
                coord.domain_snapshot()
            )
            seen.update(coord.domain_snapshot())
            assert routing(coord)["domains"] == 1
        finally:
            gate.set()
        assert t.result(timeout=WAIT) == 3
        assert wait_until(lambda: coord.domain_snapshot() == {}, 5), coord.domain_snapshot()
        pinned = coord.get_stats()["topology"]["pinned_cores"]
    slot, pending = seen[t.conductor_seed]
    assert pending == 4
    assert slot is not None
    assert t.core_id is not None and pinned[t.worker_id] == t.core_id


def test_grandchildren_inherit_the_seed_and_core() -> None:
    @task_token_guard(operation_type="gc_leaf")
    def leaf() -> tuple[int | None, str | None]:
        t = current_token()
        return t.core_id, t.conductor_seed

    @task_token_guard(operation_type="gc_mid")
    def mid() -> list:
        toks = [leaf() for _ in range(2)]
        return [t.result(timeout=WAIT) for t in toks]

    @task_token_guard(operation_type="gc_lead", tags={"external_calls": ["gc_mid"]})
    def lead() -> list:
        toks = [mid() for _ in range(2)]
        return [r for t in toks for r in t.result(timeout=WAIT)]

    with OperationsCoordinator() as coord:
        t = lead()
        leaves = t.result(timeout=WAIT)
        assert wait_until(lambda: coord.domain_snapshot() == {}, 5)
    assert len(leaves) == 4
    assert all(r == (t.core_id, t.conductor_seed) for r in leaves), (t.core_id, leaves)


def test_calls_outside_a_lead_have_no_seed() -> None:
    @task_token_guard(operation_type="noseed")
    def op() -> str | None:
        return current_token().conductor_seed

    with OperationsCoordinator() as coord:
        t = op()
        assert t.result(timeout=WAIT) is None
        assert t.conductor_seed is None and not t.is_lead
        assert coord.domain_snapshot() == {}


def test_a_failing_lead_still_closes_its_domain() -> None:
    @task_token_guard(operation_type="faildom_child")
    def child() -> int:
        time.sleep(0.01)
        return 1

    @task_token_guard(operation_type="faildom_lead", tags={"external_calls": ["faildom_child"]})
    def lead() -> int:
        child()
        child()
        raise RuntimeError("lead failed")

    with OperationsCoordinator() as coord:
        leads = [lead() for _ in range(3)]
        for t in leads:
            with pytest.raises(RuntimeError):
                t.result(timeout=WAIT)
        assert wait_until(lambda: coord.domain_snapshot() == {}, 10), coord.domain_snapshot()
        assert wait_until(lambda: coord.get_stats()["tokens"]["unresolved"] == 0, 10)


def test_leads_submitted_from_many_threads() -> None:
    lead, _ = _lead_ops("dommt", 3, pause=0.001)
    with OperationsCoordinator() as coord:
        with cf.ThreadPoolExecutor(4) as ex:
            leads = list(ex.map(lambda _: lead(), range(12)))
        for t in leads:
            core, seed, kids = t.result(timeout=WAIT)
            assert all(k.core_id == core and k.conductor_seed == seed for k, _ in kids)
        assert wait_until(lambda: coord.domain_snapshot() == {}, 5)
