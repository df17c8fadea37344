#!/usr/bin/env bash
# Create .venv (once) and install covid-cxr with its test extras into it. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"

# DICOM command-line tools the network tests drive (DCMTK: echoscu, storescu, storescp, dsrdump;
# dicom3tools: dciodvfy). Installed only when missing and apt-get can run as root; never fails the
# script: without them those tests skip locally with a message, and fail under CI=true.
if ! command -v storescu >/dev/null || ! command -v dciodvfy >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" -eq 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -qq dcmtk dicom3tools || { apt-get update -qq && apt-get install -y -qq dcmtk dicom3tools; }; } \
      >/dev/null 2>&1 || echo "setup: could not install dcmtk and dicom3tools; the DICOM network tests will skip" >&2
  else
    echo "setup: dcmtk and dicom3tools are missing (apt-get install dcmtk dicom3tools); the DICOM network tests will skip" >&2
  fi
fi
# Headless Chromium for the dashboard's browser tests (tests/test_web_dashboard.py). Best effort:
# without apt or root the tests say that Chromium is missing (and fail under CI=true).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
    || echo "setup.sh: could not install chromium; the dashboard's browser tests will say so" >&2
fi
