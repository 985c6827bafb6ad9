"""Crash drill: ``kill -9`` of ``lungnode serve`` at random points, then a restart.

One node (a real ``lungnode serve`` in its own process group) receives series from
this test's SCU and sends its results to Orthanc. A control series goes through
without a crash first: it gives the result objects one series makes (SC, PDF, SR)
and how long analysis and sending take. Then each trial sends one more series (the
same pixels, new UIDs) and SIGKILLs the node's whole process group in one phase,
chosen in turn in a seeded random order, after a seeded random delay:

- ``intake``: after the k-th acknowledged instance (k random), plus a delay;
- ``analysis``: once the series' job is ``running``, plus a delay within the
  control's analysis time;
- ``sending``: once the job's deliveries exist, plus a delay within the control's
  sending time.

The node restarts on the same storage and database (the next trial runs on it),
the sender resends what had no answer, and the trial checks:

- no acknowledged instance lost: each is on disk (checked before the restart) and
  in the database;
- every job done exactly once: one job for the series, done, version 1, and one
  prediction;
- no duplicates in Orthanc: the series' results in Orthanc are exactly its
  deliveries, and as many SC, PDF and SR objects as the control's.

``LUNGNODE_DRILL_SEED`` chooses the seed (the report prints it); 3 trials in a
test run, 21 with ``LUNGNODE_DRILLS=long``.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset

from tests.conftest import Databases, require_tool
from tests.dicom.helpers import (
    associate,
    close_dropped,
    free_port,
    store_all,
    store_or_none,
    wait_until,
)
from tests.drills.conftest import LONG, Drill
from tests.drills.results_node import SeriesFacts, kinds_text, results_node, series_facts
from tests.pacs import Orthanc
from tests.serve import ServedNode
from tests.support.synthetic import make_ct_series

SEED = int(os.environ.get("LUNGNODE_DRILL_SEED", "20261201"))
PHASES = ("intake", "analysis", "sending")
N_SLICES = 12
#: Long enough for a sender to resend after a restart; complete series use the grace.
QUIET_SECONDS = 8.0
#: A restart, analysis and delivery of one small series, on a loaded machine.
RECOVERY_TIMEOUT = 180.0


def _series() -> list[Dataset]:
    """The same phantom every time (the same analysis, the same result objects)."""
    return make_ct_series(N_SLICES, rows=128, columns=128, seed=7)


@dataclass
class Trial:
    number: int
    phase: str
    delay: float
    detail: str = ""
    acked: int = 0
    found: int = 0
    jobs: str = ""
    objects: str = ""
    landed: str = ""
    seconds: float = 0.0
    outcome: str = "ok"

    def row(self) -> str:
        cells = [
            str(self.number),
            f"{SEED}/{self.number}",
            self.phase + (f" ({self.detail})" if self.detail else ""),
            f"{self.delay:.3f}",
            f"{self.acked}/{N_SLICES}",
            str(self.found),
            self.jobs,
            self.objects,
            self.landed,
            f"{self.seconds:.0f}",
            self.outcome,
        ]
        return "| " + " | ".join(cells) + " |"


HEADER = (
    "| trial | seed | phase | delay s | instances acked | instances found | jobs "
    "| objects in Orthanc | kill landed | s | outcome |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


class CrashDrill:
    def __init__(self, node: ServedNode, orthanc: Orthanc) -> None:
        self.node = node
        self.orthanc = orthanc
        self.expected: Counter[str] = Counter()
        self.analysis_seconds = 1.0
        self.sending_seconds = 0.2

    def facts(self, datasets: list[Dataset], *, orthanc: bool = False) -> SeriesFacts:
        """The series in the node's database (and in Orthanc)."""
        first = datasets[0]
        return series_facts(
            self.node,
            str(first.StudyInstanceUID),
            str(first.SeriesInstanceUID),
            self.orthanc if orthanc else None,
        )

    def wait_done(self, datasets: list[Dataset], timeout: float = RECOVERY_TIMEOUT) -> bool:
        return wait_until(lambda: self.facts(datasets).done, timeout=timeout, step=0.2)

    # -- the control --------------------------------------------------------------

    def control(self) -> Counter[str]:
        """A series without a crash: the objects it makes, and how long each phase runs."""
        datasets = _series()
        self.node.wait_model_ready()
        assert store_all(self.node.dicom_port, datasets) == [0] * N_SLICES
        assert wait_until(lambda: self._job_state(datasets) == "running", timeout=120, step=0.02)
        running = time.monotonic()
        assert wait_until(lambda: self._deliveries(datasets) > 0, timeout=120, step=0.02), (
            self.node.log_text()
        )
        recorded = time.monotonic()
        assert self.wait_done(datasets), self.node.log_text()
        self.analysis_seconds = recorded - running
        self.sending_seconds = max(time.monotonic() - recorded, 0.05)
        facts = self.facts(datasets, orthanc=True)
        assert facts.jobs == [("done", 1)] and facts.predictions == 1
        self.expected = facts.delivered_kinds()
        assert self.expected["PDF"] == 1 and self.expected["SR"] == 1 and self.expected["SC"] >= 1
        assert set(facts.in_orthanc) == {uid for _, uid, _ in facts.deliveries}
        return self.expected

    def _job_state(self, datasets: list[Dataset]) -> str | None:
        jobs = self.facts_jobs(datasets)
        return jobs[0] if jobs else None

    def facts_jobs(self, datasets: list[Dataset]) -> list[str]:
        return [
            str(state)
            for (state,) in self.node.query(
                "SELECT job.state FROM job JOIN series ON series.id = job.series_id "
                "WHERE series.series_instance_uid = :uid ORDER BY job.id",
                uid=str(datasets[0].SeriesInstanceUID),
            )
        ]

    def _deliveries(self, datasets: list[Dataset]) -> int:
        return int(
            self.node.query(
                "SELECT COUNT(*) FROM delivery JOIN job ON job.id = delivery.job_id "
                "JOIN series ON series.id = job.series_id "
                "WHERE series.series_instance_uid = :uid",
                uid=str(datasets[0].SeriesInstanceUID),
            )[0][0]
        )

    # -- one trial ----------------------------------------------------------------

    def run(self, trial: Trial, rng: random.Random) -> None:
        started = time.monotonic()
        datasets = _series()
        acked: list[str] = []
        cut = False
        if trial.phase == "intake":
            k = rng.randint(1, N_SLICES - 1)
            trial.detail = f"k={k}"
            acked, cut = self._kill_during_intake(datasets, k, trial.delay)
        else:
            if trial.phase == "analysis":  # killed while it computes, not while it waits
                self.node.wait_model_ready()
            assert store_all(self.node.dicom_port, datasets) == [0] * N_SLICES
            acked = [str(ds.SOPInstanceUID) for ds in datasets]
            if trial.phase == "analysis":
                assert wait_until(
                    lambda: self._job_state(datasets) == "running", timeout=120, step=0.01
                ), self.node.log_text()
            else:
                assert wait_until(lambda: self._deliveries(datasets) > 0, timeout=120, step=0.01), (
                    self.node.log_text()
                )
            time.sleep(trial.delay)
            self.node.kill()
        trial.acked = len(acked)
        trial.landed = self._landed(datasets, cut)

        problems = self._check_on_disk(datasets, acked)
        self.node.start()
        # The sender sends again what had no answer.
        unanswered = [ds for ds in datasets if str(ds.SOPInstanceUID) not in set(acked)]
        if unanswered:
            statuses = store_all(self.node.dicom_port, unanswered)
            if statuses != [0] * len(unanswered):
                problems.append(f"resend answered {statuses}")
        if not self.wait_done(datasets):
            problems.append("not done in time")
        problems += self._check_after(datasets, acked, trial)
        trial.seconds = time.monotonic() - started
        if problems:
            trial.outcome = "FAILED: " + "; ".join(problems)

    def _kill_during_intake(
        self, datasets: list[Dataset], k: int, delay: float
    ) -> tuple[list[str], bool]:
        """Send the series; SIGKILL ``delay`` s after the ``k``-th acknowledgement.
        Returns the acknowledged instances, and whether the association was cut."""
        pid = self.node.pid
        killer = threading.Timer(delay, lambda: os.killpg(pid, signal.SIGKILL))
        contexts = sorted(
            {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}
        )
        assoc = associate(self.node.dicom_port, contexts)
        assert assoc.is_established
        acked: list[str] = []
        cut = armed = False
        for ds in datasets:
            response = store_or_none(assoc, ds)
            if response is None:
                cut = True  # the node died (or the answer was lost): no answer
                break
            if int(response.Status) == 0x0000:
                acked.append(str(ds.SOPInstanceUID))
            if len(acked) == k and not armed:
                killer.start()
                armed = True
        if assoc.is_established:
            assoc.release()  # may meet the kill half-way: then no release is confirmed
        if not assoc.is_released:
            close_dropped(assoc)
        if armed:
            killer.join()
        self.node.kill()  # if the timer did not (the answer to k was lost), now
        return acked, cut

    def _landed(self, datasets: list[Dataset], cut: bool) -> str:
        """Where the kill landed, from what the database kept."""
        facts = self.facts(datasets)
        jobs = [state for state, _ in facts.jobs]
        if not jobs:
            return f"receiving, {len(facts.instances)} recorded" + (", cut" if cut else "")
        if jobs == ["done"]:
            recorded = sum(state == "done" for state, _, _ in facts.deliveries)
            held = len(self.facts(datasets, orthanc=True).in_orthanc)
            return f"job done, {recorded}/{len(facts.deliveries)} recorded sent, {held} in Orthanc"
        return "job " + ", ".join(jobs)

    def _check_on_disk(self, datasets: list[Dataset], acked: list[str]) -> list[str]:
        """Acknowledged means on disk, complete, where its UIDs say (before any restart)."""
        first = datasets[0]
        folder = self.node.storage / "incoming" / first.StudyInstanceUID / first.SeriesInstanceUID
        problems = []
        for uid in acked:
            path = folder / f"{uid}.dcm"
            if not path.is_file():
                problems.append(f"acknowledged {uid} not on disk")
            elif pydicom.dcmread(path).SOPInstanceUID != uid:
                problems.append(f"{path.name} holds another instance")
        return problems

    def _check_after(self, datasets: list[Dataset], acked: list[str], trial: Trial) -> list[str]:
        facts = self.facts(datasets, orthanc=True)
        trial.found = len(facts.instances)
        trial.jobs = ", ".join(f"{state} v{version}" for state, version in facts.jobs)
        delivered = facts.delivered_kinds()
        trial.objects = kinds_text(delivered)
        problems = []
        if lost := set(acked) - facts.instances:
            problems.append(f"{len(lost)} acknowledged instance(s) not in the database")
        if len(facts.instances) != N_SLICES:
            problems.append(f"{len(facts.instances)} instances recorded")
        if facts.jobs != [("done", 1)]:
            problems.append(f"jobs {facts.jobs}")
        if facts.predictions != 1:
            problems.append(f"{facts.predictions} predictions")
        uids = [uid for _, uid, _ in facts.deliveries]
        if len(uids) != len(set(uids)):
            problems.append("a result object queued twice")
        if set(facts.in_orthanc) != set(uids):
            problems.append("Orthanc holds other objects than the deliveries")
        if delivered != self.expected:
            problems.append(f"Orthanc holds {kinds_text(delivered)}")
        return problems


