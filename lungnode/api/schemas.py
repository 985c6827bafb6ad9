"""Request and response schemas (marshmallow, through APIFlask).

Requests are validated against these before a view runs (a mismatch answers
422); responses are serialised through them, and the OpenAPI document at
``/api/v1/openapi.json`` is generated from them.
"""

from __future__ import annotations

from apiflask import Schema
from apiflask.fields import (
    Boolean,
    Date,
    DateTime,
    Dict,
    Email,
    File,
    Float,
    Integer,
    List,
    Nested,
    String,
)
from apiflask.validators import Length, OneOf, Range
from marshmallow import RAISE

from lungnode.db.models import (
    BatchItemState,
    BatchStatus,
    DeliveryState,
    JobState,
    Role,
    SeriesState,
)

ROLES = [role.value for role in Role]
SOURCES = ["upload", "dicom"]


class StrictSchema(Schema):
    class Meta:
        unknown = RAISE


# -- auth and users ---------------------------------------------------------------


class LoginIn(StrictSchema):
    username = String(required=True, validate=Length(1, 64))
    password = String(required=True, validate=Length(1, 1024))


class TokensOut(Schema):
    access_token = String(required=True)
    refresh_token = String(required=True)
    token_type = String(required=True)
    expires_in = Integer(required=True, metadata={"description": "seconds"})


class AccessTokenOut(Schema):
    access_token = String(required=True)
    token_type = String(required=True)
    expires_in = Integer(required=True)


class UserOut(Schema):
    id = Integer(required=True)
    username = String(required=True)
    email = String(allow_none=True)
    role = String(required=True)
    active = Boolean(required=True)
    created_at = DateTime(required=True)


class UserIn(StrictSchema):
    username = String(required=True, validate=Length(1, 64))
    password = String(required=True, validate=Length(8, 1024))
    role = String(load_default=Role.VIEWER.value, validate=OneOf(ROLES))
    email = Email(load_default=None, allow_none=True)


class UserPatch(StrictSchema):
    role = String(validate=OneOf(ROLES))
    active = Boolean()


class UserItem(UserOut):
    """A user inside a list (a separate name keeps the OpenAPI components unique)."""


class UserList(Schema):
    items = List(Nested(UserItem), required=True)


# -- uploads and predictions ------------------------------------------------------


class UploadIn(Schema):
    file = File(  # type: ignore[no-untyped-call]
        required=True, metadata={"description": "PNG, JPEG or DICOM"}
    )


class UploadOut(Schema):
    file_id = String(required=True)
    message = String(required=True)


class PredictIn(Schema):
    file = File(  # type: ignore[no-untyped-call]
        metadata={"description": "PNG, JPEG or DICOM; or give file_id"}
    )
    file_id = String(validate=Length(1, 64))


class PredictJSONIn(StrictSchema):
    file_id = String(required=True, validate=Length(1, 64))


class BatchIn(Schema):
    file = List(
        File(),  # type: ignore[no-untyped-call]
        metadata={"description": "up to max_batch_size files"},
    )
    file_ids = List(String(validate=Length(1, 64)))
    batch_name = String(validate=Length(1, 200))


class BatchJSONIn(StrictSchema):
    file_ids = List(String(validate=Length(1, 64)), required=True)
    batch_name = String(validate=Length(1, 200))


class ModelOut(Schema):
    """The model's identity as recorded on the prediction when it was made."""

    name = String(allow_none=True)
    version = String(allow_none=True)
    sha256 = String(allow_none=True)
    synthetic = Boolean(
        allow_none=True,
        metadata={"description": "null: identity not recorded (prediction made before 0002)"},
    )
    trained_on = String(allow_none=True)
    intended_use = String(allow_none=True)


