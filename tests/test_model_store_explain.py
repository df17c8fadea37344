"""Grad-CAM: deterministic, 224x224, follows a bright blob that a tiny model responds to; and on the real VGG16."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from model_store.explain import grad_cam, last_conv_layer, write_overlay

BLOB_DICOM = "torchxrayvision__siim-acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


def _blob_model() -> Any:
    """One 3x3 convolution that passes the grey value through a ReLU (so only bright pixels, above the VGG means,
    are active), a global average, and a head where more brightness means more P(covid)."""
    import keras

    inputs = keras.Input((224, 224, 3))
    conv = keras.layers.Conv2D(1, 3, padding="same", activation="relu", name="bright")(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(conv)
    outputs = keras.layers.Dense(2, activation="softmax", name="predictions")(pooled)
    model = keras.Model(inputs, outputs)
    kernel = np.zeros((3, 3, 3, 1), dtype=np.float32)
    kernel[1, 1, :, 0] = 1 / 3
    model.get_layer("bright").set_weights([kernel, np.zeros(1, dtype=np.float32)])
    model.get_layer("predictions").set_weights([np.array([[1.0, -1.0]], dtype=np.float32), np.zeros(2, np.float32)])
    return model


def _image_with_blob(left: int) -> np.ndarray:
    image = np.full((224, 224), 40, dtype=np.uint8)
    image[90:130, left:left + 40] = 250
    return image


def _centre_column(heatmap: np.ndarray) -> float:
    columns = heatmap.sum(axis=0)
    return float((columns * np.arange(224)).sum() / columns.sum())


def test_the_heatmap_is_deterministic_and_follows_the_blob() -> None:
    model = _blob_model()
    assert last_conv_layer(model) == "bright"
    left, right = _image_with_blob(20), _image_with_blob(160)
    heat_left = grad_cam(model, left)
    assert heat_left.shape == (224, 224) and heat_left.dtype == np.float32
    assert heat_left.min() >= 0.0 and heat_left.max() == pytest.approx(1.0)
    assert np.array_equal(heat_left, grad_cam(model, left))  # deterministic
    heat_right = grad_cam(model, right)
    assert _centre_column(heat_left) == pytest.approx(40, abs=3)
    assert _centre_column(heat_right) == pytest.approx(180, abs=3)
    # the heat lies on the blob: nearly all of it inside the blob's rows
    assert heat_left[90:130].sum() / heat_left.sum() > 0.95


def test_the_overlay_is_a_224_colour_png(tmp_path: Path) -> None:
    image = _image_with_blob(20)
    out = write_overlay(image, grad_cam(_blob_model(), image), tmp_path / "heat.png")
    written = cv2.imread(str(out), cv2.IMREAD_COLOR)
    assert written is not None and written.shape == (224, 224, 3)


@pytest.mark.slow
def test_grad_cam_on_the_real_vgg16_and_the_commands(dicom_dir: Path, model_artifact: Any, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from db.models import Instance, NormalizedImage
    from db.session import session_scope
    from model_store.artifact import load_verified_model
    from service.cli import main

    data = ["--data-dir", str(tmp_path / "data")]
    assert main(["models", "import", str(model_artifact.directory), "--activate", *data]) == 0
    capsys.readouterr()
    dicom = dicom_dir / BLOB_DICOM
    out = tmp_path / "inspect-heat.png"
    assert main(["inspect", str(dicom), "--explain", str(out), *data]) == 0
    text = capsys.readouterr().out
    assert "explain" in text and "Grad-CAM at block5_conv3" in text and "P(covid)" in text
    assert cv2.imread(str(out)).shape == (224, 224, 3)

    model = load_verified_model(model_artifact.model_path, model_artifact.sha256)
    image = cv2.imread(str(out), cv2.IMREAD_GRAYSCALE)
    heat = grad_cam(model, image)
    assert heat.shape == (224, 224) and np.isfinite(heat).all() and 0 <= heat.min() <= heat.max() <= 1
    assert np.array_equal(heat, grad_cam(model, image))

    from covid_cxr.settings import load_settings

    settings = load_settings(data_dir=tmp_path / "data")
    with session_scope(settings) as session:
        instance = Instance(file_name="x.dcm", file_sha256="0" * 64, state="done")
        session.add(instance)
        session.flush()
        png = cv2.imencode(".png", image)[1].tobytes()
        session.add(NormalizedImage(instance_id=instance.id, preprocessing_version="test", png=png))
        instance_id = instance.id
    out = tmp_path / "instance-heat.png"
    assert main(["explain", str(instance_id), str(out), *data]) == 0
    assert "Grad-CAM at block5_conv3" in capsys.readouterr().out and out.is_file()
    assert main(["explain", "999", str(out), *data]) != 0
    assert "no_stored_image" in capsys.readouterr().err
