"""The PDF report of one analysed (or not analysed) series, with reportlab.

The report is what a radiologist opens from the PACS (as an Encapsulated PDF,
:mod:`lungnode.dicom.writers.pdf`) or downloads from the API: the patient and
study facts that are known, the verdict and its confidence (worded as every
output words it, ``AnalysisResult.verdict_text``) with how the series rule
reached it, a bar chart of all class scores, the key-slice heatmaps, the time
each stage took, the model's identity and the time of writing. When a series
could not be analysed, the report says so and why, so the reader is never left
wondering.

Every page carries a "For Research Use Only" watermark, drawn diagonally and
repeated in the footer as plain text so that it survives text extraction.

Input is plain data (:class:`ReportInput`), output is the PDF as bytes: no
database, no web framework, no files.
"""

from __future__ import annotations

import datetime as _dt
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape

import cv2
import numpy as np
from pydicom.dataset import Dataset
from reportlab import rl_config
from reportlab.graphics.charts.barcharts import HorizontalBarChart
from reportlab.graphics.shapes import Drawing
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import (
    Flowable,
    Image,
    KeepTogether,
    Paragraph,
    SimpleDocTemplate,
    Spacer,
    Table,
    TableStyle,
)

from lungnode import __version__
from lungnode.domain import AnalysisResult, PreviousVersion

# Binary (Flate) streams, not ASCII85 text: reportlab encodes ASCII85 in pure Python
# unless an optional accelerator is installed, which took about a third of a second
# of every report's key images; a binary PDF is also a quarter smaller. The setting
# is read when a document is built; this module is reportlab's only user here.
rl_config.useA85 = 0

WATERMARK = "For Research Use Only"
NOT_FOR_DIAGNOSTIC_USE = "Not for diagnostic use"
SYNTHETIC_MODEL_NOTICE = "Trained on synthetic phantoms \N{EN DASH} not for diagnostic use"
#: How the series rule (``ml.inference``) reaches a verdict, and why it may say Indeterminate.
VERDICT_RULE_NOTE = (
    "How the verdict is reached: a lesion class is the verdict when enough slices score at "
    "least the threshold for a lesion class; Normal when there are not, and the mean Normal "
    "score reaches the same threshold. Otherwise the verdict is Indeterminate, not Normal: "
    '"no lesion slice passed" is not "normal", and a Normal verdict with a low Normal score '
    "would hide that the model was unsure. Read an Indeterminate series as usual."
)

_PAGE_W, _PAGE_H = A4
_MARGIN = 18 * mm
_ACCENT = colors.HexColor("#1f4e79")
_GRID = colors.HexColor("#b0b7c3")


@dataclass(frozen=True)
class StudyFacts:
    """Patient and study facts to print; empty strings are left out."""

    patient_name: str = ""
    patient_id: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_date: str = ""
    study_description: str = ""
    accession_number: str = ""
    study_instance_uid: str = ""
    series_number: str = ""
    series_description: str = ""
    series_instance_uid: str = ""

    @classmethod
    def from_dataset(cls, ds: Dataset) -> StudyFacts:
        """The facts of an instance of the analysed series (tolerant: missing is empty)."""

        def text(keyword: str) -> str:
            value = ds.get(keyword)
            return "" if value is None else str(value)

        return cls(
            patient_name=text("PatientName").replace("^", " ").strip(),
            patient_id=text("PatientID"),
            patient_birth_date=_date_text(text("PatientBirthDate")),
            patient_sex=text("PatientSex"),
            study_date=_date_text(text("StudyDate")),
            study_description=text("StudyDescription"),
            accession_number=text("AccessionNumber"),
            study_instance_uid=text("StudyInstanceUID"),
            series_number=text("SeriesNumber"),
            series_description=text("SeriesDescription"),
            series_instance_uid=text("SeriesInstanceUID"),
        )


@dataclass(frozen=True)
class KeyImage:
    """One key-slice picture: PNG bytes or an RGB uint8 array (rows, cols, 3)."""

    picture: bytes | np.ndarray
    caption: str = ""


@dataclass
class ReportInput:
    """Everything the report shows."""

    result: AnalysisResult
    facts: StudyFacts = field(default_factory=StudyFacts)
    key_images: Sequence[KeyImage] = ()
    #: When the report is written; now if None.
    created: _dt.datetime | None = None
    #: The analysis version of a series' report (None for an uploaded image).
    version: int | None = None
    #: The analysis this report supersedes (a late instance reopened the series).
    replaces: PreviousVersion | None = None


