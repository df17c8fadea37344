"""The pixel pipeline: DICOM (or PNG/JPEG) pixels to the model's 224x224 uint8 input, one named step per function.

DICOM order (PS3.4 N.2.1.1): decode -> modality LUT / rescale -> VOI LUT or window ->
MONOCHROME1 inversion, then the part shared with training images (:func:`normalize_grayscale`):
8-bit -> pad to square -> 224x224 resize. Change any behaviour here and bump
:data:`PREPROCESSING_VERSION`: it is stored with every model and every prediction.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
from pydicom.encaps import generate_frames
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_modality_lut, apply_voi, apply_windowing
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID

from covid_cxr.constants import IMAGE_SIZE
from covid_cxr.errors import InputRejected
from covid_cxr.reasons import Reason
from ingest.codestream import CodestreamHeader, check_codestream_matches
from ingest.decoders import HTJ2K_SYNTAXES, IMAGECODECS, PILLOW_REDUCED, PYLIBJPEG, choose_plugin, register_plugins
from ingest.decoders.pillow_plugin import pillow_can_reduce, reduced_size
from ingest.metadata import transfer_syntax_of

#: Identifies the behaviour of the whole pipeline (DICOM and PNG/JPEG paths). Bump on any output change.
PREPROCESSING_VERSION = "cxr-norm-5"

#: Percentiles of the fallback window (of non-padding pixels): robust to a few hot or dead pixels and labels.
PERCENTILE_WINDOW = (0.5, 99.5)
#: A stated VOI "does not fit" when more than this fraction of pixels saturate at either end...
VOI_MAX_SATURATED_FRACTION = 0.95
#: ... or when its output's standard deviation is below this many 8-bit grey levels.
VOI_MIN_STD_LEVELS = 4.0
#: Statistics (percentiles, fit check) use a regular subsample of about this many pixels.
STATISTICS_SAMPLE_PIXELS = 1 << 18
#: Images whose stored values span fewer values than this go through a per-value lookup table.
MAX_LOOKUP_TABLE_ENTRIES = 1 << 20
#: 16-bit table lookups run over bands of about this many pixels: a band's indices and output stay in the
#: CPU cache, which makes numpy's lookup about twice as fast as one call over the whole image.
LOOKUP_BAND_PIXELS = 1 << 18
#: The area resize integrates bands of rows of about this many pixels at a time (4 MiB of int32 sums).
INTEGRAL_BAND_PIXELS = 1 << 20
#: The largest sum an int32 integral image holds: a band of a very wide uint8 image is kept below it.
_INT32_SUM_LIMIT = (1 << 31) - 1
#: A JPEG 2000 image is decoded at the coarsest resolution level whose longer side is still at least this
#: (twice the model's input), so that the area resize to 224 still averages 2 x 2 or more decoded pixels.
REDUCED_DECODE_MIN_SIDE = 2 * IMAGE_SIZE

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
#: Compressed syntaxes whose codestreams end with the FFD9 marker (JPEG EOI, JPEG 2000 EOC).
_SYNTAXES_WITH_END_MARKER = frozenset(
    [*pydicom.uid.JPEGTransferSyntaxes, *pydicom.uid.JPEGLSTransferSyntaxes, *pydicom.uid.JPEG2000TransferSyntaxes]
)
_END_OF_IMAGE = b"\xff\xd9"
#: Steps :func:`normalize_grayscale` always runs, in order (some may be no-ops for a given image).
GRAYSCALE_STEPS = ("to_uint8", "pad_to_square", f"resize_{IMAGE_SIZE}")


register_plugins()

#: Standard transfer syntaxes newer than the installed pydicom knows, named in a rejection so that an operator
#: sees what arrived (DICOM 2024, Supplement 232).
NEWER_SYNTAX_NAMES = {
    "1.2.840.10008.1.2.4.110": "JPEG XL Lossless",
    "1.2.840.10008.1.2.4.111": "JPEG XL JPEG Recompression",
    "1.2.840.10008.1.2.4.112": "JPEG XL",
}


def _syntax_name(uid: UID) -> str:
    """The transfer syntax's name; a UID pydicom does not know is named from :data:`NEWER_SYNTAX_NAMES`, or said
    to be unknown (a private or a newer syntax), instead of repeating the UID."""
    if uid.name != str(uid):
        return uid.name
    return NEWER_SYNTAX_NAMES.get(str(uid), "unknown to this installation (private, or newer than pydicom)")


# --- DICOM steps ------------------------------------------------------------------------------


def check_decodable(ds: pydicom.Dataset) -> UID:
    """Refuse, before any decoding, what the pipeline cannot or must not decode; return the transfer syntax.

    Raises :class:`InputRejected` with ``unsupported_photometric`` (anything but one sample of
    MONOCHROME1/2), ``unsupported_transfer_syntax`` (no decoder, or its plugin is not
    installed: the message names it) or ``truncated`` (native pixel data shorter than
    Rows x Columns x frames x BitsAllocated needs).
    """
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    samples = _int_or_none(ds, "SamplesPerPixel")
    if photometric not in MONOCHROME or samples not in (None, 1):
        shown = photometric or "missing"
        raise InputRejected(
            f"PhotometricInterpretation {shown} with SamplesPerPixel {samples}: only single-sample "
            "MONOCHROME1/MONOCHROME2 radiographs are accepted",
            reason=Reason.UNSUPPORTED_PHOTOMETRIC,
        )
    syntax = transfer_syntax_of(ds)
    if syntax is None:
        raise InputRejected(
            "no Transfer Syntax UID (file without file meta) and the encoding cannot be inferred",
            reason=Reason.UNSUPPORTED_TRANSFER_SYNTAX,
        )
    uid = UID(syntax)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise InputRejected(
            f"no pixel data decoder exists for transfer syntax {_syntax_name(uid)} ({uid})",
            reason=Reason.UNSUPPORTED_TRANSFER_SYNTAX,
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)  # "<plugin> - requires <packages>" each
        raise InputRejected(
            f"the decoder for {uid.name} ({uid}) is not installed ({missing})",
            reason=Reason.UNSUPPORTED_TRANSFER_SYNTAX,
        )
    if not uid.is_compressed and "PixelData" in ds:
        try:
            expected = int(get_expected_length(ds, unit="bytes"))
            actual = len(ds.PixelData)
        except Exception as exc:  # missing Rows/BitsAllocated etc.: the decoder reports it properly
            raise InputRejected(
                f"the Image Pixel module is incomplete or invalid: {exc}", reason=Reason.DECODE_FAILED
            ) from exc
        if actual < expected:
            raise InputRejected(
                f"pixel data has {actual} bytes, the header needs {expected}",
                reason=Reason.TRUNCATED,
            )
    return uid


#: What a decoder call may raise that is not the decoder failing: stop requests pass through untouched.
#: Everything else is caught, including ``pyo3_runtime.PanicException`` (a Rust decoder's panic on a
#: corrupt codestream), which derives from BaseException and would otherwise stop the ingester.
NOT_DECODER_FAILURES = (KeyboardInterrupt, SystemExit, GeneratorExit)


def decode(ds: pydicom.Dataset, *, frame: int | None = None) -> np.ndarray:
    """Decode one frame's stored values (2-D, the file's dtype) with pydicom and the plugin ingest.decoders picks.

    ``frame`` is the 0-based frame to decode; ``None`` requires a single-frame image.
    Runs :func:`check_decodable` first; a JPEG / JPEG-LS / JPEG 2000 frame must end with its
    end marker (else ``truncated``) and declare the header's size (else ``codestream_mismatch``)
    before any decoder sees it. A JPEG 2000 image much larger than the model's input is
    decoded at a reduced resolution level (:func:`reduction_level`), so the array can be
    smaller than Rows x Columns. Decoder errors become ``decode_failed``.
    """
    uid = check_decodable(ds)
    decoder = get_decoder(uid)
    plugin = choose_plugin(uid)
    options: dict[str, Any] = {}
    if uid in _SYNTAXES_WITH_END_MARKER:
        codestream = _frame_codestream(ds, uid, frame or 0)
        rows, columns = _int_or_none(ds, "Rows"), _int_or_none(ds, "Columns")
        header = check_codestream_matches(codestream, rows, columns, _int_or_none(ds, "SamplesPerPixel"), uid.name)
        level = reduction_level(header) if uid in pydicom.uid.JPEG2000TransferSyntaxes else 0
        if plugin == IMAGECODECS and uid in HTJ2K_SYNTAXES and header.reversible is not True:
            # OpenJPH does not clamp an irreversible (9/7) reconstruction to the sample range: a saturated 8-bit
            # pixel came back 0 instead of 255. openjpeg does; a reversible codestream is exact in both.
            plugin = PYLIBJPEG
        if level and PILLOW_REDUCED in decoder.available_plugins:
            plugin = PILLOW_REDUCED
            options = {"j2k_reduce": level, "j2k_precision": header.precision,
                       "rows": reduced_size(header.rows, level), "columns": reduced_size(header.columns, level)}
    try:
        arr, _ = decoder.as_array(ds, index=frame, decoding_plugin=plugin, **options)
    except BaseException as exc:  # the plugins raise anything from ValueError to a Rust panic (BaseException)
        if isinstance(exc, NOT_DECODER_FAILURES):
            raise
        raise InputRejected(
            f"{uid.name} pixel data could not be decoded: {type(exc).__name__}: {exc}",
            reason=Reason.DECODE_FAILED,
        ) from exc
    if arr.ndim != 2:
        raise InputRejected(
            f"decoded pixel data has shape {arr.shape}, expected one 2-D frame",
            reason=Reason.DECODE_FAILED,
        )
    return arr


def reduction_level(header: CodestreamHeader) -> int:
    """How many JPEG 2000 resolution levels to skip: the most that keep the longer side >= REDUCED_DECODE_MIN_SIDE.

    Bounded by the codestream's decomposition levels; 0 (full resolution) for signed,
    multi-component or over-16-bit codestreams, and levels Pillow cannot size correctly
    (:func:`~ingest.decoders.pillow_plugin.pillow_can_reduce`) are passed over for a smaller one.
    """
    if header.signed or header.components != 1 or header.precision > 16 or not header.decomposition_levels:
        return 0
    longer = max(header.rows, header.columns)
    for level in range(header.decomposition_levels, 0, -1):
        if (reduced_size(longer, level) >= REDUCED_DECODE_MIN_SIDE
                and pillow_can_reduce(header.rows, header.columns, level)):
            return level
    return 0


def _frame_codestream(ds: pydicom.Dataset, uid: UID, frame: int) -> bytes:
    """The encapsulated codestream of ``frame``, refused as ``truncated`` when it lacks its end marker (FFD9).

    libjpeg decodes a codestream cut in half without complaint and fills the rest, so a cut
    frame would otherwise reach the model as a plausible-looking image. Scan data cannot
    contain FFD9 (byte stuffing), and encoders pad after the marker with at most a few
    0x00/0xFF bytes, hence the search in the last 16 bytes.
    """
    frames = _int_or_none(ds, "NumberOfFrames") or 1
    try:
        codestreams = generate_frames(ds.PixelData, number_of_frames=frames)
        codestream = next(itertools.islice(codestreams, frame, None), None)
        if codestream is None:
            raise ValueError(f"frame {frame} is missing")
    except Exception as exc:  # malformed items: the file lost bytes or was damaged
        raise InputRejected(
            f"the encapsulated {uid.name} pixel data is incomplete: {type(exc).__name__}: {exc}",
            reason=Reason.TRUNCATED,
        ) from exc
    if _END_OF_IMAGE not in codestream[-16:]:
        raise InputRejected(
            f"the {uid.name} codestream of frame {frame} has no end marker (FFD9): it was cut",
            reason=Reason.TRUNCATED,
        )
    return codestream


def padding_mask(stored: np.ndarray, ds: pydicom.Dataset) -> np.ndarray | None:
    """Pixels equal to PixelPaddingValue (or within PixelPaddingRangeLimit), ``None`` when the tag is absent.

    Padding marks "no image here" (outside a collimated or shuttered area); it is left out of
    every statistic and shown black.
    """
    value = _int_or_none(ds, "PixelPaddingValue")
    if value is None:
        return None
    limit = _int_or_none(ds, "PixelPaddingRangeLimit")
    if limit is None:
        mask = stored == value
    else:
        low, high = sorted((value, limit))
        mask = (stored >= low) & (stored <= high)
    return mask if mask.any() else None


def apply_modality(stored: np.ndarray, ds: pydicom.Dataset) -> tuple[np.ndarray, tuple[str, ...]]:
    """Stored values -> modality values: Modality LUT Sequence if present, else RescaleSlope/Intercept (pydicom).

    Returns the values and ``("modality_lut_sequence",)``, ``("rescale",)`` or ``()`` (identity).
    A malformed LUT or rescale raises ``decode_failed``.
    """
    if ds.get("ModalityLUTSequence"):
        step = "modality_lut_sequence"
    elif "RescaleSlope" in ds and "RescaleIntercept" in ds:
        step = "rescale"
    else:
        return stored, ()
    try:
        values = apply_modality_lut(stored, ds)
    except Exception as exc:
        raise InputRejected(
            f"the modality LUT / rescale could not be applied: {type(exc).__name__}: {exc}",
            reason=Reason.DECODE_FAILED,
        ) from exc
    return values, (step,)


def apply_voi_or_window(
    values: np.ndarray,
    ds: pydicom.Dataset,
    *,
    sample: np.ndarray | None = None,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Modality values -> display values in [0, 1] (float32, before MONOCHROME1 inversion).

    Statistics are taken from ``sample`` (modality values; default: all of ``values``),
    each counted ``weights`` times (default once); the caller leaves padding out. Policy,
    in order:

    1. a VOI LUT Sequence, its first item (pydicom's preference when a window is also present);
    2. else WindowCenter/WindowWidth, the first pair when several (VOILUTFunction honoured);
    3. else, for data of at most 8 bits stored, their full range (``bits_stored_range``):
       such images are display-ready, like the PNG/JPEG training images, and a DICOM and a
       PNG copy of one image must give the same model input;
    4. else a percentile window, 0.5 to 99.5 % of the sample.

    The VOI output is scaled by the VOI's own output range (not the image's), so a stated
    window keeps its meaning. A stated VOI that is malformed, or that "does not fit" (see
    :func:`voi_fits`), is replaced by the percentile window: a radiograph with real contrast
    never comes out near-constant because of a wrong header.

    Returns the display values and the steps that ran: ``voi_lut_sequence`` / ``window`` /
    ``bits_stored_range`` / ``percentile_window``, plus ``voi_fallback_percentile`` when one of
    the first three was replaced.
    """
    sample = values.ravel() if sample is None else sample
    stated = _stated_voi(ds)
    if stated is None:
        if (_int_or_none(ds, "BitsStored") or 16) > 8:
            return percentile_window(values, sample, weights), ("percentile_window",)
        stated = "bits_stored_range"
    try:
        display = _apply_stated_voi(values, ds, stated)
        fits = display is not None and voi_fits(_apply_stated_voi(sample, ds, stated), sample, weights)
    except Exception:  # a window width < 1, a LUT with a bad descriptor...: not a reason to reject
        display, fits = None, False
    if display is not None and fits:
        return display, (stated,)
    return percentile_window(values, sample, weights), (stated, "voi_fallback_percentile")


