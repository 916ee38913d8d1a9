"""Prometheus metrics of running coordinators, kept in Rust and rendered on demand.

Counters and histograms are written on the token paths by the engine (no Python runs per
token); reading them costs one pass over the operations. Families (every sample carries
``pool``, the engine's id, and the per-operation ones ``operation``):

* ``tokengate_tokens_submitted_total``, ``tokengate_tokens_completed_total{outcome}``
  (``ok``, ``error``, ``cancelled``, ``killed``, ``timeout``), ``tokengate_tokens_rejected_total{reason}``
  (``operation_limit``, ``max_pending``, ``blocked``);
* histograms ``tokengate_queue_wait_seconds`` (creation to start, buckets up to 30 minutes) and
  ``tokengate_execution_seconds`` (each run of the body: a retried token runs more than once);
* gauges ``tokengate_operation_paused``, ``tokengate_operation_blocked``,
  ``tokengate_operation_health{class}``, ``tokengate_tokens_queued``, ``tokengate_tokens_running``,
  ``tokengate_tokens_blocked``, ``tokengate_admission_paused``, ``tokengate_workers{lane}``.

Tokens of the process lane are counted in the parent, where they resolve.

>>> from tokengate import OperationsCoordinator, metrics
>>> with OperationsCoordinator() as c:
...     text = metrics.generate_latest(c)
>>> text.startswith(b"# HELP tokengate_")
True
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from . import _tokengate

if TYPE_CHECKING:
    from ._coordinator import OperationsCoordinator

__all__ = ["CONTENT_TYPE_LATEST", "TokengateCollector", "generate_latest"]

#: The ``Content-Type`` of :func:`generate_latest`'s text (Prometheus text format 0.0.4).
CONTENT_TYPE_LATEST = "text/plain; version=0.0.4; charset=utf-8"


def _engines(coordinator: OperationsCoordinator | None) -> list[_tokengate.Engine] | None:
    if coordinator is None:
        return None  # every running engine of the process
    engine = coordinator._engine
    return [] if engine is None else [engine]


def generate_latest(coordinator: OperationsCoordinator | None = None) -> bytes:
    """The metrics of ``coordinator`` (default: of every running coordinator and Executor of this
    process) in the Prometheus text format, as ``prometheus_client.generate_latest`` gives them."""
    return _tokengate.render_metrics(_engines(coordinator)).encode()


class TokengateCollector:
    """A ``prometheus_client`` collector, for applications that already export a registry::

        from prometheus_client import REGISTRY
        REGISTRY.register(tokengate.metrics.TokengateCollector())

    It reads the same text as :func:`generate_latest` (through ``prometheus_client``'s own
    parser) at each scrape. ``prometheus_client`` is needed only to use this class."""

    def __init__(self, coordinator: OperationsCoordinator | None = None) -> None:
        self._coordinator = coordinator

    def collect(self) -> Iterator[Any]:
        from prometheus_client.parser import text_string_to_metric_families

        yield from text_string_to_metric_families(generate_latest(self._coordinator).decode())

    def describe(self) -> list[Any]:
        # Nothing up front: the operations are known only once they are used.
        return []
