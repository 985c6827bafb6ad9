"""``GET /metrics`` in the Prometheus text format.

Two kinds of series:
- counts read from the database at each scrape (instances received, series
  by state and completed, jobs and deliveries by state, jobs waiting to be
  retried, predictions by source), so every process sharing the database
  reports the same numbers;
- histograms observed in this process (:class:`Metrics`): HTTP request
  durations, and analysis stage latencies (decode, preprocess, inference,
  aggregate, gradcam, total) of every analysis run in it.

Unauthenticated, like ``/health``: the numbers carry no patient data.
Under gunicorn with several workers, prometheus-client's multiprocess mode
(a folder of memory-mapped files every worker writes its histograms into,
``PROMETHEUS_MULTIPROC_DIR``) lets any worker serve the sums over all of
them; ``lungnode.app`` sets it up before prometheus-client is imported.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from apiflask import APIBlueprint
from flask import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client import values as prometheus_values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from lungnode.api import context
from lungnode.db.models import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Prediction,
    Series,
    SeriesState,
)
from lungnode.db.session import read_sessions

metrics_blueprint = APIBlueprint("metrics", __name__, tag="health")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """The histograms a process observes, in their own registry.

    One instance per process: ``lungnode.app`` builds it and hands it to the
    API (``create_app(metrics=...)``) and to the series job, so the analyses
    and requests of one process land in one place. An app built without one
    gets its own (tests, tools).

    ``multiprocess_dir``: prometheus-client's multiprocess folder, when several
    processes serve (gunicorn workers). The histograms then live in files
    there, and :meth:`exposition` reads every process's files. The mode is
    fixed when prometheus-client is imported (from ``PROMETHEUS_MULTIPROC_DIR``),
    so a folder given here must be the one that variable named then.
    """

    def __init__(self, multiprocess_dir: str | Path | None = None) -> None:
        multiprocess = prometheus_values.ValueClass is not prometheus_values.MutexValue
        if multiprocess_dir and not multiprocess:
            raise RuntimeError(
                "prometheus-client was imported before PROMETHEUS_MULTIPROC_DIR was set: "
                "its histograms would stay per process"
            )
        self.multiprocess_dir = Path(multiprocess_dir) if multiprocess_dir else None
        self.registry = CollectorRegistry(auto_describe=True)
        self.stage_seconds = Histogram(
            "lungnode_stage_seconds",
            "Analysis stage latency",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.http_seconds = Histogram(
            "lungnode_http_request_duration_seconds",
            "HTTP request duration by route",
            ["method", "route", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prediction_seconds = Histogram(
            "lungnode_prediction_seconds",
            "Wall time of one API prediction (decode, analysis, heatmaps, database)",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe_stages(self, timings_s: Mapping[str, float]) -> None:
        """Record an analysis's per-stage timings (``AnalysisResult.timings_s``)."""
        for stage, seconds in timings_s.items():
            self.stage_seconds.labels(stage=stage).observe(float(seconds))

    def observe_analysis(self, timings_s: Mapping[str, float], wall_s: float) -> None:
        self.observe_stages(timings_s)
        self.prediction_seconds.observe(wall_s)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http_seconds.labels(method, route, str(status)).observe(seconds)

    def exposition(self) -> CollectorRegistry:
        """What ``/metrics`` shows: this process's histograms, or with a multiprocess
        folder those of every process writing there, summed."""
        if self.multiprocess_dir is None:
            return self.registry
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.multiprocess_dir))  # type: ignore[no-untyped-call]
        return registry


class DatabaseCollector(Collector):
    """Counts read from the database at scrape time."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[Any]:
        with self.sessions() as session:
            instances = session.scalar(select(func.count()).select_from(Instance)) or 0
            series = dict(
                session.execute(select(Series.state, func.count()).group_by(Series.state)).all()
            )
            completed = session.scalar(
                select(func.count()).select_from(Series).where(Series.completed_at.is_not(None))
            )
            jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            retrying = session.scalar(
                select(func.count())
                .select_from(Job)
                .where(Job.state == JobState.QUEUED.value, Job.last_error.is_not(None))
            )
            deliveries = dict(
                session.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all()
            )
            predictions = dict(
                session.execute(
                    select(Prediction.source, func.count()).group_by(Prediction.source)
                ).all()
            )
        yield CounterMetricFamily(
            "lungnode_instances_received", "DICOM instances received and stored", int(instances)
        )
        yield CounterMetricFamily(
            "lungnode_series_completed", "Series found complete", int(completed or 0)
        )
        yield _by_label(
            "lungnode_series", "Series by state", "state", series, [s.value for s in SeriesState]
        )
        yield _by_label(
            "lungnode_jobs", "Jobs by state", "state", jobs, [s.value for s in JobState]
        )
        yield GaugeMetricFamily(
            "lungnode_jobs_retrying",
            "Queued jobs waiting to run again after a failed attempt",
            value=int(retrying or 0),
        )
        yield _by_label(
            "lungnode_deliveries",
            "Deliveries by state",
            "state",
            deliveries,
            [s.value for s in DeliveryState],
        )
        yield _by_label(
            "lungnode_predictions",
            "Predictions by source",
            "source",
            predictions,
            ["upload", "dicom"],
        )


def _by_label(
    name: str, documentation: str, label: str, counts: Mapping[Any, Any], known: list[str]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for value in sorted({*known, *(str(k) for k in counts)}):
        family.add_metric([value], int(counts.get(value, 0)))
    return family


@metrics_blueprint.get("/metrics")
@metrics_blueprint.doc(
    responses={  # type: ignore[arg-type]  # APIFlask accepts this shape
        200: {"description": "Prometheus text format", "content": {"text/plain": {}}}
    }
)
def metrics() -> Response:
    """Counters, gauges and latency histograms for Prometheus."""
    scrape = CollectorRegistry(auto_describe=False)
    scrape.register(DatabaseCollector(read_sessions(context.sessions())))
    body = generate_latest(scrape) + generate_latest(context.metrics().exposition())
    return Response(body, content_type=CONTENT_TYPE_LATEST)
