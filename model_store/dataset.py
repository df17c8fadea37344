"""Labelled training and evaluation sets: listing, validation, decoding through ingest, patient split, manifest."""

from __future__ import annotations

import csv
import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from covid_cxr.constants import IMAGE_SIZE
from covid_cxr.errors import CovidCxrError, DatasetError, UsageError
from covid_cxr.hashing import file_sha256
from covid_cxr.reasons import Reason
from covid_cxr.settings import Settings

if TYPE_CHECKING:
    from ingest.metadata import InstanceMetadata
    from ingest.reader import ReaderPolicy

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ""})
#: Prefix of the patient id given to an image that has none, so that it is its own group.
IMAGE_AS_PATIENT = "image:"
#: How many failing files an error message names before it says "and N more".
SHOWN_PROBLEMS = 10


@dataclass(frozen=True)
class Item:
    """One labelled image file."""

    path: Path
    label: str
    patient_id: str
    key: str  # path relative to the dataset root: how the manifest names the file
    #: The CSV row's other columns (for ``--group-by`` subgroup reports); never part of the manifest.
    attributes: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class Dataset:
    """Labelled image files, in a stable order, and where they came from."""

    items: list[Item]
    source: dict[str, Any]
    classes: tuple[str, ...]
    patient_ids_given: bool
    ignored: list[str] = field(default_factory=list)

    @property
    def labels(self) -> np.ndarray:
        return np.array([item.label for item in self.items], dtype=object)

    @property
    def groups(self) -> np.ndarray:
        return np.array([item.patient_id for item in self.items], dtype=object)

    def counts(self, indices: Iterable[int] | None = None) -> dict[str, int]:
        chosen = self.items if indices is None else [self.items[i] for i in indices]
        found = Counter(item.label for item in chosen)
        return {name: found.get(name, 0) for name in self.classes}

    def subset(self, indices: Sequence[int] | np.ndarray) -> Dataset:
        return Dataset([self.items[i] for i in indices], dict(self.source), self.classes, self.patient_ids_given,
                       list(self.ignored))


def _with_problems(message: str, problems: Sequence[str]) -> str:
    shown = "; ".join(problems[:SHOWN_PROBLEMS])
    more = f"; and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
    return f"{message}: {shown}{more}"


