"""Exceptions raised by tasks, BaseExceptions, injected Rust panics and error storms."""

from __future__ import annotations

import asyncio
import traceback
from pathlib import Path
from typing import Any

import pytest

from tokengate import OperationsCoordinator, TaskPanicError, TokengateError, _tokengate, task_token_guard

WAIT = 10.0


class CustomError(Exception):
    def __init__(self, msg: str, payload: Any = None) -> None:
        super().__init__(msg)
        self.payload = payload


class CustomBase(BaseException):
    pass


@task_token_guard
def raise_chained() -> None:
    try:
        {}["missing"]
    except KeyError as inner:
        raise CustomError("outer failure", payload=[1, 2]) from inner


@task_token_guard
def raise_obj(exc: BaseException) -> None:
    raise exc


@task_token_guard
def raise_implicit_context() -> None:
    try:
        1 / 0  # noqa: B018 - raises ZeroDivisionError on purpose
    except ZeroDivisionError:
        raise LookupError("during handling")  # noqa: B904 - the implicit __context__ is what is tested


@task_token_guard
def square(x: int) -> int:
    return x * x


@task_token_guard
def raise_value(i: int) -> None:
    raise ValueError(i)


def _frame_names(exc: BaseException) -> list[str]:
    return [fs.name for fs in traceback.extract_tb(exc.__traceback__)]


# -- the hierarchy ---------------------------------------------------------------------------


def _error_classes() -> set[type[BaseException]]:
    import tokengate._process
    import tokengate.executor  # noqa: F401

    found: set[type[BaseException]] = set()
    todo: list[type[BaseException]] = [TokengateError]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.startswith("tokengate.") and not sub.__name__.startswith("_") and sub not in found:
                found.add(sub)
                todo.append(sub)
    return found


def test_every_error_class_is_exported_and_in_the_readme() -> None:
    import tokengate

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    classes = _error_classes()
    assert {"RemoteError", "UnpicklableError", "WorkerCrashedError"} <= {c.__name__ for c in classes}
    for cls in classes:
        assert getattr(tokengate, cls.__name__, None) is cls, f"tokengate.{cls.__name__} is not exported"
        assert cls.__name__ in tokengate.__all__, f"{cls.__name__} is missing from tokengate.__all__"
        assert f"`{cls.__name__}`" in readme, f"README.md does not list {cls.__name__}"


# -- the task's own exception ----------------------------------------------------------------


def test_result_reraises_same_object(coordinator: OperationsCoordinator) -> None:
    err = CustomError("mine", payload=object())
    tok = raise_obj(err)
    assert tok.exception(timeout=WAIT) is err
    with pytest.raises(CustomError) as info:
        tok.result(timeout=WAIT)
    assert info.value is err
    # and again: the stored object is re-raised every time
    with pytest.raises(CustomError) as info2:
        tok.get(timeout=WAIT)
    assert info2.value is err


def test_cause_chain_preserved(coordinator: OperationsCoordinator) -> None:
    tok = raise_chained()
    exc = tok.exception(timeout=WAIT)
    assert isinstance(exc, CustomError)
    assert exc.payload == [1, 2]
    assert isinstance(exc.__cause__, KeyError)
    assert exc.__cause__.args == ("missing",)
    assert exc.__suppress_context__ is True
    with pytest.raises(CustomError) as info:
        tok.result(timeout=WAIT)
    assert info.value is exc
    assert info.value.__cause__ is exc.__cause__


def test_implicit_context_preserved(coordinator: OperationsCoordinator) -> None:
    exc = raise_implicit_context().exception(timeout=WAIT)
    assert isinstance(exc, LookupError)
    assert isinstance(exc.__context__, ZeroDivisionError)


def test_traceback_includes_task_frame(coordinator: OperationsCoordinator) -> None:
    tok = raise_chained()
    with pytest.raises(CustomError) as info:
        tok.result(timeout=WAIT)
    names = _frame_names(info.value)
    assert "raise_chained" in names, names
    formatted = "".join(traceback.format_exception(info.value))
    assert "raise_chained" in formatted
    assert "outer failure" in formatted
    assert "KeyError" in formatted  # the cause is printed too


def test_await_reraises_same_object(coordinator: OperationsCoordinator) -> None:
    async def main() -> tuple[BaseException, BaseException | None]:
        tok = raise_chained()
        try:
            await tok
        except CustomError as e:
            return e, tok.exception()
        raise AssertionError("await did not raise")

    awaited, stored = asyncio.run(main())
    assert awaited is stored
    assert isinstance(awaited.__cause__, KeyError)
    assert "raise_chained" in _frame_names(awaited)