def voi_fits(shown: np.ndarray | None, sample: np.ndarray, weights: np.ndarray | None = None) -> bool:
    """Whether a stated VOI keeps the contrast of ``sample`` (modality values); ``shown`` is its [0, 1] output.

    False when more than 95 % of the (weighted) pixels saturate at either end, or the
    output's std is below 4 grey levels, while the input's 0.5th and 99.5th percentiles
    differ. ``None`` (a VOI without a usable output range) never fits.
    """
    if shown is None:
        return False
    if sample.size == 0:
        return True
    weights = np.ones(sample.shape) if weights is None else weights.astype(np.float64)
    low, high = weighted_percentiles(sample, weights, PERCENTILE_WINDOW)
    if high <= low:
        return True  # nothing to rescue: the pixels themselves are (nearly) constant
    total = weights.sum()
    saturated = weights[(shown <= 0.5 / 255) | (shown >= 254.5 / 255)].sum()
    if saturated > VOI_MAX_SATURATED_FRACTION * total:
        return False
    mean = float(np.dot(weights, shown) / total)
    std = math.sqrt(max(0.0, float(np.dot(weights, (shown - mean) ** 2) / total)))
    return std * 255.0 >= VOI_MIN_STD_LEVELS


def percentile_window(
    values: np.ndarray, sample: np.ndarray | None = None, weights: np.ndarray | None = None
) -> np.ndarray:
    """Linear window from the 0.5th to the 99.5th percentile of ``sample`` (default: all of ``values``), to [0, 1].

    Percentiles are pixel values (:func:`weighted_percentiles`); min..max is used when they
    coincide, and a constant image maps to 0.
    """
    sample = values.ravel() if sample is None else sample
    if sample.size == 0:
        return np.zeros(values.shape, dtype=np.float32)
    weights = np.ones(sample.shape) if weights is None else weights
    low, high = weighted_percentiles(sample, weights, PERCENTILE_WINDOW)
    if high <= low:
        low, high = float(sample.min()), float(sample.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    return _scale_to_unit(values, low, high)


def weighted_percentiles(values: np.ndarray, weights: np.ndarray, percents: tuple[float, ...]) -> tuple[float, ...]:
    """The smallest value whose cumulative weight reaches each percent of the total (inverted CDF)."""
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(np.asarray(weights, dtype=np.float64)[order])
    targets = np.asarray(percents, dtype=np.float64) / 100.0 * cumulative[-1]
    positions = np.minimum(np.searchsorted(cumulative, targets, side="left"), len(order) - 1)
    return tuple(float(values[order[position]]) for position in positions)


def invert_monochrome1(display: np.ndarray, ds: pydicom.Dataset) -> tuple[np.ndarray, tuple[str, ...]]:
    """Make bones bright: ``1 - display`` when PhotometricInterpretation is MONOCHROME1, else unchanged.

    Decided by PhotometricInterpretation alone. Presentation LUT Shape is not consulted: for
    CR/DX it must agree with it (INVERSE goes with MONOCHROME1, PS3.3 C.8.11.6.1.2), so
    honouring both would invert twice, and deciding by it alone leaves MONOCHROME1 files
    without the tag negative.
    """
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        return 1.0 - display, ("invert_monochrome1",)
    return display, ()


def display_from_stored(
    stored: np.ndarray, ds: pydicom.Dataset, *, sample: np.ndarray | None = None
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Stored values -> display values in [0, 1], bones bright: modality, VOI/window, MONOCHROME1, padding.

    Every step is a function of the stored value alone, so ``stored`` may be the image or
    just the range of values it contains (see :func:`normalize_radiograph`); ``sample``
    (default: ``stored``) holds the stored values statistics are taken from. Pixels marked by
    PixelPaddingValue are left out of the statistics and shown black.
    """
    distinct, counts = _value_counts(stored.ravel() if sample is None else sample)
    sample_padding = padding_mask(distinct, ds)
    if sample_padding is not None:
        distinct, counts = distinct[~sample_padding], counts[~sample_padding]
    values, steps = apply_modality(stored, ds)
    sample_values, _ = apply_modality(distinct, ds)
    display, ran = apply_voi_or_window(values, ds, sample=sample_values, weights=counts)
    steps += ran
    display, ran = invert_monochrome1(display, ds)
    steps += ran
    padding = padding_mask(stored, ds)
    if padding is not None:
        display = np.where(padding, np.float32(0.0), display)
        steps += ("pixel_padding_black",)
    return display, steps


def normalize_radiograph(ds: pydicom.Dataset, *, frame: int | None = None) -> tuple[np.ndarray, tuple[str, ...]]:
    """A DICOM radiograph -> the model's 224x224 uint8 input, plus the names of the steps that ran.

    Runs :func:`decode`, :func:`display_from_stored` and :func:`normalize_grayscale`. Because
    the DICOM steps map each stored value independently, they are run once per distinct
    value (at most 65536 for 16-bit data) and the resulting 8-bit table is looked up per
    pixel (:func:`lookup`), as viewers do: the same result as running them on every pixel,
    several times faster. Raises :class:`InputRejected` (``unsupported_photometric``,
    ``unsupported_transfer_syntax``, ``truncated``, ``decode_failed``); policy checks
    (modality, body part, view, size) are the reader's job and are not made here.
    """
    stored = decode(ds, frame=frame)
    sample = _sample(stored)
    low, high = int(stored.min()), int(stored.max())
    if stored.dtype.kind in "iu" and high - low < MAX_LOOKUP_TABLE_ENTRIES:
        domain = np.arange(low, high + 1, dtype=np.int64)
        display, steps = display_from_stored(domain, ds, sample=sample)
        image = lookup(stored, to_uint8(display), low)
    else:
        display, steps = display_from_stored(stored, ds, sample=sample)
        image = to_uint8(display)
    return normalize_grayscale(image), ("decode",) + steps + GRAYSCALE_STEPS


def lookup(stored: np.ndarray, table: np.ndarray, first: int) -> np.ndarray:
    """``table[value - first]`` for every pixel of a 2-D integer image with values in first..first + len(table) - 1.

    Exact, and without a wider copy of the image: 8-bit images go through OpenCV's table
    lookup; 16-bit ones index a table of all 65536 bit patterns (two's complement for signed
    data), in bands of :data:`LOOKUP_BAND_PIXELS` that stay in the CPU cache. Other integer
    images index ``table`` directly.
    """
    bits = stored.dtype.itemsize * 8
    if stored.dtype.kind not in "iu" or bits > 16 or not stored.dtype.isnative:
        return np.asarray(table[stored.astype(np.int64) - first])
    by_pattern = np.zeros(1 << bits, dtype=table.dtype)
    by_pattern[np.arange(first, first + table.size) & ((1 << bits) - 1)] = table
    if bits == 8:
        return np.asarray(cv2.LUT(stored.view(np.uint8), by_pattern))
    patterns = stored.view(np.uint16)
    out = np.empty(stored.shape, dtype=table.dtype)
    rows = max(1, LOOKUP_BAND_PIXELS // max(1, stored.shape[1]))
    for start in range(0, stored.shape[0], rows):
        np.take(by_pattern, patterns[start:start + rows], out=out[start:start + rows], mode="clip")
    return out


# --- shared by DICOM serving and PNG/JPEG training ---------------------------------------------


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Display-ready grayscale of any dtype -> uint8.

    * uint8: unchanged.
    * float: display values in [0, 1] (what the DICOM VOI step produces), clipped, x255, rounded.
    * bool: 0/255.
    * other integers (e.g. a 16-bit PNG, which carries no window): min..max stretched to 0..255.
    """
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.bool_:
        return image.astype(np.uint8) * np.uint8(255)
    if np.issubdtype(image.dtype, np.floating):
        scaled: np.ndarray = np.clip(image, 0.0, 1.0, dtype=np.float32) * np.float32(255.0)
        np.rint(scaled, out=scaled)
        return scaled.astype(np.uint8)
    if np.issubdtype(image.dtype, np.integer):
        low, high = int(image.min()), int(image.max())
        if high <= low:
            return np.zeros(image.shape, dtype=np.uint8)
        return to_uint8(_scale_to_unit(image, low, high))
    raise TypeError(f"cannot convert an image of dtype {image.dtype} to 8 bit")


def pad_to_square(image: np.ndarray) -> np.ndarray:
    """Centre the image on a black square of side max(height, width): aspect ratio kept, nothing cropped.

    Why: the signs of COVID-19 pneumonia are peripheral and basal, so cropping to a square
    would cut the costophrenic angles or the lateral lung fields; a plain resize (what the
    original pyimagesearch project did) squeezes heart and lungs by a different factor for
    each source aspect ratio, which the model would have to learn away. Black is what an
    unexposed border looks like after windowing, and it invents no anatomy (unlike edge
    replication or reflection).
    """
    height, width = image.shape
    side = max(height, width)
    if height == width:
        return image
    top = (side - height) // 2
    left = (side - width) // 2
    return cv2.copyMakeBorder(
        image, top, side - height - top, left, side - width - left, cv2.BORDER_CONSTANT, value=0
    )


def resize_to_input(image: np.ndarray) -> np.ndarray:
    """2-D image -> IMAGE_SIZE x IMAGE_SIZE, centred on a black square first (:func:`pad_to_square`): area average
    when shrinking, bilinear when enlarging.

    Area averaging weighs every source pixel by how much of it an output pixel covers (no
    aliasing of fine lines or noise); it is computed from the image's integral image
    (:func:`area_means`), so neither the padded square nor a full-resolution float copy is
    made. OpenCV's area mode degenerates to nearest-neighbour when enlarging, hence bilinear
    there (on the padded square: such images are small). Integer images come out rounded to
    the nearest value of their dtype (halves up), float images in their dtype.
    """
    if max(image.shape) < IMAGE_SIZE:
        return np.asarray(cv2.resize(pad_to_square(image), (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_LINEAR))
    means = area_means(image)
    if image.dtype.kind in "iu":  # halves round up, as OpenCV's area resize does by an integer factor
        info = np.iinfo(image.dtype)
        rounded: np.ndarray = np.clip(np.floor(means + 0.5), info.min, info.max).astype(image.dtype)
        return rounded
    return means.astype(image.dtype)


def area_means(image: np.ndarray) -> np.ndarray:
    """The mean of each IMAGE_SIZE x IMAGE_SIZE output pixel's area of the image centred on a black square of side
    max(height, width) (float64): what resizing that padded square with area interpolation computes.

    An output pixel covers side / IMAGE_SIZE source pixels along each axis, with fractional
    edges. The integral image (the sum of all pixels above and left of a pixel corner) is
    bilinear between pixel corners, so the sum over such a rectangle is exact from the
    integral at the pixel corners around its four corners: about 450 x 450 values for any
    image size, after one pass that computes the integral. The padding adds nothing to a sum,
    so it is never made.
    """
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"expected a non-empty 2-D image, got shape {image.shape}")
    height, width = image.shape
    side = max(height, width)
    row_knots, row_positions, row_fractions = _output_edges(height, side)
    column_knots, column_positions, column_fractions = _output_edges(width, side)
    corners = _integral_at(image, row_knots, column_knots)
    below = corners[row_positions]
    at_rows = below + (corners[row_positions + 1] - below) * row_fractions[:, None]
    left = at_rows[:, column_positions]
    at_edges = left + (at_rows[:, column_positions + 1] - left) * column_fractions[None, :]
    sums = np.diff(np.diff(at_edges, axis=0), axis=1)
    scale = side / IMAGE_SIZE
    return np.asarray(sums / (scale * scale), dtype=np.float64)


def _output_edges(length: int, side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where the IMAGE_SIZE + 1 output pixel edges fall along one axis of an image of ``length`` pixels centred
    in ``side``: the pixel corners needed (sorted), and for each edge the index into them of the corner at or
    before it and the fraction of a pixel past that corner. Edges in the padding are clamped to the image."""
    before = (side - length) // 2
    edges = np.clip(np.arange(IMAGE_SIZE + 1, dtype=np.float64) * side / IMAGE_SIZE - before, 0.0, float(length))
    corner = np.minimum(np.floor(edges).astype(np.int64), length - 1)
    knots = np.union1d(corner, corner + 1)
    return knots, np.searchsorted(knots, corner), edges - corner


def _integral_at(image: np.ndarray, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """The sum of ``image[:r, :c]`` for every r of ``rows`` and c of ``columns`` (sorted), as float64.

    OpenCV integrates bands of about :data:`INTEGRAL_BAND_PIXELS` (in int32 for uint8 images,
    the bands small enough that none overflows; else in float64), and the bands are added up
    in float64: exact for uint8 images of any size (every sum below 2**53 is), and no
    full-resolution integral is held.
    """
    height, width = image.shape
    exact = image.dtype == np.uint8 and 255 * (width + 1) <= _INT32_SUM_LIMIT
    if not exact and image.dtype not in (np.float32, np.float64):
        image = image.astype(np.float64)
    band = max(1, INTEGRAL_BAND_PIXELS // width)
    if exact:
        band = min(band, _INT32_SUM_LIMIT // (255 * (width + 1)))
    result = np.empty((rows.size, columns.size), dtype=np.float64)
    result[: np.searchsorted(rows, 0, side="right")] = 0.0  # corners on the top edge: nothing above them
    above = np.zeros(columns.size, dtype=np.float64)  # the integral at the band's first row
    for start in range(0, height, band):
        stop = min(height, start + band)
        integral = cv2.integral(np.ascontiguousarray(image[start:stop]), sdepth=cv2.CV_32S if exact else cv2.CV_64F)
        first, last = np.searchsorted(rows, [start, stop], side="right")  # rows in start + 1 .. stop
        result[first:last] = np.take(np.take(integral, rows[first:last] - start, axis=0), columns, axis=1)
        result[first:last] += above
        above += np.take(integral[-1], columns)
    return result


def normalize_grayscale(image: np.ndarray) -> np.ndarray:
    """2-D display-ready grayscale (any dtype, bones bright) -> 224x224 uint8.

    THE function shared by training and serving: :func:`to_uint8`, then :func:`resize_to_input`,
    which pads to a square (:func:`pad_to_square`) and resizes (the steps named in
    :data:`GRAYSCALE_STEPS`). Raises ``ValueError`` for anything but a non-empty 2-D array.
    """
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"expected a non-empty 2-D grayscale image, got shape {image.shape}")
    return np.ascontiguousarray(resize_to_input(to_uint8(image)))


def load_image_file(path: Path) -> np.ndarray:
    """Decode a PNG/JPEG (any channels, EXIF orientation ignored) to 2-D grayscale uint8.

    OpenCV's grayscale decode (luma 0.299 R + 0.587 G + 0.114 B for colour files); 16-bit
    files are min-max stretched to 8 bit by :func:`to_uint8`. An unreadable or undecodable
    file raises :class:`InputRejected` with reason ``decode_failed``.
    """
    try:
        encoded = np.fromfile(Path(path), dtype=np.uint8)
    except OSError as exc:
        raise InputRejected(f"cannot read {path}: {exc}", reason=Reason.DECODE_FAILED) from exc
    flags = cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_IGNORE_ORIENTATION
    image = cv2.imdecode(encoded, flags) if encoded.size else None
    if image is None or image.ndim != 2 or image.size == 0:
        raise InputRejected(f"{path} is not a decodable PNG/JPEG image", reason=Reason.DECODE_FAILED)
    return to_uint8(image)


# --- helpers ----------------------------------------------------------------------------------


def _int_or_none(ds: pydicom.Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value is not None and str(value).strip() != "" else None
    except Exception:  # damaged values are treated as absent
        return None


def _scale_to_unit(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map low -> 0, high -> 1, clipped, as float32."""
    scale = np.float32(1.0 / (high - low))
    out = values.astype(np.float32)
    out -= np.float32(low)
    out *= scale
    return np.clip(out, 0.0, 1.0, out=out)


def _value_counts(sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of ``sample`` and how often each occurs (a histogram for integers: no sorting)."""
    if sample.size and sample.dtype.kind in "iu":
        low, high = int(sample.min()), int(sample.max())
        if high - low < MAX_LOOKUP_TABLE_ENTRIES:
            counts = np.bincount(sample.astype(np.int64) - low if low else sample)
            present = np.flatnonzero(counts)
            return present + low, counts[present]
    distinct, counts = np.unique(sample, return_counts=True)
    return distinct, counts


def _sample(image: np.ndarray) -> np.ndarray:
    """A regular grid subsample of about STATISTICS_SAMPLE_PIXELS pixels, flattened."""
    stride = max(1, int(math.sqrt(image.size / STATISTICS_SAMPLE_PIXELS)))
    return image[::stride, ::stride].ravel()


def _stated_voi(ds: pydicom.Dataset) -> str | None:
    """Which VOI the header states: ``voi_lut_sequence``, ``window`` or ``None`` (as pydicom's apply_voi_lut
    decides)."""
    sequence = ds.get("VOILUTSequence")
    if sequence and "LUTDescriptor" in sequence[0] and "LUTData" in sequence[0]:
        return "voi_lut_sequence"
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        return "window"
    return None


def _apply_stated_voi(values: np.ndarray, ds: pydicom.Dataset, stated: str) -> np.ndarray | None:
    """Apply the first VOI LUT or window with pydicom (or the stored range) and scale by its output range to [0, 1]."""
    if stated == "voi_lut_sequence":
        # A LUT is indexed by integers; rescale may have produced integral floats.
        indices = np.rint(values).astype(np.int64) if values.dtype.kind == "f" else values
        output = apply_voi(indices, ds, index=0)
        descriptor = ds.VOILUTSequence[0].LUTDescriptor
        entries, first = int(descriptor[0]) or 65536, int(descriptor[1])
        lut = apply_voi(np.arange(first, first + entries, dtype=np.int64), ds, index=0)
        low, high = float(lut.min()), float(lut.max())
    elif stated == "window":
        output = apply_windowing(values, ds, index=0)
        # Far below and far above the window give the window's own output range.
        low, high = (float(v) for v in apply_windowing(np.array([-np.inf, np.inf]), ds, index=0))
    else:  # bits_stored_range: the modality values of the smallest and largest storable value
        bits = int(ds.BitsStored)
        signed = _int_or_none(ds, "PixelRepresentation") == 1
        extremes = np.array([-(1 << (bits - 1)), (1 << (bits - 1)) - 1] if signed else [0, (1 << bits) - 1])
        low, high = sorted(float(v) for v in apply_modality(extremes, ds)[0])
        output = values
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return None
    return _scale_to_unit(output, low, high)