def from_folder(folder: Path, classes: Sequence[str]) -> Dataset:
    """A folder with one subfolder per class (``covid/``, ``normal/``) of PNG/JPEG or DICOM files.

    Files are found recursively inside each class folder; hidden files are skipped; other subfolders
    and files with other suffixes are listed in :attr:`Dataset.ignored` (and logged), never guessed at.
    Each image is its own patient (a folder carries no patient ids): use a CSV for a patient-level split.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder", reason=Reason.DATASET_NOT_FOUND)
    items: list[Item] = []
    ignored: list[str] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir() or entry.name not in classes:
            ignored.append(entry.name + ("/" if entry.is_dir() else ""))
            continue
        for path in sorted(p for p in entry.rglob("*") if p.is_file()):
            relative = path.relative_to(folder).as_posix()
            if any(part.startswith(".") for part in path.relative_to(folder).parts):
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES | DICOM_SUFFIXES:
                ignored.append(relative)
                continue
            items.append(Item(path, entry.name, IMAGE_AS_PATIENT + relative, relative))
    if ignored:
        log.warning("ignored in %s (not a class folder or not an image): %s", folder,
                    ", ".join(ignored[:SHOWN_PROBLEMS]))
    dataset = Dataset(items, {"kind": "folder", "path": str(folder)}, tuple(classes), False, ignored)
    check_dataset(dataset)
    return dataset


def parse_where(expressions: Sequence[str]) -> dict[str, frozenset[str]]:
    """``["subset=pyimagesearch50", "label=covid,normal"]`` -> ``{column: allowed values}`` (filters are ANDed)."""
    filters: dict[str, frozenset[str]] = {}
    for expression in expressions:
        column, sep, values = expression.partition("=")
        if not sep or not column.strip() or not values.strip():
            raise UsageError(f"bad filter {expression!r}: expected COLUMN=VALUE[,VALUE...]", reason=Reason.BAD_FILTER)
        filters[column.strip()] = frozenset(value.strip() for value in values.split(","))
    return filters


def from_csv(
    csv_path: Path,
    classes: Sequence[str],
    *,
    label_column: str = "label",
    path_column: str | None = None,
    patient_column: str = "patient_id",
    where: Mapping[str, frozenset[str]] | None = None,
    check: bool = True,
) -> Dataset:
    """A CSV with a header: a path column (``path`` or ``file``, relative to the CSV's folder), a label column,
    and optionally a patient id column. ``where`` keeps only rows whose columns hold one of the given values.

    Every row left after filtering must have a known label and an existing file; otherwise
    :class:`DatasetError` names the offending rows (nothing is silently dropped). ``check=False`` skips
    :func:`check_dataset` (for one part of several CSVs, which may hold one class only).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path} does not exist", reason=Reason.DATASET_NOT_FOUND)
    where = dict(where or {})
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        rows = list(reader)
    if path_column is None:
        path_column = next((name for name in ("path", "file") if name in columns), "path")
    for needed in (path_column, label_column, *where):
        if needed not in columns:
            raise DatasetError(f"{csv_path} has no column {needed!r} (columns: {', '.join(columns) or 'none'})",
                               reason=Reason.BAD_CSV)
    has_patients = patient_column in columns
    root = csv_path.parent
    items: list[Item] = []
    unknown: list[str] = []
    missing: list[str] = []
    for line, row in enumerate(rows, start=2):
        if any(row.get(column, "") not in allowed for column, allowed in where.items()):
            continue
        label = (row[label_column] or "").strip()
        relative = (row[path_column] or "").strip()
        if label not in classes:
            unknown.append(f"line {line}: {label!r}")
            continue
        path = root / relative
        if not relative or not path.is_file():
            missing.append(f"line {line}: {relative!r}")
            continue
        patient = (row.get(patient_column) or "").strip() if has_patients else ""
        attributes = {column: (value or "").strip() for column, value in row.items() if isinstance(column, str)}
        items.append(Item(path, label, patient or IMAGE_AS_PATIENT + relative, relative, attributes))
    if unknown:
        labels = Counter(entry.split(": ", 1)[1] for entry in unknown)
        raise DatasetError(_with_problems(
            f"{csv_path}: {len(unknown)} rows have labels other than {', '.join(classes)} "
            f"({', '.join(f'{k} x{v}' for k, v in labels.items())}); drop them with --where "
            f"{label_column}={','.join(classes)}", unknown), reason=Reason.UNKNOWN_LABELS)
    if missing:
        raise DatasetError(_with_problems(f"{csv_path}: {len(missing)} rows name files that do not exist", missing),
                           reason=Reason.MISSING_FILES)
    source = {"kind": "csv", "path": str(csv_path), "label_column": label_column, "path_column": path_column,
              "patient_column": patient_column if has_patients else None,
              "where": {column: sorted(values) for column, values in where.items()}}
    dataset = Dataset(items, source, tuple(classes), has_patients)
    if check:
        check_dataset(dataset)
    return dataset


def from_csvs(csv_paths: Sequence[Path], classes: Sequence[str], **options: Any) -> Dataset:
    """Several CSVs (as :func:`from_csv`, with the same options) as one set; with more than one, each key is
    prefixed with its CSV's folder name so that keys stay unique. Patient ids must not collide across CSVs."""
    if len(csv_paths) == 1:
        return from_csv(csv_paths[0], classes, **options)
    parts = [from_csv(path, classes, check=False, **options) for path in csv_paths]
    items = [Item(item.path, item.label, item.patient_id, f"{Path(part.source['path']).parent.name}/{item.key}",
                  item.attributes) for part in parts for item in part.items]
    source = {**parts[0].source, "path": [part.source["path"] for part in parts]}
    dataset = Dataset(items, source, tuple(classes), all(part.patient_ids_given for part in parts))
    check_dataset(dataset)
    return dataset


