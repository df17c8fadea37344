"""Several ``covid-cxr ingest`` processes on one inbox (PostgreSQL + Redis): every file recorded and archived by
exactly one of them, and the files a SIGKILLed ingester had claimed finished by the others."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fresh_copies import write_fresh_copies
from service_fixtures import REPO_ROOT, distributed_settings, wait_until
from sqlalchemy import func, select

from covid_cxr.settings import Settings
from db.migrate import upgrade
from db.models import Instance
from db.session import session_scope
from ingest.claims import CLAIMS_FOLDER, ClaimFolder, process_alive

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

FILES = 300
SMALL_CHESTS = (  # 388 KB uncompressed and 127 KB JPEG: cheap to decode, so the race is what is tested
    "dwv__gdcm-CR-MONO1-10-chest.dcm",
    "torchxrayvision__siim-acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
)
KEY = "0123456789abcdef" * 4
FAST = {"settle_seconds": 0.2, "reconcile_interval_seconds": 1.0, "batch_max_wait_seconds": 0.5,
        "claim_lease_seconds": 5.0, "decode_processes": 1}


class Ingester:
    """``covid-cxr ingest`` as an operator runs it, logging to a file."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.log_path = log_path
        env = {**os.environ, "COVID_CXR_DATABASE_URL": settings.database, "COVID_CXR_BROKER_URL": settings.broker,
               "COVID_CXR_PSEUDONYM_KEY": KEY,
               **{f"COVID_CXR_{key.upper()}": str(value) for key, value in FAST.items()}}
        argv = [sys.executable, "-m", "covid_cxr", "ingest", "--data-dir", str(settings.data_dir)]
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def recorded(self) -> int:
        return len(re.findall(r" -> instance \d+ ", self.log()))

    def claim_folder(self) -> Path | None:
        found = [p for p in (self.log_path.parent / "data" / "inbox" / CLAIMS_FOLDER).glob(f"*-{self.process.pid}-*")]
        return found[0] if found else None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(60)


@pytest.fixture
def settings(tmp_path, postgres_url, redis_url) -> Settings:
    settings = distributed_settings(tmp_path / "data", postgres_url, redis_url, pseudonym_key=KEY, **FAST)
    upgrade(settings)
    settings.inbox.mkdir(parents=True)
    return settings


def _stage(dicom_dir: Path, staging: Path) -> list[str]:
    """FILES copies of the small chests, each with fresh UIDs, written beside the inbox (same file system)."""
    staging.mkdir()
    write_fresh_copies([dicom_dir / name for name in SMALL_CHESTS], FILES, staging,
                       lambda index: f"s{index % 7}/f{index:03d}.dcm")
    return [f"s{index % 7}/f{index:03d}.dcm" for index in range(FILES)]


def _drop_all(staging: Path, inbox: Path, names: list[str]) -> None:
    """Rename every staged file into the inbox at once, as a router that writes elsewhere and renames."""
    for name in names:
        (inbox / name).parent.mkdir(exist_ok=True)
        os.rename(staging / name, inbox / name)


def _rows(settings: Settings) -> list[tuple[str, str, str | None]]:
    with session_scope(settings) as session:
        return [tuple(row) for row in session.execute(
            select(Instance.file_name, Instance.state, Instance.reason).order_by(Instance.id)).all()]


def _count(settings: Settings) -> int:
    with session_scope(settings) as session:
        return int(session.scalar(select(func.count()).select_from(Instance)) or 0)


def _inbox_files(settings: Settings) -> list[Path]:
    """Files in the inbox, claimed ones included."""
    return [p for p in settings.inbox.rglob("*") if p.is_file()]


def _assert_each_file_recorded_and_archived_once(settings: Settings, names: list[str],
                                                 ingesters: list[Ingester]) -> None:
    rows = _rows(settings)
    assert len(rows) == FILES
    assert sorted(name for name, _, _ in rows) == sorted(names), "one row per file"
    assert {(state, reason) for _, state, reason in rows} <= {("received", None), ("queued", None)}, \
        "no duplicate, no rejection"
    archive = settings.archive.resolve()
    archived = sorted(p.relative_to(archive).as_posix() for p in archive.rglob("*") if p.is_file())
    assert archived == sorted(names), "every file archived once under its own name"
    for ingester in ingesters:
        assert "Traceback" not in ingester.log(), ingester.log()[-3000:]


