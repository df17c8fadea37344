"""Inference in a worker process: the active model (reloaded when the active version changes) and its forward pass.

Keras and its backend (TensorFlow by default; JAX or PyTorch through ``KERAS_BACKEND``) are imported here only
inside functions, so importing this module in the parent worker process (before the pool forks) stays free of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from covid_cxr.constants import CLASS_NAMES, IMAGE_SIZE, POSITIVE_CLASS
from covid_cxr.reasons import Reason
from covid_cxr.settings import Settings

log = logging.getLogger(__name__)

#: How often a worker asks the registry whether the active model changed (seconds).
ACTIVE_MODEL_CHECK_SECONDS = 5.0
#: The image size the model was built for.
IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE)


@dataclass
class LoadedModel:
    """A verified model in memory, with the provenance every prediction records."""

    model: Any = field(repr=False)
    model_id: int | None
    name: str
    version: str
    sha256: str
    threshold: float
    class_names: tuple[str, ...]
    positive_class: str
    preprocessing_version: str | None
    forward: Callable[[np.ndarray], Any] | None = field(default=None, repr=False)
    #: The score scaling fitted at training (metadata ``calibration``); ``None``: raw softmax output.
    calibration: dict[str, Any] | None = None

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """``(N, len(class_names))`` probabilities for ``(N, 224, 224)`` uint8 images: one forward pass, then the
        model's calibration (if it has one) on the positive class, the other class its complement."""
        from model_store.architecture import to_model_input

        x = to_model_input(images)
        outputs = self.forward(x) if self.forward is not None else self.model(x, training=False)
        probabilities = np.asarray(outputs, dtype=np.float64)
        if not np.isfinite(probabilities).all():
            from covid_cxr.errors import ModelError

            bad = int((~np.isfinite(probabilities)).any(axis=1).sum())
            raise ModelError(f"model {self.name} {self.version} gave non-finite probabilities for {bad} of "
                             f"{len(images)} image(s); none stored", reason=Reason.NON_FINITE_SCORES)
        if self.calibration and self.calibration.get("method", "none") != "none":
            from model_store.calibration import apply_calibration

            positive = self.class_names.index(self.positive_class)
            scores = apply_calibration(probabilities[:, positive], self.calibration)
            probabilities = np.stack([scores if i == positive else 1 - scores
                                      for i in range(len(self.class_names))], axis=1)
        return probabilities

    def label_for(self, positive_probability: float) -> str:
        """The positive class at or above the model's decision threshold, the other class below it."""
        if positive_probability >= self.threshold:
            return self.positive_class
        return next(name for name in self.class_names if name != self.positive_class)


def load_active_model(settings: Settings) -> LoadedModel:
    """Fetch the active version of ``settings.model_name`` from the registry and load it in Keras safe mode.

    Raises :class:`~covid_cxr.errors.NoActiveModel` or :class:`~covid_cxr.errors.ModelError`
    (:class:`~covid_cxr.errors.ModelIntegrityError` when the sha256 does not match).
    """
    from model_store.registry import get_active, load_registered_model

    configure_devices()
    record = get_active(settings, settings.model_name)
    started = time.perf_counter()
    model = with_precision(load_registered_model(settings, record), settings.mixed_precision)
    loaded = describe(model, record)
    loaded.forward = compile_forward(model)
    # Trace the compiled function now, so the first batch does not pay for it.
    loaded.probabilities(np.zeros((1, *IMAGE_SHAPE), dtype=np.uint8))
    log.info("loaded model %s version %s (sha256 %s...) in %.1f s, precision %s", loaded.name, loaded.version,
             loaded.sha256[:12], time.perf_counter() - started, settings.mixed_precision)
    return loaded


#: ``COVID_CXR_MIXED_PRECISION`` values and the Keras mixed precision policies they stand for.
PRECISION_POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def with_precision(model: Any, precision: str) -> Any:
    """``model`` rebuilt under the Keras mixed precision policy for ``precision`` (``fp32``: unchanged).

    A saved model names each layer's dtype policy (float32), so loading it under another global
    policy changes nothing: the layers are built again from their configs without it, while the
    global policy is set, and get the loaded weights (kept in float32 by the policy; each layer
    computes in 16 bit). The output layer stays float32, so the softmax and the probabilities the
    worker stores are float32 whatever the precision.
    """
    import keras

    policy = PRECISION_POLICIES[precision]
    if policy == "float32":
        return model
    output_layer = model.layers[-1].name

    def rebuild(layer: Any) -> Any:
        config = layer.get_config()
        config.pop("dtype", None)
        if layer.name == output_layer:
            config["dtype"] = "float32"
        return layer.__class__.from_config(config)

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        mixed = keras.models.clone_model(model, clone_function=rebuild)
    finally:
        keras.mixed_precision.set_global_policy(previous)  # the policy belongs to this model, not the process
    mixed.set_weights(model.get_weights())
    return mixed


