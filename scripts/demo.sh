#!/usr/bin/env bash
# The README's first command: from a fresh clone to predictions in a database, on the embedded
# default (SQLite + a folder broker: nothing else to install or start).
#
#   1. set up .venv (scripts/setup.sh)
#   2. train a small VGG16 on the sample images in samples/cxr and make it the active model
#   3. start `covid-cxr serve` (watcher + worker + scheduler) on a fresh data dir
#   4. drop the sample DICOM files of samples/dicom into its inbox
#   5. wait until every file is predicted or rejected, print `covid-cxr results` and `status`, stop
#
# COVID_CXR_DEMO_DIR=DIR keeps everything in DIR (default: a new temporary folder, kept at the end
# so you can look at it); DEMO_EPOCHS sets the training epochs (default 5).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
CLI=(.venv/bin/covid-cxr)
PY=.venv/bin/python
DEMO_DIR="${COVID_CXR_DEMO_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/covid-cxr-demo-XXXXXX")}"
INBOX="$DEMO_DIR/inbox"
EPOCHS="${DEMO_EPOCHS:-5}"
mkdir -p "$DEMO_DIR"
step() { printf '\n== %s\n' "$*"; }

step "1/5 database in $DEMO_DIR"
"${CLI[@]}" db upgrade --data-dir "$DEMO_DIR"

step "2/5 training a small model on samples/cxr ($EPOCHS epochs; a few minutes on 2 cores)"
echo "   (21 images: enough to run the pipeline, far too few for a useful classifier; see samples/LICENSES.md)"
echo "   (so its report may flag it DEGENERATE; the demo activates it anyway with --force, which is recorded:"
echo "    never do that with a model meant to be used)"
"${CLI[@]}" train --data-dir "$DEMO_DIR" --csv samples/cxr/metadata.csv --epochs "$EPOCHS" --activate --force \
  --out "$DEMO_DIR/runs/demo-model" --no-progress

step "3/5 covid-cxr serve (log: $DEMO_DIR/serve.log)"
"${CLI[@]}" serve --data-dir "$DEMO_DIR" --inbox "$INBOX" --settle-seconds 1 >"$DEMO_DIR/serve.log" 2>&1 &
SERVE_PID=$!
stop_serve() {
  if kill -0 "$SERVE_PID" 2>/dev/null; then
    kill -INT "$SERVE_PID" 2>/dev/null || true
    wait "$SERVE_PID" 2>/dev/null || true
  fi
}
trap stop_serve EXIT

step "4/5 dropping samples/dicom/*.dcm into $INBOX"
mkdir -p "$INBOX"
count=0
for file in samples/dicom/*.dcm; do
  # Copy under a temporary name, then rename: the watcher takes a renamed file at once.
  cp "$file" "$INBOX/$(basename "$file").part"
  mv "$INBOX/$(basename "$file").part" "$INBOX/$(basename "$file")"
  echo "   $(basename "$file")"
  count=$((count + 1))
done

step "5/5 waiting until all $count files are predicted or rejected"
"$PY" - "$DEMO_DIR" "$count" "$SERVE_PID" <<'PYTHON'
import json, os, subprocess, sys, time

data_dir, expected, serve_pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + 600
last = None
while True:
    try:
        os.kill(serve_pid, 0)
    except ProcessLookupError:
        sys.exit(f"covid-cxr serve stopped; see {data_dir}/serve.log")
    out = subprocess.run([".venv/bin/covid-cxr", "status", "--json", "--data-dir", data_dir],
                         capture_output=True, text=True)
    if out.returncode == 0:
        counts = json.loads(out.stdout)["instances"]
        line = " · ".join(f"{k} {v}" for k, v in counts.items() if k != "total")
        if line != last:
            print(f"   {line}", flush=True)
            last = line
        if counts["total"] >= expected and counts.get("received", 0) + counts.get("queued", 0) == 0:
            break
    if time.monotonic() > deadline:
        sys.exit(f"timed out; see {data_dir}/serve.log")
    time.sleep(2)
PYTHON

printf '\n== covid-cxr results --data-dir %s\n' "$DEMO_DIR"
"${CLI[@]}" results --data-dir "$DEMO_DIR"
printf '\n== covid-cxr status --data-dir %s\n' "$DEMO_DIR"
"${CLI[@]}" status --data-dir "$DEMO_DIR"

stop_serve
trap - EXIT
cat <<EOF

Done. Everything is in $DEMO_DIR:
  covid-cxr.sqlite3   the database (try: sqlite3 $DEMO_DIR/covid-cxr.sqlite3 'select * from predictions')
  archive/            accepted files        quarantine/  rejected files, each with <name>.reason.json
  serve.log           what the service printed
Run it yourself:  .venv/bin/covid-cxr serve --data-dir $DEMO_DIR   and drop DICOM files into $INBOX
EOF
