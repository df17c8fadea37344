"""Labelled sets: folder and CSV listing, bad input refused before training, patient-level split, manifest."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from covid_cxr.constants import CLASS_NAMES
from covid_cxr.errors import DatasetError, UsageError
from model_store.dataset import (
    IMAGE_AS_PATIENT,
    Dataset,
    Item,
    from_csv,
    from_folder,
    load_images,
    load_images_with_headers,
    manifest,
    parse_where,
    split_dataset,
)


def metadata_rows(cxr_dir: Path) -> list[dict[str, str]]:
    with (cxr_dir / "metadata.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def real_folder(cxr_dir: Path, target: Path, per_class: int = 2) -> Path:
    """A covid/ + normal/ folder of real images copied from the shared data."""
    rows = metadata_rows(cxr_dir)
    for label in CLASS_NAMES:
        (target / label).mkdir(parents=True)
        for row in [r for r in rows if r["label"] == label and not r["subset"]][:per_class]:
            shutil.copy(cxr_dir / row["file"], target / label / Path(row["file"]).name)
    return target


def test_folder_lists_class_subfolders_and_ignores_the_rest(cxr_dir: Path, tmp_path: Path) -> None:
    folder = real_folder(cxr_dir, tmp_path / "set")
    (folder / "pneumonia").mkdir()
    (folder / "covid" / "notes.txt").write_text("not an image")
    (folder / "covid" / ".hidden.png").write_bytes(b"")
    dataset = from_folder(folder, CLASS_NAMES)
    assert dataset.counts() == {"covid": 2, "normal": 2}
    assert sorted(dataset.ignored) == ["covid/notes.txt", "pneumonia/"]
    assert not dataset.patient_ids_given
    assert all(item.patient_id == IMAGE_AS_PATIENT + item.key for item in dataset.items)


def test_empty_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "covid").mkdir()
    (tmp_path / "normal").mkdir()
    with pytest.raises(DatasetError, match="no labelled images") as caught:
        from_folder(tmp_path, CLASS_NAMES)
    assert caught.value.reason == "empty_dataset"


def test_one_class_only_is_refused(cxr_dir: Path, tmp_path: Path) -> None:
    folder = real_folder(cxr_dir, tmp_path / "set")
    shutil.rmtree(folder / "normal")
    with pytest.raises(DatasetError, match="no images of class normal") as caught:
        from_folder(folder, CLASS_NAMES)
    assert caught.value.reason == "one_class_only"


def test_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a folder"):
        from_folder(tmp_path / "absent", CLASS_NAMES)


def test_shared_metadata_csv_with_pneumonia_rows_is_refused_until_filtered(cxr_dir: Path) -> None:
    with pytest.raises(DatasetError, match="pneumonia") as caught:
        from_csv(cxr_dir / "metadata.csv", CLASS_NAMES)
    assert caught.value.reason == "unknown_labels"
    assert "--where label=covid,normal" in caught.value.message
    dataset = from_csv(cxr_dir / "metadata.csv", CLASS_NAMES, where=parse_where(["label=covid,normal"]))
    assert dataset.counts() == {"covid": 109, "normal": 108}
    assert dataset.patient_ids_given
    assert len(set(dataset.groups)) == 77 + 108  # covid patients + normal patients (see shared/data/README.md)


def test_pyimagesearch50_reference_labels(cxr_dir: Path) -> None:
    dataset = from_csv(cxr_dir / "metadata.csv", CLASS_NAMES, label_column="reference_label",
                       where=parse_where(["subset=pyimagesearch50"]))
    assert dataset.counts() == {"covid": 25, "normal": 25}
    assert sum(1 for item in dataset.items if item.label == "normal" and item.key.startswith("pneumonia/")) == 18


def test_csv_with_unknown_labels_names_them(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "labels.csv").write_text("path,label\na.png,covid\na.png,Covid-19\na.png,normal\n")
    with pytest.raises(DatasetError, match="'Covid-19'") as caught:
        from_csv(tmp_path / "labels.csv", CLASS_NAMES)
    assert "line 3" in caught.value.message


def test_csv_missing_files_and_columns_are_refused(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("path,label\nabsent.png,covid\n")
    with pytest.raises(DatasetError, match="absent.png") as caught:
        from_csv(tmp_path / "labels.csv", CLASS_NAMES)
    assert caught.value.reason == "missing_files"
    (tmp_path / "other.csv").write_text("image,diagnosis\n")
    with pytest.raises(DatasetError, match="no column 'path'"):
        from_csv(tmp_path / "other.csv", CLASS_NAMES)
    with pytest.raises(UsageError, match="COLUMN=VALUE"):
        parse_where(["subset"])


def test_unreadable_images_are_all_listed(cxr_dir: Path, tmp_path: Path) -> None:
    folder = real_folder(cxr_dir, tmp_path / "set")
    (folder / "covid" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    (folder / "normal" / "empty.jpg").write_bytes(b"")
    dataset = from_folder(folder, CLASS_NAMES)
    with pytest.raises(DatasetError, match="2 of 6 images cannot be used") as caught:
        load_images(dataset, progress=False)
    assert caught.value.reason == "unreadable_images"
    assert "covid/broken.png: decode_failed" in caught.value.message
    assert "normal/empty.jpg: decode_failed" in caught.value.message


def test_images_go_through_the_ingest_normalization(cxr_dir: Path, tmp_path: Path) -> None:
    from ingest.pixels import load_image_file, normalize_grayscale

    dataset = from_folder(real_folder(cxr_dir, tmp_path / "set", per_class=1), CLASS_NAMES)
    images = load_images(dataset, progress=False)
    assert images.shape == (2, 224, 224) and images.dtype == np.uint8
    for image, item in zip(images, dataset.items, strict=False):
        np.testing.assert_array_equal(image, normalize_grayscale(load_image_file(item.path)))


def test_dicom_files_go_through_the_reader_and_its_rejections_are_listed(shared_data: Path, cxr_dir: Path,
                                                                         tmp_path: Path) -> None:
    from ingest.reader import ReaderPolicy, read_radiograph

    folder = real_folder(cxr_dir, tmp_path / "set", per_class=1)
    chest = shared_data / "dicom" / "dwv__gdcm-CR-MONO1-10-chest.dcm"
    shutil.copy(chest, folder / "covid" / "chest.dcm")
    dataset = from_folder(folder, CLASS_NAMES)
    loaded = load_images_with_headers(dataset, progress=False)
    policy = ReaderPolicy(frozenset({"CR", "DX"}), 60_000_000, "reject", b"test")
    index = [item.key for item in dataset.items].index("covid/chest.dcm")
    np.testing.assert_array_equal(loaded.images[index], read_radiograph(chest, policy).image)
    # The header's subgroup facts come back with the image (one read); nothing else of the header is kept.
    assert loaded.headers[index] == {"manufacturer": "FUJI PHOTO FILM CO. LTD.", "modality": "CR",
                                     "view_position": "PA", "institution_name": "FUJI PHOTO FILM CO.,",
                                     "patient_sex": None, "age_band": None}
    assert [header for i, header in enumerate(loaded.headers) if i != index] == [{}, {}]  # the PNGs

    shutil.copy(shared_data / "dicom" / "dcmfx-pydicom__MR_small_RLE.dcm", folder / "normal" / "mr")
    with pytest.raises(DatasetError, match="normal/mr: wrong_modality"):
        load_images(from_folder(folder, CLASS_NAMES), progress=False)


def synthetic(patients: dict[str, tuple[str, int]]) -> Dataset:
    """A dataset of fake paths: patient -> (label, number of images)."""
    items = [Item(Path(f"/nowhere/{patient}-{i}.png"), label, patient, f"{patient}-{i}.png")
             for patient, (label, count) in patients.items() for i in range(count)]
    return Dataset(items, {"kind": "test"}, CLASS_NAMES, True)


def test_split_keeps_each_patient_in_one_part_and_every_part_has_both_classes() -> None:
    rng = np.random.default_rng(0)
    patients = {f"c{i}": ("covid", int(rng.integers(1, 5))) for i in range(30)}
    patients |= {f"n{i}": ("normal", 1) for i in range(40)}
    dataset = synthetic(patients)
    split = split_dataset(dataset, test_fraction=0.2, validation_fraction=0.2, seed=1)
    parts = {name: {dataset.items[i].patient_id for i in indices} for name, indices in split.parts().items()}
    assert not parts["train"] & parts["test"] and not parts["train"] & parts["validation"]
    assert not parts["validation"] & parts["test"]
    assert sorted(np.concatenate(list(split.parts().values()))) == list(range(len(dataset.items)))
    for indices in split.parts().values():
        assert min(dataset.counts(indices).values()) > 0
    assert 0.12 < len(parts["test"]) / len(patients) < 0.28
    again = split_dataset(dataset, test_fraction=0.2, validation_fraction=0.2, seed=1)
    np.testing.assert_array_equal(split.test, again.test)
    other = split_dataset(dataset, test_fraction=0.2, validation_fraction=0.2, seed=2)
    assert not np.array_equal(split.test, other.test)


def test_split_without_validation_and_with_too_few_patients() -> None:
    dataset = synthetic({"c1": ("covid", 3), "c2": ("covid", 1), "n1": ("normal", 1), "n2": ("normal", 1),
                         "n3": ("normal", 1)})
    split = split_dataset(dataset, test_fraction=0.5, validation_fraction=0)
    assert len(split.validation) == 0
    tiny = synthetic({"c1": ("covid", 4), "n1": ("normal", 1), "n2": ("normal", 1)})
    with pytest.raises(DatasetError, match="too few patients") as caught:
        split_dataset(tiny, test_fraction=0.5, validation_fraction=0)
    assert caught.value.reason == "bad_split"


def test_manifest_hash_follows_bytes_labels_and_patients(cxr_dir: Path, tmp_path: Path) -> None:
    folder = real_folder(cxr_dir, tmp_path / "set")
    dataset = from_folder(folder, CLASS_NAMES)
    first = manifest(dataset)
    assert first["counts"] == {"covid": 2, "normal": 2} and first["n_images"] == 4
    assert manifest(from_folder(folder, CLASS_NAMES))["sha256"] == first["sha256"]
    target = dataset.items[0].path
    target.write_bytes(target.read_bytes() + b"\0")
    assert manifest(from_folder(folder, CLASS_NAMES))["sha256"] != first["sha256"]


def test_manifest_records_the_split_patients(monkeypatch: pytest.MonkeyPatch) -> None:
    # The synthetic paths do not exist: stub the per-file hash, the split record is what is checked here.
    monkeypatch.setattr("model_store.dataset.file_sha256", lambda path: "0" * 64)
    dataset = synthetic({f"c{i}": ("covid", 1) for i in range(5)} | {f"n{i}": ("normal", 1) for i in range(5)})
    split = split_dataset(dataset, test_fraction=0.2, validation_fraction=0)
    recorded = manifest(dataset, split)["split"]
    assert set(recorded["test"]["patient_ids"]) == {dataset.items[i].patient_id for i in split.test}
    assert recorded["test"]["counts"] == dataset.counts(split.test)
    assert recorded["train"]["n_images"] + recorded["test"]["n_images"] == 10
    assert recorded["method"] == "StratifiedGroupKFold by patient_id"
