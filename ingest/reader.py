"""Reads one file into a normalized radiograph and kept metadata, or a typed rejection; never raises for any bytes."""

from __future__ import annotations

import hashlib
import io
import logging
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeAlias

import numpy as np
import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.errors import BytesLengthException

from covid_cxr.constants import FRONTAL_VIEWS, IMAGE_SIZE
from covid_cxr.errors import ConfigurationError, InputRejected
from covid_cxr.reasons import Reason
from ingest.header_rules import check_header_rules
from ingest.limits import check_plausible_part10
from ingest.metadata import InstanceMetadata, sop_class_name, transfer_syntax_of
from ingest.pixels import NOT_DECODER_FAILURES, PREPROCESSING_VERSION, normalize_radiograph
from ingest.quality import QualityAssessment, QualityCheck, QualityPolicy, assess_image, load_quality_model

logger = logging.getLogger(__name__)

MULTI_FRAME_POLICIES = ("reject", "first_frame")
#: Words taken to mean the chest (CID 4031 "CHEST", older "THORAX", vendor and national variants).
#: Matched per word, so "PORT CHEST" or "CHEST_PA" count too; "THORACIC" does not (TSPINE).
CHEST_WORDS = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS", "TORAX", "TORACE", "THORAKS", "POITRINE"})
#: Words naming a region that is not the chest, looked for only when BodyPartExamined is absent.
OTHER_REGION_WORDS = frozenset({
    "SKULL", "HEAD", "BRAIN", "SINUS", "SINUSES", "FACE", "ORBIT", "MANDIBLE", "JAW", "TEETH", "TOOTH", "DENTAL",
    "OPG", "PANORAMIC", "NECK", "SPINE", "CSPINE", "TSPINE", "LSPINE", "SSPINE", "PELVIS", "HIP", "HIPS", "SACRUM",
    "ABDOMEN", "KUB", "SHOULDER", "CLAVICLE", "HUMERUS", "ELBOW", "FOREARM", "WRIST", "HAND", "FINGER", "FEMUR",
    "KNEE", "TIBIA", "LEG", "ANKLE", "FOOT", "TOE", "EXTREMITY", "BREAST", "MAMMO", "MAMMOGRAPHY",
})
#: Where a region is looked for when BodyPartExamined is absent, in order.
_REGION_DESCRIPTIONS = ("StudyDescription", "SeriesDescription", "ProtocolName", "RequestedProcedureDescription")
#: ViewPosition values meaning a lateral projection (PS3.3 C.8.11.5 defines LL and RL).
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "L", "LLAT", "RLAT"})
#: A file without the DICM prefix is taken as DICOM only if a forced read starts with one of
#: these groups (file meta, or the identifying group every IOD starts with).
_PLAUSIBLE_FIRST_GROUPS = (0x0002, 0x0008)
_IDENTIFYING_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "MediaStorageSOPClassUID")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")
#: What pydicom raises when the bytes end inside an element's tag, VR or length.
_END_OF_DATA = (EOFError, OSError, struct.error, BytesLengthException)
_UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class ReaderPolicy:
    """What the reader accepts; build it with :meth:`from_settings` in the service.

    ``allowed_modalities``: Modality values accepted as radiographs. ``max_pixels``: limit on
    Rows x Columns x NumberOfFrames, checked before any decoding. ``multi_frame_policy``:
    ``"reject"`` or ``"first_frame"``. ``pseudonym_secret``: HMAC key for patient ids.
    ``quality``: what each quality check does when it fires (default: the service's defaults).
    Raises ``ValueError`` when a field is invalid.
    """

    allowed_modalities: frozenset[str]
    max_pixels: int
    multi_frame_policy: str
    pseudonym_secret: bytes = field(repr=False)
    quality: QualityPolicy = field(default_factory=QualityPolicy)

    def __post_init__(self) -> None:
        modalities = frozenset(str(m).strip().upper() for m in self.allowed_modalities)
        if not modalities:
            raise ValueError("allowed_modalities must name at least one modality, e.g. {'CR', 'DX'}")
        object.__setattr__(self, "allowed_modalities", modalities)
        if not isinstance(self.max_pixels, int) or self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be a positive int, got {self.max_pixels!r}")
        if self.multi_frame_policy not in MULTI_FRAME_POLICIES:
            raise ValueError(f"multi_frame_policy must be one of {MULTI_FRAME_POLICIES}, "
                             f"got {self.multi_frame_policy!r}")
        if not isinstance(self.pseudonym_secret, bytes) or not self.pseudonym_secret:
            raise ValueError("pseudonym_secret must be non-empty bytes")
        if not isinstance(self.quality, QualityPolicy):
            raise ValueError(f"quality must be a QualityPolicy, got {type(self.quality).__name__}")

    @classmethod
    def from_settings(cls, settings: Any) -> ReaderPolicy:
        """The policy configured in :class:`covid_cxr.settings.Settings` (may create the pseudonym key file).

        Raises :class:`~covid_cxr.errors.ConfigurationError` when the settings make no valid policy
        or the quality model cannot be read (checked here, so that a service fails at start-up).
        """
        try:
            load_quality_model()
            return cls(
                allowed_modalities=frozenset(settings.allowed_modalities),
                max_pixels=int(settings.max_pixels),
                multi_frame_policy=str(settings.multi_frame_policy),
                pseudonym_secret=settings.pseudonym_secret,
                quality=QualityPolicy.from_settings(settings),
            )
        except ValueError as exc:
            raise ConfigurationError(f"invalid DICOM acceptance policy: {exc}") from exc


