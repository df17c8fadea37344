"""Quality checks of the model's 224x224 input (polarity, orientation, frontal chest) and the per-check policy.

Each image check is a named function that scores the image with a tiny multilayer perceptron
(:class:`QualityModel`, shipped as ``quality_model.npz`` and rebuilt by ``covid-cxr qc train``);
:func:`assess_image` runs them in order and applies the :class:`QualityPolicy`: ``reject`` (with
a reason code), ``flag`` (accepted, flagged ``qc_<check>_flagged``) or ``correct`` (polarity and
orientation: the image is fixed and flagged ``qc_<check>_corrected``). A check that fires
without being confident only flags, whatever the policy. The header rules
(:mod:`ingest.header_rules`) use the same policy and records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from covid_cxr.constants import IMAGE_SIZE
from covid_cxr.errors import InputRejected
from covid_cxr.reasons import Reason
from ingest.pixels import pad_to_square, resize_to_input

#: What a policy can say about a check that fired confidently.
POLICIES = ("reject", "flag", "correct")
#: The checks whose finding the service knows how to undo.
CORRECTABLE_CHECKS = frozenset({"polarity", "orientation"})
#: The decision recorded for every check: ``pass`` when it did not fire.
DECISIONS = ("pass", "flag", "correct", "reject")
#: Image checks, in the order they are recorded (orientation is scored first: see :func:`assess_image`).
IMAGE_CHECKS = ("polarity", "orientation", "frontal_chest")
#: The reason code of each check's rejection.
REJECT_REASONS: dict[str, Reason] = {
    "species": Reason.NOT_HUMAN,
    "described_view": Reason.LATERAL_VIEW,
    "polarity": Reason.INVERTED_IMAGE,
    "orientation": Reason.WRONG_ORIENTATION,
    "frontal_chest": Reason.NOT_FRONTAL_CHEST,
}
#: Where the patient's head is, by quarter turns counter-clockwise from upright (``np.rot90``'s ``k``).
ORIENTATIONS = ("upright", "rotated_90_ccw", "upside_down", "rotated_90_cw")
#: What undoing each orientation means, for people.
_TURN_BACK = {1: "rotated 90° clockwise", 2: "rotated 180°", 3: "rotated 90° counter-clockwise"}
#: The model that ships with the code (``covid-cxr qc train`` rebuilds it from the shared data).
QUALITY_MODEL_FILE = Path(__file__).with_name("quality_model.npz")
#: The features: a FEATURE_SIDE x FEATURE_SIDE area-averaged copy (224 = 14 x 16, so rotating the
#: copy equals copying the rotated image), standardized, with its row and column means and quantiles.
FEATURE_SIDE = 16
FEATURE_QUANTILES = np.linspace(0.02, 0.98, 16)
FEATURE_COUNT = FEATURE_SIDE * FEATURE_SIDE + 2 * FEATURE_SIDE + len(FEATURE_QUANTILES)

Policy = Literal["reject", "flag", "correct"]


@dataclass(frozen=True)
class QualityPolicy:
    """What to do when each check fires confidently: ``reject``, ``flag`` or (polarity, orientation) ``correct``.

    The defaults are the service's: non-human subjects and laterals named only in descriptions
    are rejected, an inverted or turned image is corrected, an image that is not a frontal chest
    radiograph is rejected. Raises ``ValueError`` for a policy a check does not support.
    """

    species: Policy = "reject"
    described_view: Policy = "reject"
    polarity: Policy = "correct"
    orientation: Policy = "correct"
    frontal_chest: Policy = "reject"

    def __post_init__(self) -> None:
        for check in ("species", "described_view", *IMAGE_CHECKS):
            policy = getattr(self, check)
            allowed = POLICIES if check in CORRECTABLE_CHECKS else ("reject", "flag")
            if policy not in allowed:
                raise ValueError(f"the {check} policy must be one of {', '.join(allowed)}, got {policy!r}")

    @classmethod
    def from_settings(cls, settings: Any) -> QualityPolicy:
        """The policies configured as ``COVID_CXR_QC_<CHECK>_POLICY``."""
        return cls(species=settings.qc_species_policy, described_view=settings.qc_described_view_policy,
                   polarity=settings.qc_polarity_policy, orientation=settings.qc_orientation_policy,
                   frontal_chest=settings.qc_frontal_chest_policy)


@dataclass(frozen=True)
class QualityCheck:
    """One check's outcome for one file, as stored in ``quality_checks`` and shown by ``inspect``.

    ``finding``: what the check found (``inverted``, an orientation, ``not_frontal_chest``,
    ``not_human``, ``lateral_view``...), ``None`` when it passed. ``score``: the model's
    probability of the finding (image checks; header rules have none). ``action``: what was done
    to the image (``correct``). ``evidence``: for header rules, the element that decided (never
    the value of a name).
    """

    check: str
    decision: str
    finding: str | None
    score: float | None
    confident: bool
    version: str
    action: str | None = None
    evidence: str | None = None

    def __post_init__(self) -> None:
        if self.decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}, got {self.decision!r}")

    @property
    def flag(self) -> str | None:
        """The flag this outcome puts on an accepted instance (``qc_<check>_flagged`` / ``_corrected``)."""
        if self.decision == "flag":
            return f"qc_{self.check}_flagged"
        if self.decision == "correct":
            return f"qc_{self.check}_corrected"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check, "decision": self.decision, "finding": self.finding,
                "score": None if self.score is None else round(self.score, 4), "confident": self.confident,
                "action": self.action, "evidence": self.evidence, "version": self.version}


class QualityRejected(InputRejected):
    """A rejection decided by a quality check; ``checks`` are every check's outcome up to it."""

    def __init__(self, message: str, *, reason: Reason, checks: tuple[QualityCheck, ...]) -> None:
        super().__init__(message, reason=reason)
        self.checks = checks


