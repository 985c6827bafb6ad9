"""The process's metrics registry.

One :class:`~lungnode.api.metrics.Metrics` per process: the API's request and
prediction histograms and the series job's stage timings land in it, and
``GET /api/v1/metrics`` serves it next to the counts read from the database.
Under gunicorn with several workers, their histograms are summed through
prometheus-client's multiprocess folder (:mod:`lungnode.app.metrics_dir`
exports it before this module is imported).
"""

from __future__ import annotations

import os

from lungnode.api.metrics import Metrics
from lungnode.app.metrics_dir import ENV

PROCESS_METRICS = Metrics(multiprocess_dir=os.environ.get(ENV))