@pytest.mark.drill
@pytest.mark.slow
@pytest.mark.timeout(3600 if LONG else 600)
@pytest.mark.sqlite_only(
    "what survives kill -9 is the node's own files and SQLite's WAL; a PostgreSQL server "
    "is not killed. The e2e crash tests run on both backends."
)
def test_crash_drill(
    drill: Drill,
    serve_node: Callable[..., ServedNode],
    databases: Databases,
    tmp_path: Path,
) -> None:
    orthanc = Orthanc(require_tool("Orthanc"), tmp_path / "orthanc", {}, dicom_port=free_port())
    node = results_node(
        serve_node,
        tmp_path / "storage",
        databases,
        orthanc.dicom_port,
        # One receiving process: a cold restart is the node process and TensorFlow alone.
        ingest_processes="1",
        workers="1",
        series_quiet_seconds=str(QUIET_SECONDS),
    )
    orthanc.start()
    try:
        node.start()
        crash = CrashDrill(node, orthanc)
        expected = crash.control()
        n_trials = drill.size(3, 21)
        phases: list[str] = []
        order = random.Random(SEED)
        while len(phases) < n_trials:  # every phase once in each round, in a random order
            phases += order.sample(PHASES, len(PHASES))
        trials = []
        for number, phase in enumerate(phases[:n_trials], start=1):
            rng = random.Random(f"{SEED}/{number}")
            window = {
                "intake": 0.1,
                "analysis": crash.analysis_seconds,
                "sending": crash.sending_seconds,
            }[phase]
            trial = Trial(number, phase, rng.uniform(0.0, window))
            trials.append(trial)
            crash.run(trial, rng)
            if trial.outcome != "ok":
                break
        # Every series of the drill, the control's included: analysed exactly once.
        jobs_per_series = node.query(
            "SELECT series.series_instance_uid, COUNT(job.id) FROM series "
            "LEFT JOIN job ON job.series_id = series.id GROUP BY series.series_instance_uid"
        )
        predictions = node.query("SELECT COUNT(*) FROM prediction")[0][0]
    finally:
        node.close()
        orthanc.stop()

    table = "\n".join([HEADER, *(trial.row() for trial in trials)])
    summary = (
        f"Seed {SEED} (`LUNGNODE_DRILL_SEED`); {len(trials)} trial(s) after a control series "
        f"without a crash ({kinds_text(expected)}; analysis {crash.analysis_seconds:.1f} s, "
        f"sending {crash.sending_seconds:.2f} s); {N_SLICES} slices of 128 x 128 per series. "
        f"Phases: {dict(Counter(t.phase for t in trials))}.\n\n"
    )
    drill.report("crash", summary + table)
    failed = [trial for trial in trials if trial.outcome != "ok"]
    assert not failed, f"{table}\n\n{node.logs()[-20000:]}"
    assert len(trials) == n_trials
    assert sorted(count for _, count in jobs_per_series) == [1] * (n_trials + 1), jobs_per_series
    assert predictions == n_trials + 1