def test_three_ingesters_share_one_inbox_and_process_each_file_once(settings, dicom_dir, tmp_path):
    names = _stage(dicom_dir, tmp_path / "staging")
    ingesters = [Ingester(settings, tmp_path / f"ingest-{i}.log") for i in range(3)]
    try:
        for ingester in ingesters:
            wait_until(lambda ingester=ingester: "watching" in ingester.log(), timeout=120, what="ingesters up")
        _drop_all(tmp_path / "staging", settings.inbox, names)
        wait_until(lambda: _count(settings) >= FILES and not _inbox_files(settings), timeout=180,
                   what=f"{FILES} rows and an empty inbox")
    finally:
        for ingester in ingesters:
            ingester.stop()
    _assert_each_file_recorded_and_archived_once(settings, names, ingesters)
    assert sum(ingester.recorded() for ingester in ingesters) == FILES
    assert all(ingester.recorded() > 0 for ingester in ingesters), "all three took a share"
    assert not (settings.inbox / CLAIMS_FOLDER).exists(), "every claim folder removed once empty"


def test_the_files_of_a_killed_ingester_are_finished_by_the_others(settings, dicom_dir, tmp_path):
    names = _stage(dicom_dir, tmp_path / "staging")
    ingesters = [Ingester(settings, tmp_path / f"ingest-{i}.log") for i in range(3)]
    victim = ingesters[0]
    try:
        for ingester in ingesters:
            wait_until(lambda ingester=ingester: "watching" in ingester.log(), timeout=120, what="ingesters up")
        _drop_all(tmp_path / "staging", settings.inbox, names)

        def victim_holds_files() -> Path | None:
            folder = victim.claim_folder()
            held = folder is not None and victim.recorded() >= 10 and any(p.is_file() for p in folder.rglob("*"))
            return folder if held else None

        folder = wait_until(victim_holds_files, timeout=120, interval=0.01, what="the victim holding claims")
        children = _children(victim.process.pid)
        victim.process.send_signal(signal.SIGKILL)  # only the ingester: its decode processes must follow by themselves
        victim.process.wait(30)
        wait_until(lambda: _count(settings) >= FILES and not _inbox_files(settings), timeout=180,
                   what=f"{FILES} rows and an empty inbox after the kill")
        assert children and not any(process_alive(pid) for pid in children), "decode processes died with it"
        assert not folder.exists(), "the dead ingester's claim folder was emptied and removed"
    finally:
        for ingester in ingesters[1:]:
            ingester.stop()
    _assert_each_file_recorded_and_archived_once(settings, names, ingesters)
    assert any("took over" in ingester.log() for ingester in ingesters[1:])


def test_a_claim_lost_to_another_ingester_is_none_and_a_stalled_heartbeat_is_death_after_the_lease(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.dcm").write_bytes(b"x")
    now = [0.0]
    first, second = ClaimFolder(inbox, 10.0, clock=lambda: now[0]), ClaimFolder(inbox, 10.0, clock=lambda: now[0])
    first.open()
    second.open()
    try:
        claim = first.claim(inbox / "a.dcm")
        assert claim is not None and claim.path.read_bytes() == b"x" and claim.rel_name == "a.dcm"
        assert second.claim(inbox / "a.dcm") is None
        first._stop.set()  # the heartbeat stops, the process lives on (a hung or partitioned ingester)
        first._heartbeat.join()
        assert second.adopt_orphans() == []  # first sight of its heartbeat
        now[0] = 9.0
        assert second.adopt_orphans() == []
        now[0] = 10.5
        [adopted] = second.adopt_orphans()
        assert adopted.rel_name == "a.dcm" and adopted.path.parent == second.folder
        assert not first.folder.exists()
    finally:
        second.close()
    assert (inbox / "a.dcm").read_bytes() == b"x", "a clean stop gives held files back"
    assert not (inbox / CLAIMS_FOLDER / second.ingester_id).exists()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found