def build_report(report: ReportInput) -> bytes:
    """The report as PDF bytes; raise ``ValueError`` on an unusable input."""
    result = report.result
    if not result.analysed and not result.not_analysed_reason:
        raise ValueError("a result that was not analysed needs not_analysed_reason")
    created = (report.created or _dt.datetime.now()).replace(microsecond=0)
    styles = _styles()
    story: list[Flowable] = [
        Paragraph("Lung CT classification report", styles["title"]),
        Paragraph(f"{WATERMARK} \N{EM DASH} {NOT_FOR_DIAGNOSTIC_USE}", styles["banner"]),
        Paragraph(
            f"Written {escape(created.isoformat(sep=' '))} by lungnode {__version__}",
            styles["centred"],
        ),
    ]
    if report.version is not None:
        said = f"Analysis version {report.version}."
        if report.replaces is not None:
            said += f" {report.replaces.replaces_text()}"
        story.append(Paragraph(escape(said), styles["centred"]))
    story.append(Spacer(1, 4 * mm))
    facts = _facts_table(report.facts, styles)
    if facts is not None:
        story += [Paragraph("Patient and study", styles["h2"]), facts, Spacer(1, 4 * mm)]
    story += _result_section(result, styles)
    story += _key_images_section(report.key_images, styles)
    story += _timing_section(result, styles)
    story += _model_section(result, styles)
    buffer = io.BytesIO()
    doc = SimpleDocTemplate(
        buffer,
        pagesize=A4,
        leftMargin=_MARGIN,
        rightMargin=_MARGIN,
        topMargin=_MARGIN,
        bottomMargin=_MARGIN + 6 * mm,
        title="lungnode lung CT classification report",
        author="lungnode",
        subject=WATERMARK,
        creator=f"lungnode {__version__}",
        invariant=True,
    )
    doc.build(story, onFirstPage=_decorate_page, onLaterPages=_decorate_page)
    return buffer.getvalue()


# -- sections ----------------------------------------------------------------


def _facts_table(facts: StudyFacts, styles: dict[str, ParagraphStyle]) -> Table | None:
    rows = [
        ("Patient name", facts.patient_name),
        ("Patient ID", facts.patient_id),
        ("Birth date", facts.patient_birth_date),
        ("Sex", facts.patient_sex),
        ("Study date", facts.study_date),
        ("Study", facts.study_description),
        ("Accession number", facts.accession_number),
        ("Series", " ".join(v for v in (facts.series_number, facts.series_description) if v)),
        ("Study Instance UID", facts.study_instance_uid),
        ("Series Instance UID", facts.series_instance_uid),
    ]
    present = [(k, v) for k, v in rows if v]
    if not present:
        return None
    return _key_value_table(present, styles)


def _result_section(result: AnalysisResult, styles: dict[str, ParagraphStyle]) -> list[Flowable]:
    story: list[Flowable] = [Paragraph("Result", styles["h2"])]
    if not result.analysed:
        reason = escape(result.not_analysed_reason or "")
        story += [
            Paragraph("Not analysed", styles["verdict"]),
            Paragraph(f"This series was not analysed, because {reason}.", styles["body"]),
            Paragraph("No verdict was produced; read the images as usual.", styles["body"]),
            Spacer(1, 4 * mm),
        ]
        return story
    story += [
        Paragraph(f"Verdict: {escape(result.verdict_text())}", styles["verdict"]),
        Spacer(1, 2 * mm),
    ]
    if result.model.synthetic:
        story.append(Paragraph(f"Demo model. {SYNTHETIC_MODEL_NOTICE}.", styles["warning"]))
    scores = [(k, result.class_scores[k]) for k in result.labels if k in result.class_scores]
    if scores:
        story += [
            Paragraph("Class scores", styles["h3"]),
            _score_chart(scores, result.verdict),
            Spacer(1, 2 * mm),
        ]
    if result.rule:
        rule = ", ".join(f"{k} = {v}" for k, v in result.rule.items())
        story.append(Paragraph(f"Series rule: {escape(rule)}", styles["small"]))
    if explanation := result.explanation():
        story.append(Paragraph(escape(explanation), styles["small"]))
    story.append(Paragraph(escape(VERDICT_RULE_NOTE), styles["small"]))
    story.append(Spacer(1, 4 * mm))
    return story


