"""COVID_CXR_MIXED_PRECISION: the worker's model computes in bfloat16 on request, its output stays float32 and close.

bf16 runs on CPUs (TensorFlow's oneDNN kernels), so this runs on any machine; fp16 and the speed-up
are a GPU's business (bench/bench_gpu.sh).
"""

from __future__ import annotations

import numpy as np
import pytest
from service_fixtures import chest_images, embedded_settings

from covid_cxr.errors import ConfigurationError
from covid_cxr.settings import load_settings

pytestmark = pytest.mark.slow

#: Largest allowed difference of a bf16 probability from fp32 (bf16 keeps 8 bits of mantissa).
TOLERANCE = 0.02


def test_bf16_scores_match_fp32_within_tolerance_and_the_output_stays_float32(tmp_path, active_model, cxr_dir):
    import keras

    from worker.inference import load_active_model

    fp32 = embedded_settings(tmp_path)
    active_model.register(fp32)
    bf16 = fp32.model_copy(update={"mixed_precision": "bf16"})
    images = np.stack(chest_images(cxr_dir, 6))

    reference = load_active_model(fp32)
    mixed = load_active_model(bf16)

    compute = {layer.name: layer.dtype_policy.compute_dtype for layer in mixed.model.layers}
    assert compute["block1_conv1"] == compute["head_dense"] == "bfloat16"
    assert compute[mixed.model.layers[-1].name] == "float32", "the softmax stays float32"
    assert all(layer.dtype_policy.variable_dtype == "float32" for layer in mixed.model.layers if layer.weights)
    from model_store.architecture import to_model_input

    assert mixed.model(to_model_input(images), training=False).dtype == "float32"
    assert keras.mixed_precision.global_policy().name == "float32", "the process-wide policy is left as it was"

    expected, got = reference.probabilities(images), mixed.probabilities(images)
    assert got.shape == expected.shape == (6, 2)
    assert np.allclose(got.sum(axis=1), 1.0, atol=1e-4)
    assert np.abs(got - expected).max() < TOLERANCE


def test_an_unknown_precision_is_refused_with_the_variable_named(tmp_path):
    with pytest.raises(ConfigurationError, match="COVID_CXR_MIXED_PRECISION"):
        load_settings(data_dir=tmp_path, mixed_precision="fp64")