def test_tokengate_does_not_wrap_task_errors(coordinator: OperationsCoordinator) -> None:
    exc = raise_obj(RuntimeError("plain")).exception(timeout=WAIT)
    assert type(exc) is RuntimeError
    assert not isinstance(exc, TokengateError)


# -- BaseException inside a task ----------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [lambda: SystemExit(3), lambda: KeyboardInterrupt(), lambda: CustomBase("custom"), lambda: GeneratorExit()],
    ids=["SystemExit", "KeyboardInterrupt", "CustomBase", "GeneratorExit"],
)
def test_base_exception_stored_on_token(one_worker: OperationsCoordinator, make: Any) -> None:
    err = make()
    tok = raise_obj(err)
    assert tok.exception(timeout=WAIT) is err
    assert tok.state == "failed"
    with pytest.raises(type(err)) as info:
        tok.result(timeout=WAIT)
    assert info.value is err
    # the single worker survived and keeps working
    toks = [square(i) for i in range(20)]
    assert [t.result(timeout=WAIT) for t in toks] == [i * i for i in range(20)]
    stats = one_worker.get_stats()
    assert stats["pool"]["alive"] == 1
    assert stats["tokens"]["failed"] == 1
    assert stats["tokens"]["completed"] == 20


def test_many_base_exceptions_keep_pool(coordinator: OperationsCoordinator) -> None:
    toks = [raise_obj(SystemExit(i)) for i in range(50)] + [raise_obj(KeyboardInterrupt()) for _ in range(50)]
    for t in toks:
        assert isinstance(t.exception(timeout=WAIT), (SystemExit, KeyboardInterrupt))
    assert coordinator.get_stats()["pool"]["alive"] == 4
    assert square(9).result(timeout=WAIT) == 81


# -- injected Rust panics --------------------------------------------------------------------------


def test_fault_injection_fails_exactly_the_faulted_tokens(coordinator: OperationsCoordinator) -> None:
    _tokengate.set_fault_injection(10)
    try:
        toks = [square(i) for i in range(100)]
        for t in toks:
            t.exception(timeout=WAIT)
    finally:
        _tokengate.set_fault_injection(0)
    panicked = [i for i, t in enumerate(toks) if isinstance(t.exception(), TaskPanicError)]
    completed = [i for i, t in enumerate(toks) if t.state == "completed"]
    assert len(panicked) == 10, panicked
    assert len(completed) == 90
    assert sorted(panicked + completed) == list(range(100))
    for i in completed:
        assert toks[i].result(timeout=0) == i * i
    for i in panicked:
        assert toks[i].state == "failed"
        with pytest.raises(TaskPanicError):
            toks[i].result(timeout=0)
    # the pool keeps working, with every worker alive
    assert [t.result(timeout=WAIT) for t in [square(i) for i in range(100)]] == [i * i for i in range(100)]
    assert coordinator.get_stats()["pool"]["alive"] == 4


def test_fault_injection_disabled_by_zero(coordinator: OperationsCoordinator) -> None:
    _tokengate.set_fault_injection(1)
    _tokengate.set_fault_injection(0)
    toks = [square(i) for i in range(50)]
    assert all(not isinstance(t.exception(timeout=WAIT), TaskPanicError) for t in toks)
    assert {t.state for t in toks} == {"completed"}


def test_fault_injection_every_task_single_worker(one_worker: OperationsCoordinator) -> None:
    _tokengate.set_fault_injection(1)
    try:
        toks = [square(i) for i in range(20)]
        excs = [t.exception(timeout=WAIT) for t in toks]
    finally:
        _tokengate.set_fault_injection(0)
    assert all(isinstance(e, TaskPanicError) for e in excs), excs
    assert square(3).result(timeout=WAIT) == 9
    assert one_worker.get_stats()["pool"]["alive"] == 1


# -- storms -------------------------------------------------------------------------------------------


def test_ten_thousand_raising_tasks(coordinator: OperationsCoordinator) -> None:
    toks = [raise_value(i) for i in range(10_000)]
    for i, t in enumerate(toks):
        exc = t.exception(timeout=WAIT)
        assert isinstance(exc, ValueError) and exc.args == (i,), (i, exc)
    stats = coordinator.get_stats()
    assert stats["tokens"]["failed"] == 10_000
    assert stats["tokens"]["unresolved"] == 0
    assert stats["pool"]["alive"] == 4
    del toks
    assert [t.result(timeout=WAIT) for t in [square(i) for i in range(200)]] == [i * i for i in range(200)]
