"""``covid-cxr web``: the dashboard's pages in a real browser (headless Chromium), on SQLite and PostgreSQL, escaped.

Set ``COVID_CXR_DOCS_SCREENSHOTS=docs/img`` to keep the browser's screenshots for the docs.
"""

from __future__ import annotations

import base64
import html
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import markupsafe
import pytest
from conftest import REPO_ROOT, _unavailable
from service_fixtures import embedded_settings
from web_fixtures import (
    ACTIVATED_BY,
    HOSTILE_BODY_PART,
    HOSTILE_NAME,
    VERSIONS,
    Installation,
    RunningWeb,
    build_installation,
    fetch,
    scrape,
)

#: Dashboard pages, as their screenshots are named in docs/img.
PAGES = {"overview": "/", "rejects": "/rejects", "results": "/results", "evaluation": "/evaluation",
         "models": "/models"}
SCREENSHOTS_ENV = "COVID_CXR_DOCS_SCREENSHOTS"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium (scripts/setup.sh installs it)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        _unavailable("chromium (apt-get install chromium)")
    return str(path)


def browse(chromium: str, url: str, screenshot: Path) -> str:
    """The page's DOM after it loaded in headless Chromium, and its screenshot (1280 px wide)."""
    result = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--dump-dom",
         f"--screenshot={screenshot}", "--window-size=1280,1000", url],
        capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    assert screenshot.read_bytes().startswith(PNG_SIGNATURE)
    return result.stdout


def shown_as_text(value: str, page: str) -> bool:
    """``value`` is on the page as text: escaped as the server sent it (Jinja), or as a browser serializes it."""
    return str(markupsafe.escape(value)) in page or html.escape(value, quote=False) in page


def check_pages(get: Callable[[str], str], installation: Installation) -> None:
    """What each page must show, and what none may: an unescaped hostile value, a pseudonym, a script."""
    pages = {name: get(path) for name, path in PAGES.items()}
    for name, page in pages.items():
        assert "<script" not in page.lower(), f"{name}: a script element made it into the page"
        assert not re.search(r"<[a-z]+[^>]*\son[a-z]+=", page), f"{name}: an event handler made it into the page"
        for pseudonym in installation.pseudonyms:
            assert pseudonym not in page, f"{name} shows a patient pseudonym"

    overview = pages["overview"]
    assert re.search(r"<td>predicted</td>\s*<td class=\"num\">4</td>", overview)
    assert re.search(r"<td>rejected</td>\s*<td class=\"num\">4</td>", overview)
    assert "<svg" in overview and "Files recorded" in overview and "Predictions written" in overview
    assert VERSIONS[1] in overview and re.search(r"[KMGT]iB free", overview)
    assert 'id="overdue">0<' in overview and 'id="stuck-count">0<' in overview
    assert "sop_instance_conflict" in overview  # the last rejection

    rejects = pages["rejects"]
    assert shown_as_text(HOSTILE_NAME, rejects), "the hostile file name"
    assert shown_as_text(f"BodyPartExamined is {HOSTILE_BODY_PART}, not the chest", rejects), "the hostile header"
    for reason in ("wrong_modality", "wrong_body_part", "not_dicom", "sop_instance_conflict"):
        assert reason in rejects
    assert "the version it conflicts with" in rejects and '<img class="view" src="/images/' in rejects

    results = pages["results"]
    for uid in installation.study_uids:
        if uid in results:
            break
    else:
        raise AssertionError("no study of the installation is listed on the results page")
    assert results.count('<img class="thumb"') == len(installation.accepted)
    assert sorted(int(i) for i in re.findall(r'href="/images/(\d+)/explain\.png"', results)) == installation.accepted

    evaluation = pages["evaluation"]
    assert "Window all" in evaluation and VERSIONS[1] in evaluation
    assert re.search(r'src="/evaluation/\d+/roc_curve\.png"', evaluation)
    assert "full report" in evaluation

    models = pages["models"]
    assert f"{ACTIVATED_BY} (by " in models
    assert all(version in models for version in VERSIONS)


def check_binary_endpoints(url: str, installation: Installation, pages: str) -> None:
    """Every picture a page shows is served, as a PNG; a report's page too."""
    sources = set(re.findall(r'<img[^>]+src="(/[^"]+\.png)"', pages))
    assert sources
    for source in sources:
        status, headers, body = fetch(url.rstrip("/") + source)
        assert status == 200 and headers["content-type"] == "image/png" and body.startswith(PNG_SIGNATURE), source
    status, _, _ = fetch(url + f"images/{installation.rejected['not-dicom']}.png")
    assert status == 404, "a file rejected before normalization has no model view"
    # The registered versions here are stand-ins whose bytes are no model: a heatmap link says so, with the reason.
    status, headers, body = fetch(url + f"images/{installation.accepted[0]}/explain.png")
    assert status == 409 and headers["content-type"].startswith("text/plain"), body[:500]
    assert f"model covid-cxr {VERSIONS[1]}, which scored this image, cannot be loaded".encode() in body
    assert body.endswith(b"[sha256_mismatch]\n")
    report = re.search(r'href="(/evaluation/\d+/report\.html)"', pages)
    assert report is not None
    status, headers, body = fetch(url.rstrip("/") + report.group(1))
    assert status == 200 and headers["content-type"].startswith("text/html") and b"<img" in body


