"""Values that several modules must agree on, written once; this module imports nothing first-party."""

from __future__ import annotations

# --- the classifier -------------------------------------------------------------------------------
#: The model's classes in softmax output order (index 0 is the positive class); a ground-truth label is one of them.
CLASS_NAMES: tuple[str, ...] = ("covid", "normal")
#: The class whose probability is the model's score.
POSITIVE_CLASS = "covid"
#: Side of the square uint8 image the pixel pipeline produces and the model takes.
IMAGE_SIZE = 224
#: ViewPosition values of a frontal chest view (PS3.3 C.8.11.5).
FRONTAL_VIEWS = frozenset({"PA", "AP"})
#: Registry name of the model: the default of ``COVID_CXR_MODEL_NAME`` and of ``train --name``.
MODEL_NAME = "covid-cxr"

# --- training defaults: the origin's, except ``TRAINABLE_FROM`` (see model_store.training) ----------
TRAINABLE_FROM = "auto"
EPOCHS = 25
TRAINING_BATCH_SIZE = 8
#: Adam's learning rate for the origin's recipe: a frozen pretrained base and a new head.
LEARNING_RATE = 1e-3
#: ... and when convolution blocks are trained too (block 5 from random base weights). At 1e-3 that fit collapsed to
#: one class in 2 of 3 seeds on cxr + cxr-extra; 3e-5 in none (docs/model.md, "The recipe, measured").
LEARNING_RATE_FINE_TUNING = 3e-5
#: Fraction of the patients held out for the test report.
TEST_FRACTION = 0.2
#: Fraction of the remaining patients held out for early stopping.
VALIDATION_FRACTION = 0.2
EARLY_STOPPING_PATIENCE = 5
#: What early stopping watches on the validation part (restoring the best epoch's weights). The origin's loss stays
#: the default: measured on cxr + cxr-extra (docs/model.md), stopping on balanced accuracy stopped after 6 epochs.
EARLY_STOPPING_METRICS: tuple[str, ...] = ("val_loss", "val_balanced_accuracy", "val_auc")
EARLY_STOPPING_METRIC = "val_loss"
#: Rotated copies of each training image, each rotated by up to ``ROTATION_DEGREES`` either way.
AUGMENT_COPIES = 3
ROTATION_DEGREES = 15.0
#: How training samples are weighted: ``balanced`` (inverse class frequency) or ``none``.
CLASS_WEIGHT_MODES: tuple[str, ...] = ("balanced", "none")
CLASS_WEIGHT = "balanced"
SEED = 42
#: How a model's scores may be rescaled after training (``none`` keeps the softmax output).
CALIBRATION_METHODS: tuple[str, ...] = ("none", "temperature", "platt")
#: Decision threshold on P(covid) stored with a trained model.
DECISION_THRESHOLD = 0.5

# --- evaluation ---------------------------------------------------------------------------------
#: Names of the time windows an evaluation covers, each ending now; ``all`` has no start.
EVALUATION_WINDOWS: tuple[str, ...] = ("24h", "7d", "30d", "all")
#: The window of the nightly evaluation and of ``covid-cxr evaluate`` without ``--window``.
DEFAULT_EVALUATION_WINDOW = "24h"
