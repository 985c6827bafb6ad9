"""The node's one model bundle, loaded and warmed on a background thread at start.

Without a warm-up, the first series after a start paid for importing
TensorFlow, loading the model, tracing its forward pass and its Grad-CAM pass,
and the writers' first use (highdicom reads its tables of the standard once):
16.4 s from job start to done, against 2.4 s for the next series. Warming
runs the real entry points on a synthetic input of the model's input size, so
the graphs the first job needs are the ones already traced:

- ``pipeline.analyze.analyze_volume`` with heatmaps: one batch of
  ``DEFAULT_BATCH_SIZE`` slices and one of a single slice (a series rarely
  divides evenly, and Keras traces a second batch shape once), then Grad-CAM,
  whose traced function is cached per model by the model's input shape
  (``ml.gradcam._compiled_gradcam``), which a job's slices share once resized;
- the writers (Secondary Capture, PDF report, Encapsulated PDF, SR) on that
  result, serialised in memory; nothing is written to disk or sent.

The DICOM side does not wait for any of this: the node listens at once and
stores what it receives. A job that starts before warming ends waits for it
(:meth:`WarmModel.bundle`); the API's ``/predict`` shares the same bundle.
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.uid import CTImageStorage, generate_uid

from lungnode.domain import HUVolume, SliceRef
from lungnode.errors import BundleError
from lungnode.ml.bundle import ModelBundle
from lungnode.ml.inference import DEFAULT_BATCH_SIZE
from lungnode.pipeline.cpu_priority import lower_thread_priority

logger = logging.getLogger(__name__)


class ModelState(StrEnum):
    WARMING = "warming"
    READY = "ready"
    FAILED = "failed"


class WarmModel:
    """Loads the bundle with ``load`` and warms it with ``warm``, once, off the caller's thread.

    ``niceness``: how much lower the warm-up thread runs than the process. The
    threads the model creates while it loads and first runs (TensorFlow's pools,
    which every later forward pass uses) inherit it (``pipeline.cpu_priority``).
    """

    def __init__(
        self,
        load: Callable[[], ModelBundle],
        warm: Callable[[ModelBundle], None] | None = None,
        *,
        niceness: int = 0,
    ) -> None:
        self._load = load
        self.niceness = niceness
        self._warm = warm if warm is not None else warm_up
        self._done = threading.Event()
        self._bundle: ModelBundle | None = None
        self._error: str | None = None
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._started = 0.0
        #: Seconds from start() to ready (or failed); None while warming.
        self.seconds: float | None = None

    def start(self) -> None:
        """Begin loading and warming on a daemon thread, once; returns at once."""
        with self._start_lock:
            if self._thread is not None:
                return
            self._started = time.perf_counter()
            self._thread = threading.Thread(target=self._run, name="model-warm-up", daemon=True)
            self._thread.start()

    @property
    def state(self) -> ModelState:
        if not self._done.is_set():
            return ModelState.WARMING
        return ModelState.READY if self._bundle is not None else ModelState.FAILED

    def bundle(self, timeout: float | None = None) -> ModelBundle:
        """The warmed bundle, waiting for the warm-up if it is still running.

        Raises:
            BundleError: the bundle could not be loaded or warmed (the reason
                names why), or ``timeout`` passed first.
        """
        self.start()
        if not self._done.wait(timeout):
            raise BundleError(f"the model is still warming after {timeout:g} s")
        if self._bundle is None:
            raise BundleError(f"the model failed to load: {self._error}")
        return self._bundle

    def status(self) -> dict[str, Any]:
        """What ``/health`` shows: the state, the warm-up time once known, the error."""
        status: dict[str, Any] = {"state": self.state.value}
        if self.seconds is not None:
            status["warm_up_seconds"] = round(self.seconds, 2)
        if self._error is not None:
            status["error"] = self._error
        return status

    def _run(self) -> None:
        logger.info("warming the model: load, one synthetic analysis with Grad-CAM, the writers")
        lower_thread_priority(self.niceness)
        try:
            bundle = self._load()
            self._warm(bundle)
        except Exception as exc:  # any failure leaves the node unable to analyse: say why
            self._error = str(exc) if isinstance(exc, BundleError) else f"{exc!r}"
            self.seconds = time.perf_counter() - self._started
            logger.error("model warm-up failed after %.1f s: %s", self.seconds, self._error)
        else:
            self._bundle = bundle
            self.seconds = time.perf_counter() - self._started
            logger.info(
                "model %s %s ready (warmed in %.1f s)",
                bundle.identity.name,
                bundle.identity.version,
                self.seconds,
            )
        finally:
            self._done.set()


def warm_up(bundle: ModelBundle) -> None:
    """Analyse a synthetic volume with heatmaps and write its results in memory."""
    from lungnode.pipeline.analyze import analyze_volume
    from lungnode.pipeline.outputs import dataset_bytes, render_results

    rows, columns = bundle.manifest.input_size
    # Soft tissue with noise: any HU will do, the graphs only depend on the shapes.
    generator = np.random.default_rng(0)
    count = DEFAULT_BATCH_SIZE + 1
    hu = generator.normal(40.0, 200.0, size=(count, rows, columns)).astype(np.float32)
    source = _source_header(rows, columns)
    volume = HUVolume(
        hu=hu, slices=[SliceRef(sop_instance_uid=generate_uid()) for _ in range(count)]
    )
    result = analyze_volume(volume, bundle, with_heatmaps=True)
    key_headers = [
        _slice_header(source, volume.slices[index], index) for index in result.key_slices
    ]
    rendered = render_results(source, volume, result, version=1, key_headers=key_headers)
    for _kind, dataset in rendered.datasets:
        dataset_bytes(dataset)


def _slice_header(source: Dataset, ref: SliceRef, index: int) -> Dataset:
    """The header of slice ``index`` of the synthetic series: the source's, placed."""
    header = copy.deepcopy(source)
    header.SOPInstanceUID = ref.sop_instance_uid
    header.InstanceNumber = index + 1
    header.ImagePositionPatient = [0, 0, float(index)]
    return header


def _source_header(rows: int, columns: int) -> Dataset:
    """A CT header for the writers to copy from: no patient, fresh UIDs."""
    now = _dt.datetime.now()
    ds = Dataset()
    ds.PatientName = "WARM^UP"
    ds.PatientID = "WARMUP"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = generate_uid()
    ds.StudyDate = now.strftime("%Y%m%d")
    ds.StudyTime = now.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.FrameOfReferenceUID = generate_uid()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, 0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 1.0
    ds.Rows, ds.Columns = rows, columns
    return ds
