"""The Celery app's configuration, the worker command line, and the no-TensorFlow-before-fork rule."""

from __future__ import annotations

import json
import subprocess
import sys

from celery.schedules import crontab

from covid_cxr.cli import build_parser, main
from covid_cxr.settings import load_settings
from worker.app import EVALUATE_TASK, PREDICT_TASK, create_app, worker_command


def test_app_is_json_only_with_late_acks_and_prefetch_one(tmp_path):
    app = create_app(load_settings(data_dir=tmp_path))
    conf = app.conf
    assert conf.accept_content == ["json"]
    assert conf.task_serializer == "json" and conf.result_serializer == "json"
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_ignore_result is True
    assert {queue.name for queue in conf.task_queues} == {"gpu", "cpu"}
    assert conf.task_routes[PREDICT_TASK] == {"queue": "gpu"}
    assert conf.task_routes[EVALUATE_TASK] == {"queue": "cpu"}
    assert list(app.conf.include) == ["worker.tasks", "worker.evaluation"]


def test_embedded_broker_folders_are_created_under_the_data_dir(tmp_path):
    settings = load_settings(data_dir=tmp_path)
    options = create_app(settings).conf.broker_transport_options
    for key in ("data_folder_in", "data_folder_out", "control_folder", "processed_folder"):
        assert options[key].startswith(str(tmp_path.resolve() / "broker"))
    assert (tmp_path / "broker" / "queue").is_dir() and (tmp_path / "broker" / "control").is_dir()


def test_redis_messages_of_a_lost_worker_come_back_after_requeue_after_seconds(tmp_path):
    settings = load_settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/15", requeue_after_seconds=12)
    options = create_app(settings).conf.broker_transport_options
    assert options["visibility_timeout"] == 12
    assert options["unacked_restore_interval"] <= 3
    assert not (tmp_path / "broker").exists()


def test_nightly_evaluation_follows_the_configured_cron(tmp_path):
    settings = load_settings(data_dir=tmp_path, evaluation_cron="30 3 * * 1", cpu_queue="cpu-jobs")
    entry = create_app(settings).conf.beat_schedule["nightly-evaluation"]
    assert entry["task"] == EVALUATE_TASK
    assert entry["kwargs"] == {"window": "24h"}
    assert entry["options"] == {"queue": "cpu-jobs"}
    assert entry["schedule"] == crontab(minute="30", hour="3", day_of_month="*", month_of_year="*", day_of_week="1")


def test_worker_command_carries_the_settings_but_no_secret(tmp_path, monkeypatch):
    from worker.cli import _settings

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


def test_no_tensorflow_in_the_process_that_forks_the_pool():
    # Everything the parent worker process and the ingester import before forking.
    code = (
        "import sys, covid_cxr.cli as c; c.build_parser();"
        "import worker.app, worker.tasks, worker.dispatch, worker.results, worker.inference;"
        "bad = sorted(m for m in ('tensorflow', 'keras') if m in sys.modules);"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_importing_the_app_module_has_no_side_effects(tmp_path):
    code = ("import os, worker.app, worker.dispatch; assert not os.path.exists('covid-cxr-data');"
            "app = worker.app.app; assert os.path.isdir('covid-cxr-data/broker/queue'), os.listdir('.');"
            "assert app.covid_cxr_settings.batch_size == 7")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "COVID_CXR_BATCH_SIZE": "7"})
    assert done.returncode == 0, done.stderr


def test_worker_refuses_an_out_of_date_schema(tmp_path, capsys):
    assert main(["worker", "--data-dir", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert "covid-cxr db upgrade" in error and "schema_out_of_date" in error
