"""Grad-CAM heatmaps for one image on demand (``covid-cxr inspect FILE --explain``, ``covid-cxr explain``, the
dashboard's ``/images/ID/explain.png``).

Never in the batch path: one image, one forward and backward pass, overlaid on the 224x224 model input.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from covid_cxr.constants import CLASS_NAMES, IMAGE_SIZE, POSITIVE_CLASS
from covid_cxr.errors import UsageError
from covid_cxr.reasons import Reason
from covid_cxr.settings import Settings
from model_store.architecture import to_model_input

if TYPE_CHECKING:
    import keras

#: The VGG16 base's last convolution: the finest map that still sees the whole head's evidence.
DEFAULT_LAYER = "block5_conv3"


def last_conv_layer(model: keras.Model) -> str:
    """:data:`DEFAULT_LAYER` when the model has it, else the name of its last 4-D (convolutional) output."""
    names = [layer.name for layer in model.layers]
    if DEFAULT_LAYER in names:
        return DEFAULT_LAYER
    for layer in reversed(model.layers):
        if type(layer).__name__ == "Conv2D":
            return str(layer.name)
    raise ValueError("the model has no convolutional layer to explain")


def grad_cam(model: keras.Model, image: np.ndarray, layer: str | None = None,
             class_name: str = POSITIVE_CLASS) -> np.ndarray:
    """Grad-CAM (Selvaraju et al. 2017) of ``class_name`` for one ``(224, 224)`` uint8 image.

    Returns ``(224, 224)`` float32 in [0, 1]: the ReLU of the layer's channels weighted by their mean gradient,
    resized to the input and divided by its maximum (all zeros when no channel speaks for the class).
    """
    import keras
    import tensorflow as tf

    name = layer or last_conv_layer(model)
    probe = keras.Model(model.inputs, [model.get_layer(name).output, model.output])
    x = tf.convert_to_tensor(to_model_input(image))
    with tf.GradientTape() as tape:
        activations, outputs = probe(x, training=False)
        target = outputs[:, CLASS_NAMES.index(class_name)]
    gradients = tape.gradient(target, activations)
    weights = tf.reduce_mean(gradients, axis=(1, 2))
    cam = tf.nn.relu(tf.reduce_sum(activations * weights[:, tf.newaxis, tf.newaxis, :], axis=-1))[0].numpy()
    cam = cv2.resize(cam.astype(np.float32), (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_LINEAR)
    peak = float(cam.max())
    normalized: np.ndarray = (cam / peak if peak > 0 else np.zeros_like(cam)).astype(np.float32)
    return normalized


def overlay(image: np.ndarray, heatmap: np.ndarray, opacity: float = 0.4) -> np.ndarray:
    """The heatmap (JET colours) over the grey 224x224 input: ``(224, 224, 3)`` uint8, BGR (OpenCV's order)."""
    grey = cv2.cvtColor(np.asarray(image, dtype=np.uint8), cv2.COLOR_GRAY2BGR)
    colours = cv2.applyColorMap((np.clip(heatmap, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    blended: np.ndarray = cv2.addWeighted(colours, opacity, grey, 1 - opacity, 0)
    return blended


def overlay_png(image: np.ndarray, heatmap: np.ndarray) -> bytes:
    """:func:`overlay` encoded as a PNG (the same bytes for the same image and heatmap)."""
    ok, encoded = cv2.imencode(".png", overlay(image, heatmap))
    if not ok:
        raise UsageError("the heatmap could not be encoded as a PNG", reason=Reason.PNG_NOT_WRITTEN)
    return bytes(encoded.tobytes())


def write_overlay(image: np.ndarray, heatmap: np.ndarray, out: Path, opacity: float = 0.4) -> Path:
    """:func:`overlay`, written as a PNG."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), overlay(image, heatmap, opacity)):
        raise UsageError(f"{out}: could not write the PNG")
    return out


def stored_image(png: bytes | None, instance_id: int) -> np.ndarray:
    """An instance's stored model input (``normalized_images.png``) as ``(224, 224)`` uint8.

    Raises :class:`UsageError` (``no_stored_image``) when there is none (unknown id, rejected, purged) or it is
    not a 224x224 8-bit grey PNG.
    """
    if png is None:
        raise UsageError(f"instance {instance_id} has no stored normalized image", reason=Reason.NO_STORED_IMAGE)
    image = cv2.imdecode(np.frombuffer(png, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.shape != (IMAGE_SIZE, IMAGE_SIZE) or image.dtype != np.uint8:
        raise UsageError(f"instance {instance_id}: the stored image is not a 224x224 8-bit PNG",
                         reason=Reason.NO_STORED_IMAGE)
    return np.asarray(image)


def explain_image(model: keras.Model, metadata: dict[str, Any], image: np.ndarray, out: Path) -> dict[str, Any]:
    """Grad-CAM of one normalized image written to ``out``; returns the score, the model and the layer."""
    from model_store.calibration import apply_calibration

    raw = np.asarray(model(to_model_input(image), training=False))[0, CLASS_NAMES.index(POSITIVE_CLASS)]
    score = float(apply_calibration([float(raw)], metadata.get("calibration"))[0])
    layer = last_conv_layer(model)
    write_overlay(image, grad_cam(model, image, layer), out)
    return {"explain": str(out), "layer": layer, "model": f"{metadata.get('name')} {metadata.get('version')}",
            "score": score, "threshold": metadata.get("decision_threshold")}


def active_model(settings: Settings) -> tuple[keras.Model, dict[str, Any]]:
    """The active registered model of ``settings.model_name`` and its metadata."""
    from model_store.registry import get_active, load_registered_model

    record = get_active(settings, settings.model_name)
    return load_registered_model(settings, record), dict(record.metadata_json)


def explain_file(settings: Settings, path: Path, out: Path) -> dict[str, Any]:
    """Grad-CAM of a file read as training and serving read it (PNG/JPEG or DICOM), with the active model."""
    from model_store.dataset import Dataset, Item, load_images

    images = load_images(Dataset([Item(Path(path), POSITIVE_CLASS, "one", Path(path).name)], {}, CLASS_NAMES,
                                 False), settings, progress=False)
    model, metadata = active_model(settings)
    return explain_image(model, metadata, images[0], out)


def explain_instance(settings: Settings, instance_id: int, out: Path) -> dict[str, Any]:
    """Grad-CAM of a stored instance's normalized image (from the database), with the active model."""
    from db.migrate import prepare_database
    from db.models import NormalizedImage
    from db.session import session_scope

    prepare_database(settings)
    with session_scope(settings) as session:
        stored = session.get(NormalizedImage, instance_id)
        png = None if stored is None or stored.png is None else bytes(stored.png)  # purged images keep no PNG
    image = stored_image(png, instance_id)
    model, metadata = active_model(settings)
    return explain_image(model, metadata, image, out)
