"""The stored form of a normalized image: a lossless 8-bit greyscale PNG (``normalized_images.png``)."""

from __future__ import annotations

import cv2
import numpy as np


def encode_png(image: np.ndarray) -> bytes:
    """``image`` (2-D uint8) as PNG bytes; raises ``ValueError`` if OpenCV cannot encode it."""
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(image, dtype=np.uint8))
    if not ok:
        raise ValueError(f"could not PNG-encode an image of shape {image.shape}")
    return bytes(encoded.tobytes())
