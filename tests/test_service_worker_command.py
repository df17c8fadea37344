"""``covid-cxr worker``: the command line serve starts a worker with, and its start-up checks."""

from __future__ import annotations

import json
import os
import sys

from covid_cxr.commandline import EXIT_USAGE
from covid_cxr.settings import load_settings
from service.cli import build_parser, main
from service.worker_command import worker_command


def test_worker_command_hands_the_settings_over_in_the_environment_not_the_command_line(tmp_path, monkeypatch):
    from service.worker_command import SETTINGS_ENV, _settings

    monkeypatch.chdir(tmp_path)
    password_url = "postgresql+psycopg://covid:S3cret-PW@db.example:5432/covid"
    settings = load_settings(data_dir="rel-data", batch_size=4, max_attempts=5, model_name="m",
                             pseudonym_key="secret-key" * 4, database_url=password_url)
    argv, env = worker_command(settings, ["gpu"], concurrency=2, beat=True, pool="solo")
    assert argv[:4] == [sys.executable, "-m", "covid_cxr", "worker"]
    assert "S3cret-PW" not in " ".join(argv) and "secret-key" not in " ".join(argv)
    assert set(env) == {SETTINGS_ENV}
    assert "secret-key" not in env[SETTINGS_ENV]  # workers do not pseudonymize: the key stays with the ingester
    args = build_parser().parse_args(argv[3:])
    assert (args.queues, args.concurrency, args.beat, args.pool) == ("gpu", 2, True, "solo")
    monkeypatch.setenv(SETTINGS_ENV, env[SETTINGS_ENV])
    child = _settings(args)
    assert child.data_dir == tmp_path / "rel-data"  # absolute: the child's working directory does not matter
    assert (child.batch_size, child.max_attempts, child.model_name, child.database) == (4, 5, "m", password_url)
    assert json.loads(env[SETTINGS_ENV])["batch_size"] == 4
    assert SETTINGS_ENV not in os.environ  # taken out, so the forked pool processes do not carry it


def test_worker_refuses_an_out_of_date_schema(tmp_path, capsys):
    assert main(["worker", "--data-dir", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert "covid-cxr db upgrade" in error and "schema_out_of_date" in error


def test_bad_queue_and_concurrency_options_are_usage_errors(tmp_path, capsys):
    assert main(["worker", "--concurrency", "0", "--data-dir", str(tmp_path)]) == EXIT_USAGE
    assert main(["worker", "--queues", " , ", "--data-dir", str(tmp_path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--concurrency must be at least 1 [usage]" in err and "--queues names no queue [usage]" in err
