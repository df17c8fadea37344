"""Which decoder pydicom uses for each transfer syntax: the fastest installed one that is exact, as pydicom plugins.

Every decoder runs through pydicom's one read path (``Decoder.as_array`` with a named
``decoding_plugin``); the plugins of this package are added to pydicom's decoders by
:func:`register_plugins`. :data:`DECODING_PREFERENCE` lists, per syntax, the plugins to try in
order; the first one installed is used (:func:`choose_plugin`). For lossless syntaxes a plugin
is listed before the reference (pylibjpeg) only when its output is bit-identical on the shared
files (tests/test_ingest_decoders.py asserts it); for lossy JPEG the output may differ from the
reference by rounding in the inverse DCT, within a tolerance on the 224 x 224 model input that
the same test states.
"""

from __future__ import annotations

from pydicom import uid
from pydicom.pixels.decoders.base import get_decoder

#: Label of the imagecodecs plugin (libjpeg-turbo 3 for JPEG, CharLS for JPEG-LS).
IMAGECODECS = "imagecodecs"
#: Label of the Pillow plugin that decodes JPEG 2000 at a reduced resolution level.
PILLOW_REDUCED = "pillow-reduced"
#: pydicom's label of the pylibjpeg plugins: the reference decoder of every compressed syntax.
PYLIBJPEG = "pylibjpeg"

#: High-Throughput JPEG 2000 (DICOM 2023; also in pydicom's JPEG2000TransferSyntaxes).
HTJ2K_SYNTAXES = frozenset({uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL, uid.HTJ2K})
#: Plugins to try per transfer syntax, fastest exact first. Syntaxes not listed use the reference alone.
DECODING_PREFERENCE: dict[str, tuple[str, ...]] = {
    uid.JPEGLosslessSV1: (IMAGECODECS, PYLIBJPEG),  # libjpeg-turbo: identical, ~5x faster
    uid.JPEGLSLossless: (IMAGECODECS, PYLIBJPEG),  # CharLS: identical, ~4x faster
    uid.JPEGLSNearLossless: (IMAGECODECS, PYLIBJPEG),  # CharLS: identical, ~4x faster
    uid.JPEGBaseline8Bit: (IMAGECODECS, PYLIBJPEG),  # libjpeg-turbo: lossy, IDCT rounding differs by 1 level
    uid.JPEGExtended12Bit: (IMAGECODECS, PYLIBJPEG),  # libjpeg-turbo: lossy, IDCT rounding differs by 1 level
    # OpenJPH: identical, 1.5-2.5x faster than openjpeg. Only for reversible codestreams: ingest.pixels.decode
    # sends an irreversible (9/7) one to the reference, whose output is clamped to the sample range.
    uid.HTJ2KLossless: (IMAGECODECS, PYLIBJPEG),
    uid.HTJ2KLosslessRPCL: (IMAGECODECS, PYLIBJPEG),
    uid.HTJ2K: (IMAGECODECS, PYLIBJPEG),
}
#: Where each of this package's plugins lives (pydicom imports the function by name).
_PLUGINS = {
    IMAGECODECS: ("ingest.decoders.imagecodecs_plugin", "decode_frame"),
    PILLOW_REDUCED: ("ingest.decoders.pillow_plugin", "decode_frame"),
}
_SYNTAXES = {
    IMAGECODECS: (uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLosslessSV1, uid.JPEGLSLossless,
                  uid.JPEGLSNearLossless, uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL, uid.HTJ2K),
    PILLOW_REDUCED: (uid.JPEG2000Lossless, uid.JPEG2000),
}


def register_plugins() -> None:
    """Add this package's plugins to pydicom's decoders (idempotent; pydicom's registry is process-wide)."""
    for label, syntaxes in _SYNTAXES.items():
        for syntax in syntaxes:
            try:
                get_decoder(syntax).add_plugin(label, _PLUGINS[label])
            except ValueError:  # "already has a plugin named ...": registered by an earlier call
                continue


def choose_plugin(transfer_syntax: str) -> str:
    """The plugin to decode ``transfer_syntax`` with: the first installed one of its preference, else the reference
    (``pylibjpeg`` when installed), else ``""`` (pydicom's own choice)."""
    available = get_decoder(uid.UID(transfer_syntax)).available_plugins
    for label in DECODING_PREFERENCE.get(transfer_syntax, (PYLIBJPEG,)):
        if label in available:
            return label
    return ""
