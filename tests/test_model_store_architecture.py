"""The VGG16 base equals the origin's; base weights load from a legacy Keras HDF5 file; input scaling."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from covid_cxr.constants import CLASS_NAMES
from covid_cxr.errors import ModelError, UsageError
from model_store.architecture import build_model, split_point, to_model_input

# Keras 2's VGG16(include_top=False, input_shape=(224, 224, 3)) as the origin built it: name -> output shape.
ORIGIN_BASE = [
    ("block1_conv1", (224, 224, 64)), ("block1_conv2", (224, 224, 64)), ("block1_pool", (112, 112, 64)),
    ("block2_conv1", (112, 112, 128)), ("block2_conv2", (112, 112, 128)), ("block2_pool", (56, 56, 128)),
    ("block3_conv1", (56, 56, 256)), ("block3_conv2", (56, 56, 256)), ("block3_conv3", (56, 56, 256)),
    ("block3_pool", (28, 28, 256)),
    ("block4_conv1", (28, 28, 512)), ("block4_conv2", (28, 28, 512)), ("block4_conv3", (28, 28, 512)),
    ("block4_pool", (14, 14, 512)),
    ("block5_conv1", (14, 14, 512)), ("block5_conv2", (14, 14, 512)), ("block5_conv3", (14, 14, 512)),
    ("block5_pool", (7, 7, 512)),
]
ORIGIN_BASE_PARAMS = 14_714_688
HEAD_PARAMS = 512 * 64 + 64 + 64 * 2 + 2


@pytest.fixture(scope="module")
def frozen_model():
    return build_model(base_weights=None, trainable_from=None)


def test_base_layers_shapes_and_parameters_equal_the_origin(frozen_model) -> None:
    layers = frozen_model.layers
    assert tuple(layers[0].output.shape) == (None, 224, 224, 3)
    base = layers[1: len(ORIGIN_BASE) + 1]
    assert [(layer.name, tuple(layer.output.shape[1:])) for layer in base] == ORIGIN_BASE
    assert sum(layer.count_params() for layer in base) == ORIGIN_BASE_PARAMS
    assert frozen_model.count_params() == ORIGIN_BASE_PARAMS + HEAD_PARAMS


def test_head_is_the_origins(frozen_model) -> None:
    head = frozen_model.layers[len(ORIGIN_BASE) + 1:]
    assert [type(layer).__name__ for layer in head] == ["AveragePooling2D", "Flatten", "Dense", "Dropout", "Dense"]
    assert head[0].pool_size == (4, 4)
    assert head[2].units == 64 and head[2].activation.__name__ == "relu"
    assert head[3].rate == 0.5
    assert head[4].units == len(CLASS_NAMES) == 2 and head[4].activation.__name__ == "softmax"
    assert tuple(frozen_model.output.shape) == (None, 2)


def test_frozen_base_trains_only_the_head(frozen_model) -> None:
    trainable = [layer.name for layer in frozen_model.layers if layer.trainable and layer.weights]
    assert trainable == ["head_dense", "predictions"]


def test_trainable_from_block5_unfreezes_block5_only() -> None:
    model = build_model(None, "block5")
    trainable = [layer.name for layer in model.layers if layer.trainable and layer.weights]
    assert trainable == ["block5_conv1", "block5_conv2", "block5_conv3", "head_dense", "predictions"]
    assert split_point("block5") == "block4_pool"
    assert split_point(None) == "block5_pool"
    assert split_point("block1") == "input"


def test_unknown_block_is_refused() -> None:
    with pytest.raises(UsageError, match="block6"):
        build_model(None, "block6")


def write_legacy_notop_file(path: Path, seed: int = 7) -> dict[str, list[np.ndarray]]:
    """Write random VGG16 weights in the layout of Keras's published ``..._notop.h5`` (Keras 2 HDF5 format)."""
    rng = np.random.default_rng(seed)
    filters = {"block1": (3, 64, 64), "block2": (64, 128, 128), "block3": (128, 256, 256, 256),
               "block4": (256, 512, 512, 512), "block5": (512, 512, 512, 512)}
    weights: dict[str, list[np.ndarray]] = {}
    for block, channels in filters.items():
        for index in range(1, len(channels)):
            kernel = rng.normal(0, 0.05, (3, 3, channels[index - 1], channels[index])).astype(np.float32)
            bias = rng.normal(0, 0.05, (channels[index],)).astype(np.float32)
            weights[f"{block}_conv{index}"] = [kernel, bias]
    layer_names = ["input_1"]
    for block, channels in filters.items():
        layer_names += [f"{block}_conv{index}" for index in range(1, len(channels))] + [f"{block}_pool"]
    with h5py.File(path, "w") as handle:
        # Keras 2 stored names as fixed-length byte strings (numpy "S" arrays), as in the published file.
        handle.attrs["layer_names"] = np.array([name.encode() for name in layer_names], dtype="S")
        handle.attrs["backend"] = b"tensorflow"
        handle.attrs["keras_version"] = b"2.2.4"
        for name in layer_names:
            group = handle.create_group(name)
            values = weights.get(name, [])
            weight_names = [f"{name}_W_1:0", f"{name}_b_1:0"][: len(values)]
            group.attrs["weight_names"] = np.array([weight_name.encode() for weight_name in weight_names], dtype="S")
            for weight_name, value in zip(weight_names, values, strict=False):
                group.create_dataset(weight_name, data=value)
    return weights