class PredictionOut(Schema):
    prediction_id = Integer(required=True)
    prediction = String(
        required=True, metadata={"description": 'a class label, or "Indeterminate"'}
    )
    confidence = Float(
        required=True,
        allow_none=True,
        metadata={"description": "the verdict's class score; null for Indeterminate"},
    )
    confidence_scores = Dict(keys=String(), values=Float(), required=True)
    heatmap_url = String(allow_none=True, required=True)
    heatmap_urls = List(String(), required=True)
    report_url = String(required=True)
    model = Nested(ModelOut, required=True)
    processing_time = Float(required=True, metadata={"description": "seconds"})


class ErrorDetail(Schema):
    code = String(required=True)
    message = String(required=True)
    details = Dict()


class BatchItemOut(Schema):
    index = Integer(required=True)
    file_id = String(allow_none=True)
    state = String(required=True, validate=OneOf([s.value for s in BatchItemState]))
    ok = Boolean(
        required=True,
        allow_none=True,
        metadata={"description": "null while the item is pending or running"},
    )
    result = Nested(
        PredictionOut,
        allow_none=True,
        metadata={"description": "the prediction of a done item; null once it was deleted"},
    )
    error = Nested(ErrorDetail, allow_none=True)


class BatchOut(Schema):
    batch_id = Integer(required=True)
    batch_name = String(required=True)
    status = String(required=True, validate=OneOf([s.value for s in BatchStatus]))
    created_at = DateTime(required=True)
    poll_url = String(
        required=True, metadata={"description": "GET it for the batch's state and results"}
    )
    items = List(Nested(BatchItemOut), required=True)


# -- history and statistics -------------------------------------------------------


class PageQuery(StrictSchema):
    page = Integer(load_default=1, validate=Range(min=1, max=1_000_000))
    per_page = Integer(load_default=20, validate=Range(min=1, max=100))


class HistoryQuery(PageQuery):
    prediction_class = String(data_key="class", validate=Length(1, 64))
    source = String(validate=OneOf(SOURCES))
    study_uid = String(validate=Length(1, 64))
    date_from = DateTime(metadata={"description": "inclusive, ISO 8601"})
    date_to = DateTime(metadata={"description": "exclusive, ISO 8601"})


class HistoryItem(Schema):
    id = Integer(required=True)
    prediction = String(allow_none=True)
    confidence = Float(allow_none=True)
    confidence_scores = Dict(keys=String(), values=Float(), allow_none=True)
    source = String(required=True)
    user_id = Integer(allow_none=True)
    batch_id = Integer(allow_none=True)
    job_id = Integer(allow_none=True)
    study_instance_uid = String(allow_none=True)
    series_instance_uid = String(allow_none=True)
    model = Nested(ModelOut, required=True)
    timestamp = DateTime(required=True)
    processing_time = Float(allow_none=True)
    heatmap_url = String(allow_none=True)
    report_url = String(required=True)
    analysis_version = Integer(
        allow_none=True,
        metadata={
            "description": "the analysis of its series (a late instance makes a new one); "
            "null for an upload"
        },
    )
    current = Boolean(
        required=True,
        metadata={"description": "false when a later analysis of the same series supersedes it"},
    )


class HistoryDetail(HistoryItem):
    heatmap_urls = List(String(), required=True)


class HistoryPage(Schema):
    items = List(Nested(HistoryItem), required=True)
    total = Integer(required=True)
    page = Integer(required=True)
    per_page = Integer(required=True)
    pages = Integer(required=True)


class StatsQuery(StrictSchema):
    days = Integer(load_default=30, validate=Range(min=1, max=366))


class DayCount(Schema):
    date = Date(required=True)
    count = Integer(required=True)


class HourCount(Schema):
    hour = DateTime(required=True, metadata={"description": "the hour's start, UTC"})
    instances_received = Integer(required=True)
    series_analysed = Integer(required=True)


class HourlyOut(Schema):
    hours = List(
        Nested(HourCount),
        required=True,
        metadata={"description": "the last 24 hours, oldest first, the current one last"},
    )


class StatsOut(Schema):
    total = Integer(required=True)
    by_source = Dict(keys=String(), values=Integer(), required=True)
    class_distribution = Dict(keys=String(), values=Integer(), required=True)
    per_day = List(Nested(DayCount), required=True)
    mean_processing_time = Float(allow_none=True, required=True)
    queue = Dict(keys=String(), values=Dict(keys=String(), values=Integer()), required=True)