def check_dataset(dataset: Dataset) -> None:
    """Refuse a set that cannot train or evaluate a two-class model: empty, or a class without images."""
    where = dataset.source.get("path", "the dataset")
    if not dataset.items:
        raise DatasetError(f"no labelled images found in {where} (expected {'/, '.join(dataset.classes)}/ "
                           "subfolders of PNG/JPEG/DICOM files, or CSV rows)", reason=Reason.EMPTY_DATASET)
    counts = dataset.counts()
    absent = [name for name, count in counts.items() if count == 0]
    if absent:
        raise DatasetError(f"{where} has no images of class {', '.join(absent)} "
                           f"(counts: {counts}); a two-class model needs both", reason=Reason.ONE_CLASS_ONLY)


@dataclass(frozen=True)
class LoadedImages:
    """A dataset's normalized images and, per item, the subgroup facts of its DICOM header."""

    #: ``(N, 224, 224)`` uint8, in the dataset's order.
    images: np.ndarray
    #: Per item, :data:`model_store.subgroups.HEADER_ATTRIBUTES` as read from its header (control characters
    #: escaped); empty for a PNG/JPEG. Nothing else of the header is kept.
    headers: list[dict[str, str | None]]


def load_images(dataset: Dataset, settings: Settings | None = None, progress: bool = True) -> np.ndarray:
    """Decode and normalize every image exactly as serving does: ``(N, 224, 224)`` uint8.

    The images of :func:`load_images_with_headers`, for callers that do not group by header facts.
    """
    return load_images_with_headers(dataset, settings, progress).images


