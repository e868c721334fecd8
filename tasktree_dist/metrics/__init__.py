"""Prometheus metrics of the fleet: what every worker and coordinator process counts, and the hooks that count it.

Importing this package installs its hooks as the process's `core.instruments` (the lower layers report events
there without importing this package); `server.start_metrics_server` serves this process's registry on
TASKTREE_METRICS_PORT (0: off). `definitions` names every metric in one place.
"""

from ..core.instruments import install as _install
from .hooks import (
    PrometheusInstruments,
    broker_error,
    llm_call,
    record_limiter_wait,
    record_rate_limited,
    redis_error,
    run_state,
    track_dispatcher,
    unit_finished,
    unit_lost,
    unit_started,
    units_sent,
)
from .server import metrics_address, parse_port_spec, start_metrics_server

_install(PrometheusInstruments())

__all__ = [
    "PrometheusInstruments",
    "broker_error",
    "llm_call",
    "metrics_address",
    "parse_port_spec",
    "record_limiter_wait",
    "record_rate_limited",
    "redis_error",
    "run_state",
    "start_metrics_server",
    "track_dispatcher",
    "unit_finished",
    "unit_lost",
    "unit_started",
    "units_sent",
]