# -- node status ---------------------------------------------------------------------


class SeriesQuery(PageQuery):
    state = String(validate=OneOf([s.value for s in SeriesState]))


class SeriesOut(Schema):
    id = Integer(required=True)
    study_instance_uid = String(required=True)
    series_instance_uid = String(required=True)
    modality = String(allow_none=True)
    calling_ae = String(allow_none=True)
    state = String(required=True)
    instance_count = Integer(required=True)
    declared_count = Integer(allow_none=True)
    completion_rule = String(allow_none=True)
    completion_reason = String(allow_none=True)
    first_received_at = DateTime(required=True)
    last_received_at = DateTime(required=True)
    completed_at = DateTime(allow_none=True)


class SeriesPage(Schema):
    items = List(Nested(SeriesOut), required=True)
    total = Integer(required=True)
    page = Integer(required=True)
    per_page = Integer(required=True)
    pages = Integer(required=True)


class JobQuery(PageQuery):
    state = String(validate=OneOf([s.value for s in JobState]))


class JobOut(Schema):
    id = Integer(required=True)
    series_id = Integer(required=True)
    version = Integer(required=True)
    state = String(required=True)
    reason = String(allow_none=True)
    instance_count = Integer(required=True)
    attempts = Integer(required=True)
    next_attempt_at = DateTime(allow_none=True)
    last_error = String(allow_none=True)
    created_at = DateTime(required=True)
    started_at = DateTime(allow_none=True)
    finished_at = DateTime(allow_none=True)
    details = Dict(allow_none=True)


class JobItem(JobOut):
    """A job inside a page (a separate name keeps the OpenAPI components unique)."""


class JobPage(Schema):
    items = List(Nested(JobItem), required=True)
    total = Integer(required=True)
    page = Integer(required=True)
    per_page = Integer(required=True)
    pages = Integer(required=True)


class DeliveryQuery(PageQuery):
    state = String(validate=OneOf([s.value for s in DeliveryState]))
    job_id = Integer(
        validate=Range(min=1, max=2**31 - 1),
        metadata={"description": "only the deliveries of this job's result objects"},
    )


class DeliveryOut(Schema):
    id = Integer(required=True)
    job_id = Integer(required=True)
    destination = String(required=True)
    sop_class_uid = String(required=True)
    sop_instance_uid = String(required=True)
    state = String(required=True)
    attempts = Integer(required=True)
    next_attempt_at = DateTime(required=True)
    last_status = Integer(allow_none=True)
    last_error = String(allow_none=True)
    #: Storage Commitment (PS3.4 Annex J): the transaction that last asked for the
    #: object, and when a ``sent`` delivery's report is overdue.
    commit_transaction_uid = String(allow_none=True)
    commit_due_at = DateTime(allow_none=True)
    created_at = DateTime(required=True)
    updated_at = DateTime(required=True)


class DeliveryItem(DeliveryOut):
    """A delivery inside a page (a separate name keeps the OpenAPI components unique)."""


class DeliveryPage(Schema):
    items = List(Nested(DeliveryItem), required=True)
    total = Integer(required=True)
    page = Integer(required=True)
    per_page = Integer(required=True)
    pages = Integer(required=True)


class PeerOut(Schema):
    name = String(required=True)
    ae_title = String(required=True)
    host = String(required=True)
    port = Integer(required=True)
    result_destination = Boolean(required=True)
    storage_commitment = Boolean(required=True)


class PeerList(Schema):
    items = List(Nested(PeerOut), required=True)
    result_destinations = List(String(), required=True)
    dicomweb_peers = List(
        String(),
        required=True,
        metadata={"description": "DICOMweb destinations, as configured, secrets masked"},
    )


class SettingsOut(Schema):
    settings = Dict(
        keys=String(),
        values=String(),
        required=True,
        metadata={"description": "every effective setting as text; secrets ********"},
    )
