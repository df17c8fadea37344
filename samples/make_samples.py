"""Rebuild ``samples/`` from ``../shared/data``: small redistributable images for the demo (run once, by hand).

Training images: every covid image licensed CC BY-NC-SA (the only covid licence here that allows
redistributing a modified copy) and the first 12 intact Kermany normals (CC BY 4.0), each turned
to 8-bit grayscale and downscaled to 256 px on the longest side (OpenCV INTER_AREA, JPEG quality 90).
DICOM files: byte-exact copies of permissively licensed test files (MIT / Apache-2.0).
"""

from __future__ import annotations

import csv
import hashlib
import shutil
import sys
from pathlib import Path

import cv2

HERE = Path(__file__).resolve().parent
SHARED = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parent.parent / "shared" / "data"
LONGEST_SIDE = 256
NORMALS = 12

#: file in shared/data/dicom -> (name in samples/dicom, licence, note)
DICOM_FILES = {
    "torchxrayvision__siim-acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm":
        ("chest-cr-siim-acr.dcm", "Apache-2.0", "chest CR, JPEG baseline, MONOCHROME2, no window tags: accepted"),
    "pydicom-data__RG1_J2KI.dcm":
        ("chest-cr-nema-wg04-j2k.dcm", "MIT", "chest CR, JPEG 2000, MONOCHROME1: accepted"),
    "pylibjpeg-data__RG2_JPLY_fixed.dcm":
        ("hip-cr-nema-wg04.dcm", "MIT", "hip CR, 12-bit JPEG extended: rejected (wrong_body_part)"),
    "dcmfx-pydicom__MR_small_RLE.dcm":
        ("mr-small-rle.dcm", "MIT (pydicom's test file MR_small_RLE.dcm, unmodified; the dcmfx repository it was "
                             "taken from is AGPL-3.0)", "64x64 MR, RLE: rejected (wrong_modality)"),
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    rows = list(csv.DictReader((SHARED / "cxr" / "metadata.csv").open()))
    covid = [r for r in rows if r["label"] == "covid" and r["license"].startswith("CC BY-NC-SA")]
    normal = [r for r in rows if r["label"] == "normal" and r["license"].startswith("CC BY 4.0")
              and r["integrity"].startswith(("derived", "exact_original"))][:NORMALS]
    out_rows = []
    for row in covid + normal:
        source = SHARED / "cxr" / row["file"]
        image = cv2.imread(str(source), cv2.IMREAD_GRAYSCALE)
        scale = LONGEST_SIDE / max(image.shape)
        if scale < 1:
            image = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)),
                               interpolation=cv2.INTER_AREA)
        target = HERE / "cxr" / row["label"] / (Path(row["file"]).stem.split("__")[-1] + ".jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        out_rows.append({
            "file": target.relative_to(HERE / "cxr").as_posix(),
            "label": row["label"],
            "patient_id": f"{row['origin_dataset'].split()[0].split('/')[0]}:{row['patient_id']}",
            "license": row["license"],
            "source_repo": row["source_repo"],
            "source_commit": row["source_commit"],
            "source_path": row["source_path"],
            "shared_data_file": row["file"],
            "width": image.shape[1],
            "height": image.shape[0],
            "sha256": _sha256(target),
        })
    with (HERE / "cxr" / "metadata.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(out_rows[0]))
        writer.writeheader()
        writer.writerows(out_rows)

    manifest = {r["file"]: r for r in csv.DictReader((SHARED / "dicom" / "manifest.csv").open())}
    dicom_rows = []
    for name, (target_name, licence, note) in DICOM_FILES.items():
        target = HERE / "dicom" / target_name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SHARED / "dicom" / name, target)
        source = manifest[name]
        dicom_rows.append({"file": target_name, "license": licence, "note": note,
                           "source_repo": source["source_repo"], "source_commit": source["source_commit"],
                           "source_path": source["source_path"], "sha256": _sha256(target)})
    with (HERE / "dicom" / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dicom_rows[0]))
        writer.writeheader()
        writer.writerows(dicom_rows)
    print(f"{len(covid)} covid + {len(normal)} normal images, {len(dicom_rows)} DICOM files written under {HERE}")


if __name__ == "__main__":
    main()
