"""``covid-cxr purge``: old archived and quarantined files and normalized images go, rows and predictions stay,
and nothing outside the archive and quarantine folders is ever deleted."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from service_fixtures import embedded_settings, record_instances
from sqlalchemy import func, select, update

from db.migrate import upgrade
from db.models import Instance, NormalizedImage, Prediction
from db.session import session_scope
from ingest.inbox import REASON_SUFFIX, write_reason
from service.cli import main

IMAGES = [np.full((224, 224), level, dtype=np.uint8) for level in (10, 50, 90, 130, 170, 210, 250)]


class Installation:
    """Seven instances with real files: which of them a purge --older-than 30d may touch is in ``expected``."""

    def __init__(self, tmp_path: Path, database_url: str | None = None) -> None:
        self.settings = settings = embedded_settings(tmp_path / "data", inbox_dir=tmp_path / "inbox",
                                                     database_url=database_url)
        upgrade(settings)
        self.outside = tmp_path / "outside" / "precious.dcm"
        self.outside.parent.mkdir()
        self.outside.write_bytes(b"not the service's to delete")
        ids = record_instances(settings, IMAGES, preprocessing_version="test")
        archive, quarantine = settings.archive.resolve(), settings.quarantine.resolve()
        old = datetime.now(UTC) - timedelta(days=40)
        self.ids = dict(zip(["archived", "quarantined", "recent", "pending", "symlink", "kept", "failed"], ids,
                            strict=True))
        plan = {
            "archived": ("predicted", archive / "site-a" / "old.dcm", old),
            "quarantined": ("rejected", quarantine / "hip.dcm", old),
            "recent": ("predicted", archive / "new.dcm", datetime.now(UTC)),
            "pending": ("queued", archive / "waiting.dcm", old),
            "symlink": ("predicted", archive / "link.dcm", old),
            "kept": ("predicted", (tmp_path / "inbox" / "kept.dcm").resolve(), old),
            "failed": ("failed", archive / "failed.dcm", old),
        }
        self.paths: dict[str, Path] = {}
        with session_scope(settings) as session:
            for name, (state, path, created) in plan.items():
                path.parent.mkdir(parents=True, exist_ok=True)
                if name == "symlink":
                    path.symlink_to(self.outside)
                else:
                    path.write_bytes(name.encode() * 1000)
                self.paths[name] = path
                session.execute(update(Instance).where(Instance.id == self.ids[name])
                                .values(state=state, stored_path=str(path), created_at=created))
                if state == "predicted":
                    session.add(Prediction(instance_id=self.ids[name], model_version="v1", preprocessing_version="t",
                                           probabilities={"covid": 0.2, "normal": 0.8}, prob_covid=0.2,
                                           label="normal", threshold=0.5))
        write_reason(self.paths["quarantined"], {"reason": "wrong_body_part"})

    def row(self, name: str) -> Instance:
        with session_scope(self.settings) as session:
            return session.get_one(Instance, self.ids[name])

    def png(self, name: str) -> NormalizedImage:
        with session_scope(self.settings) as session:
            return session.get_one(NormalizedImage, self.ids[name])


@pytest.fixture
def installation(tmp_path) -> Installation:
    return Installation(tmp_path)


@pytest.fixture
def both_databases(tmp_path, database_url) -> Installation:
    return Installation(tmp_path, database_url)


def _run(installation: Installation, capsys, *flags: str) -> dict:
    database = ["--database-url", installation.settings.database_url] if installation.settings.database_url else []
    assert main(["purge", "--data-dir", str(installation.settings.data_dir), *database, "--older-than", "30d",
                 "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_dry_run_counts_and_deletes_nothing(installation, capsys):
    report = _run(installation, capsys, "--archive", "--quarantine", "--images", "--dry-run")
    assert report["dry_run"]
    assert report["archive"]["files"] == 2  # the old predicted one and the old failed one
    assert report["quarantine"]["files"] == 1
    assert report["images"] == 3  # old predicted instances: archived, symlink, kept
    assert all(path.exists() for path in installation.paths.values())
    assert installation.row("archived").stored_path is not None
    assert installation.png("archived").png is not None


def test_old_files_and_images_go_and_every_row_says_so(both_databases, capsys):
    installation = both_databases
    report = _run(installation, capsys, "--archive", "--quarantine", "--images")
    paths = installation.paths
    assert not paths["archived"].exists() and not paths["failed"].exists()
    assert not paths["quarantined"].exists()
    assert not paths["quarantined"].with_name(paths["quarantined"].name + REASON_SUFFIX).exists()
    for name in ("archived", "quarantined", "failed"):
        row = installation.row(name)
        assert row.stored_path is None and row.purged_at is not None, name
    # Recent, still pending, kept in the inbox: untouched.
    for name in ("recent", "pending", "kept"):
        assert paths[name].exists() and installation.row(name).purged_at is None, name
    # A link out of the archive is refused, and what it points at survives.
    assert report["archive"]["refused"] == [str(paths["symlink"])]
    assert installation.outside.read_bytes() == b"not the service's to delete"
    # Images: dropped for old predicted instances only; mean and std stay for drift, predictions stay.
    for name in ("archived", "symlink", "kept"):
        image = installation.png(name)
        assert image.png is None and image.purged_at is not None and image.mean is not None, name
    for name in ("recent", "pending", "failed", "quarantined"):
        assert installation.png(name).png is not None, name
    with session_scope(installation.settings) as session:
        assert session.scalar(select(func.count()).select_from(Prediction)) == 4
    # A second purge finds nothing more to do.
    again = _run(installation, capsys, "--archive", "--quarantine", "--images")
    assert (again["archive"]["files"], again["quarantine"]["files"], again["images"]) == (0, 0, 0)


def test_a_file_already_gone_is_recorded_as_purged(installation, capsys):
    os.unlink(installation.paths["archived"])
    report = _run(installation, capsys, "--archive")
    assert report["archive"]["already_gone"] == 1
    assert installation.row("archived").purged_at is not None


def test_purge_says_what_to_purge_and_reads_durations(installation, capsys):
    assert main(["purge", "--data-dir", str(installation.settings.data_dir), "--older-than", "30d"]) == 2
    assert "--archive, --quarantine and/or --images" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["purge", "--data-dir", str(installation.settings.data_dir), "--older-than", "a month", "--images"])
    assert main(["purge", "--data-dir", str(installation.settings.data_dir), "--older-than", "30d",
                 "--images", "--dry-run"]) == 0
    assert "3 normalized image(s) of predicted instances" in capsys.readouterr().out
