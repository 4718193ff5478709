"""A replica's fire-and-forget Ray calls (metrics, cancellations), sent from one thread of their own.

They leave from this thread, not from the request's task: when a client disconnects, Serve
cancels that task, and Ray would cancel the calls it submitted too.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import ray

from dovetail.serve.metrics import metrics_actor

log = logging.getLogger("dovetail.serve")

_METRICS = None
_SIDE_CALLS = ThreadPoolExecutor(1, thread_name_prefix="dovetail-side-calls")


_UNSETTLED: list = []  # this replica's metric calls not yet known to have landed (touched by the side thread only)


def side_call(fn, *args) -> None:
    _SIDE_CALLS.submit(fn, *args)


def record(fn, *args) -> None:
    """A fire-and-forget metrics call that a later /metrics on this replica is sure to see."""
    def send():
        _UNSETTLED.append(fn(*args))
        if len(_UNSETTLED) > 64:
            _, _UNSETTLED[:] = ray.wait(_UNSETTLED, num_returns=len(_UNSETTLED), timeout=0)
    side_call(send)


def settle_metrics(timeout_s: float = 5.0):
    """Wait (in the side thread, after every call queued before it) until this replica's metrics landed."""
    def settle():
        if _UNSETTLED:
            ray.wait(_UNSETTLED, num_returns=len(_UNSETTLED), timeout=timeout_s)
            _UNSETTLED.clear()
    return asyncio.wrap_future(_SIDE_CALLS.submit(settle))


def metrics():
    global _METRICS
    if _METRICS is None:
        _METRICS = metrics_actor()
    return _METRICS


def count_error(status: int) -> None:
    try:
        record(metrics().record_error.remote, status)
    except Exception:  # metrics must never turn an answer into a failure
        log.warning("could not record an error metric", exc_info=True)
