"""One queued series in, results recorded and queued for delivery: the job handler.

The stages: load the series (``dicom.decode``), check it is analysable, run
the analysis (``pipeline.analyze``), write the Secondary Capture heatmaps, the
PDF report (also saved for the API), the Encapsulated PDF and the SR, then
record the prediction, the deliveries and the job's completion in one
transaction (``db.results``). A series that cannot be analysed still gets a
PDF and an SR that say why, so the radiologist is never left wondering.

Files are written atomically and named by their deterministic UIDs, so a job
re-run after a crash overwrites identical files and queues no duplicates. The
outputs of one attempt are written all or none (``dicom.intake.write_all_atomically``):
a full disk leaves none of them, and the job waits for space (:class:`StorageFull`,
``pipeline.jobs``). It remembers how much room its outputs took, and until the storage
has that much free again, its next attempt waits without running the analysis.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from sqlalchemy.orm import Session, sessionmaker

from lungnode.config import Settings
from lungnode.db.results import (
    JobInputs,
    JobResults,
    ResultObject,
    job_inputs,
    next_job_inputs,
    record_job_results,
)
from lungnode.dicom.intake import write_all_atomically
from lungnode.domain import AnalysisResult, HUVolume, PreviousVersion
from lungnode.errors import DecodeError, LungnodeError, StorageFull, storage_full
from lungnode.ml.bundle import ModelBundle, load_bundle
from lungnode.pipeline.outputs import (
    OutputOptions,
    dataset_bytes,
    render_results,
)
from lungnode.pipeline.prescore import FileKey, SliceScores, analyze_prescored, file_key

logger = logging.getLogger(__name__)

#: |normal · z| below this means the slices are not axial (tilted gantry passes):
#: more than about 26 degrees between the slice normal and the patient's z axis.
_AXIAL_MIN_COSINE = 0.9


class NotAnalysable(LungnodeError):
    """The series is not something the model can judge; the reason is for people."""


def check_analysable(volume: HUVolume, min_slices: int) -> None:
    """Raise NotAnalysable unless the series is an axial stack of enough slices.

    Axial is judged on ``volume.slice_normal``: the unit normal decoding
    sorted the volume along (``imaging.geometry.slice_stack``, PS3.3
    C.7.6.2.1.1), wherever the orientation was (top level, shared or
    per-frame functional groups). A volume without orientation is not refused.
    """
    count = volume.hu.shape[0]
    if count < min_slices:
        raise NotAnalysable(f"only {count} slice(s); at least {min_slices} are needed")
    normal = volume.slice_normal
    if normal is not None and abs(normal[2]) < _AXIAL_MIN_COSINE:
        raise NotAnalysable("the slices are not axial")


#: Prepared results kept at most (a few MB each: the encoded objects).
_MAX_PREPARED = 4
#: How long a job waits for the preparation of its series under way.
_PREPARE_WAIT_SECONDS = 120.0

#: What a job's results depend on: series, version, predecessor, and each file as
#: (path, size, modification time).
_InputsKey = tuple[str, int, PreviousVersion | None, tuple[FileKey, ...]]


def _inputs_key(inputs: JobInputs) -> _InputsKey | None:
    keys = [file_key(path) for path in inputs.instance_paths]
    if any(key is None for key in keys):
        return None
    return (
        inputs.series_instance_uid,
        inputs.version,
        inputs.previous,
        tuple(key for key in keys if key is not None),
    )


@dataclass(frozen=True)
class _Encoded:
    """A job's outputs as the bytes of their files (what ``_write_outputs`` writes)."""

    #: The key-slice pictures as PNG, for the API.
    pictures: list[bytes]
    pdf: bytes
    #: (kind, dataset, the dataset as a DICOM file) in sending order.
    datasets: list[tuple[str, Dataset, bytes]]


@dataclass(frozen=True)
class _Prepared:
    key: _InputsKey
    result: AnalysisResult
    encoded: _Encoded


