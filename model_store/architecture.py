"""The classifier: the origin's Keras VGG16 base plus its small head, and the model's input scaling.

Keras (and so TensorFlow) is imported inside the functions that need it, so that importing
:func:`to_model_input` stays cheap for light processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from covid_cxr.constants import CLASS_NAMES, IMAGE_SIZE
from covid_cxr.errors import UsageError
from covid_cxr.reasons import Reason

if TYPE_CHECKING:
    import keras

INPUT_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)
ARCHITECTURE = "vgg16-avgpool4-dense64-dropout0.5-softmax2"
#: How uint8 grey values become model input; recorded in every artifact's metadata.
INPUT_SCALING = ("keras.applications.vgg16.preprocess_input ('caffe'): grey 0..255 in all three channels minus the "
                 "ImageNet BGR means (103.939, 116.779, 123.68)")
#: The per-channel means VGG16's ImageNet weights were trained with, in the weights' BGR channel order.
IMAGENET_BGR_MEANS = np.array([103.939, 116.779, 123.68], dtype=np.float32)

#: The VGG16 blocks, in order; ``trainable_from`` names one of them.
BLOCKS: tuple[str, ...] = ("block1", "block2", "block3", "block4", "block5")
#: Names of the head's layers, after the base's ``block5_pool``.
HEAD_LAYERS: tuple[str, ...] = ("head_pool", "head_flatten", "head_dense", "head_dropout", "predictions")


def to_model_input(images: np.ndarray) -> np.ndarray:
    """Scale normalized grayscale images the way the model expects; used by training and serving.

    The scaling of Keras's VGG16 ``preprocess_input`` (what its ImageNet weights expect), computed here
    without TensorFlow. Why not the origin's ``/ 255``: it is not the scaling of the ImageNet weights, and with
    random base weights it shrinks block-4 activations about 200-fold (std 0.003 against 0.5 measured
    here), so training block 5 stalled at loss ln 2 while this scaling learned.

    Parameters
    ----------
    images
        ``(N, 224, 224)`` uint8 images from the ingest pipeline (one image ``(224, 224)`` is accepted).

    Returns
    -------
    numpy.ndarray
        ``(N, 224, 224, 3)`` float32: the grey value in every channel minus :data:`IMAGENET_BGR_MEANS`.
    """
    images = np.asarray(images)
    if images.ndim == 2:
        images = images[np.newaxis]
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected (N, {IMAGE_SIZE}, {IMAGE_SIZE}) grayscale images, got shape {images.shape}")
    if images.dtype != np.uint8:
        raise TypeError(f"expected uint8 images from the ingest pipeline, got {images.dtype}")
    return images.astype(np.float32)[..., np.newaxis] - IMAGENET_BGR_MEANS


def resolve_trainable_from(trainable_from: str | None) -> str | None:
    """Validate a ``trainable_from`` block name; ``None``/``"none"`` means the whole base is frozen."""
    if trainable_from is None or str(trainable_from).lower() == "none":
        return None
    name = str(trainable_from).lower()
    if name not in BLOCKS:
        raise UsageError(f"unknown block {trainable_from!r}: choose one of {', '.join(BLOCKS)} or 'none'",
                         reason=Reason.BAD_TRAINABLE_FROM)
    return name


def build_model(base_weights: str | Path | None = None, trainable_from: str | None = None) -> keras.Model:
    """The origin's model: Keras VGG16 without top, then AveragePooling 4x4, Flatten, Dense 64, Dropout 0.5, Dense 2.

    Parameters
    ----------
    base_weights
        ``None``/``"none"`` (random initialisation), ``"imagenet"`` (Keras downloads its published file),
        or the path of a local HDF5 file in the layout of Keras's ``vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5``.
    trainable_from
        First trainable block (``"block1"`` .. ``"block5"``); ``None`` freezes the whole base as the origin did.
        The head is always trainable.

    Returns
    -------
    keras.Model
        ``(N, 224, 224, 3)`` float32 -> ``(N, 2)`` softmax probabilities in :data:`CLASS_NAMES` order.
    """
    import keras

    from model_store.weights import load_base_weights

    first_trainable = resolve_trainable_from(trainable_from)
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=INPUT_SHAPE)
    load_base_weights(base, base_weights)
    trainable = False
    for layer in base.layers:
        if first_trainable is not None and layer.name.startswith(first_trainable + "_"):
            trainable = True
        layer.trainable = trainable

    x = keras.layers.AveragePooling2D(pool_size=(4, 4), name=HEAD_LAYERS[0])(base.output)
    x = keras.layers.Flatten(name=HEAD_LAYERS[1])(x)
    x = keras.layers.Dense(64, activation="relu", name=HEAD_LAYERS[2])(x)
    x = keras.layers.Dropout(0.5, name=HEAD_LAYERS[3])(x)
    outputs = keras.layers.Dense(len(CLASS_NAMES), activation="softmax", name=HEAD_LAYERS[4])(x)
    return keras.Model(inputs=base.input, outputs=outputs, name="covid_cxr_vgg16")


def split_point(trainable_from: str | None) -> str:
    """Name of the last frozen layer whose output can be cached: the pool before the first trainable block."""
    first_trainable = resolve_trainable_from(trainable_from)
    if first_trainable is None:
        return "block5_pool"
    index = BLOCKS.index(first_trainable)
    return "input" if index == 0 else f"{BLOCKS[index - 1]}_pool"
