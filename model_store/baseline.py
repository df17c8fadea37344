"""The shortcut check: a logistic regression on 32x32 grayscale thumbnails, scored on the same split as the model.

If so crude a model separates the classes, the data carry shortcuts (source, age, borders, text) and a
CNN's accuracy says little about the lungs. No TensorFlow here.
"""

from __future__ import annotations

import cv2
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

THUMBNAIL_SIZE = 32
METHOD = (f"logistic regression (scikit-learn, C=1.0, standardized pixels) on {THUMBNAIL_SIZE}x{THUMBNAIL_SIZE} "
          "grayscale thumbnails (cv2.INTER_AREA) of the same normalized 224x224 images")


def thumbnails(images: np.ndarray) -> np.ndarray:
    """``(N, 224, 224)`` uint8 -> ``(N, 1024)`` float32 in [0, 1]."""
    small = [cv2.resize(image, (THUMBNAIL_SIZE, THUMBNAIL_SIZE), interpolation=cv2.INTER_AREA) for image in images]
    return np.asarray(small, dtype=np.float32).reshape(len(images), -1) / 255.0


def fit(images: np.ndarray, is_positive: np.ndarray, seed: int = 0) -> Pipeline:
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000, random_state=seed))
    return pipeline.fit(thumbnails(images), np.asarray(is_positive, dtype=int))


def scores(pipeline: Pipeline, images: np.ndarray) -> np.ndarray:
    """Probability of the positive class per image."""
    return np.asarray(pipeline.predict_proba(thumbnails(images))[:, list(pipeline.classes_).index(1)])


def fit_and_score(train_images: np.ndarray, train_is_positive: np.ndarray, test_images: np.ndarray,
                  seed: int = 0) -> np.ndarray:
    """Fit on the training part, return positive-class probabilities for the test part."""
    return scores(fit(train_images, train_is_positive, seed), test_images)


def cross_validated_scores(images: np.ndarray, is_positive: np.ndarray, groups: np.ndarray, folds: int = 5,
                           seed: int = 0) -> np.ndarray:
    """Out-of-fold scores from a patient-level StratifiedGroupKFold: for an evaluation set without a training part."""
    from sklearn.model_selection import StratifiedGroupKFold

    is_positive = np.asarray(is_positive, dtype=int)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    out = np.full(len(images), np.nan)
    for train, test in splitter.split(np.zeros(len(images)), is_positive, groups):
        if len(set(is_positive[train])) < 2:
            continue
        out[test] = fit_and_score(images[train], is_positive[train], images[test], seed)
    return out
