"""``covid-cxr worker``: the command line serve starts a worker with, and its start-up checks."""

from __future__ import annotations

import json
import sys

from covid_cxr.settings import load_settings
from service.cli import build_parser, main
from service.worker_command import worker_command


def test_worker_command_carries_the_settings_but_no_secret(tmp_path, monkeypatch):
    from service.worker_command import _settings

    monkeypatch.chdir(tmp_path)
    settings = load_settings(data_dir="rel-data", batch_size=4, max_attempts=5, model_name="m",
                             pseudonym_key="secret-key", database_url="sqlite:////tmp/x.sqlite3")
    argv = worker_command(settings, ["gpu"], concurrency=2, beat=True, pool="solo")
    assert argv[:4] == [sys.executable, "-m", "covid_cxr", "worker"]
    assert "secret-key" not in " ".join(argv)
    args = build_parser().parse_args(argv[3:])
    assert (args.queues, args.concurrency, args.beat, args.pool) == ("gpu", 2, True, "solo")
    child = _settings(args)
    assert child.data_dir == tmp_path / "rel-data"  # absolute: the child's working directory does not matter
    assert (child.batch_size, child.max_attempts, child.model_name, child.database) == (
        4, 5, "m", "sqlite:////tmp/x.sqlite3")
    assert json.loads(argv[argv.index("--settings-json") + 1])["batch_size"] == 4


def test_worker_refuses_an_out_of_date_schema(tmp_path, capsys):
    assert main(["worker", "--data-dir", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert "covid-cxr db upgrade" in error and "schema_out_of_date" in error