def decide(policy: str, *, fired: bool, confident: bool) -> str:
    """The decision for a check: ``pass`` unless it fired; ``flag`` unless it is confident; else the policy."""
    if not fired:
        return "pass"
    return policy if confident else "flag"


def raise_if_rejected(checks: tuple[QualityCheck, ...], messages: dict[str, str]) -> None:
    """Raise :class:`QualityRejected` for the first check that decided ``reject`` (``messages[check]`` says why)."""
    for check in checks:
        if check.decision == "reject":
            raise QualityRejected(messages[check.check], reason=REJECT_REASONS[check.check], checks=checks)


# --- the model ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Perceptron:
    """One hidden ReLU layer and a logistic output (scikit-learn's ``MLPClassifier``, binary), in numpy."""

    hidden_weights: np.ndarray
    hidden_bias: np.ndarray
    output_weights: np.ndarray
    output_bias: np.ndarray

    def probability(self, features: np.ndarray) -> np.ndarray:
        """P(positive class) for each row of ``features``."""
        hidden = np.maximum(features @ self.hidden_weights + self.hidden_bias, 0.0)
        logit = (hidden @ self.output_weights + self.output_bias).ravel()
        return np.asarray(1.0 / (1.0 + np.exp(-np.clip(logit, -60.0, 60.0))), dtype=np.float64)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.{name}": getattr(self, name) for name in _PERCEPTRON_FIELDS}

    @classmethod
    def from_arrays(cls, arrays: Any, prefix: str) -> Perceptron:
        return cls(*(np.asarray(arrays[f"{prefix}.{name}"], dtype=np.float32) for name in _PERCEPTRON_FIELDS))


_PERCEPTRON_FIELDS = ("hidden_weights", "hidden_bias", "output_weights", "output_bias")


@dataclass(frozen=True)
class QualityModel:
    """The three scorers and their thresholds; ``metadata`` holds the version and how it was trained.

    ``polarity``: P(inverted). ``upright``: P(the patient's head is at the top), evaluated on the
    four quarter turns of an image. ``frontal_chest``: P(not a frontal chest radiograph), of an
    upright image with bones bright. ``thresholds[check]`` is ``(fires, confident)``.
    """

    polarity: Perceptron
    upright: Perceptron
    frontal_chest: Perceptron
    thresholds: dict[str, tuple[float, float]]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", "unversioned"))

    def save(self, path: Path) -> None:
        """Write an ``.npz`` (float32 weights, metadata as JSON text; no pickled objects)."""
        arrays: dict[str, Any] = {**self.polarity.arrays("polarity"), **self.upright.arrays("upright"),
                                  **self.frontal_chest.arrays("frontal_chest")}
        document = {"thresholds": self.thresholds, "metadata": self.metadata}
        with open(path, "wb") as handle:
            np.savez_compressed(handle, **{k: v.astype(np.float32) for k, v in arrays.items()},
                                document=np.array(json.dumps(document, sort_keys=True)))

    @classmethod
    def load(cls, path: Path) -> QualityModel:
        """Read a model written by :meth:`save`; raises ``ValueError`` for anything else."""
        try:
            with np.load(path, allow_pickle=False) as arrays:
                document = json.loads(str(arrays["document"]))
                polarity, upright, frontal_chest = (Perceptron.from_arrays(arrays, name)
                                                    for name in ("polarity", "upright", "frontal_chest"))
        except (KeyError, OSError, ValueError) as exc:  # ValueError: not an .npz, pickled data, bad JSON
            raise ValueError(f"{path} is not a covid-cxr quality model: {exc}") from exc
        thresholds = {check: (float(fire), float(sure)) for check, (fire, sure) in document["thresholds"].items()}
        return cls(polarity, upright, frontal_chest, thresholds=thresholds, metadata=document["metadata"])


