"""Cache the frozen part of the base: split the model at the last frozen pool, compute that prefix's outputs once.

The suffix model shares its layers (and so its weights) with the full model: training the suffix on cached
features trains the full model, which is what the artifact saves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np

from model_store.architecture import to_model_input

if TYPE_CHECKING:
    import keras

#: Images per forward pass when computing cached features (memory, not speed, bounds it on CPU).
FEATURE_BATCH = 16


def split_model(model: keras.Model, split_layer: str) -> tuple[keras.Model | None, keras.Model]:
    """``(prefix, suffix)`` with ``suffix(prefix(x)) == model(x)``; ``prefix`` is ``None`` when nothing is frozen.

    ``split_layer`` is the name of the prefix's last layer (see :func:`model_store.architecture.split_point`),
    or ``"input"``. The model must be a chain, as VGG16 plus its head is.
    """
    import keras

    names = [layer.name for layer in model.layers]
    if split_layer == "input":
        return None, model
    position = names.index(split_layer)
    prefix = keras.Model(model.input, model.get_layer(split_layer).output, name="frozen_prefix")
    features = keras.Input(shape=tuple(model.get_layer(split_layer).output.shape[1:]), name="cached_features")
    x = features
    for layer in model.layers[position + 1:]:
        x = layer(x)
    suffix = keras.Model(features, x, name="trainable_suffix")
    return prefix, suffix


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate about the centre, filling with the nearest edge pixel.

    As the origin's Keras augmentation did (``rotation_range``, ``fill_mode="nearest"``).
    """
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2 - 0.5, height / 2 - 0.5), degrees, 1.0)
    return cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def augmented_copies(images: np.ndarray, copies: int, max_degrees: float, seed: int) -> np.ndarray:
    """``(copies, N, 224, 224)`` uint8: each copy rotates each image by its own uniform angle in ``±max_degrees``."""
    rng = np.random.default_rng(seed)
    out = np.empty((copies, *images.shape), dtype=np.uint8)
    for copy in range(copies):
        angles = rng.uniform(-max_degrees, max_degrees, len(images))
        for index, (image, angle) in enumerate(zip(images, angles, strict=False)):
            out[copy, index] = rotate(image, float(angle))
    return out


def compute_features(prefix: keras.Model | None, images: np.ndarray, progress: bool = True,
                     description: str = "features") -> np.ndarray:
    """Run the frozen prefix once over ``(N, 224, 224)`` uint8 images (through :func:`to_model_input`)."""
    from tqdm import tqdm

    if prefix is None:
        return to_model_input(images)
    batches: Sequence[int] = range(0, len(images), FEATURE_BATCH)
    outputs = []
    for start in tqdm(batches, desc=description, unit="batch", disable=not progress):
        batch = to_model_input(images[start:start + FEATURE_BATCH])
        outputs.append(np.asarray(prefix(batch, training=False)))
    if not outputs:
        return np.zeros((0, *prefix.output.shape[1:]), dtype=np.float32)
    return np.concatenate(outputs).astype(np.float32, copy=False)