@dataclass(frozen=True)
class AcceptedResult:
    """A file read into the model's input: a 224x224 uint8 radiograph, with the metadata kept from its header.

    ``steps`` are the pixel pipeline steps that ran; ``flags`` note accepted oddities (``view_unknown``,
    ``body_part_unknown``, ``view_not_frontal``, ``first_frame_only``, ``voi_did_not_fit``, and the quality
    checks' ``qc_<check>_flagged`` / ``qc_<check>_corrected``); ``quality`` holds every quality check's outcome.
    Raises ``ValueError`` when ``image`` is not the model's input.
    """

    sha256: str
    metadata: InstanceMetadata
    image: np.ndarray = field(repr=False)
    steps: tuple[str, ...]
    flags: tuple[str, ...] = ()
    quality: tuple[QualityCheck, ...] = ()
    #: ``image`` as the PNG the database stores, when it was encoded where it was read (a decode process).
    png: bytes | None = field(default=None, repr=False, compare=False)
    accepted: ClassVar[Literal[True]] = True
    reason: ClassVar[None] = None

    def __post_init__(self) -> None:
        if self.image.shape != (IMAGE_SIZE, IMAGE_SIZE) or self.image.dtype != np.uint8:
            raise ValueError(f"an accepted image must be ({IMAGE_SIZE}, {IMAGE_SIZE}) uint8, "
                             f"got {self.image.shape} {self.image.dtype}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary without the image (and without any clear patient identifier)."""
        return _summary(self, "accepted", self.steps)


@dataclass(frozen=True)
class RejectedResult:
    """A file the service cannot use; ``rejection`` carries the reason code and a message for people.

    ``metadata`` is set whenever the header could be parsed (duplicate detection needs the UIDs).
    ``flags`` are those of the header checks when the pixel pipeline or an image check rejected the file,
    else empty; ``quality`` the outcomes of the quality checks that ran.
    """

    sha256: str
    metadata: InstanceMetadata | None
    rejection: InputRejected
    flags: tuple[str, ...] = ()
    quality: tuple[QualityCheck, ...] = ()
    accepted: ClassVar[Literal[False]] = False

    @property
    def reason(self) -> Reason:
        """The rejection's reason code."""
        return self.rejection.reason

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without any clear patient identifier)."""
        return _summary(self, self.rejection.message, ())


#: The outcome of reading one file; ``accepted`` tells which (and narrows the type).
ReadResult: TypeAlias = AcceptedResult | RejectedResult


def _summary(result: ReadResult, message: str, steps: tuple[str, ...]) -> dict[str, Any]:
    return {
        "accepted": result.accepted,
        "reason": result.reason,
        "message": message,
        "sha256": result.sha256,
        "preprocessing_version": PREPROCESSING_VERSION,
        "metadata": None if result.metadata is None else result.metadata.to_dict(),
        "steps": list(steps),
        "flags": list(result.flags),
        "quality": [check.to_dict() for check in result.quality],
    }


def read_radiograph(source: Path | bytes, policy: ReaderPolicy, *, sha256: str | None = None) -> ReadResult:
    """Read a DICOM file (path or bytes) into an :class:`AcceptedResult` or a :class:`RejectedResult`.

    Never raises for any input bytes: every problem becomes a rejection with a
    :class:`~covid_cxr.reasons.Reason` of kind rejection. Only reading a path can raise ``OSError``
    (missing file, permissions): that is a problem of the file system, not of the input,
    and the caller may retry. ``sha256``: the hex digest of the bytes, when the caller has
    already computed it (the ingest service has, to recognise files it recorded before).
    """
    data = bytes(source if isinstance(source, bytes | bytearray | memoryview) else Path(source).read_bytes())
    if sha256 is None:
        sha256 = hashlib.sha256(data).hexdigest()
    result: ReadResult
    try:
        result = _read(data, sha256, policy)
    except BaseException as exc:  # a bug in covid-cxr (or a library's panic): the file still gets a typed answer
        if isinstance(exc, NOT_DECODER_FAILURES):
            raise
        logger.error("internal error reading sha256=%s", sha256, exc_info=True)
        rejection = InputRejected(f"internal error: {type(exc).__name__}", reason=Reason.INTERNAL_ERROR)
        result = RejectedResult(sha256, None, rejection)
    _log(result)
    return result


def _read(data: bytes, sha256: str, policy: ReaderPolicy) -> ReadResult:
    """The reader's steps in order; the first one that raises :class:`InputRejected` decides the rejection."""
    metadata: InstanceMetadata | None = None
    flags: tuple[str, ...] = ()
    checks: tuple[QualityCheck, ...] = ()
    try:
        ds, cut = parse_dataset(data)
        metadata = InstanceMetadata.from_dataset(ds, pseudonym_secret=policy.pseudonym_secret)
        check_complete(cut)  # after the metadata is kept: a truncated file still has its UIDs
        frame, flags, checks = check_acceptance(ds, metadata, policy)
        image, steps = normalize_pixels(ds, metadata, frame)
        if "voi_fallback_percentile" in steps:
            flags += ("voi_did_not_fit",)
        assessment = check_image_quality(image, metadata, policy)
    except InputRejected as rejection:
        if metadata is None and rejection.reason == Reason.TRUNCATED:
            metadata = _salvage_metadata(data, policy)
        return RejectedResult(sha256, metadata, rejection, flags, checks + getattr(rejection, "checks", ()))
    return AcceptedResult(sha256, metadata, assessment.image, steps, flags + assessment.flags,
                          checks + assessment.checks)


