"""Readiness of a long-running command: its database, its broker and the active model, each checked on request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from covid_cxr.errors import CovidCxrError
from covid_cxr.settings import Settings

#: The checks :func:`readiness` knows.
CHECKS = ("database", "broker", "model")


@dataclass
class Readiness:
    """Each check's outcome (``ok`` or what is wrong); ``ready`` when every required one is ``ok``."""

    required: tuple[str, ...]
    checks: dict[str, str] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return all(self.checks.get(name) == "ok" for name in self.required)

    def to_dict(self) -> dict[str, Any]:
        return {"ready": self.ready, "required": list(self.required), "checks": self.checks}


def readiness(settings: Settings, required: tuple[str, ...] = CHECKS) -> Readiness:
    """Run every check; those not ``required`` are reported for information only (an ingester needs no model)."""
    result = Readiness(required)
    result.checks["database"] = _database(settings)
    result.checks["broker"] = _broker(settings)
    result.checks["model"] = _model(settings) if result.checks["database"] == "ok" else "unknown: no database"
    return result


def _database(settings: Settings) -> str:
    from db.migrate import current_revision, head_revision
    from db.session import create_engine_for

    try:
        current = current_revision(create_engine_for(settings))
    except Exception as exc:  # any driver error means "not reachable", which is what the check reports
        return f"unreachable: {type(exc).__name__}: {exc}"
    if current != head_revision():
        return f"schema at revision {current}, this code needs {head_revision()}: run covid-cxr db upgrade"
    return "ok"


def _broker(settings: Settings) -> str:
    from worker.results import queue_depths

    _, error = queue_depths(settings)
    return error or "ok"


def _model(settings: Settings) -> str:
    from model_store.registry import get_active

    try:
        get_active(settings, settings.model_name)
    except CovidCxrError as exc:
        return f"{exc.message} [{exc.reason}]"
    except Exception as exc:
        return f"unreachable: {type(exc).__name__}: {exc}"
    return "ok"