def test_local_legacy_hdf5_weights_load_and_equal_the_file(tmp_path: Path) -> None:
    path = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    expected = write_legacy_notop_file(path)
    model = build_model(base_weights=path)
    assert len(expected) == 13
    for name, (kernel, bias) in expected.items():
        loaded_kernel, loaded_bias = model.get_layer(name).get_weights()
        np.testing.assert_array_equal(loaded_kernel, kernel)
        np.testing.assert_array_equal(loaded_bias, bias)


def test_local_weights_file_through_the_train_command_flag(tmp_path: Path) -> None:
    from service.cli import build_parser

    path = tmp_path / "notop.h5"
    args = build_parser().parse_args(["train", "--folder", str(tmp_path), "--base-weights", str(path)])
    assert args.base_weights == str(path)


def test_weights_file_missing_a_layer_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notop.h5"
    write_legacy_notop_file(path)
    with h5py.File(path, "a") as handle:
        names = handle.attrs["layer_names"]
        handle.attrs["layer_names"] = np.array([name for name in names if name != b"block3_conv2"], dtype="S")
    with pytest.raises(ModelError, match="block3_conv2") as caught:
        build_model(base_weights=path)
    assert caught.value.reason == "weights_file_invalid"


def test_weights_file_that_is_not_hdf5_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notop.h5"
    path.write_bytes(b"not hdf5")
    with pytest.raises(ModelError, match="not a readable HDF5"):
        build_model(base_weights=path)


def test_imagenet_offline_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No ImageNet download is possible here; the error must say how to proceed (never a silent fallback)."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr("keras.src.applications.vgg16.file_utils.get_file", offline)
    with pytest.raises(ModelError, match="--base-weights PATH") as caught:
        build_model(base_weights="imagenet")
    assert caught.value.reason == "imagenet_weights_unavailable"


def test_to_model_input_is_keras_vgg16_preprocessing_of_the_grey_image() -> None:
    import keras

    images = np.random.default_rng(1).integers(0, 256, (2, 224, 224), dtype=np.uint8)
    model_input = to_model_input(images)
    assert model_input.shape == (2, 224, 224, 3) and model_input.dtype == np.float32
    rgb = np.repeat(images[..., np.newaxis], 3, axis=-1).astype(np.float32)
    expected = keras.applications.vgg16.preprocess_input(rgb)
    np.testing.assert_allclose(model_input, expected, atol=1e-4)
    np.testing.assert_allclose(to_model_input(np.full((224, 224), 255, np.uint8))[0, 0, 0],
                               [255 - 103.939, 255 - 116.779, 255 - 123.68], atol=1e-4)


@pytest.mark.parametrize("bad", [np.zeros((1, 100, 100), np.uint8), np.zeros((1, 224, 224, 3), np.uint8)])
def test_to_model_input_refuses_wrong_shapes(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="224"):
        to_model_input(bad)


def test_to_model_input_refuses_non_uint8() -> None:
    with pytest.raises(TypeError, match="uint8"):
        to_model_input(np.zeros((1, 224, 224), np.float32))
