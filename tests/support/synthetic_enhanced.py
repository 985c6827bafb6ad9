"""One synthetic Enhanced CT Image Storage instance (PS3.3 A.38).

Modern scanners send a whole series as one multi-frame object whose frames
carry their own geometry in functional groups (PS3.3 C.7.6.16). The node has
to sort those frames by position, not by frame number, so the builder here can
store frames in any order.
"""

from __future__ import annotations

import copy
import datetime as _dt
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import EnhancedCTImageStorage, generate_uid

from tests.support.synthetic_codecs import PixelFormat

#: Thorax, SNOMED CT (PS3.16 CID 4031).
_THORAX = ("43799004", "SCT", "Thorax")
#: The phantom CTDIvol refers to (PS3.16 CID 4052).
_BODY_PHANTOM = ("113691", "DCM", "IEC Body Dosimetry Phantom")


def build_enhanced_ct(
    common: Dataset,
    *,
    frames: Sequence[np.ndarray],
    positions: Sequence[Sequence[float]],
    pixel_spacing_mm: float,
    slice_thickness_mm: float,
    fmt: PixelFormat,
    instance_number: int,
    per_frame_rescale: bool,
    window: tuple[float, float],
    when: _dt.datetime,
) -> Dataset:
    """Build the instance from the common modules and frames in storage order.

    ``positions[i]`` is the Image Position (Patient) of ``frames[i]``. The
    dimension index is the position along z, so In-Stack Position Number
    says where each frame belongs whatever its frame number.
    """
    ds = copy.deepcopy(common)
    for keyword in ("AcquisitionDate", "AcquisitionTime", "AcquisitionNumber"):
        if keyword in ds:
            del ds[keyword]
    acquired = when.strftime("%Y%m%d%H%M%S")
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = instance_number
    ds.NumberOfFrames = len(frames)
    # Enhanced CT Image module (C.8.15.2) and its Common CT/MR description.
    # Value 3 is the image flavor; AXIAL is not a defined term for it (C.8.16.1.3).
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.AcquisitionNumber = 1
    ds.AcquisitionDateTime = acquired
    ds.AcquisitionDuration = 1.0
    ds.ContentQualification = "RESEARCH"
    ds.PresentationLUTShape = "IDENTITY"
    ds.RecognizableVisualFeatures = "NO"
    ds.LossyImageCompression = "00"
    ds.AcquisitionContextSequence = DicomSequence()

    # Multi-frame Dimension module (C.7.6.17): one stack, indexed by position.
    organization_uid = generate_uid()
    ds.DimensionOrganizationType = "3D"
    org = Dataset()
    org.DimensionOrganizationUID = organization_uid
    ds.DimensionOrganizationSequence = DicomSequence([org])
    dim = Dataset()
    dim.DimensionOrganizationUID = organization_uid
    dim.DimensionIndexPointer = 0x00209057  # In-Stack Position Number
    dim.FunctionalGroupPointer = 0x00209111  # Frame Content Sequence
    dim.DimensionDescriptionLabel = "In-Stack Position Number"
    ds.DimensionIndexSequence = DicomSequence([dim])

    ds.SharedFunctionalGroupsSequence = DicomSequence(
        [_shared_groups(ds, pixel_spacing_mm, slice_thickness_mm, fmt, window, per_frame_rescale)]
    )
    z_rank = {z: rank for rank, z in enumerate(sorted(p[2] for p in positions))}
    per_frame = []
    for i, position in enumerate(positions):
        item = Dataset()
        content = Dataset()
        rank = z_rank[position[2]] + 1
        content.StackID = "1"
        content.InStackPositionNumber = rank
        content.DimensionIndexValues = [rank]
        content.FrameAcquisitionDateTime = acquired
        content.FrameReferenceDateTime = acquired
        content.FrameAcquisitionDuration = 500.0
        content.FrameAcquisitionNumber = i + 1
        item.FrameContentSequence = DicomSequence([content])
        plane = Dataset()
        plane.ImagePositionPatient = [round(float(v), 6) for v in position]
        item.PlanePositionSequence = DicomSequence([plane])
        ct_position = Dataset()
        ct_position.TablePosition = round(float(position[2]), 6)
        ct_position.ReconstructionTargetCenterPatient = [0.0, 0.0, round(float(position[2]), 6)]
        ct_position.DataCollectionCenterPatient = [0.0, 0.0, round(float(position[2]), 6)]
        item.CTPositionSequence = DicomSequence([ct_position])
        if per_frame_rescale:
            item.PixelValueTransformationSequence = DicomSequence([_rescale(fmt)])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = b"".join(frame.tobytes() for frame in frames)
    return ds