@lru_cache(maxsize=1)
def load_quality_model(path: Path = QUALITY_MODEL_FILE) -> QualityModel:
    """The shipped model, read once per process."""
    return QualityModel.load(path)


def small_image(image: np.ndarray) -> np.ndarray:
    """The FEATURE_SIDE x FEATURE_SIDE area average of a 224x224 image, standardized (zero mean, unit std)."""
    small = cv2.resize(image, (FEATURE_SIDE, FEATURE_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)
    return np.asarray((small - small.mean()) / (small.std() + np.float32(1e-3)), dtype=np.float32)


def features_of_small(small: np.ndarray) -> np.ndarray:
    """The feature vector of a :func:`small_image`: its pixels, column and row means, and quantiles."""
    quantiles = np.quantile(small, FEATURE_QUANTILES).astype(np.float32)
    return np.concatenate([small.ravel(), small.mean(axis=0), small.mean(axis=1), quantiles])


def quality_features(image: np.ndarray) -> np.ndarray:
    """The features every scorer takes, of a 224x224 uint8 image."""
    return features_of_small(small_image(image))


# --- corrections ----------------------------------------------------------------------------------


def content_weight(source_shape: tuple[int, int] | None) -> np.ndarray:
    """How much of each 224x224 pixel is image rather than the black padding :func:`pad_to_square` added.

    1 inside the source image, 0 in the padding, fractions on the resized border. Area and
    bilinear resizing are separable, so rows and columns are resized apart; a test checks
    this equals resizing the padded 2-D mask. ``None`` (shape unknown): all image.
    """
    if source_shape is None:
        return np.ones((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    height, width = source_shape
    side = max(height, width)
    profiles = []
    for length in (height, width):
        ones = np.ones((length, 1), dtype=np.float32)
        before = (side - length) // 2
        padded = cv2.copyMakeBorder(ones, before, side - length - before, 0, 0, cv2.BORDER_CONSTANT, value=0)
        interpolation = cv2.INTER_AREA if side >= IMAGE_SIZE else cv2.INTER_LINEAR
        profiles.append(cv2.resize(padded, (1, IMAGE_SIZE), interpolation=interpolation).ravel())
    return np.outer(profiles[0], profiles[1]).astype(np.float32)


def content_weight_2d(source_shape: tuple[int, int]) -> np.ndarray:
    """:func:`content_weight` the direct way (pad and resize the whole mask): the reference for tests."""
    return resize_to_input(pad_to_square(np.ones(source_shape, dtype=np.float32)))


def invert_content(image: np.ndarray, source_shape: tuple[int, int] | None) -> np.ndarray:
    """Undo an inversion of the source image's values, leaving the padding black.

    Padding and resizing are linear, so normalizing ``255 - source`` gives ``255 * weight - image``
    (within one grey level of rounding), where ``weight`` is :func:`content_weight`.
    """
    inverted = np.float32(255.0) * content_weight(source_shape) - image.astype(np.float32)
    return np.clip(np.rint(inverted), 0, 255).astype(np.uint8)


def turn_upright(image: np.ndarray, quarter_turns: int) -> np.ndarray:
    """Undo ``quarter_turns`` counter-clockwise quarter turns (the index into :data:`ORIENTATIONS`)."""
    return np.ascontiguousarray(np.rot90(image, -quarter_turns))


# --- the checks -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """What one scorer says: the probability of the finding, whether that fires and whether it is confident."""

    score: float
    fired: bool
    confident: bool
    finding: str | None
    quarter_turns: int = 0


def _finding(score: float, thresholds: tuple[float, float], name: str) -> Finding:
    fire, sure = thresholds
    fired = score >= fire
    return Finding(score, fired, score >= sure, name if fired else None)


def check_polarity(image: np.ndarray, model: QualityModel) -> Finding:
    """Whether an upright image is a negative (bones dark): P(inverted)."""
    score = float(model.polarity.probability(quality_features(image)[None])[0])
    return _finding(score, model.thresholds["polarity"], "inverted")


def check_orientation(image: np.ndarray, model: QualityModel) -> Finding:
    """Where the patient's head is: the upright scorer on the image turned back by 0-3 quarter turns.

    The scores, normalized to sum to 1, are the probabilities of :data:`ORIENTATIONS`; the score
    is 1 - P(upright). It fires when another orientation is the most probable and is confident
    when that one's probability reaches the confident threshold.
    """
    small = small_image(image)
    rows = np.stack([features_of_small(np.rot90(small, -turns)) for turns in range(4)])
    upright = model.upright.probability(rows)
    probabilities = upright / max(float(upright.sum()), 1e-12)
    turns = int(np.argmax(probabilities))
    fire, sure = model.thresholds["orientation"]
    fired = turns != 0 and 1.0 - probabilities[0] >= fire
    return Finding(float(1.0 - probabilities[0]), fired, bool(probabilities[turns] >= sure),
                   ORIENTATIONS[turns] if fired else None, turns if fired else 0)


def check_frontal_chest(images: list[np.ndarray], model: QualityModel) -> Finding:
    """Whether this is not a frontal chest radiograph: P(not), of the most chest-like of ``images``.

    ``images`` are the image as read and as the polarity and orientation checks would correct
    it: a chest radiograph passes in whichever form it looks like one.
    """
    score = float(model.frontal_chest.probability(np.stack([quality_features(i) for i in images])).min())
    return _finding(score, model.thresholds["frontal_chest"], "not_frontal_chest")


@dataclass(frozen=True)
class QualityAssessment:
    """The image after the image checks (corrected where the policy says so), their outcomes and flags."""

    image: np.ndarray
    checks: tuple[QualityCheck, ...]

    @property
    def flags(self) -> tuple[str, ...]:
        return tuple(check.flag for check in self.checks if check.flag is not None)


def assess_image(image: np.ndarray, source_shape: tuple[int, int] | None, policy: QualityPolicy,
                 model: QualityModel | None = None) -> QualityAssessment:
    """Run the image checks on a 224x224 uint8 image and apply ``policy``.

    Orientation first (its scorer knows both polarities), then polarity on the image turned
    upright, then the frontal-chest check on the image as read and as the first two would
    correct it, whatever their policy. ``source_shape`` (rows, columns of the decoded image)
    tells the padding apart from the image when an inversion is undone. Raises
    :class:`QualityRejected` when a check decides ``reject``.
    """
    model = model or load_quality_model()
    messages: dict[str, str] = {}

    orientation = check_orientation(image, model)
    upright, upright_shape = image, source_shape
    if orientation.fired:
        upright = turn_upright(image, orientation.quarter_turns)
        if source_shape is not None and orientation.quarter_turns % 2:
            upright_shape = (source_shape[1], source_shape[0])
    messages["orientation"] = (f"the image is {(orientation.finding or '').replace('_', ' ')} "
                               f"(P(not upright) = {orientation.score:.2f})")

    polarity = check_polarity(upright, model)
    canonical = invert_content(upright, upright_shape) if polarity.fired else upright
    messages["polarity"] = f"the image is a negative (bones dark; P(inverted) = {polarity.score:.2f})"

    frontal = check_frontal_chest([image, canonical] if canonical is not image else [image], model)
    messages["frontal_chest"] = (f"the image does not look like a frontal chest radiograph "
                                 f"(P(not) = {frontal.score:.2f})")

    checks = (_outcome("polarity", policy.polarity, polarity, model, "inverted"),
              _outcome("orientation", policy.orientation, orientation, model,
                       _TURN_BACK.get(orientation.quarter_turns)),
              _outcome("frontal_chest", policy.frontal_chest, frontal, model, None))
    raise_if_rejected(checks, messages)
    if checks[1].decision == "correct":
        image, source_shape = upright, upright_shape
    if checks[0].decision == "correct":
        image = invert_content(image, source_shape)
    return QualityAssessment(image, checks)


def _outcome(check: str, policy: str, found: Finding, model: QualityModel, action: str | None) -> QualityCheck:
    decision = decide(policy, fired=found.fired, confident=found.confident)
    return QualityCheck(check, decision, found.finding, found.score, found.confident, model.version,
                        action=action if decision == "correct" else None)
