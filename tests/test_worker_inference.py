"""The per-process model cache (reload on activation), model metadata, and decoding stored images (no TensorFlow)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from service_fixtures import encode_png

import worker.inference as inference
from covid_cxr.errors import ModelError, NoActiveModel
from worker.inference import ActiveModelCache, decode_png, describe


def _record(version: str, sha256: str = "a" * 64, **metadata):
    return SimpleNamespace(id=7, name="covid-cxr", version=version, sha256=sha256,
                           metadata_json={"class_names": ["covid", "normal"], **metadata})


@pytest.fixture
def registry(monkeypatch, tmp_path):
    """A registry whose active record the test sets, and a loader that counts loads."""
    state = SimpleNamespace(active=_record("v1"), lookups=0, loads=[])

    def get_active(settings, name):
        state.lookups += 1
        if state.active is None:
            raise NoActiveModel("no active model")
        return state.active

    def load(settings):
        state.loads.append(state.active.version)
        return describe(object(), state.active)

    import model_store.registry

    monkeypatch.setattr(model_store.registry, "get_active", get_active)
    monkeypatch.setattr(inference, "load_active_model", load)
    state.settings = SimpleNamespace(database="sqlite://", model_name="covid-cxr")
    return state


def test_a_model_is_loaded_once_and_the_registry_asked_at_most_every_interval(registry):
    cache = ActiveModelCache(check_seconds=3600)
    first = cache.get(registry.settings)
    assert cache.get(registry.settings) is first
    assert (registry.loads, registry.lookups) == (["v1"], 1)


def test_a_newly_activated_version_is_loaded_after_the_check(registry):
    cache = ActiveModelCache(check_seconds=0)
    assert cache.get(registry.settings).version == "v1"
    assert cache.get(registry.settings).version == "v1"
    assert registry.loads == ["v1"]  # same version and sha256: not reloaded
    registry.active = _record("v2", sha256="b" * 64)
    assert cache.get(registry.settings).version == "v2"
    assert registry.loads == ["v1", "v2"]
    registry.active = None
    with pytest.raises(NoActiveModel):
        cache.get(registry.settings)


def test_metadata_gives_threshold_classes_and_labels():
    model = describe(object(), _record("v1", decision_threshold=0.3, preprocessing_version="cxr-norm-1"))
    assert (model.threshold, model.class_names, model.positive_class) == (0.3, ("covid", "normal"), "covid")
    assert model.preprocessing_version == "cxr-norm-1" and model.model_id == 7
    assert [model.label_for(p) for p in (0.29, 0.3, 0.9)] == ["normal", "covid", "covid"]
    record = SimpleNamespace(id=1, name="n", version="v", sha256="c", metadata_json={})
    assert describe(object(), record).threshold == 0.5
    with pytest.raises(ModelError, match="expected two classes"):
        describe(object(), _record("v1", class_names=["normal", "pneumonia"]))


def test_stored_images_must_be_224_square_uint8_pngs():
    image = np.arange(224 * 224, dtype=np.uint32).reshape(224, 224).astype(np.uint8)
    assert np.array_equal(decode_png(encode_png(image)), image)
    with pytest.raises(ValueError, match="expected uint8"):
        decode_png(encode_png(np.zeros((100, 224), dtype=np.uint8)))
    with pytest.raises(ValueError, match="not a decodable PNG"):
        decode_png(b"\x89PNG\r\n\x1a\n broken")


def test_devices_are_reported_and_gpus_share_memory(caplog):
    import logging

    import tensorflow as tf

    from worker.inference import configure_devices

    with caplog.at_level(logging.INFO, logger="worker.inference"):
        names = configure_devices()
    gpus = tf.config.list_physical_devices("GPU")
    assert names == [gpu.name for gpu in gpus]
    assert all(tf.config.experimental.get_memory_growth(gpu) for gpu in gpus)
    assert ("CPU only" in caplog.text) == (not gpus)


def test_the_stored_calibration_rescales_the_served_probabilities():
    raw = np.array([[0.9, 0.1], [0.2, 0.8]])

    def forward(x):
        return raw[: len(x)]

    plain = describe(object(), _record("v1"))
    plain.forward = forward
    images = np.zeros((2, 224, 224), dtype=np.uint8)
    assert np.allclose(plain.probabilities(images), raw)
    calibrated = describe(object(), _record("v2", calibration={"method": "temperature", "temperature": 2.0}))
    calibrated.forward = forward
    served = calibrated.probabilities(images)
    # temperature 2 halves the logit: logit(0.9) = ln 9 -> sigmoid(ln 3) = 0.75; logit(0.2) = -ln 4 -> 1/3
    assert served[:, 0] == pytest.approx([0.75, 1 / 3]) and np.allclose(served.sum(axis=1), 1.0)
