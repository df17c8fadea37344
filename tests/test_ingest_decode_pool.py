"""Decode processes: same results as reading in-process, no TensorFlow, a memory cap and a time limit that cost one
process (replaced) and give the file a typed rejection; an ingester fed three bombs keeps going."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from bombs import J2K_CHEST, JPEG_CHEST, j2k_siz_bomb, jpeg_sof_bomb, zeros_after_dicm
from fresh_copies import with_fresh_uids
from service_fixtures import REPO_ROOT, wait_until
from sqlalchemy import select

from covid_cxr.settings import load_settings
from db.migrate import upgrade
from db.models import Instance
from db.session import session_scope
from ingest.decode_pool import DecodePool
from ingest.reader import ReaderPolicy, read_radiograph

POLICY = ReaderPolicy(frozenset({"CR", "DX"}), 60_000_000, "reject", b"k" * 32)
SMALL_CHEST = "dwv__gdcm-CR-MONO1-10-chest.dcm"


def _job(key: str, data: bytes) -> tuple[str, bytes, str]:
    return key, data, hashlib.sha256(data).hexdigest()


def _one(pool: DecodePool, key: str, data: bytes):  # type: ignore[no-untyped-def]
    pool.submit(*_job(key, data))
    while not (ready := pool.results()):
        pool.wait(1.0)
    [(got, result, seconds, _)] = ready
    assert got == key and seconds >= 0
    return result


def _status(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` field in kB."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    assert match, field
    return int(match.group(1))


def test_results_equal_reading_in_process_and_no_process_loads_tensorflow(dicom_dir: Path) -> None:
    import tensorflow  # noqa: F401 - training's situation: the parent has TensorFlow loaded

    files = {path.name: path.read_bytes() for path in sorted(dicom_dir.glob("*.dcm"))}
    with DecodePool(POLICY, processes=2, memory_mb=1536, timeout_seconds=60, encode_png=True) as pool:
        results = dict(pool.read_all(_job(name, data) for name, data in files.items()))
        for pid in pool.pids:
            maps = Path(f"/proc/{pid}/maps").read_text()
            assert "tensorflow" not in maps and "libtensorflow" not in maps
            limits = Path(f"/proc/{pid}/limits").read_text()
            assert re.search(r"Max address space\s+1610612736\s+1610612736", limits), limits
    assert set(results) == set(files)
    for name, data in files.items():
        here = read_radiograph(data, POLICY)
        there = results[name]
        assert (there.accepted, there.reason, there.sha256, there.metadata) == (here.accepted, here.reason,
                                                                                here.sha256, here.metadata), name
        if here.accepted:
            np.testing.assert_array_equal(there.image, here.image)
            assert there.png is not None, name  # encoded beside decoding, as the ingester stores it
            np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(there.png, np.uint8), cv2.IMREAD_UNCHANGED),
                                          here.image)
        else:
            assert there.rejection.message == here.rejection.message


def test_a_pool_encodes_png_only_when_asked(dicom_dir: Path) -> None:
    """Training reads through the same processes and has no use for the PNG the ingester stores."""
    data = (dicom_dir / SMALL_CHEST).read_bytes()
    with DecodePool(POLICY, processes=1, memory_mb=1536, timeout_seconds=60) as pool:
        result = _one(pool, "training", data)
    assert result.accepted and result.png is None


def test_a_decode_process_keeps_the_heap_a_file_freed_for_the_next_one(dicom_dir: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The chest files read a third time cost a fraction of the page faults they cost with glibc's own adaptive
    thresholds (which returned and re-faulted the decoded frames' pages, about 2500 per file): the buffers come
    from heap memory the earlier passes left mapped. Compared in the same run, since absolute counts vary by
    machine."""
    import ingest.decode_pool as decode_pool

    chest = ["pylibjpeg-data__RG1_JLSN.dcm", "orthanc-tests__Monochrome1-Jpeg.dcm", "pydicom-data__RG1_J2KI.dcm",
             "torchxrayvision__siim-acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"]
    files = [(name, (dicom_dir / name).read_bytes()) for name in chest]

    def third_pass_faults() -> int:
        with DecodePool(POLICY, processes=1, memory_mb=1536, timeout_seconds=60) as pool:
            for _ in range(2):
                assert all(result.accepted for _, result in pool.read_all(_job(name, data) for name, data in files))
            (pid,) = pool.pids
            before = _minor_faults(pid)
            assert all(result.accepted for _, result in pool.read_all(_job(name, data) for name, data in files))
            return _minor_faults(pid) - before

    kept = third_pass_faults()
    glibc_defaults = {key: value for key, value in decode_pool._CHILD_ENVIRONMENT.items()
                      if key not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    monkeypatch.setattr(decode_pool, "_CHILD_ENVIRONMENT", glibc_defaults)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    returned = third_pass_faults()
    assert kept * 3 < returned, (kept, returned)


def _minor_faults(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def test_running_out_of_memory_costs_one_process_and_rejects_the_file_too_large(dicom_dir: Path) -> None:
    """A bomb whose header and codestream agree (20000 x 20000, allowed by this policy) needs gigabytes to decode."""
    lenient = ReaderPolicy(frozenset({"CR", "DX"}), 10**10, "reject", b"k" * 32)
    bomb = jpeg_sof_bomb(dicom_dir / JPEG_CHEST, 20000, 20000, header_too=True)
    with DecodePool(lenient, processes=1, memory_mb=1024, timeout_seconds=60) as pool:
        first = _one(pool, "warm-up", (dicom_dir / SMALL_CHEST).read_bytes())
        [before] = pool.pids
        result = _one(pool, "bomb", bomb)
        assert not result.accepted and result.reason == "too_large"
        assert "more than the 1024 MiB a decode process may use" in result.rejection.message
        assert _one(pool, "after", (dicom_dir / SMALL_CHEST).read_bytes()).accepted and first.accepted
        [after] = pool.pids
        assert after != before, "the process that ran out of memory was replaced"


def test_a_file_over_the_time_limit_is_decode_timeout_and_its_process_is_replaced(dicom_dir: Path) -> None:
    data = (dicom_dir / "pylibjpeg-data__966_fixed.dcm").read_bytes()
    with DecodePool(POLICY, processes=1, memory_mb=1024, timeout_seconds=0.001) as pool:
        result = _one(pool, "slow", data)
        assert not result.accepted and result.reason == "decode_timeout"
        assert "longer than the limit of 0.001 s" in result.rejection.message
        pool.timeout_seconds = 60
        assert _one(pool, "next", data).accepted


def test_a_process_that_died_between_files_is_replaced_and_the_file_read(dicom_dir: Path) -> None:
    with DecodePool(POLICY, processes=1, memory_mb=1024, timeout_seconds=60) as pool:
        assert _one(pool, "first", (dicom_dir / SMALL_CHEST).read_bytes()).accepted
        [pid] = pool.pids
        os.kill(pid, signal.SIGKILL)
        assert _one(pool, "second", (dicom_dir / SMALL_CHEST).read_bytes()).accepted
        assert pool.pids != [pid]


def test_an_ingester_fed_three_bombs_rejects_them_within_its_caps_and_keeps_going(dicom_dir: Path,
                                                                                  tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "data", settle_seconds=0.2, reconcile_interval_seconds=1.0,
                             decode_processes=2, decode_memory_mb=1024)
    upgrade(settings)
    settings.inbox.mkdir(parents=True)
    env = {**os.environ, "COVID_CXR_DECODE_PROCESSES": "2", "COVID_CXR_DECODE_MEMORY_MB": "1024"}
    log_path = tmp_path / "ingest.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "covid_cxr", "ingest", "--data-dir", str(settings.data_dir),
                                    "--settle-seconds", "0.2"], stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                   env=env)
    try:
        wait_until(lambda: "watching" in log_path.read_text(), timeout=120, what="the ingester up")
        bombs = {"j2k-siz.dcm": j2k_siz_bomb(dicom_dir / J2K_CHEST),
                 "jpeg-sof.dcm": jpeg_sof_bomb(dicom_dir / JPEG_CHEST),
                 "zeros.dcm": zeros_after_dicm(200 * 1024 * 1024)}
        for name, data in bombs.items():
            _drop(settings.inbox, name, data)
        time.sleep(1.0)
        dropped = time.monotonic()
        _drop(settings.inbox, "normal.dcm", with_fresh_uids(dicom_dir / JPEG_CHEST))
        wait_until(lambda: "normal.dcm" in _states(settings), timeout=10, what="the normal file recorded in 10 s")
        assert time.monotonic() - dropped <= 10
        wait_until(lambda: len(_states(settings)) == 4, timeout=30, what="all four recorded")
        assert process.poll() is None, "the ingester keeps going"
        assert _status(process.pid, "VmHWM") < 600 * 1024, "the ingester itself never held a bomb's pixels"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    assert _states(settings) == {"j2k-siz.dcm": ("rejected", "codestream_mismatch"),
                                 "jpeg-sof.dcm": ("rejected", "codestream_mismatch"),
                                 "zeros.dcm": ("rejected", "too_large"),
                                 "normal.dcm": ("received", None)}
    assert "Traceback" not in log_path.read_text()


