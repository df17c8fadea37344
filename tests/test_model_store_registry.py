"""The database-backed registry: import (verified), activate (one per name), list, fetch to cache (verified), export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import update

from covid_cxr.errors import ModelError, ModelIntegrityError, NoActiveModel
from covid_cxr.hashing import file_sha256
from covid_cxr.settings import Settings, load_settings
from model_store.artifact import METADATA_FILE, MODEL_FILE, ArtifactInfo, save_artifact
from model_store.registry import (
    activate,
    export,
    fetch_artifact,
    find,
    get_active,
    import_artifact,
    list_models,
    load_registered_model,
)


def minimal_metadata(name: str = "covid-cxr") -> dict:
    return {"name": name, "architecture": {"name": "test"}, "base_weights": {"source": "none"},
            "preprocessing_version": "test", "class_names": ["covid", "normal"], "decision_threshold": 0.5}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> list[ArtifactInfo]:
    """Two versions of a small stand-in model with the classifier's input and output (the registry needs no VGG16)."""
    import keras
    import numpy as np

    root = tmp_path_factory.mktemp("artifacts")
    inputs = keras.Input((224, 224, 3))
    outputs = keras.layers.Dense(2, activation="softmax", name="predictions")(
        keras.layers.GlobalAveragePooling2D()(inputs))
    model = keras.Model(inputs, outputs)
    first = save_artifact(model, minimal_metadata(), root / "one")
    head = model.get_layer("predictions")
    head.set_weights([w + np.float32(0.01) for w in head.get_weights()])
    second = save_artifact(model, minimal_metadata(), root / "two")
    return [first, second]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    from db.migrate import upgrade

    settings = load_settings(data_dir=tmp_path / "data")
    upgrade(settings)
    return settings


def test_no_model_says_how_to_get_one(settings: Settings) -> None:
    with pytest.raises(NoActiveModel, match="covid-cxr train") as caught:
        get_active(settings, "covid-cxr")
    assert "no version is registered" in caught.value.message
    assert caught.value.reason == "no_active_model"


def test_import_activate_list_fetch(settings: Settings, artifacts: list[ArtifactInfo]) -> None:
    first, second = artifacts
    record = import_artifact(settings, first.directory)
    assert (record.name, record.version, record.sha256, record.active) == ("covid-cxr", first.version, first.sha256,
                                                                            False)
    with pytest.raises(NoActiveModel, match="none of its registered versions is active"):
        get_active(settings, "covid-cxr")
    import_artifact(settings, second.model_path, activate=True)
    assert get_active(settings, "covid-cxr").version == second.version
    activate(settings, "covid-cxr", first.version)
    active = [(r.version, r.active) for r in list_models(settings)]
    assert sorted(active) == sorted([(first.version, True), (second.version, False)])
    record = get_active(settings, "covid-cxr")
    path = fetch_artifact(settings, record)
    assert path == settings.model_cache / "covid-cxr" / first.version / MODEL_FILE
    assert file_sha256(path) == first.sha256
    assert json.loads((path.parent / METADATA_FILE).read_text())["version"] == first.version


def test_import_is_idempotent_and_refuses_conflicts(settings: Settings, artifacts: list[ArtifactInfo],
                                                    tmp_path: Path) -> None:
    first, second = artifacts
    import_artifact(settings, first.directory)
    import_artifact(settings, first.directory)
    assert len(list_models(settings)) == 1
    # Same name and version, other bytes: refused.
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / MODEL_FILE).write_bytes(second.model_path.read_bytes())
    metadata = json.loads(first.metadata_path.read_text()) | {"sha256": second.sha256}
    (forged / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(ModelError, match="different bytes") as caught:
        import_artifact(settings, forged)
    assert caught.value.reason == "version_conflict"


def test_import_refuses_a_file_that_does_not_match_its_metadata(settings: Settings, artifacts: list[ArtifactInfo],
                                                                tmp_path: Path) -> None:
    first, second = artifacts
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / MODEL_FILE).write_bytes(second.model_path.read_bytes())
    (mixed / METADATA_FILE).write_text(first.metadata_path.read_text())
    with pytest.raises(ModelIntegrityError, match="sha256"):
        import_artifact(settings, mixed)
    assert list_models(settings) == []


