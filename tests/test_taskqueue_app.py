"""The shared Celery configuration (taskqueue.app), the worker's app, and the no-TensorFlow-before-fork rule."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from celery.schedules import crontab
from service_fixtures import (
    chest_images,
    embedded_settings,
    instance_states,
    record_instances,
    start_worker,
    wait_until,
)

from covid_cxr.settings import load_settings
from db.migrate import upgrade
from taskqueue.app import create_app
from taskqueue.names import EVALUATE_TASK, PREDICT_TASK
from taskqueue.producer import enqueue_batch
from worker.app import create_worker_app


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
    assert list(app.conf.include) == []  # a producer registers no tasks


def test_the_worker_app_registers_the_task_modules(tmp_path):
    app = create_worker_app(load_settings(data_dir=tmp_path))
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


def test_no_tensorflow_in_the_process_that_forks_the_pool():
    # Everything the parent worker process and the ingester import before forking.
    code = (
        "import sys, service.cli as c; c.build_parser();"
        "import worker.app, worker.tasks, taskqueue.producer, worker.results, worker.inference;"
        "bad = sorted(m for m in ('tensorflow', 'keras') if m in sys.modules);"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_importing_the_app_module_has_no_side_effects(tmp_path):
    code = ("import os, worker.app, taskqueue.producer; assert not os.path.exists('covid-cxr-data');"
            "app = worker.app.app; assert os.path.isdir('covid-cxr-data/broker/queue'), os.listdir('.');"
            "assert app.covid_cxr_settings.batch_size == 7")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "COVID_CXR_BATCH_SIZE": "7"})
    assert done.returncode == 0, done.stderr




@pytest.mark.slow
def test_a_deleted_broker_folder_is_recreated_and_messages_still_reach_the_worker(tmp_path, cxr_dir):
    settings = embedded_settings(tmp_path, max_attempts=1)
    upgrade(settings)  # no model: the batch ends 'failed', which shows that its message arrived
    ids = record_instances(settings, chest_images(cxr_dir, 1))
    with start_worker(settings, queues=[settings.inference_queue, settings.cpu_queue]) as worker:
        shutil.rmtree(settings.broker_dir)
        wait_until(lambda: (settings.broker_dir / "queue").is_dir(), timeout=10,
                   what="the worker to recreate the broker folder")
        shutil.rmtree(settings.broker_dir / "control")  # the producer, too, recreates what it needs
        assert enqueue_batch(settings, ids)
        wait_until(lambda: set(instance_states(settings, ids).values()) == {"failed"}, timeout=60,
                   what="the batch sent after the broker folder was deleted")
        assert worker.alive
    assert "recreating them" in worker.log_text()
    assert worker.process.returncode == 0


@pytest.mark.slow
def test_a_worker_whose_broker_folder_cannot_come_back_exits_non_zero(tmp_path):
    settings = embedded_settings(tmp_path)
    upgrade(settings)
    with start_worker(settings) as worker:
        shutil.rmtree(settings.broker_dir)
        settings.broker_dir.write_text("a file where the broker folder was\n")
        wait_until(lambda: not worker.alive, timeout=60, what="the worker to stop")
    assert worker.process.returncode not in (0, None)
    assert "cannot be recreated" in worker.log_text()