def parse_dataset(data: bytes) -> tuple[pydicom.Dataset, str | None]:
    """The dataset in ``data`` and the tag of an element the file ends inside of (``None``: none is cut).

    Rejects with ``not_dicom`` (empty, not DICOM, DICM followed by no plausible element, unparseable header)
    or ``truncated`` (the file ends inside the header, or inside an undefined-length element).
    """
    if not data:
        raise InputRejected("the file is empty (0 bytes)", reason=Reason.NOT_DICOM)
    part10 = len(data) >= 132 and data[128:132] == b"DICM"
    if part10:
        check_plausible_part10(data)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not part10)
    except _END_OF_DATA as exc:
        if part10:
            raise InputRejected(f"the file ends inside its header ({type(exc).__name__}: {exc})",
                                reason=Reason.TRUNCATED) from exc
        raise InputRejected("no DICM prefix and not parseable as DICOM", reason=Reason.NOT_DICOM) from exc
    except Exception as exc:  # unknown VR, bad characters...: a corrupt header, not a cut one
        prefix = "has the DICM prefix but its header" if part10 else "no DICM prefix, and the bytes"
        raise InputRejected(f"{prefix} cannot be parsed as DICOM ({type(exc).__name__})",
                            reason=Reason.NOT_DICOM) from exc
    cut = _cut_element(ds, len(data))  # first: reading a value converts its element and hides its raw length
    if not part10 and not _looks_like_dicom(ds):
        raise InputRejected("no DICM prefix and no plausible DICOM elements", reason=Reason.NOT_DICOM)
    if len(ds) == 0:
        # pydicom drops the whole dataset when the file ends inside an undefined-length
        # element (encapsulated pixel data or a sequence without its delimiter).
        raise InputRejected("the file ends before the dataset does (no delimiter for an undefined-length element)",
                            reason=Reason.TRUNCATED)
    return ds, cut


def check_complete(cut: str | None) -> None:
    """Rejects a file that ends inside element ``cut`` (from :func:`parse_dataset`)."""
    if cut is not None:
        raise InputRejected(f"the file ends inside element {cut}", reason=Reason.TRUNCATED)