@pytest.mark.slow
def test_the_dashboard_in_a_real_browser(tmp_path: Path, dicom_dir: Path, chromium: str) -> None:
    installation = build_installation(embedded_settings(tmp_path / "data"), dicom_dir, tmp_path)
    keep = os.environ.get(SCREENSHOTS_ENV)
    with RunningWeb(installation.settings, tmp_path / "web.log") as web:
        shots = tmp_path / "shots"
        shots.mkdir()
        seen: dict[str, str] = {}

        def get(path: str) -> str:
            name = next(key for key, value in PAGES.items() if value == path)
            seen[name] = browse(chromium, web.url.rstrip("/") + path, shots / f"dashboard-{name}.png")
            return seen[name]

        check_pages(get, installation)
        check_binary_endpoints(web.url, installation, seen["rejects"] + seen["results"] + seen["evaluation"])
        status, headers, _ = fetch(web.url)
        assert "script-src" not in headers["content-security-policy"]  # default-src 'none': no script at all
        assert headers["x-content-type-options"] == "nosniff" and headers["cache-control"] == "no-store"
        assert web.stop() == 0
    if keep:
        target = REPO_ROOT / keep
        target.mkdir(parents=True, exist_ok=True)
        for shot in shots.glob("*.png"):
            shutil.copyfile(shot, target / shot.name)


@pytest.mark.postgres
def test_the_dashboard_on_postgresql(tmp_path: Path, dicom_dir: Path, postgres_url: str) -> None:
    settings = embedded_settings(tmp_path / "data", database_url=postgres_url)
    installation = build_installation(settings, dicom_dir, tmp_path)
    with RunningWeb(settings, tmp_path / "web.log") as web:
        pages: dict[str, str] = {}

        def get(path: str) -> str:
            status, _, body = fetch(web.url.rstrip("/") + path)
            assert status == 200, (path, body[:2000])
            pages[path] = body.decode()
            return pages[path]

        check_pages(get, installation)
        check_binary_endpoints(web.url, installation, "".join(pages.values()))
        status, _, body = fetch(web.url + "readyz")
        assert status == 200 and b'"database":"ok"' in body
        assert web.stop() == 0


def test_the_metrics_of_web_describe_the_installation(tmp_path: Path, dicom_dir: Path) -> None:
    installation = build_installation(embedded_settings(tmp_path / "data"), dicom_dir, tmp_path)
    with RunningWeb(installation.settings, tmp_path / "web.log") as web:
        samples = scrape(web.url)
        assert samples[("covid_cxr_files", (("reason", "none"), ("state", "predicted")))] == 4
        for reason in ("wrong_modality", "wrong_body_part", "not_dicom", "sop_instance_conflict"):
            assert samples[("covid_cxr_files", (("reason", reason), ("state", "rejected")))] == 1
        assert samples[("covid_cxr_queue_depth_messages", (("queue", "gpu"),))] == 1  # the batch nobody took
        assert samples[("covid_cxr_stuck_files", ())] == 0 and samples[("covid_cxr_overdue_files", ())] == 0
        assert samples[("covid_cxr_database_up", ())] == 1 and samples[("covid_cxr_broker_up", ())] == 1
        assert samples[("covid_cxr_active_model_info", (("model_name", "covid-cxr"), ("model_version", VERSIONS[1])))]
        ages = [value for (name, labels), value in samples.items() if name == "covid_cxr_evaluation_report_age_seconds"
                and ("window", "all") in labels]
        assert ages and all(0 <= age < 600 for age in ages)
        free = [value for (name, _), value in samples.items() if name == "covid_cxr_disk_free_bytes"]
        assert free and free[0] > 0
        status, _, body = fetch(web.url + "healthz")
        assert (status, body) == (200, b"ok\n")
        assert web.stop() == 0


def test_a_token_guards_every_request(tmp_path: Path) -> None:
    from db.migrate import upgrade

    settings = embedded_settings(tmp_path / "data")
    upgrade(settings)
    token = "s3cret-token-for-the-test"
    with RunningWeb(settings, tmp_path / "web.log", env={"COVID_CXR_WEB_TOKEN": token}) as web:
        for path in ("", "healthz", "metrics", "models"):
            status, headers, _ = fetch(web.url + path)
            assert status == 401 and headers["www-authenticate"].startswith("Basic"), path
        assert fetch(web.url, {"Authorization": "Bearer wrong-token-of-the-same-len"})[0] == 401
        assert fetch(web.url, {"Authorization": f"Bearer {token}"})[0] == 200
        basic = base64.b64encode(f"operator:{token}".encode()).decode()
        assert fetch(web.url + "models", {"Authorization": f"Basic {basic}"})[0] == 200
        assert web.stop() == 0


def test_listening_beyond_loopback_needs_a_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from db.migrate import upgrade
    from service.cli import main

    upgrade(embedded_settings(tmp_path))
    assert main(["web", "--data-dir", str(tmp_path), "--host", "0.0.0.0", "--port", "0"]) == 1
    error = capsys.readouterr().err
    assert "refusing to listen on 0.0.0.0 without a token" in error and "[bad_configuration]" in error


def test_a_short_token_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from service.cli import main

    monkeypatch.setenv("COVID_CXR_WEB_TOKEN", "short")
    assert main(["web", "--data-dir", str(tmp_path)]) == 1
    assert "COVID_CXR_WEB_TOKEN: Value error, must be at least 16 characters" in capsys.readouterr().err
