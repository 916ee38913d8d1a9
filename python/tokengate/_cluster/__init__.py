"""Cluster lanes: tokens of operations tagged ``cluster: True`` run on a cluster.

``OperationsCoordinator(cluster=...)`` names the cluster (see :mod:`.connect`):
Dask (a ``distributed.Client``, ``"dask://HOST:PORT"``, ``"dask-local"``,
``"dask-local:N"``) or Ray (``"ray"``, ``"ray://HOST:PORT"``, ``"ray-local"``,
``"ray-local:N"``).

A cluster lane is an outside lane of the engine (see
:class:`~tokengate._tokengate.OutsideLane`): the engine keeps the queue and
does admission, per-operation limits, pauses, deadlines, retries and tokens
as arguments; the lane sends what the cluster has threads for, in priority
order, and reports how each token ended.

* :mod:`.function`: the decorated function (``ClusterFunction``) and what a
  cluster worker runs (``RemoteCall``).
* :mod:`.connect`: parsing ``cluster=`` and connecting.
* :mod:`.lane`: what every cluster lane shares (the dispatcher, room, links, stopping).
* :mod:`.dask_lane`: the Dask lane.
* :mod:`.ray_lane`: the Ray lane.
"""

from __future__ import annotations

from .connect import check_cluster
from .function import ClusterFunction, cluster_wrapper, lane_for

__all__ = ["ClusterFunction", "check_cluster", "cluster_wrapper", "lane_for"]
