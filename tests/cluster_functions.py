"""Cluster-lane functions importable by name (Dask workers import them by reference)."""

from __future__ import annotations

import os
import time

from tokengate import task_token_guard


@task_token_guard(operation_type="cl_square", tags={"cluster": True})
def square(x: int) -> int:
    return x * x


@task_token_guard(operation_type="cl_where", tags={"cluster": True})
def where(x: int) -> tuple[int, int]:
    return x, os.getpid()


@task_token_guard(operation_type="cl_slow", tags={"cluster": True})
def slow(x: int, seconds: float = 0.05) -> int:
    time.sleep(seconds)
    return x


@task_token_guard(operation_type="cl_stamp", tags={"cluster": True})
def stamp(x: int, seconds: float = 0.02) -> tuple[int, float]:
    started = time.time()
    time.sleep(seconds)
    return x, started


@task_token_guard(operation_type="cl_heavy", tags={"cluster": True, "weight": "heavy"})
def heavy(x: int, seconds: float = 0.2) -> tuple[int, float, float]:
    started = time.time()
    time.sleep(seconds)
    return x, started, time.time()


@task_token_guard(operation_type="cl_marked", tags={"cluster": True, "weight": "heavy"})
def marked(x: int, path: str, seconds: float = 0.05) -> int:
    """Appends its parent's pid (a Ray worker's parent is its node's raylet) and its own
    to ``path``, then sleeps."""
    with open(path, "a") as f:
        f.write(f"{os.getppid()} {os.getpid()}\n")
    time.sleep(seconds)
    return x


@task_token_guard(operation_type="cl_fail", tags={"cluster": True})
def fail(x: int) -> int:
    raise ValueError(f"bad {x}")


@task_token_guard(operation_type="cl_flaky", tags={"cluster": True, "retries": 2})
def flaky(path: str) -> str:
    """Fails the first time it runs (it leaves a file behind), then succeeds."""
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write("once")
        raise RuntimeError("first attempt fails")
    return "second"


def mul(x: int, y: int) -> int:
    return x * y


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def sleep_and_return(seconds: float, value: int) -> int:
    time.sleep(seconds)
    return value


class MyObject:
    def my_method(self) -> None:
        pass


def make_dummy_object(_: object) -> MyObject:
    return MyObject()