def load_images_with_headers(dataset: Dataset, settings: Settings | None = None,
                             progress: bool = True) -> LoadedImages:
    """Decode and normalize every image exactly as serving does, keeping each DICOM header's subgroup facts.

    PNG/JPEG go through :func:`ingest.pixels.load_image_file` then :func:`ingest.pixels.normalize_grayscale`;
    DICOM through :func:`ingest.reader.read_radiograph` with the configured acceptance policy, in the
    ingester's decode processes (:class:`ingest.decode_pool.DecodePool`: one per core, each under the
    configured memory cap and time limit, and none with TensorFlow loaded). The header facts come back with
    the decoded image (one read per file); UIDs, dates and the patient pseudonym are dropped on arrival.
    All files are tried first; then :class:`DatasetError` lists every file that could not be used.
    """
    from tqdm import tqdm

    from ingest.pixels import load_image_file, normalize_grayscale

    images = np.zeros((len(dataset.items), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    headers: list[dict[str, str | None]] = [{} for _ in dataset.items]
    problems: list[str] = []
    dicom: list[int] = []
    with tqdm(total=len(dataset.items), desc="decode", unit="img", disable=not progress) as bar:
        for index, item in enumerate(dataset.items):
            if item.path.suffix.lower() not in IMAGE_SUFFIXES:
                dicom.append(index)
                continue
            try:
                images[index] = normalize_grayscale(load_image_file(item.path))
            except CovidCxrError as exc:
                problems.append(f"{item.key}: {exc.reason} ({exc.message})")
            bar.update()
        if dicom:
            problems += _read_dicom_items(dataset, dicom, images, headers, settings, bar.update)
    if problems:
        raise DatasetError(_with_problems(f"{len(problems)} of {len(dataset.items)} images cannot be used", problems),
                           reason=Reason.UNREADABLE_IMAGES)
    return LoadedImages(images, headers)


def _read_dicom_items(dataset: Dataset, indices: list[int], images: np.ndarray, headers: list[dict[str, str | None]],
                      settings: Settings | None, done: Callable[[], object]) -> list[str]:
    """Read the DICOM items at ``indices`` into ``images`` and ``headers`` in decode processes; returns the
    problems."""
    from covid_cxr.settings import load_settings
    from ingest.decode_pool import DecodePool

    base = settings or load_settings()
    problems: list[str] = []

    def files() -> Iterator[tuple[int, bytes, str]]:
        for index in indices:
            try:
                data = dataset.items[index].path.read_bytes()
            except OSError as exc:
                problems.append(f"{dataset.items[index].key}: unreadable ({exc})")
                done()
                continue
            yield index, data, hashlib.sha256(data).hexdigest()

    with DecodePool(_reader_policy(base), processes=base.decode_process_count, memory_mb=base.decode_memory_mb,
                    timeout_seconds=base.decode_timeout_seconds) as pool:
        for key, result in pool.read_all(files()):
            index = cast(int, key)
            if result.accepted:
                images[index] = result.image
                headers[index] = _subgroup_facts(result.metadata)
            else:
                problems.append(f"{dataset.items[index].key}: {result.reason} ({result.rejection.message})")
            done()
    return problems


def _subgroup_facts(metadata: InstanceMetadata) -> dict[str, str | None]:
    """The header facts subgroup tables use, control characters escaped; nothing identifying is among them."""
    from covid_cxr.safe_output import printable
    from model_store.subgroups import HEADER_ATTRIBUTES

    values = {name: getattr(metadata, name) for name in HEADER_ATTRIBUTES}
    return {name: None if value is None else printable(str(value)) for name, value in values.items()}


def _reader_policy(settings: Settings | None) -> ReaderPolicy:
    """The configured DICOM acceptance policy, with a throwaway pseudonym key: training keeps no patient ids
    from DICOM headers, so it must not create or need the installation's key file."""
    import secrets

    from pydantic import SecretStr

    from covid_cxr.settings import load_settings
    from ingest.reader import ReaderPolicy

    base = settings or load_settings()
    return ReaderPolicy.from_settings(base.model_copy(update={"pseudonym_key": SecretStr(secrets.token_hex(16))}))


@dataclass(frozen=True)
class Split:
    """Indices into a :class:`Dataset` for each part; every patient is in exactly one part."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    method: str
    seed: int
    test_fraction: float
    validation_fraction: float

    def parts(self) -> dict[str, np.ndarray]:
        return {"train": self.train, "validation": self.validation, "test": self.test}


def _group_fold(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One fold of scikit-learn's StratifiedGroupKFold with ``round(1 / fraction)`` folds: (rest, held out)."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = max(2, round(1 / fraction))
    patients = {str(label): len(set(groups[labels == label])) for label in sorted(set(labels))}
    if min(patients.values()) < n_splits:
        raise DatasetError(f"too few patients for a stratified split: holding out {fraction:g} needs at least "
                           f"{n_splits} patients per class, there are {patients}; add images or change "
                           "--test-fraction/--validation-fraction", reason=Reason.BAD_SPLIT)
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    rest, held_out = next(folds.split(np.zeros(len(labels)), labels, groups))
    return rest, held_out


def split_dataset(dataset: Dataset, test_fraction: float = 0.2, validation_fraction: float = 0.2,
                  seed: int = 42) -> Split:
    """Stratified, patient-level train / validation / test split (an image without a patient id is its own patient).

    ``test_fraction`` of the patients are held out for the test; ``validation_fraction`` of the rest for
    early stopping (0 = no validation part). Raises :class:`DatasetError` when a part would lack a class.
    """
    if not 0 < test_fraction < 1 or not 0 <= validation_fraction < 1:
        raise DatasetError(f"fractions must be in (0, 1): test={test_fraction}, validation={validation_fraction}",
                           reason=Reason.BAD_SPLIT)
    labels, groups = dataset.labels, dataset.groups
    _check_groups_have_one_label(dataset)
    rest, test = _group_fold(labels, groups, test_fraction, seed)
    validation = np.array([], dtype=int)
    train = rest
    if validation_fraction > 0:
        kept, held_out = _group_fold(labels[rest], groups[rest], validation_fraction, seed)
        train, validation = rest[kept], rest[held_out]
    split = Split(np.sort(train), np.sort(validation), np.sort(test),
                  "StratifiedGroupKFold by patient_id" if dataset.patient_ids_given
                  else "StratifiedGroupKFold by image (no patient ids given)",
                  seed, test_fraction, validation_fraction)
    for part, indices in split.parts().items():
        if part == "validation" and validation_fraction == 0:
            continue
        counts = dataset.counts(indices)
        if min(counts.values()) == 0:
            raise DatasetError(f"too few patients for a stratified split: the {part} part would have {counts}; "
                               f"add images or change --test-fraction/--validation-fraction", reason=Reason.BAD_SPLIT)
    return split


def _check_groups_have_one_label(dataset: Dataset) -> None:
    labels_of: dict[str, set[str]] = {}
    for item in dataset.items:
        labels_of.setdefault(item.patient_id, set()).add(item.label)
    mixed = sorted(patient for patient, labels in labels_of.items() if len(labels) > 1)
    if mixed:
        log.warning("patients with images of both classes (kept together in one split part): %s", ", ".join(mixed[:10]))


def manifest(dataset: Dataset, split: Split | None = None) -> dict[str, Any]:
    """What a model was trained on: source, counts, a hash over (file, sha256, label, patient) and the split's patients.

    The hash changes if any file's bytes, label or patient assignment changes, or a file is added or removed.
    """
    lines = sorted(f"{item.key}\t{file_sha256(item.path)}\t{item.label}\t{item.patient_id}" for item in dataset.items)
    result: dict[str, Any] = {
        "source": dataset.source,
        "n_images": len(dataset.items),
        "n_patients": len(set(dataset.groups)),
        "counts": dataset.counts(),
        "patient_ids_given": dataset.patient_ids_given,
        "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest(),
        "hash_of": "sorted lines 'relative path<TAB>file sha256<TAB>label<TAB>patient id', newline-joined",
    }
    if dataset.ignored:
        result["ignored"] = dataset.ignored
    if split is not None:
        parts: dict[str, Any] = {}
        for part, indices in split.parts().items():
            parts[part] = {
                "n_images": int(len(indices)),
                "counts": dataset.counts(indices),
                "patient_ids": sorted({dataset.items[i].patient_id for i in indices}),
            }
        result["split"] = {"method": split.method, "seed": split.seed, "test_fraction": split.test_fraction,
                           "validation_fraction": split.validation_fraction, **parts}
    return result


def describe_source(source: dict[str, Any]) -> str:
    """One line naming where a dataset came from, for reports."""
    if source.get("kind") == "csv":
        where = " and ".join(f"{column} in {{{', '.join(values)}}}"
                             for column, values in source.get("where", {}).items())
        rows = f", rows where {where}" if where else ""
        paths = source["path"] if isinstance(source["path"], list) else [source["path"]]
        return f"CSV {' + '.join(paths)} (labels from column {source['label_column']!r}{rows})"
    return f"folder {source.get('path')}"


def group_attributes(dataset: Dataset, columns: Sequence[str]) -> dict[str, list[str | None]]:
    """Per ``--group-by`` column, each item's value from its CSV row; a column named ``age`` becomes decade bands
    (:func:`ingest.metadata.age_band`). An unknown column raises :class:`UsageError` naming the columns there are."""
    known = set().union(*(item.attributes.keys() for item in dataset.items)) if dataset.items else set()
    attributes: dict[str, list[str | None]] = {}
    for column in columns:
        if column not in known:
            raise UsageError(f"--group-by {column!r}: no such column (columns: {', '.join(sorted(known)) or 'none'})",
                             reason=Reason.BAD_FILTER)
        values = [item.attributes.get(column) for item in dataset.items]
        if column == "age":
            from ingest.metadata import age_band

            attributes["age_band"] = [age_band(value) for value in values]
        else:
            attributes[column] = values
    return attributes


def indices_of_patients(dataset: Dataset, patient_ids: Iterable[str]) -> np.ndarray:
    """Indices of the items whose patient id is listed (to re-select a recorded split part)."""
    wanted = set(patient_ids)
    return np.array([i for i, item in enumerate(dataset.items) if item.patient_id in wanted], dtype=int)
