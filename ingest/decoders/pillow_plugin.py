"""pydicom decoding plugin over Pillow's OpenJPEG binding: JPEG 2000 decoded at a reduced resolution level.

OpenJPEG can stop the inverse wavelet transform ``level`` levels early and skip the code
blocks of the finer levels, which gives the image at 1/2**level of its size for a fraction
of the work. pylibjpeg-openjpeg does not expose this; Pillow does (``Image.reduce``). The
level travels as the decoding option ``j2k_reduce``, with ``rows`` and ``columns`` set to the
reduced size (``ceil(size / 2**level)``, OpenJPEG's rule).
"""

from __future__ import annotations

import io

import numpy as np
from pydicom import uid
from pydicom.pixels.decoders.base import DecodeRunner

try:
    from PIL import Jpeg2KImagePlugin, features
except ImportError:  # the plugin is then listed as unavailable, with DECODER_DEPENDENCIES as the reason
    HAVE_PILLOW = False
else:
    HAVE_PILLOW = True

DECODER_DEPENDENCIES = {
    uid.JPEG2000Lossless: ("numpy", "pillow>=10"),
    uid.JPEG2000: ("numpy", "pillow>=10"),
}


def is_available(transfer_syntax: str) -> bool:
    """Whether Pillow is installed with its OpenJPEG decoder (pydicom's plugin interface)."""
    if not HAVE_PILLOW or transfer_syntax not in DECODER_DEPENDENCIES:
        return False
    return bool(features.check_codec("jpg_2000"))


def reduced_size(size: int, level: int) -> int:
    """The size of one dimension at resolution ``level`` (OpenJPEG: ``ceil(size / 2**level)``)."""
    return -(-size // (1 << level))


def pillow_can_reduce(rows: int, columns: int, level: int) -> bool:
    """Whether Pillow gets the reduced size right: it rounds ``size / 2**level`` half up where OpenJPEG takes the
    ceiling, and fails ("broken data stream") when the two differ (a dimension whose remainder is below half)."""
    power = 1 << level
    return all(size % power == 0 or size % power >= power // 2 for size in (rows, columns))


def decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """One single-sample unsigned frame at resolution level ``j2k_reduce``, as stored values (not scaled by Pillow).

    Pillow scales samples of precision p to 16 bits (``value << (16 - p)``); the shift is
    undone here, so that at level 0 the values equal pylibjpeg-openjpeg's bit for bit.
    """
    if runner.samples_per_pixel != 1 or runner.pixel_representation != 0:
        raise ValueError("the Pillow JPEG 2000 plugin of covid-cxr decodes unsigned single-sample frames only")
    level = int(runner.get_option("j2k_reduce", 0))
    precision = int(runner.get_option("j2k_precision", runner.bits_stored))
    with Jpeg2KImagePlugin.Jpeg2KImageFile(io.BytesIO(src)) as image:
        image.reduce = level
        image.load()
        array = np.asarray(image)
    if array.shape != (runner.rows, runner.columns):
        raise ValueError(f"decoded {array.shape} at level {level}, expected {(runner.rows, runner.columns)}")
    if array.dtype == np.uint8:
        runner.set_option("bits_allocated", 8)
        return bytes(array.tobytes())
    if precision < 16:
        array = array >> np.uint16(16 - precision)
    runner.set_option("bits_allocated", 16)
    return bytes(array.astype("<u2", copy=False).tobytes())
