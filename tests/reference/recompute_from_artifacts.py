#!/usr/bin/env python3
"""Recompute a report's neural-collapse metrics from its raw safetensors artifacts.

For every analysis object listed in `<report>/frames/objects.csv`, this reads the tensors
`features`, `labels`, `predictions` and `classifier` straight from the cache (the safetensors
format is parsed by hand: an 8-byte little-endian header length, a JSON header, raw
little-endian data), computes every metric with the straightforward numpy reference in
`nc_metrics_reference.py`, and compares with the numbers `reprise` wrote to
`<report>/frames/results.csv`. Exit 1 on any disagreement beyond a relative 1e-6.

    python3 tests/reference/recompute_from_artifacts.py artifacts/neural-collapse artifacts/store
"""
import csv
import json
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nc_metrics_reference import metrics  # noqa: E402

DTYPES = {"F32": np.float32, "F64": np.float64, "U32": np.uint32, "I64": np.int64, "U8": np.uint8}
CHECKED = ["nc1", "nc2_equinorm_features", "nc2_equinorm_classifier", "nc2_equiangular_features",
           "nc2_equiangular_classifier", "nc3", "nc4", "drift_abs", "drift_norm", "minority_cosine"]


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        arr = np.frombuffer(body[start:end], dtype=DTYPES[info["dtype"]]).reshape(info["shape"])
        out[name] = arr
    return out


def main():
    report, store = sys.argv[1], sys.argv[2]
    with open(os.path.join(report, "frames", "results.csv")) as f:
        results = {(r["key"], r["epoch"]): r for r in csv.DictReader(f)}
    tail = {}
    with open(os.path.join(report, "frames", "per_class.csv")) as f:
        for r in csv.DictReader(f):
            if r["group"] == "tail":
                tail.setdefault((r["key"], r["epoch"]), set()).add(int(r["class"]))
    with open(os.path.join(report, "frames", "objects.csv")) as f:
        objects = list(csv.DictReader(f))
    checked, bad = 0, 0
    for o in objects:
        h = o["sha256"]
        t = read_safetensors(os.path.join(store, "objects", h[:2], h))
        feats = t["features"].astype(np.float64)
        labels = t["labels"].astype(np.int64)
        preds = t["predictions"].astype(np.int64)
        w = t["classifier"].astype(np.float64)
        minority = sorted(tail.get((o["key"], o["epoch"]), set()))
        ours = metrics(feats, labels, preds, w, w.shape[0], minority, "global")
        row = results[(o["key"], o["epoch"])]
        for m in CHECKED:
            want = row[m]
            got = ours[m]
            if want == "" and got is None:
                continue
            want = float(want)
            if got is None or abs(got - want) > 1e-6 * max(1.0, abs(want)):
                bad += 1
                print(f"MISMATCH {o['key'][:12]} epoch {o['epoch']} {m}: reprise {want} numpy {got}")
        checked += 1
    print(f"recomputed {checked} analysis objects, {bad} mismatches")
    sys.exit(1 if bad or checked == 0 else 0)


if __name__ == "__main__":
    main()
