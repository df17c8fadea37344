"""The inbox folder renamed away and back (or replaced): noticed within a second, the watcher re-armed on it."""

from __future__ import annotations

import os
import shutil

from service_fixtures import wait_until

from ingest.inbox_presence import InboxPresence
from ingest.watcher import InboxWatcher


def test_a_renamed_inbox_is_waited_for_never_recreated_and_watched_again_when_back(tmp_path, caplog):
    inbox = tmp_path / "inbox"
    watcher = InboxWatcher(inbox, settle_seconds=0.0)
    watcher.start()
    presence = InboxPresence(watcher, check_every=0.0)
    presence.start()
    try:
        assert presence.present() and presence.rearmed == 0
        os.rename(inbox, tmp_path / "away")
        assert not presence.present()
        assert not presence.present() and not inbox.exists(), "a folder moved back would land inside a new one"
        (tmp_path / "away" / "sent-while-away.dcm").write_bytes(b"x")
        os.rename(tmp_path / "away", inbox)
        assert presence.present() and presence.rearmed == 1
        assert watcher.waiting == 1, "the folder is scanned as soon as it is back"
        # Events arrive again: a file dropped now is known without a scan.
        (inbox / "after.dcm").write_bytes(b"y")
        wait_until(lambda: watcher.waiting == 2, timeout=5, what="the re-armed watcher to see a new file")
    finally:
        watcher.stop()
    messages = [record.getMessage() for record in caplog.records]
    assert any("is gone" in message for message in messages) and any("is back" in message for message in messages)
    # Ours never reach ERROR; watchdog may log one of its own when the stopped observer's thread races
    # the vanished folder ("queue_events() called when the thread is inactive"), which is harmless.
    ours = [record for record in caplog.records if not record.name.startswith("watchdog")]
    assert all(record.levelname in {"INFO", "WARNING", "DEBUG"} for record in ours)


def test_another_folder_in_its_place_is_watched_too(tmp_path):
    inbox = tmp_path / "inbox"
    watcher = InboxWatcher(inbox, settle_seconds=0.0)
    watcher.start()
    presence = InboxPresence(watcher, check_every=0.0)
    presence.start()
    try:
        replacement = tmp_path / "replacement"
        replacement.mkdir()
        (replacement / "one.dcm").write_bytes(b"x")
        shutil.rmtree(inbox)
        os.rename(replacement, inbox)  # between two looks: the folder changed, it never seemed gone
        assert presence.present() and presence.rearmed == 1 and watcher.waiting == 1
    finally:
        watcher.stop()