def check_acceptance(ds: pydicom.Dataset, metadata: InstanceMetadata,
                     policy: ReaderPolicy) -> tuple[int | None, tuple[str, ...], tuple[QualityCheck, ...]]:
    """Whether the header describes an image the policy accepts: the frame to read, the flags and the outcomes
    of the header quality rules (:mod:`ingest.header_rules`), or a rejection."""
    check_is_image(ds, metadata)
    check_modality(metadata, policy)
    flags = [*check_body_part(ds, metadata), *check_view(metadata)]
    header_flags, checks = check_header_rules(ds, metadata, policy.quality)
    flags += header_flags
    frame = frame_to_read(metadata, policy)
    if frame is not None:
        flags.append("first_frame_only")
    check_pixel_count(metadata, policy)
    return frame, tuple(flags), checks


def check_is_image(ds: pydicom.Dataset, metadata: InstanceMetadata) -> None:
    """Rejects a non-image SOP class, and an image object without Pixel Data."""
    sop_name = sop_class_name(metadata.sop_class_uid)
    if sop_name is not None and "Image Storage" not in sop_name:
        raise InputRejected(f"SOP class {sop_name} is not an image", reason=Reason.NOT_AN_IMAGE)
    if "PixelData" not in ds:
        raise InputRejected(f"{sop_name or 'the object'} has no Pixel Data element", reason=Reason.NO_PIXEL_DATA)


def check_modality(metadata: InstanceMetadata, policy: ReaderPolicy) -> None:
    """Rejects a Modality the policy does not accept as a radiograph."""
    modality = (metadata.modality or "").upper()
    if modality not in policy.allowed_modalities:
        allowed = ", ".join(sorted(policy.allowed_modalities))
        raise InputRejected(f"Modality {modality or 'missing'} is not accepted (accepted: {allowed})",
                            reason=Reason.WRONG_MODALITY)


def check_body_part(ds: pydicom.Dataset, metadata: InstanceMetadata) -> tuple[str, ...]:
    """Rejects a region other than the chest; flags ``body_part_unknown`` when nothing names a region."""
    body_part = metadata.body_part_examined
    if body_part is not None:
        if not CHEST_WORDS.intersection(_words(body_part)):
            raise InputRejected(f"BodyPartExamined is {body_part}, not the chest", reason=Reason.WRONG_BODY_PART)
        return ()
    described = _described_region(ds)
    if described is not None:
        raise InputRejected(f"BodyPartExamined is absent and {described[0]} names {described[1]}, not the chest",
                            reason=Reason.WRONG_BODY_PART)
    return ("body_part_unknown",)


def check_view(metadata: InstanceMetadata) -> tuple[str, ...]:
    """Rejects a lateral view; flags a missing (``view_unknown``) or unusual (``view_not_frontal``) one."""
    view = (metadata.view_position or "").upper()
    if view in LATERAL_VIEWS:
        raise InputRejected(f"ViewPosition {view} is a lateral view; only frontal views are accepted",
                            reason=Reason.LATERAL_VIEW)
    if not view:
        return ("view_unknown",)
    return () if view in FRONTAL_VIEWS else ("view_not_frontal",)


def frame_to_read(metadata: InstanceMetadata, policy: ReaderPolicy) -> int | None:
    """``None`` for a single-frame image, 0 for a multi-frame one under the ``first_frame`` policy."""
    frames = metadata.number_of_frames or 1
    if frames <= 1:
        return None
    if policy.multi_frame_policy == "reject":
        raise InputRejected(f"{frames} frames; the multi-frame policy is 'reject'", reason=Reason.MULTI_FRAME)
    return 0


def check_pixel_count(metadata: InstanceMetadata, policy: ReaderPolicy) -> None:
    """The decompression-bomb guard, from the header alone (before any decoding)."""
    frames = metadata.number_of_frames or 1
    pixels = (metadata.rows or 0) * (metadata.columns or 0) * frames
    if pixels > policy.max_pixels:
        raise InputRejected(f"{metadata.rows} x {metadata.columns} x {frames} frames = {pixels} pixels exceeds "
                            f"the limit of {policy.max_pixels}", reason=Reason.TOO_LARGE)


def normalize_pixels(ds: pydicom.Dataset, metadata: InstanceMetadata,
                      frame: int | None) -> tuple[np.ndarray, tuple[str, ...]]:
    """:func:`~ingest.pixels.normalize_radiograph`, with any failure but its own rejections as ``decode_failed``."""
    try:
        return normalize_radiograph(ds, frame=frame)
    except InputRejected:
        raise
    except Exception as exc:  # corrupt header values surface as anything from TypeError to IndexError
        logger.warning("pixel pipeline failed for sop_instance_uid=%s", metadata.sop_instance_uid, exc_info=True)
        raise InputRejected(f"the pixel pipeline failed: {type(exc).__name__}: {exc}",
                            reason=Reason.DECODE_FAILED) from exc


