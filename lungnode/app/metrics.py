"""The process's metrics registry.

One :class:`~lungnode.api.metrics.Metrics` per process: the API's request and
prediction histograms and the series job's stage timings land in it, and
``GET /api/v1/metrics`` serves it next to the counts read from the database.
Under gunicorn with several workers each worker keeps its own.
"""

from __future__ import annotations

from lungnode.api.metrics import Metrics

PROCESS_METRICS = Metrics()