def _score_chart(scores: Sequence[tuple[str, float]], verdict: str) -> Drawing:
    """A horizontal bar chart of the class scores in percent, the verdict highlighted."""
    bar_h = 9 * mm
    width = _PAGE_W - 2 * _MARGIN
    height = bar_h * len(scores) + 14 * mm
    drawing = Drawing(width, height)
    chart = HorizontalBarChart()
    chart.x, chart.y = 55 * mm, 8 * mm
    chart.width, chart.height = width - 75 * mm, bar_h * len(scores)
    # The first category is drawn at the bottom: reverse to keep label order.
    ordered = list(reversed(scores))
    chart.data = [[round(score * 100.0, 1) for _, score in ordered]]
    chart.categoryAxis.categoryNames = [label for label, _ in ordered]
    chart.categoryAxis.labels.fontName = "Helvetica"
    chart.categoryAxis.labels.fontSize = 9
    chart.categoryAxis.labels.dx = -4
    chart.valueAxis.valueMin = 0
    chart.valueAxis.valueMax = 100
    chart.valueAxis.valueStep = 20
    chart.valueAxis.labels.fontSize = 8
    chart.valueAxis.labelTextFormat = "%d%%"
    chart.barLabelFormat = "%.1f%%"
    chart.barLabels.nudge = 14
    chart.barLabels.fontSize = 8
    chart.bars[0].fillColor = colors.HexColor("#9fb6cd")
    chart.bars[0].strokeColor = None
    for i, (label, _) in enumerate(ordered):
        if label == verdict:
            chart.bars[(0, i)].fillColor = _ACCENT
    drawing.add(chart)
    return drawing


def _key_images_section(
    images: Sequence[KeyImage], styles: dict[str, ParagraphStyle]
) -> list[Flowable]:
    if not images:
        return []
    columns = 3
    cell_w = (_PAGE_W - 2 * _MARGIN) / columns - 3 * mm
    cells: list[list[Flowable]] = []
    for key_image in images:
        picture = Image(io.BytesIO(_image_file(key_image.picture)))
        scale = min(cell_w / picture.imageWidth, 70 * mm / picture.imageHeight)
        picture.drawWidth = picture.imageWidth * scale
        picture.drawHeight = picture.imageHeight * scale
        cells.append([picture, Paragraph(escape(key_image.caption), styles["small"])])
    rows = [cells[i : i + columns] for i in range(0, len(cells), columns)]
    rows[-1] += [[Spacer(1, 1)]] * (columns - len(rows[-1]))
    table = Table(rows, colWidths=[cell_w + 3 * mm] * columns)
    table.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP")]))
    heading = Paragraph("Key slices (Grad-CAM)", styles["h2"])
    # Keep the heading with the pictures; a table taller than a page still splits.
    return [KeepTogether([heading, table]), Spacer(1, 4 * mm)]


def _timing_section(result: AnalysisResult, styles: dict[str, ParagraphStyle]) -> list[Flowable]:
    if not result.timings_s:
        return []
    rows = [(stage, f"{seconds:.3f} s") for stage, seconds in result.timings_s.items()]
    if not any(stage.lower() == "total" for stage in result.timings_s):
        rows.append(("Total", f"{sum(result.timings_s.values()):.3f} s"))
    return [
        KeepTogether([Paragraph("Timing", styles["h2"]), _key_value_table(rows, styles)]),
        Spacer(1, 4 * mm),
    ]


def _model_section(result: AnalysisResult, styles: dict[str, ParagraphStyle]) -> list[Flowable]:
    model = result.model
    rows = [
        ("Model", f"{model.name} {model.version}"),
        ("SHA-256", model.sha256),
        ("Intended use", model.intended_use),
        ("Trained on", model.trained_on),
    ]
    flowables: list[Flowable] = [
        Paragraph("Model", styles["h2"]),
        _key_value_table([(k, v) for k, v in rows if v], styles),
    ]
    if model.synthetic:
        flowables.append(Paragraph(SYNTHETIC_MODEL_NOTICE, styles["warning"]))
    return [KeepTogether(flowables), Spacer(1, 4 * mm)]


# -- helpers -----------------------------------------------------------------