def check_image_quality(image: np.ndarray, metadata: InstanceMetadata, policy: ReaderPolicy) -> QualityAssessment:
    """The image checks of :func:`ingest.quality.assess_image` on the normalized image (corrected where the policy
    says so); the decoded frame's Rows x Columns tell the padding apart from the image."""
    shape = (metadata.rows, metadata.columns) if metadata.rows and metadata.columns else None
    return assess_image(image, shape, policy.quality)


def _words(text: str) -> set[str]:
    return set(re.split(r"[^A-Z]+", text.upper())) - {""}


def _described_region(ds: pydicom.Dataset) -> tuple[str, str] | None:
    """(keyword, region) when, without BodyPartExamined, the header still names a region other than the chest.

    Looks at the coded Anatomic Region Sequence, then the free-text descriptions; a text that
    also mentions the chest is not evidence against it. ``None``: nothing names a region.
    """
    texts: list[tuple[str, str]] = []
    try:
        for item in ds.get("AnatomicRegionSequence") or []:
            texts.append(("AnatomicRegionSequence", str(item.get("CodeMeaning", ""))))
    except Exception:  # a damaged sequence is no evidence either way
        pass
    for keyword in _REGION_DESCRIPTIONS:
        try:
            texts.append((keyword, str(ds.get(keyword) or "")))
        except Exception:  # a damaged value is no evidence either way
            continue
    for keyword, text in texts:
        words = _words(text)
        if words & CHEST_WORDS:
            return None
        named = sorted(words & OTHER_REGION_WORDS)
        if named:
            return keyword, named[0]
    return None


def _looks_like_dicom(ds: pydicom.Dataset) -> bool:
    """Whether a forced read of bytes without the DICM prefix found real DICOM rather than noise.

    Requires the first element to be in group 0002 or 0008 and an identifying UID that
    looks like a UID. Random bytes fail both; a preamble-less file passes.
    """
    file_meta = getattr(ds, "file_meta", None)
    tags = [*(file_meta.keys() if file_meta else []), *ds.keys()]
    if not tags or min(tags).group not in _PLAUSIBLE_FIRST_GROUPS:
        return False
    for keyword in _IDENTIFYING_KEYWORDS:
        for holder in (ds, file_meta):
            if holder is None:
                continue
            try:
                value = holder.get(keyword)
            except Exception:  # a damaged UID is not evidence of DICOM
                continue
            if value is not None and _UID.match(str(value).strip("\x00 ")):
                return True
    return False


def _cut_element(ds: pydicom.Dataset, size: int) -> str | None:
    """The tag of a top-level element the file ends inside of, ``None`` when every element is complete.

    pydicom keeps a short value when the bytes run out inside it; an undefined-length element
    (encapsulated pixel data) must also be followed by its 8-byte sequence delimiter. Element
    positions are only checked for non-deflated files, where they are file offsets.
    """
    deflated = transfer_syntax_of(ds) == pydicom.uid.DeflatedExplicitVRLittleEndian
    for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset yields elements, not tags
        # get_item returns the element unconverted (its typing overload says DataElement only).
        element: DataElement | RawDataElement = ds.get_item(tag, keep_deferred=True)
        if not isinstance(element, RawDataElement) or not isinstance(element.value, bytes):
            continue
        if element.length != _UNDEFINED_LENGTH:
            if len(element.value) < element.length:
                return str(element.tag)
        elif not deflated and element.value_tell + len(element.value) + 8 > size:
            return str(element.tag)
    return None


def _salvage_metadata(data: bytes, policy: ReaderPolicy) -> InstanceMetadata | None:
    """Metadata of a damaged file from the header alone (pixel data skipped), ``None`` when even that fails."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        if len(ds) == 0:
            return None
        return InstanceMetadata.from_dataset(ds, pseudonym_secret=policy.pseudonym_secret)
    except Exception:  # nothing to salvage
        return None


def _log(result: ReadResult) -> None:
    uid = result.metadata.sop_instance_uid if result.metadata else None
    if result.accepted:
        logger.debug("accepted sop_instance_uid=%s sha256=%s steps=%s", uid, result.sha256, ",".join(result.steps))
    else:
        logger.info(
            "rejected sop_instance_uid=%s sha256=%s reason=%s: %s",
            uid,
            result.sha256,
            result.rejection.reason,
            result.rejection.message,
        )
