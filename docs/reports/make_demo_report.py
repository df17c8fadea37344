"""The demo report of docs/model.md: a trained model's held-out test images, as DICOM, through `covid-cxr serve`.

Usage (from the repository root, after training into DEMO/model as docs/model.md, "A real report", shows)::

    .venv/bin/python docs/reports/make_demo_report.py DEMO

It writes DEMO/site (data dir, inbox, labels.csv, serve.log), imports the labels, runs
`covid-cxr evaluate --window 24h` and prints `covid-cxr report`.
"""

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from dicom_wrap import wrap_as_dicom  # noqa: E402

DEMO = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/demo").resolve()
SITE = DEMO / "site"
DATA = SITE / "data"
INBOX = SITE / "inbox"
STAGING = SITE / "staging"
SHARED = Path(os.environ.get("COVID_CXR_SHARED_DATA", REPO.parent / "shared" / "data"))
PY = sys.executable


def cli(*args: str, check: bool = True) -> str:
    result = subprocess.run([PY, "-m", "covid_cxr", *args, "--data-dir", str(DATA)], capture_output=True, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, cwd=REPO)
    if check and result.returncode != 0:
        raise SystemExit(f"covid-cxr {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout + result.stderr


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def write_training_csv() -> None:
    """covid and normal images of ../shared/data/cxr, without the unverified (damaged) copies; patients per origin."""
    DEMO.mkdir(parents=True, exist_ok=True)
    with open(DEMO / "train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient_id"])
        for row in read_csv(SHARED / "cxr" / "metadata.csv"):
            if row["label"] in ("covid", "normal") and not row["integrity"].startswith(("unverified", "visibly")):
                patient = f"{row['origin_dataset']}:{row['patient_id']}"
                writer.writerow([SHARED / "cxr" / row["file"], row["label"], patient])


def main() -> None:
    if SITE.exists():
        shutil.rmtree(SITE)
    STAGING.mkdir(parents=True)
    if not (DEMO / "model" / "metadata.json").exists():
        write_training_csv()
        raise SystemExit(f"wrote {DEMO / 'train.csv'}; now train, then run this again:\n"
                         f"  covid-cxr train --csv {DEMO / 'train.csv'} --epochs 6 --out {DEMO / 'model'} "
                         f"--data-dir {DEMO / 'train-data'}")
    meta = json.loads((DEMO / "model" / "metadata.json").read_text())
    test_patients = set(meta["data"]["split"]["test"]["patient_ids"])
    origin = {row["file"]: row for row in read_csv(SHARED / "cxr" / "metadata.csv")}
    rows = [r for r in read_csv(DEMO / "train.csv") if r["patient_id"] in test_patients]
    print(f"{len(rows)} held-out test images of {len(test_patients)} patients")

    labels = ["StudyInstanceUID,SOPInstanceUID,AccessionNumber,label,source,date"]
    source_of = {"ieee8023": "publication", "actualmed": "hospital", "kermany": "kermany-2018"}
    for index, row in enumerate(sorted(rows, key=lambda r: r["path"])):
        path = Path(row["path"])
        info = origin[str(path.relative_to(SHARED / "cxr"))]
        view = info["view"] if info["view"] in {"PA", "AP"} else "AP" if info["view"].startswith("AP") else "PA"
        patient = "P" + hashlib.sha256(row["patient_id"].encode()).hexdigest()[:12]
        wrapped = wrap_as_dicom(path, STAGING / f"{index:03d}.dcm", patient_id=patient, view_position=view)
        source = next((v for k, v in source_of.items() if k in info["origin_dataset"].lower()), "dataset")
        if row["label"] == "covid":
            key = (wrapped.study_instance_uid, "", "") if index % 4 else ("", wrapped.sop_instance_uid, "")
        else:
            key = ("", "", wrapped.accession_number)
        labels.append(",".join([*key, row["label"], source, "2020-03-16"]))
    # Lines an analyst gets wrong: an unknown study and a label the model does not know.
    labels.append("1.2.826.0.1.3680043.99.1,,,covid,publication,2020-03-16")
    labels.append(f",,{wrapped.accession_number},pneumonia,radiologist,2020-03-17")
    (SITE / "labels.csv").write_text("\n".join(labels) + "\n")

    # The real DICOM files too: chest radiographs (no labels) and non-chest ones (rejected), and a scanned film.
    for path in sorted((SHARED / "dicom").glob("*.dcm")):
        shutil.copyfile(path, STAGING / path.name)
    wrap_as_dicom(Path(rows[0]["path"]), STAGING / "scanned-film-secondary-capture.dcm", kind="SC")
    expected = len(list(STAGING.iterdir()))

    print(cli("db", "upgrade"))
    print(cli("models", "import", str(DEMO / "model"), "--activate"))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "COVID_CXR_BATCH_MAX_WAIT_SECONDS": "1",
           "COVID_CXR_RECONCILE_INTERVAL_SECONDS": "5"}
    with open(SITE / "serve.log", "wb") as log:
        serve = subprocess.Popen([PY, "-m", "covid_cxr", "serve", "--data-dir", str(DATA), "--inbox", str(INBOX),
                                  "--settle-seconds", "1"], stdout=log, stderr=subprocess.STDOUT, env=env,
                                 cwd=REPO, start_new_session=True)
        try:
            time.sleep(5)
            INBOX.mkdir(parents=True, exist_ok=True)
            for path in sorted(STAGING.iterdir()):
                shutil.copyfile(path, INBOX / path.name)
            started = time.monotonic()
            while True:
                status = json.loads(cli("status", "--json"))
                states = status["instances"]
                done = sum(v for k, v in states.items() if k in {"predicted", "rejected", "duplicate", "failed"})
                if done >= expected:
                    break
                if time.monotonic() - started > 900 or serve.poll() is not None:
                    raise SystemExit(f"not done: {status}")
                time.sleep(3)
            print(f"all {expected} files final after {time.monotonic() - started:.0f} s")
        finally:
            serve.send_signal(signal.SIGINT)
            serve.wait(120)
    print(cli("labels", "import", str(SITE / "labels.csv"), check=False))
    print(cli("evaluate", "--window", "24h"))
    print(cli("report"))


if __name__ == "__main__":
    main()
