"""Start-up of the long-running commands: database ready, layout sane, model active, signals handled.

The schema is checked here, once per process, before any loop starts; the packages' own functions
trust it from then on.
"""

from __future__ import annotations

import grp
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from kombu.utils.url import maybe_sanitize_url

from covid_cxr.errors import ConfigurationError, NoActiveModel
from covid_cxr.settings import Settings
from db.models import ModelVersion
from model_store.registry import get_active

log = logging.getLogger(__name__)


def require_active_model(settings: Settings) -> ModelVersion:
    """The active model record for ``settings.model_name``; :class:`NoActiveModel` says how to get one."""
    try:
        return get_active(settings, settings.model_name)
    except NoActiveModel as exc:
        raise NoActiveModel(
            f"{exc.message}. The service does not start without a model. For a first try, train a small one "
            f"on the sample images shipped in the repository (a few minutes on a laptop):\n"
            f"    covid-cxr train --data-dir {settings.data_dir} --csv samples/cxr/metadata.csv --epochs 5 --activate"
        ) from exc


#: Modes of the data dir and the embedded database: the service's own, or shared read-only with ``data_group``.
PRIVATE_DIR_MODE, GROUP_DIR_MODE = 0o700, 0o750
PRIVATE_FILE_MODE, GROUP_FILE_MODE = 0o600, 0o640


def secure_data_dir(settings: Settings) -> None:
    """Make the data dir (archived DICOMs, the database, reports: PHI) private to the service.

    With ``data_group`` set, that group may read the data dir and the embedded database (new files
    get umask 027); otherwise everything stays the service user's alone (umask 077, set by the CLI).
    A data dir owned by someone else is left as it is, with a warning.
    """
    data_dir = settings.data_dir.expanduser()
    data_dir.mkdir(parents=True, exist_ok=True)
    gid = _group_id(settings.data_group) if settings.data_group else None
    if gid is not None:
        os.umask(0o027)
    database = data_dir / "covid-cxr.sqlite3"
    targets = [(data_dir, PRIVATE_DIR_MODE if gid is None else GROUP_DIR_MODE)]
    if database.exists():
        targets.append((database, PRIVATE_FILE_MODE if gid is None else GROUP_FILE_MODE))
    for path, mode in targets:
        try:
            if gid is not None:
                os.chown(path, -1, gid)
            os.chmod(path, mode)
        except PermissionError as exc:
            log.warning("cannot make %s private (mode %o): %s", path, mode, exc)


def _group_id(group: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigurationError(f"COVID_CXR_DATA_GROUP: no group named {group!r} on this machine") from None


def check_layout(settings: Settings) -> None:
    """Refuse an inbox that would swallow the installation's own files."""
    inbox = settings.inbox.expanduser().resolve()
    data_dir = settings.data_dir.expanduser().resolve()
    if inbox == data_dir:
        raise ConfigurationError(f"the inbox {inbox} is the data dir itself; give the inbox a folder of its own")
    for name, folder in (("archive", settings.archive), ("quarantine", settings.quarantine)):
        folder = folder.expanduser().resolve()
        if inbox == folder or folder in inbox.parents:
            raise ConfigurationError(f"the inbox {inbox} lies in the {name} folder {folder}; files would loop")


def describe(settings: Settings) -> None:
    """Log where the database, broker, archive and quarantine are (credentials masked)."""
    log.info("database %s | broker %s | archive %s | quarantine %s",
             maybe_sanitize_url(settings.database), maybe_sanitize_url(settings.broker),
             settings.archive.resolve(), settings.quarantine.resolve())


class stop_on_signals:
    """While active, SIGINT and SIGTERM call ``stop`` instead of raising (a second one raises as usual)."""

    def __init__(self, stop: Callable[[], None]) -> None:
        self._stop = stop
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        log.info("%s received: stopping after the file at hand (again to stop at once)", signal.Signals(signum).name)
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._stop()

    def __exit__(self, *exc_info: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
