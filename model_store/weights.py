"""Where the VGG16 base's weights come from: none, Keras's ImageNet download, or a local HDF5 file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from covid_cxr.errors import ModelError
from covid_cxr.hashing import file_sha256
from covid_cxr.reasons import Reason

if TYPE_CHECKING:
    import keras

#: The file Keras downloads for ``weights="imagenet", include_top=False``; air-gapped sites copy it in.
KERAS_NOTOP_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"


def describe_base_weights(base_weights: str | Path | None) -> dict[str, Any]:
    """Provenance of the base weights for an artifact's metadata: kind, and for a file its name and sha256."""
    source = _source(base_weights)
    if isinstance(source, Path):
        return {"source": "file", "file_name": source.name, "sha256": file_sha256(source)}
    return {"source": source}


def load_base_weights(base: keras.Model, base_weights: str | Path | None) -> None:
    """Put the requested weights into a freshly built Keras VGG16 base (``include_top=False``).

    Raises :class:`ModelError` with what to do when ImageNet weights cannot be downloaded or a local
    file is missing, not HDF5, or lacks a VGG16 layer or has one with the wrong shape.
    """
    source = _source(base_weights)
    if isinstance(source, Path):
        _check_weights_file(source, base)
        base.load_weights(str(source), by_name=True)
    elif source == "imagenet":
        _load_imagenet(base)


def _source(base_weights: str | Path | None) -> str | Path:
    """``"none"``, ``"imagenet"``, or the path of a local weights file."""
    if base_weights is None or (isinstance(base_weights, str) and base_weights.lower() in {"", "none"}):
        return "none"
    if isinstance(base_weights, str) and base_weights.lower() == "imagenet":
        return "imagenet"
    return Path(base_weights)


def _load_imagenet(base: keras.Model) -> None:
    import keras

    try:
        reference = keras.applications.VGG16(include_top=False, weights="imagenet", input_shape=base.input_shape[1:])
    except Exception as exc:  # Keras raises bare Exception/URLError/HTTPError when offline
        raise ModelError(
            "could not obtain Keras's ImageNet VGG16 weights (no internet access?): "
            f"{type(exc).__name__}: {exc}. On an air-gapped machine copy {KERAS_NOTOP_FILE} from a machine that "
            "has it (~/.keras/models/) and pass --base-weights PATH, or train with --base-weights none",
            reason=Reason.IMAGENET_WEIGHTS_UNAVAILABLE,
        ) from exc
    base.set_weights(reference.get_weights())


def _check_weights_file(path: Path, base: keras.Model) -> None:
    """Fail early, naming the problem, instead of Keras's positional-mismatch errors."""
    import h5py

    if not path.is_file():
        raise ModelError(f"base weights file {path} does not exist", reason=Reason.WEIGHTS_FILE_MISSING)
    if path.suffix.lower() not in {".h5", ".hdf5"}:
        raise ModelError(f"base weights file {path} must be an HDF5 file named *.h5 or *.hdf5 "
                         f"(the layout of Keras's {KERAS_NOTOP_FILE})", reason=Reason.WEIGHTS_FILE_INVALID)
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise ModelError(f"base weights file {path} is not a readable HDF5 file: {exc}",
                         reason=Reason.WEIGHTS_FILE_INVALID) from exc
    with handle:
        group: Any = handle
        if "layer_names" not in group.attrs and "model_weights" in group:
            group = group["model_weights"]
        if "layer_names" not in group.attrs:
            raise ModelError(f"{path} is not in the Keras HDF5 weights layout (no 'layer_names' attribute); "
                             f"expected the layout of {KERAS_NOTOP_FILE}", reason=Reason.WEIGHTS_FILE_INVALID)
        stored = {_text(name) for name in group.attrs["layer_names"]}
        for layer in base.layers:
            if not layer.weights:
                continue
            if layer.name not in stored:
                raise ModelError(f"{path} has no weights for VGG16 layer {layer.name}",
                                 reason=Reason.WEIGHTS_FILE_INVALID)
            layer_group = group[layer.name]
            names = [_text(name) for name in layer_group.attrs.get("weight_names", [])]
            shapes = [tuple(layer_group[name].shape) for name in names]
            expected = [tuple(weight.shape) for weight in layer.weights]
            if shapes != expected:
                raise ModelError(f"{path}: layer {layer.name} has weight shapes {shapes}, VGG16 needs {expected}",
                                 reason=Reason.WEIGHTS_FILE_INVALID)


def _text(value: Any) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)