def _drop(inbox: Path, name: str, data: bytes) -> None:
    staging = inbox.parent / f".{name}.part"
    staging.write_bytes(data)
    os.rename(staging, inbox / name)


def _states(settings) -> dict[str, tuple[str, str | None]]:  # type: ignore[no-untyped-def]
    with session_scope(settings) as session:
        rows = session.execute(select(Instance.file_name, Instance.state, Instance.reason)).all()
    return {name: (state if state != "queued" else "received", reason) for name, state, reason in rows}


@pytest.fixture(autouse=True)
def _quiet_tensorflow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")


def test_a_decode_process_logs_header_values_escaped(dicom_dir: Path, capfd: pytest.CaptureFixture[str],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Rejections are logged by the decode process; a header's control characters must not reach the terminal."""
    import io
    import logging

    caplog.set_level(logging.INFO, logger="ingest")  # the decode processes log at the ingester's level

    import pydicom

    ds = pydicom.dcmread(dicom_dir / SMALL_CHEST)
    ds.Modality = "\x1b[2J\x1b]0;OWNED\x07"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with DecodePool(POLICY, processes=1, memory_mb=1024, timeout_seconds=60) as pool:
        result = _one(pool, "escape", buffer.getvalue())
    assert result.reason == "wrong_modality"
    logged = capfd.readouterr().err
    assert "is not accepted" in logged and "\x1b" not in logged and "\x07" not in logged


def test_a_library_warning_with_a_header_value_reaches_the_log_escaped(dicom_dir: Path,
                                                                       capfd: pytest.CaptureFixture[str]) -> None:
    """pydicom warns about an unknown character set with the header's own text; Python would print that warning
    raw to stderr (the ingester's terminal or log). Warnings go through logging, escaped like every record."""
    import io

    import pydicom

    ds = pydicom.dcmread(dicom_dir / SMALL_CHEST)
    ds.SpecificCharacterSet = "EVIL\x1b[2J\x1b]0;OWNED\x07"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    capfd.readouterr()
    with DecodePool(POLICY, processes=1, memory_mb=1024, timeout_seconds=60) as pool:
        result = _one(pool, "charset", buffer.getvalue())
    assert result.accepted
    logged = capfd.readouterr().err
    assert "\x1b" not in logged and "\x07" not in logged, logged


@pytest.mark.parametrize("cut", ["inside a request", "before an answer"])
def test_a_decode_process_whose_ingester_died_exits_without_a_traceback(dicom_dir: Path, cut: str) -> None:
    """An ingester SIGKILLed while sending a request (or before reading the answer) must not leave a traceback in
    its log: the decode process sees the pipe end and exits quietly (its parent-death signal follows anyway)."""
    import pickle
    import struct

    child = subprocess.Popen([sys.executable, "-m", "ingest.decode_child", "1024", "INFO"], cwd=REPO_ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None
    send = lambda message: child.stdin.write(struct.pack("!i", len(message)) + message)  # noqa: E731
    send(pickle.dumps(("policy", POLICY, False)))
    if cut == "inside a request":
        request = pickle.dumps(("read", "job", (dicom_dir / SMALL_CHEST).read_bytes(), "0" * 64))
        child.stdin.write(struct.pack("!i", len(request)) + request[: len(request) // 2])
        child.stdin.close()
    else:
        send(pickle.dumps(("read", "job", (dicom_dir / SMALL_CHEST).read_bytes(), "0" * 64)))
        child.stdin.flush()
        child.stdout.close()  # nobody reads the answer
    if not child.stdin.closed:
        child.stdin.close()
    assert child.wait(timeout=60) in (0, 1)
    assert child.stderr is not None
    stderr = child.stderr.read()
    assert b"Traceback" not in stderr, stderr.decode(errors="replace")


def _identity(path: Path) -> tuple[int, int, int, int]:
    from ingest.inbox import identity_of

    return identity_of(os.lstat(path))


def test_a_file_read_by_path_gets_the_same_result_and_its_sha256_from_the_decode_process(
        dicom_dir: Path, tmp_path: Path) -> None:
    accepted, rejected = dicom_dir / SMALL_CHEST, dicom_dir / "pylibjpeg-data__RG2_JPLY_fixed.dcm"  # a hip
    with DecodePool(POLICY, processes=1, memory_mb=1024, timeout_seconds=60) as pool:
        for path in (accepted, rejected):
            data = path.read_bytes()
            pool.submit_path(path.name, path, _identity(path))
            while not (ready := pool.results()):
                pool.wait(1.0)
            [(_, result, _, judged)] = ready
            expected = read_radiograph(data, POLICY)
            assert not isinstance(result, Exception)
            assert result.sha256 == hashlib.sha256(data).hexdigest() == expected.sha256
            assert result.accepted == expected.accepted and result.reason == expected.reason
            # A rejected file's judged bytes come back for its quarantine copy; an accepted one's do not.
            assert judged == (None if expected.accepted else data)


def test_a_file_read_by_path_that_is_not_the_file_claimed_is_an_error_not_a_result(dicom_dir: Path,
                                                                                    tmp_path: Path) -> None:
    from ingest.inbox import FileChanged, InboxEntryError

    path = tmp_path / "a.dcm"
    path.write_bytes((dicom_dir / SMALL_CHEST).read_bytes())
    claimed = _identity(path)
    with path.open("ab") as handle:  # a writer still at it
        handle.write(b"more")
    link = tmp_path / "link.dcm"
    link.symlink_to(path)
    with DecodePool(POLICY, processes=1, memory_mb=1024, timeout_seconds=60) as pool:
        answers = {}
        for key, target, identity in (("changed", path, claimed), ("link", link, claimed),
                                      ("gone", tmp_path / "gone.dcm", claimed)):
            pool.submit_path(key, target, identity)
            while not (ready := pool.results()):
                pool.wait(1.0)
            [(got, result, _, judged)] = ready
            answers[got] = result
            assert judged is None
    assert isinstance(answers["changed"], FileChanged)
    assert isinstance(answers["link"], InboxEntryError) and answers["link"].cause == "not_a_regular_file"
    assert isinstance(answers["gone"], FileNotFoundError)