def _key_value_table(rows: Sequence[tuple[str, str]], styles: dict[str, ParagraphStyle]) -> Table:
    data = [
        [Paragraph(escape(k), styles["key"]), Paragraph(escape(v), styles["body"])] for k, v in rows
    ]
    table = Table(data, colWidths=[42 * mm, _PAGE_W - 2 * _MARGIN - 42 * mm])
    table.setStyle(
        TableStyle(
            [
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("LINEBELOW", (0, 0), (-1, -1), 0.25, _GRID),
                ("TOPPADDING", (0, 0), (-1, -1), 2),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 2),
            ]
        )
    )
    return table


def _styles() -> dict[str, ParagraphStyle]:
    base = getSampleStyleSheet()
    body = ParagraphStyle("body", parent=base["BodyText"], fontSize=9.5, leading=12)
    return {
        "title": ParagraphStyle("title", parent=base["Title"], textColor=_ACCENT, fontSize=18),
        "banner": ParagraphStyle(
            "banner", parent=body, alignment=1, textColor=colors.HexColor("#b00020"), fontSize=11
        ),
        "h2": ParagraphStyle("h2", parent=base["Heading2"], textColor=_ACCENT, fontSize=13),
        "h3": ParagraphStyle("h3", parent=base["Heading3"], fontSize=10.5),
        "verdict": ParagraphStyle(
            "verdict", parent=body, fontName="Helvetica-Bold", fontSize=14, leading=18
        ),
        "body": body,
        "key": ParagraphStyle("key", parent=body, fontName="Helvetica-Bold"),
        "small": ParagraphStyle(
            "small", parent=body, fontSize=8, leading=10, textColor=colors.grey
        ),
        "centred": ParagraphStyle(
            "centred", parent=body, fontSize=8, alignment=1, textColor=colors.grey
        ),
        "warning": ParagraphStyle(
            "warning", parent=body, textColor=colors.HexColor("#b00020"), fontName="Helvetica-Bold"
        ),
    }


def _decorate_page(canvas: Canvas, doc: Any) -> None:
    """Watermark and footer, on every page."""
    canvas.saveState()
    canvas.setFillColor(colors.Color(0.75, 0.1, 0.1, alpha=0.12))
    canvas.setFont("Helvetica-Bold", 54)
    canvas.translate(_PAGE_W / 2, _PAGE_H / 2)
    canvas.rotate(45)
    canvas.drawCentredString(0, 0, WATERMARK)
    canvas.restoreState()
    canvas.saveState()
    canvas.setFont("Helvetica", 8)
    canvas.setFillColor(colors.grey)
    canvas.drawString(_MARGIN, _MARGIN / 2, f"{WATERMARK} \N{EM DASH} {NOT_FOR_DIAGNOSTIC_USE}")
    canvas.drawRightString(_PAGE_W - _MARGIN, _MARGIN / 2, f"Page {doc.page}")
    canvas.restoreState()


#: JPEG quality of the report's pictures (the Secondary Captures carry them lossless).
_PICTURE_QUALITY = 92


def _image_file(picture: bytes | np.ndarray) -> bytes:
    """A key image as a file ReportLab reads: PNG bytes as given; an array, which
    must be RGB (or grey) uint8, as JPEG.

    ReportLab embeds a JPEG as it is (DCTDecode), where it would deflate the pixels
    of a lossless picture itself: that compression was most of the report's time,
    and made the PDF seven times larger. The report is a summary printed small; the
    pictures a radiologist reads are the Secondary Captures, which are lossless.
    """
    if isinstance(picture, bytes):
        if not picture.startswith(b"\x89PNG"):
            raise ValueError("key image bytes are not a PNG")
        return picture
    array = np.asarray(picture)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"key image must be uint8 grey or RGB, got {array.dtype} {array.shape}")
    if array.ndim == 3 and array.shape[2] != 3:
        raise ValueError(f"key image must have 3 channels, got {array.shape[2]}")
    bgr = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array
    encoded, buffer = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, _PICTURE_QUALITY])
    if not encoded:
        raise ValueError("OpenCV cannot encode the key image as JPEG")
    return bytes(buffer.tobytes())


def _date_text(value: str) -> str:
    """A DICOM DA (YYYYMMDD, PS3.5 6.2) as YYYY-MM-DD; anything else unchanged."""
    if len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value