def test_cache_and_database_corruption_are_caught(settings: Settings, artifacts: list[ArtifactInfo]) -> None:
    from db.models import ModelVersion
    from db.session import session_scope

    first, _ = artifacts
    record = import_artifact(settings, first.directory, activate=True)
    cached = fetch_artifact(settings, record)
    cached.write_bytes(b"tampered cache")
    assert file_sha256(fetch_artifact(settings, record)) == first.sha256  # replaced from the database
    cached.unlink()
    with session_scope(settings) as session:
        session.execute(update(ModelVersion).where(ModelVersion.id == record.id).values(artifact=b"corrupt row"))
    with pytest.raises(ModelIntegrityError, match="sha256"):
        fetch_artifact(settings, record)
    assert not cached.exists()


def test_loading_a_registered_model_hashes_its_file_once_and_refuses_tampering(
        settings: Settings, artifacts: list[ArtifactInfo], monkeypatch: pytest.MonkeyPatch) -> None:
    from db.models import ModelVersion
    from db.session import session_scope
    from model_store import artifact, registry

    first, _ = artifacts
    record = import_artifact(settings, first.directory, activate=True)
    hashed: list[Path] = []

    def counting_sha256(path: Path) -> str:
        hashed.append(Path(path))
        return file_sha256(path)

    monkeypatch.setattr(artifact, "file_sha256", counting_sha256)
    monkeypatch.setattr(registry, "file_sha256", counting_sha256)
    for source in ("the database", "the cache"):
        hashed.clear()
        assert load_registered_model(settings, record).output_shape == (None, 2), source
        assert len(hashed) == 1, source
    cached = fetch_artifact(settings, record)
    cached.write_bytes(b"tampered cache")
    assert load_registered_model(settings, record).output_shape == (None, 2)  # replaced from the database
    assert file_sha256(cached) == first.sha256
    with session_scope(settings) as session:
        session.execute(update(ModelVersion).where(ModelVersion.id == record.id).values(artifact=b"corrupt row"))
    fetch_artifact(settings, record).unlink()
    with pytest.raises(ModelIntegrityError, match="sha256"):
        load_registered_model(settings, record)


def test_export_round_trips_through_import(settings: Settings, artifacts: list[ArtifactInfo], tmp_path: Path) -> None:
    first, _ = artifacts
    import_artifact(settings, first.directory, activate=True)
    out = export(settings, find(settings, "covid-cxr"), tmp_path / "exported")
    assert file_sha256(out / MODEL_FILE) == first.sha256
    other = load_settings(data_dir=tmp_path / "other")
    from db.migrate import upgrade

    upgrade(other)
    assert import_artifact(other, out, activate=True).version == first.version


def test_unknown_version_is_named(settings: Settings, artifacts: list[ArtifactInfo]) -> None:
    import_artifact(settings, artifacts[0].directory)
    with pytest.raises(ModelError, match="versions: " + artifacts[0].version):
        find(settings, "covid-cxr", "20000101-000000-deadbeef")
    with pytest.raises(ModelError, match="no model covid-cxr version"):
        activate(settings, "covid-cxr", "nope")