def _rescale(fmt: PixelFormat) -> Dataset:
    """CT Pixel Value Transformation macro (C.8.15.3.10): stored -> HU."""
    item = Dataset()
    item.RescaleIntercept = fmt.intercept
    item.RescaleSlope = fmt.slope
    item.RescaleType = "HU"
    return item


def _shared_groups(
    ds: Dataset,
    pixel_spacing_mm: float,
    slice_thickness_mm: float,
    fmt: PixelFormat,
    window: tuple[float, float],
    per_frame_rescale: bool,
) -> Dataset:
    """Functional groups whose values are the same for every frame (A.38-2)."""
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]
    measures.SliceThickness = slice_thickness_mm
    measures.SpacingBetweenSlices = slice_thickness_mm
    shared.PixelMeasuresSequence = DicomSequence([measures])
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    if not per_frame_rescale:
        shared.PixelValueTransformationSequence = DicomSequence([_rescale(fmt)])
    voi = Dataset()
    voi.WindowCenter = window[0]
    voi.WindowWidth = window[1]
    voi.WindowCenterWidthExplanation = "LUNG"
    shared.FrameVOILUTSequence = DicomSequence([voi])

    anatomy = Dataset()
    anatomy.FrameLaterality = "B"
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = _THORAX
    anatomy.AnatomicRegionSequence = DicomSequence([region])
    shared.FrameAnatomySequence = DicomSequence([anatomy])

    frame_type = Dataset()
    frame_type.FrameType = list(ds.ImageType)
    frame_type.PixelPresentation = "MONOCHROME"
    frame_type.VolumetricProperties = "VOLUME"
    frame_type.VolumeBasedCalculationTechnique = "NONE"
    shared.CTImageFrameTypeSequence = DicomSequence([frame_type])

    irradiation = Dataset()
    irradiation.IrradiationEventUID = generate_uid()
    shared.IrradiationEventIdentificationSequence = DicomSequence([irradiation])

    acquisition_type = Dataset()
    acquisition_type.AcquisitionType = "SPIRAL"
    acquisition_type.ConstantVolumeFlag = "NO"
    acquisition_type.FluoroscopyFlag = "NO"
    shared.CTAcquisitionTypeSequence = DicomSequence([acquisition_type])

    details = Dataset()
    details.DataCollectionDiameter = 500.0
    details.RevolutionTime = 0.5
    details.SingleCollimationWidth = 0.625
    details.TotalCollimationWidth = 40.0
    details.TableHeight = 150.0
    details.GantryDetectorTilt = 0.0
    details.RotationDirection = "CW"
    shared.CTAcquisitionDetailsSequence = DicomSequence([details])

    dynamics = Dataset()
    dynamics.TableSpeed = 80.0
    dynamics.TableFeedPerRotation = 40.0
    dynamics.SpiralPitchFactor = 1.0
    shared.CTTableDynamicsSequence = DicomSequence([dynamics])

    geometry = Dataset()
    geometry.DistanceSourceToDetector = 1040.0
    geometry.DistanceSourceToDataCollectionCenter = 570.0
    shared.CTGeometrySequence = DicomSequence([geometry])

    reconstruction = Dataset()
    reconstruction.ReconstructionAlgorithm = "FILTER_BACK_PROJ"
    reconstruction.ConvolutionKernel = "LUNG"
    reconstruction.ConvolutionKernelGroup = "LUNG"
    reconstruction.ReconstructionDiameter = round(pixel_spacing_mm * ds.Columns, 6)
    reconstruction.ReconstructionPixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]
    reconstruction.ReconstructionAngle = 360.0
    reconstruction.ImageFilter = "LUNG"
    shared.CTReconstructionSequence = DicomSequence([reconstruction])

    exposure = Dataset()
    exposure.ExposureTimeInms = 500.0
    exposure.XRayTubeCurrentInmA = 200.0
    exposure.ExposureInmAs = 100.0
    exposure.ExposureModulationType = "NONE"
    exposure.CTDIvol = 8.0
    phantom = Dataset()
    phantom.CodeValue, phantom.CodingSchemeDesignator, phantom.CodeMeaning = _BODY_PHANTOM
    exposure.CTDIPhantomTypeCodeSequence = DicomSequence([phantom])
    shared.CTExposureSequence = DicomSequence([exposure])

    xray = Dataset()
    xray.KVP = 120
    xray.FocalSpots = [1.0]
    xray.FilterType = "BODY"
    xray.FilterMaterial = ["ALUMINUM"]
    shared.CTXRayDetailsSequence = DicomSequence([xray])
    return shared