def configure_devices() -> list[str]:
    """Let the Keras backend take GPU memory as needed, and say which GPUs inference runs on.

    TensorFlow by default reserves nearly all memory of every visible GPU in the first process
    that touches it, so a second worker process on the same card (or ``--concurrency 2``) would
    fail to start; memory growth lets them share. JAX preallocates 75 % of the card unless
    ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` is set before it starts (set here when it has not
    been). A no-op without GPUs, and once the backend has already initialised its devices.
    """
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        for gpu in gpus:
            with contextlib.suppress(RuntimeError):  # devices already initialised in this process: keep their setting
                tf.config.experimental.set_memory_growth(gpu, True)
        names = [gpu.name for gpu in gpus]
    elif backend == "jax":
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        import jax

        names = [str(device) for device in jax.devices() if device.platform == "gpu"]
    elif backend == "torch":
        import torch

        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        names = []
    log.info("inference devices (Keras backend %s): %s", backend, ", ".join(names) if names else "CPU only (no GPU)")
    return names


def compile_forward(model: Any) -> Callable[[np.ndarray], Any]:
    """``model(x, training=False)`` compiled once for any batch size, by the Keras backend in use.

    TensorFlow: one ``tf.function`` (on two CPU cores 15-25 % less CPU per image than calling the Keras model
    eagerly, ``bench/bench_inference.py --compiled``, identical outputs). Other backends (JAX, PyTorch): Keras's
    own compiled predict step, ``predict_on_batch`` (``jax.jit`` under JAX).
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        predict: Callable[[np.ndarray], Any] = model.predict_on_batch
        return predict
    import tensorflow as tf

    forward: Callable[[np.ndarray], Any] = tf.function(
        lambda x: model(x, training=False), input_signature=[tf.TensorSpec([None, *IMAGE_SHAPE, 3], tf.float32)])
    return forward


def describe(model: Any, record: Any) -> LoadedModel:
    """Pair a loaded Keras model with its registry record's metadata."""
    metadata = dict(getattr(record, "metadata_json", None) or getattr(record, "metadata", None) or {})
    class_names = tuple(metadata.get("class_names") or CLASS_NAMES)
    positive = metadata.get("positive_class") or POSITIVE_CLASS
    if positive not in class_names or len(class_names) != 2:
        from covid_cxr.errors import ModelError

        raise ModelError(f"model {record.name} {record.version} has classes {class_names!r}: "
                         f"expected two classes including {positive!r}")
    return LoadedModel(
        model=model,
        model_id=getattr(record, "id", None),
        name=record.name,
        version=str(record.version),
        sha256=record.sha256,
        threshold=float(override if (override := getattr(record, "threshold_override", None)) is not None
                        else metadata.get("decision_threshold", 0.5)),
        class_names=class_names,
        positive_class=positive,
        preprocessing_version=metadata.get("preprocessing_version"),
        calibration=metadata.get("calibration"),
    )


class ActiveModelCache:
    """The active model of this process, asked for again at most every ``check_seconds``.

    A Keras model is loaded once per version; when the operator activates another version,
    the next batch after the check interval runs on it.
    """

    def __init__(self, check_seconds: float = ACTIVE_MODEL_CHECK_SECONDS) -> None:
        self.check_seconds = check_seconds
        self._lock = threading.Lock()
        self._loaded: dict[tuple[str, str], tuple[LoadedModel, float]] = {}

    def get(self, settings: Settings) -> LoadedModel:
        key = (settings.database, settings.model_name)
        with self._lock:
            cached = self._loaded.get(key)
            if cached is not None and time.monotonic() - cached[1] < self.check_seconds:
                return cached[0]
            from model_store.registry import get_active

            record = get_active(settings, settings.model_name)
            if cached is not None and (cached[0].version, cached[0].sha256) == (str(record.version), record.sha256):
                self._loaded[key] = (cached[0], time.monotonic())
                return cached[0]
            if cached is not None:
                log.info("active model changed from %s to %s: reloading", cached[0].version, record.version)
            self._loaded.pop(key, None)
            loaded = load_active_model(settings)
            self._loaded[key] = (loaded, time.monotonic())
            return loaded

    def clear(self) -> None:
        with self._lock:
            self._loaded.clear()


#: The one cache of a worker process.
MODELS = ActiveModelCache()


def decode_png(png: bytes) -> np.ndarray:
    """The stored normalized image as ``(224, 224)`` uint8; raises ``ValueError`` if it is not one."""
    image = cv2.imdecode(np.frombuffer(png, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError("the stored normalized image is not a decodable PNG")
    if image.dtype != np.uint8 or image.shape != IMAGE_SHAPE:
        raise ValueError(f"the stored normalized image is {image.dtype} {image.shape}, expected uint8 {IMAGE_SHAPE}")
    return image


def stack(images: Sequence[np.ndarray]) -> np.ndarray:
    return np.stack(list(images)).astype(np.uint8, copy=False)
