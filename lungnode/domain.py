"""Plain data passed between layers.

Nothing here imports pynetdicom, Flask or SQLAlchemy: these dataclasses are
what ``dicom.decode`` hands to ``ml`` and what ``pipeline`` hands to the
writers and the database.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: The four classes of the original plan, in the demo model's output order.
CLASS_LABELS: tuple[str, ...] = (
    "Adenocarcinoma",
    "Large Cell Carcinoma",
    "Normal",
    "Squamous Cell Carcinoma",
)

#: The verdict when no class clears its bar under the series rule
#: (``ml.inference.aggregate``): no lesion class on enough slices, and a Normal
#: score below the threshold. It has no confidence of its own.
INDETERMINATE = "Indeterminate"


def verdict_text(verdict: str, confidence: float | None, class_scores: dict[str, float]) -> str:
    """The verdict as every output words it: the CLI, the PDF, the SC banner and the SR.

    A class verdict carries its own score ("Adenocarcinoma (confidence 0.912)").
    Indeterminate has no score of its own, so it names the highest class score
    instead, saying that it did not reach the rule's threshold; a reader then
    never meets a verdict beside a number that belongs to another class.
    """
    if verdict != INDETERMINATE:
        return f"{verdict} (confidence {float(confidence or 0.0):.3f})"
    if not class_scores:
        return f"{INDETERMINATE} (no class reached its threshold)"
    label, score = max(class_scores.items(), key=lambda item: item[1])
    return f"{INDETERMINATE} (no class reached its threshold; highest score {label} {score:.3f})"


@dataclass(frozen=True)
class SliceRef:
    """Where one 2D slice of a volume came from."""

    sop_instance_uid: str
    #: 1-based frame number inside a multi-frame instance; None for single-frame.
    frame_number: int | None = None
    #: Position along the slice normal, in mm; None when the slice has no geometry.
    position_mm: float | None = None


@dataclass
class HUVolume:
    """A CT series (or one image) in Hounsfield units.

    ``hu`` is float32 with shape (slices, rows, columns), sorted along the
    slice normal (feet to head for an axial series).
    """

    hu: np.ndarray
    slices: list[SliceRef]
    pixel_spacing_mm: tuple[float, float] | None = None
    #: Median step between slices along the normal (mm); None without geometry.
    slice_spacing_mm: float | None = None
    #: Unit slice normal the volume is sorted along (PS3.3 C.7.6.2.1.1); None
    #: without orientation. Both come from ``imaging.geometry.slice_stack``.
    slice_normal: tuple[float, float, float] | None = None
    #: The slices whose pixels ``hu`` holds; None: all of them. A series whose
    #: slices were scored while it arrived (``pipeline.prescore``) decodes only its
    #: key slices; the others are zeros and must not be read.
    decoded_slices: frozenset[int] | None = None

    def pixels(self, index: int) -> np.ndarray:
        """Slice ``index`` of ``hu``, which must have been decoded."""
        if not 0 <= index < self.hu.shape[0]:
            raise ValueError(f"slice {index} is outside the volume")
        if self.decoded_slices is not None and index not in self.decoded_slices:
            raise ValueError(f"slice {index} was not decoded")
        pixels: np.ndarray = self.hu[index]
        return pixels

    def __post_init__(self) -> None:
        if self.hu.ndim != 3:
            raise ValueError(f"HU volume must be 3D, got shape {self.hu.shape}")
        if self.hu.shape[0] != len(self.slices):
            raise ValueError(
                f"{self.hu.shape[0]} slices of pixels but {len(self.slices)} slice references"
            )


@dataclass(frozen=True)
class ModelIdentity:
    """What every output records about the model that produced it."""

    name: str
    version: str
    sha256: str
    intended_use: str = ""
    #: True for the bundled demo model trained on synthetic phantoms.
    synthetic: bool = False
    #: What the weights were trained on, in words (for reports).
    trained_on: str = ""


@dataclass
class AnalysisResult:
    """The verdict for one series or one image.

    ``slice_scores`` is float32 (slices, classes) with columns in ``labels``
    order; ``class_scores`` sums to 1. ``key_slices`` are indices into the
    analysed volume, most suspicious first, and ``heatmaps`` line up with them.
    ``verdict`` is one of ``labels`` or :data:`INDETERMINATE`; ``confidence`` is
    the verdict's class score, and None for Indeterminate.
    """

    verdict: str
    confidence: float | None
    class_scores: dict[str, float]
    slice_scores: np.ndarray
    key_slices: list[int]
    key_slice_refs: list[SliceRef]
    model: ModelIdentity
    #: One Grad-CAM map per key slice, float32 in [0, 1], at the slice's size.
    heatmaps: list[np.ndarray] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    #: Class labels in the model's output order (the columns of slice_scores).
    labels: tuple[str, ...] = CLASS_LABELS
    #: Indices of the slices that passed the lesion threshold of the series rule.
    lesion_slices: list[int] = field(default_factory=list)
    #: The aggregation rule and its parameters, as applied (for reports).
    rule: dict[str, object] = field(default_factory=dict)
    #: False when the input could not be analysed; the verdict is then empty.
    analysed: bool = True
    not_analysed_reason: str | None = None

    def explanation(self) -> str:
        """One sentence on how the series rule (``ml.inference``) reached the verdict.

        For a Normal or an Indeterminate verdict it also says how close the
        series came to a lesion verdict, and for Indeterminate why it is not
        Normal either: a reader checking a negative or open result wants to
        know what came closest. Empty for a result without a rule (not analysed).
        """
        rule = self.rule
        if not self.analysed or rule.get("rule") != "lesion_slices":
            return ""
        n = int(self.slice_scores.shape[0])
        threshold = float(str(rule["threshold"]))
        needed = int(str(rule.get("min_slices_applied", rule.get("min_slices", 1))))
        normal = str(rule.get("normal_label", "Normal"))
        counted = (
            f"{len(self.lesion_slices)} of {n} slice{'s' if n != 1 else ''} reached the "
            f"lesion threshold {threshold:.2f}; the rule needs {needed} for a lesion verdict."
        )
        lesion = [i for i, label in enumerate(self.labels) if label != normal]
        if self.verdict not in (normal, INDETERMINATE) or n == 0 or not lesion:
            return counted
        if self.verdict == INDETERMINATE:
            counted += (
                f" The mean {normal} score {self.class_scores.get(normal, 0.0):.3f} is below "
                f"{threshold:.2f}, so the series is not {normal} either."
            )
        columns = self.slice_scores[:, lesion]
        slice_index, column = divmod(int(np.argmax(columns)), len(lesion))
        return (
            f"{counted} Highest lesion score: {float(columns[slice_index, column]):.3f} "
            f"({self.labels[lesion[column]]}, slice {slice_index + 1})."
        )

    def verdict_text(self) -> str:
        """The verdict and its confidence in words, as every output shows it (``verdict_text``)."""
        if not self.analysed:
            return "Not analysed"
        return verdict_text(self.verdict, self.confidence, self.class_scores)

    @classmethod
    def not_analysed(cls, reason: str, model: ModelIdentity) -> AnalysisResult:
        """A result that records why no verdict was produced."""
        return cls(
            verdict="",
            confidence=0.0,
            class_scores={},
            slice_scores=np.zeros((0, 0), dtype=np.float32),
            key_slices=[],
            key_slice_refs=[],
            model=model,
            analysed=False,
            not_analysed_reason=reason,
        )


@dataclass(frozen=True)
class ObjectRef:
    """One DICOM object lungnode wrote: enough to reference it from another."""

    kind: str
    sop_class_uid: str
    series_instance_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class PreviousVersion:
    """The analysis of a series that a new analysis of the same series supersedes.

    A late instance reopens a completed series; its next analysis is version
    ``version + 1``, and its report and SR say which version they replace.
    ``objects`` are what the previous version wrote (empty when unrecorded).
    """

    version: int
    finished_at: str | None
    objects: tuple[ObjectRef, ...] = ()

    def object_of(self, kind: str) -> ObjectRef | None:
        """The previous version's object of ``kind`` ("sr", "pdf"...), if recorded."""
        return next((o for o in self.objects if o.kind == kind), None)

    def replaces_text(self) -> str:
        """What the SR and the PDF report say of the version they replace."""
        when = f" of {self.finished_at}" if self.finished_at else ""
        sr = self.object_of("sr")
        named = f" (SR {sr.sop_instance_uid})" if sr else ""
        return f"Replaces analysis version {self.version}{when}{named}."


@dataclass(frozen=True)
class InstanceFacts:
    """What the database and the series assembler need to know about one received instance."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None
    series_number: int | None
    instance_number: int | None
    number_of_frames: int
    position: list[float] | None
    orientation: list[float] | None
    declared_count: int | None