def test_the_registry_records_when_and_by_what_command_a_version_was_activated(
        settings: Settings, artifacts: list[ArtifactInfo], capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import main

    first, second = artifacts
    data = ["--data-dir", str(settings.data_dir)]
    assert main(["models", "import", str(first.directory), "--activate", *data]) == 0
    assert main(["models", "import", str(second.directory), *data]) == 0
    imported = get_active(settings, "covid-cxr")
    assert imported.activated_by is not None
    assert imported.activated_by.startswith(f"covid-cxr models import {first.directory} --activate (by ")
    assert main(["models", "activate", f"covid-cxr:{second.version}", *data]) == 0
    capsys.readouterr()
    assert main(["models", "list", "--json", *data]) == 0
    rows = {row["version"]: row for row in json.loads(capsys.readouterr().out)}
    newest = rows[second.version]
    assert newest["active"]
    assert newest["activated_by"].startswith(f"covid-cxr models activate covid-cxr:{second.version} (by ")
    assert newest["activated_at"] >= rows[first.version]["activated_at"]  # the older activation stays on record
    assert not rows[first.version]["active"]


@pytest.fixture(scope="module")
def degenerate_artifact(tmp_path_factory: pytest.TempPathFactory) -> ArtifactInfo:
    import keras

    inputs = keras.Input((224, 224, 3))
    outputs = keras.layers.Dense(2, activation="softmax", name="predictions")(
        keras.layers.GlobalAveragePooling2D()(inputs))
    metadata = {**minimal_metadata(), "degenerate": {
        "degenerate": True, "reasons": ["predicts 'normal' for all 63 images of the validation part (threshold 0.5)"]}}
    return save_artifact(keras.Model(inputs, outputs), metadata, tmp_path_factory.mktemp("degenerate") / "run")


def test_a_degenerate_model_is_registered_but_not_activated_without_force(
        settings: Settings, artifacts: list[ArtifactInfo], degenerate_artifact: ArtifactInfo,
        capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import main

    data = ["--data-dir", str(settings.data_dir)]
    good = import_artifact(settings, artifacts[0].directory, activate=True)
    with pytest.raises(ModelError, match="is degenerate: predicts 'normal' for all 63") as refused:
        import_artifact(settings, degenerate_artifact.directory, activate=True)
    assert refused.value.reason == "degenerate_model"
    assert get_active(settings, "covid-cxr").version == good.version  # nothing changed
    import_artifact(settings, degenerate_artifact.directory)  # registering alone is allowed
    capsys.readouterr()
    assert main(["models", "activate", f"covid-cxr:{degenerate_artifact.version}", *data]) != 0
    assert "degenerate_model" in capsys.readouterr().err
    assert get_active(settings, "covid-cxr").version == good.version
    assert main(["models", "activate", f"covid-cxr:{degenerate_artifact.version}", "--force", *data]) == 0
    forced = get_active(settings, "covid-cxr")
    assert forced.version == degenerate_artifact.version and forced.activated_by is not None
    assert forced.activated_by.startswith(f"covid-cxr models activate --force covid-cxr:{degenerate_artifact.version}")
    assert "FORCED despite degenerate model: predicts 'normal'" in forced.activated_by


def test_activate_may_override_the_threshold_and_records_who_and_when(
        settings: Settings, artifacts: list[ArtifactInfo], capsys: pytest.CaptureFixture[str]) -> None:
    from model_store.registry import serving_threshold
    from service.cli import main
    from worker.inference import describe

    first = artifacts[0]
    data = ["--data-dir", str(settings.data_dir)]
    assert main(["models", "import", str(first.directory), "--activate", *data]) == 0
    assert serving_threshold(get_active(settings, "covid-cxr")) == 0.5  # the metadata's
    assert main(["models", "activate", f"covid-cxr:{first.version}", "--threshold", "0.3", *data]) == 0
    record = get_active(settings, "covid-cxr")
    assert record.threshold_override == 0.3 and serving_threshold(record) == 0.3
    assert record.threshold_set_by is not None and "--threshold 0.3" in record.threshold_set_by
    assert record.threshold_set_at is not None
    assert describe(object(), record).threshold == 0.3  # what the workers serve
    capsys.readouterr()
    assert main(["models", "activate", f"covid-cxr:{first.version}", "--threshold", "1.5", *data]) != 0
    assert "bad_threshold" in capsys.readouterr().err
    assert main(["models", "card", f"covid-cxr:{first.version}", "--out", str(settings.data_dir / "card"), *data]) == 0
    card = (settings.data_dir / "card" / "model_card.md").read_text()
    assert "0.3 (override set at activation)" in card and "NOT a medical device" in card
    assert (settings.data_dir / "card" / "model_card.html").read_text().startswith("<!DOCTYPE html>")
