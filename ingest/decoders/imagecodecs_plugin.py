"""pydicom decoding plugin over imagecodecs: libjpeg-turbo 3 for JPEG (lossless and lossy), CharLS for JPEG-LS."""

from __future__ import annotations

import importlib
from typing import Any

from pydicom import uid
from pydicom.pixels.decoders.base import DecodeRunner

imagecodecs: Any
try:
    imagecodecs = importlib.import_module("imagecodecs")
except ImportError:  # the plugin is then listed as unavailable, with DECODER_DEPENDENCIES as the reason
    imagecodecs = None

#: What the plugin needs per transfer syntax (pydicom's plugin interface; shown when it is missing).
DECODER_DEPENDENCIES = {
    uid.JPEGBaseline8Bit: ("numpy", "imagecodecs>=2024.1"),
    uid.JPEGExtended12Bit: ("numpy", "imagecodecs>=2024.1"),
    uid.JPEGLosslessSV1: ("numpy", "imagecodecs>=2024.1"),
    uid.JPEGLSLossless: ("numpy", "imagecodecs>=2024.1"),
    uid.JPEGLSNearLossless: ("numpy", "imagecodecs>=2024.1"),
}
_JPEG_SYNTAXES = frozenset({uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLosslessSV1})


def is_available(transfer_syntax: str) -> bool:
    """Whether imagecodecs is installed with the codec for ``transfer_syntax`` (pydicom's plugin interface)."""
    if imagecodecs is None or transfer_syntax not in DECODER_DEPENDENCIES:
        return False
    codec = imagecodecs.JPEG8 if transfer_syntax in _JPEG_SYNTAXES else imagecodecs.JPEGLS
    return bool(codec.available)


def decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """One decoded single-sample frame, in the container (8 or 16 bits) the codestream's precision needs.

    Colour frames are refused (``ValueError``): libjpeg-turbo would convert YCbCr to RGB where
    pydicom's other plugins keep it, and covid-cxr reads only grayscale radiographs.
    """
    if runner.samples_per_pixel != 1:
        raise ValueError("the imagecodecs plugin of covid-cxr decodes single-sample (grayscale) frames only")
    jpeg = runner.transfer_syntax in _JPEG_SYNTAXES
    array = imagecodecs.jpeg8_decode(src) if jpeg else imagecodecs.jpegls_decode(src)
    if array.ndim != 2:
        raise ValueError(f"expected one grayscale frame, the codestream decoded to shape {array.shape}")
    runner.set_option("bits_allocated", array.dtype.itemsize * 8)
    return bytes(array.tobytes())