class SeriesJob:
    """The job handler of the embedded node (and of Celery workers)."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        destinations_for: Callable[[str | None], list[str]],
        on_recorded: Callable[[], None] = lambda: None,
        on_stage_timings: Callable[[Mapping[str, float]], None] = lambda _timings: None,
        bundle: Callable[[], ModelBundle] | None = None,
        slice_scores: SliceScores | None = None,
    ) -> None:
        """``on_recorded`` runs after a job's results are recorded (wakes the outbox);
        ``on_stage_timings`` receives each analysis's stage timings (the metrics);
        ``slice_scores`` holds slices scored while their series arrived
        (``pipeline.prescore``), which the job then neither decodes nor scores;
        ``bundle`` hands out the model (the node's warmed one, waiting while it
        warms); without it the first job loads the bundle."""
        self.settings = settings
        self.sessions = sessions
        self.destinations_for = destinations_for
        self.on_recorded = on_recorded
        self.on_stage_timings = on_stage_timings
        self._bundle: ModelBundle | None = None
        self._bundle_lock = threading.Lock()
        self._provided_bundle = bundle
        self.slice_scores = slice_scores
        #: Results prepared while a series' grace ran, by Series Instance UID.
        self._prepared: dict[str, _Prepared] = {}
        self._preparing: dict[str, threading.Event] = {}
        self._prepared_lock = threading.Lock()
        self.output_options = OutputOptions.from_settings(settings)
        #: Bytes the outputs of a job waiting for space took: its next attempt runs
        #: only when that much is free (an optimisation: a restart forgets it).
        self._room_needed: dict[int, int] = {}
        self._room_lock = threading.Lock()

    @property
    def bundle(self) -> ModelBundle:
        if self._provided_bundle is not None:
            return self._provided_bundle()
        with self._bundle_lock:
            if self._bundle is None:
                self._bundle = load_bundle(
                    self.settings.model,
                    self.settings.models_dir,
                    trust_pickle=self.settings.trust_pickle,
                )
            return self._bundle

    def __call__(self, job_id: int) -> dict[str, Any] | None:
        self._check_room(job_id)
        try:
            details = self._run(job_id)
        except Exception as exc:
            if storage_full(exc):
                self._remember_room(job_id, exc)
            raise
        with self._room_lock:
            self._room_needed.pop(job_id, None)
        return details

    def prepare(self, series_id: int) -> bool:
        """Analyse and render the series now, for the job its completion will queue.

        Called while the series waits out its grace (``pipeline.completion``): the
        job then only writes, records and sends what was prepared, if its inputs
        are still exactly these (same version, predecessor, files, sizes and
        modification times). A late instance changes them, and the job analyses
        afresh; nothing prepared is ever written or sent on its own. Returns
        whether results are prepared; a failure is left to the job.
        """
        inputs = next_job_inputs(self.sessions, series_id, self.settings.storage_dir)
        if inputs is None or not inputs.instance_paths:
            return False
        key = _inputs_key(inputs)
        if key is None:
            return False
        uid = inputs.series_instance_uid
        with self._prepared_lock:
            held = self._prepared.get(uid)
            if (held is not None and held.key == key) or uid in self._preparing:
                return held is not None
            done = self._preparing[uid] = threading.Event()
        try:
            started = time.perf_counter()
            source = dcmread(inputs.instance_paths[0], stop_before_pixels=True)
            volume, result = self._analyse(source, inputs.instance_paths, self.bundle, report=False)
            encoded = self._render(inputs, source, volume, result)
            with self._prepared_lock:
                self._prepared[uid] = _Prepared(key, result, encoded)
                while len(self._prepared) > _MAX_PREPARED:
                    self._prepared.pop(next(iter(self._prepared)))
            logger.info(
                "series %d prepared in %.2f s, while its grace runs",
                series_id,
                time.perf_counter() - started,
            )
            return True
        except Exception as exc:
            logger.warning("series %d not prepared (its job will analyse it): %s", series_id, exc)
            return False
        finally:
            with self._prepared_lock:
                self._preparing.pop(uid, None)
            done.set()

    def is_prepared(self, series_instance_uid: str) -> bool:
        """Whether results of the series are prepared and not yet taken by its job."""
        with self._prepared_lock:
            return series_instance_uid in self._prepared

    def _take_prepared(self, inputs: JobInputs) -> _Prepared | None:
        """What ``prepare`` made for these inputs, waiting for it if it is under way."""
        uid = inputs.series_instance_uid
        with self._prepared_lock:
            underway = self._preparing.get(uid)
        if underway is not None:
            underway.wait(_PREPARE_WAIT_SECONDS)
        with self._prepared_lock:
            prepared = self._prepared.pop(uid, None)
        if prepared is None or prepared.key != _inputs_key(inputs):
            return None
        return prepared

    def _check_room(self, job_id: int) -> None:
        """A job that waited for space waits on, without analysing, while less is free
        than its outputs took last time."""
        with self._room_lock:
            needed = self._room_needed.get(job_id)
        if needed is None:
            return
        free = shutil.disk_usage(self.settings.storage_dir).free
        if free < needed:
            raise StorageFull(
                f"storage full: {_mib(free)} free, the results need {_mib(needed)}", needed
            )

    def _remember_room(self, job_id: int, exc: BaseException) -> None:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, StorageFull):
            cause = cause.__cause__
        if cause is not None and cause.needed_bytes is not None:
            with self._room_lock:
                self._room_needed[job_id] = cause.needed_bytes

    def _run(self, job_id: int) -> dict[str, Any] | None:
        started = time.perf_counter()
        inputs = job_inputs(self.sessions, job_id, self.settings.storage_dir)
        paths = [Path(p) for p in inputs.instance_paths]
        if not paths:
            raise NotAnalysable("the series has no stored instance")
        missing = [p for p in paths if not p.is_file()]
        if missing:
            # Received and acknowledged, so ours to keep: storage (a shared volume not
            # mounted) is at fault, not the series. Failing the attempt retries it.
            raise FileNotFoundError(f"{len(missing)} stored instance file(s) missing")
        prepared = self._take_prepared(inputs)
        if prepared is not None:
            result, encoded = prepared.result, prepared.encoded
            self.on_stage_timings(result.timings_s)
        else:
            source = dcmread(paths[0], stop_before_pixels=True)
            volume, result = self._analyse(source, paths, self.bundle)
            encoded = self._render(inputs, source, volume, result)
        results = self._write_outputs(inputs, encoded, result)
        results.processing_time = time.perf_counter() - started
        results.details["timings_s"]["job"] = results.processing_time
        results.details["prepared"] = prepared is not None
        destinations = self.destinations_for(inputs.calling_ae)
        if not destinations:
            logger.warning("job %d: no destination for results (caller not a peer)", job_id)
        prediction_id = record_job_results(
            self.sessions, job_id, results, destinations, self.settings.storage_dir
        )
        logger.info(
            "job %d: %s, %d object(s) for %s, prediction %d",
            job_id,
            result.verdict or "not analysed",
            len(results.objects),
            destinations or "nobody",
            prediction_id,
        )
        if self.slice_scores is not None:
            self.slice_scores.discard(paths)
        self.on_recorded()
        return results.details

    def _analyse(
        self, source: Dataset, paths: Sequence[Path], bundle: ModelBundle, *, report: bool = True
    ) -> tuple[HUVolume | None, AnalysisResult]:
        from lungnode.pipeline.analyze import analyze_series

        def analysable(volume: HUVolume) -> None:
            check_analysable(volume, self.settings.min_series_slices)

        try:
            prescored = (
                analyze_prescored(paths, bundle, self.slice_scores, check=analysable)
                if self.slice_scores is not None
                else None
            )
            volume, result = (
                prescored
                if prescored is not None
                else analyze_series(paths, bundle, check=analysable)
            )
        except (NotAnalysable, DecodeError) as exc:
            # Only the series' own faults are findings. Anything else (a ValueError
            # from numpy, the model or Grad-CAM, a full disk, no memory) propagates:
            # the attempt fails, nothing is sent, and the job is retried.
            logger.warning("series not analysed: %s", exc)
            return None, AnalysisResult.not_analysed(str(exc), bundle.identity)
        if report:
            self.on_stage_timings(result.timings_s)
        return volume, result

    def _render(
        self, inputs: JobInputs, source: Dataset, volume: HUVolume | None, result: AnalysisResult
    ) -> _Encoded:
        """Every output of the job, encoded as the files it writes."""
        from lungnode.imaging.heatmap import png_bytes

        rendered = render_results(
            source,
            volume,
            result,
            inputs.version,
            previous=inputs.previous,
            options=self.output_options,
            key_headers=_key_headers(inputs.instance_paths, result),
        )
        return _Encoded(
            pictures=[png_bytes(picture) for picture in rendered.key_pictures],
            pdf=rendered.pdf,
            datasets=[(kind, ds, dataset_bytes(ds)) for kind, ds in rendered.datasets],
        )

    def _write_outputs(
        self, inputs: JobInputs, encoded: _Encoded, result: AnalysisResult
    ) -> JobResults:
        version = inputs.version
        storage = self.settings.storage_dir
        files: list[tuple[Path, bytes]] = []
        heatmap_dir: Path | None = None
        if encoded.pictures:
            heatmap_dir = storage / "heatmaps" / f"job-{inputs.job_id}"
            files += [
                (heatmap_dir / f"{n}.png", picture) for n, picture in enumerate(encoded.pictures)
            ]
        report_path = (
            storage
            / "reports"
            / inputs.study_instance_uid
            / f"{inputs.series_instance_uid}_v{version}.pdf"
        )
        files.append((report_path, encoded.pdf))
        objects = []
        outputs: list[dict[str, str]] = []
        for kind, dataset, payload in encoded.datasets:
            path = (
                storage
                / "results"
                / inputs.study_instance_uid
                / str(dataset.SeriesInstanceUID)
                / f"{dataset.SOPInstanceUID}.dcm"
            )
            files.append((path, payload))
            objects.append(
                ResultObject(kind, str(dataset.SOPClassUID), str(dataset.SOPInstanceUID), str(path))
            )
            outputs.append(
                {
                    "kind": kind,
                    "sop_class_uid": str(dataset.SOPClassUID),
                    "series_instance_uid": str(dataset.SeriesInstanceUID),
                    "sop_instance_uid": str(dataset.SOPInstanceUID),
                }
            )
        _write_files(files)
        model = result.model
        return JobResults(
            details={
                "analysed": result.analysed,
                "not_analysed_reason": result.not_analysed_reason,
                "timings_s": dict(result.timings_s),
                "model": {"name": model.name, "version": model.version, "sha256": model.sha256},
                "key_slices": list(result.key_slices),
                "objects": len(objects),
                # What a later version of this series names as its predecessor.
                "outputs": outputs,
                "supersedes_version": inputs.previous.version if inputs.previous else None,
            },
            objects=objects,
            prediction_class=result.verdict or None,
            confidence=result.confidence if result.analysed else None,
            all_scores=dict(result.class_scores) if result.analysed else None,
            heatmap_path=str(heatmap_dir) if heatmap_dir else None,
            report_path=str(report_path),
            model_name=model.name,
            model_version=model.version,
            model_sha256=model.sha256,
            model_synthetic=model.synthetic,
            model_intended_use=model.intended_use,
            model_trained_on=model.trained_on,
        )


def _key_headers(paths: Sequence[Path], result: AnalysisResult) -> list[Dataset]:
    """The headers of the key slices' instances, whose geometry the Parametric Map takes.

    A stored instance is named after its SOP Instance UID (``dicom.intake``).
    """
    by_uid = {path.stem: path for path in paths}
    wanted = dict.fromkeys(ref.sop_instance_uid for ref in result.key_slice_refs)
    return [dcmread(by_uid[uid], stop_before_pixels=True) for uid in wanted if uid in by_uid]


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _write_files(files: list[tuple[Path, bytes]]) -> None:
    """All the outputs of the attempt, or none; a full disk raises :class:`StorageFull`
    with the room they need."""
    needed = sum(len(payload) for _path, payload in files)
    try:
        write_all_atomically(files)
    except OSError as exc:
        if not storage_full(exc):
            raise
        raise StorageFull(
            f"storage full: cannot write the results ({_mib(needed)}): {exc.strerror}", needed
        ) from exc


def make_series_job(
    settings: Settings,
    sessions: sessionmaker[Session],
    on_recorded: Callable[[], None] = lambda: None,
    on_stage_timings: Callable[[Mapping[str, float]], None] = lambda _timings: None,
    bundle: Callable[[], ModelBundle] | None = None,
    slice_scores: SliceScores | None = None,
) -> SeriesJob:
    """The handler for ``LocalJobQueue``: results go to the configured destinations,
    or back to the peer that sent the series."""

    def destinations_for(calling_ae: str | None) -> list[str]:
        if settings.result_destinations:
            return list(settings.result_destinations)
        peer = settings.peer_by_ae(calling_ae) if calling_ae else None
        return [peer.name] if peer else []

    return SeriesJob(
        settings, sessions, destinations_for, on_recorded, on_stage_timings, bundle, slice_scores
    )
