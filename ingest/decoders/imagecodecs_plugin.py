"""pydicom decoding plugin over imagecodecs: libjpeg-turbo 3 for JPEG (lossless and lossy), CharLS for JPEG-LS,
OpenJPH for High-Throughput JPEG 2000 (HTJ2K)."""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pydicom import uid
from pydicom.pixels.decoders.base import DecodeRunner

from ingest.decoders import HTJ2K_SYNTAXES

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
    uid.HTJ2KLossless: ("numpy", "imagecodecs built with OpenJPH (HTJ2K)"),
    uid.HTJ2KLosslessRPCL: ("numpy", "imagecodecs built with OpenJPH (HTJ2K)"),
    uid.HTJ2K: ("numpy", "imagecodecs built with OpenJPH (HTJ2K)"),
}
_JPEG_SYNTAXES = frozenset({uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLosslessSV1})


def _codec(transfer_syntax: str) -> Any:
    """imagecodecs' codec for ``transfer_syntax`` (``None`` where this imagecodecs has none: HTJ2K is recent)."""
    if transfer_syntax in _JPEG_SYNTAXES:
        return imagecodecs.JPEG8
    if transfer_syntax in HTJ2K_SYNTAXES:
        return getattr(imagecodecs, "HTJ2K", None)
    return imagecodecs.JPEGLS


def is_available(transfer_syntax: str) -> bool:
    """Whether imagecodecs is installed with the codec for ``transfer_syntax`` (pydicom's plugin interface)."""
    if imagecodecs is None or transfer_syntax not in DECODER_DEPENDENCIES:
        return False
    codec = _codec(transfer_syntax)
    return codec is not None and bool(codec.available)


def decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """One decoded single-sample frame, in the container (8 or 16 bits) the codestream's precision needs.

    Colour frames are refused (``ValueError``): libjpeg-turbo would convert YCbCr to RGB where
    pydicom's other plugins keep it, and covid-cxr reads only grayscale radiographs. An HTJ2K
    frame is decoded whole, at full resolution; a signed codestream comes back as its samples,
    and pydicom corrects the sign as it does for openjpeg's output.
    """
    if runner.samples_per_pixel != 1:
        raise ValueError("the imagecodecs plugin of covid-cxr decodes single-sample (grayscale) frames only")
    syntax = runner.transfer_syntax
    if syntax in _JPEG_SYNTAXES:
        array = imagecodecs.jpeg8_decode(src)
    elif syntax in HTJ2K_SYNTAXES:
        with _errors_it_cannot_raise() as errors:
            array = imagecodecs.htj2k_decode(src)
        if errors:
            raise ValueError(f"OpenJPH could not decode the HTJ2K codestream: {errors[0]}")
    else:
        array = imagecodecs.jpegls_decode(src)
    if array.ndim != 2:
        raise ValueError(f"expected one grayscale frame, the codestream decoded to shape {array.shape}")
    runner.set_option("bits_allocated", array.dtype.itemsize * 8)
    return bytes(array.tobytes())


_hook_lock = threading.Lock()


@contextmanager
def _errors_it_cannot_raise() -> Iterator[list[BaseException]]:
    """The exceptions raised inside imagecodecs' callbacks while the block runs.

    OpenJPH reports a corrupt HTJ2K code block from a callback that cannot raise; Python prints it
    ("Exception ignored in ...", raw, to stderr), and the decode returns an image of garbage. The
    errors are collected here instead, so that the frame fails, as the same codestream does when the
    error comes from OpenJPH's main path.
    """
    errors: list[BaseException] = []
    with _hook_lock:
        previous = sys.unraisablehook
        sys.unraisablehook = lambda unraisable: errors.append(unraisable.exc_value or RuntimeError("unknown"))
        try:
            yield errors
        finally:
            sys.unraisablehook = previous
