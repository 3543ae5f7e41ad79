#!/usr/bin/env python3
"""Independent reference for `reprise::metrics` (src/metrics/nc.rs).

Generates a fixed pseudo-random imbalanced case, writes it to `nc_case.json` next to this
script, and prints every neural-collapse metric computed the straightforward way: full
D x D matrices Sigma_W and Sigma_B, `numpy.linalg.pinv`, explicit Python loops.

The Rust test `metrics::nc::tests::matches_numpy_reference` reads the same JSON and compares
against the numbers printed here (copied into the test). Re-run with

    python3 tests/reference/nc_metrics_reference.py

The case: N = 60, D = 7, C = 5 classes with counts 30/15/10/5/0 (class 4 is empty, so it is
skipped and reported in `empty_classes`), classifier W (5 x 7) = class means plus noise,
predictions = argmax_c w_c . h_i, minority classes [1, 2, 3, 4].
"""
import json
import os

import numpy as np

SEED = 20240611
N_PER_CLASS = [30, 15, 10, 5, 0]
D = 7
MINORITY = [1, 2, 3, 4]


def make_case():
    rng = np.random.default_rng(SEED)
    c = len(N_PER_CLASS)
    centres = rng.normal(0.0, 2.0, size=(c, D)) + 0.7  # offset: global mean is not zero
    feats, labels = [], []
    for k, nk in enumerate(N_PER_CLASS):
        for _ in range(nk):
            feats.append(centres[k] + rng.normal(0.0, 1.0, size=D))
            labels.append(k)
    feats = np.array(feats)
    labels = np.array(labels)
    perm = rng.permutation(len(labels))
    feats, labels = feats[perm], labels[perm]
    w = centres + rng.normal(0.0, 0.8, size=(c, D))
    # Rust receives f32: round here so both sides compute on the same numbers.
    feats = feats.astype(np.float32).astype(np.float64)
    w = w.astype(np.float32).astype(np.float64)
    preds = np.argmax(feats @ w.T, axis=1)
    return feats, labels, preds, w, c


def cos(a, b):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(a @ b / (na * nb))


def metrics(h, y, pred, w, c, minority, centering):
    n, d = h.shape
    present = [k for k in range(c) if np.sum(y == k) > 0]
    cp = len(present)
    counts = {k: int(np.sum(y == k)) for k in present}
    mu = {k: h[y == k].mean(axis=0) for k in present}
    mu_g = h.mean(axis=0)
    mu_b = sum(mu[k] for k in present) / cp
    centre = mu_g if centering == "global" else mu_b

    sigma_w = np.zeros((d, d))
    for i in range(n):
        r = h[i] - mu[y[i]]
        sigma_w += np.outer(r, r)
    sigma_w /= n
    sigma_b = np.zeros((d, d))
    for k in present:
        m = mu[k] - centre
        sigma_b += np.outer(m, m)
    sigma_b /= cp
    # Same cut-off as the Rust code: eigenvalues of Sigma_B below 1e-10 * max are dropped.
    nc1 = float(np.trace(sigma_w @ np.linalg.pinv(sigma_b, rcond=1e-10, hermitian=True)) / cp)

    v = [mu[k] - centre for k in present]
    ws = [w[k] for k in present]

    def equinorm(vs):
        norms = np.array([np.linalg.norm(x) for x in vs])
        return float(norms.std() / norms.mean())  # population std

    def equiangular(vs):
        total, pairs = 0.0, 0
        for a in range(cp):
            for b in range(cp):
                if a != b:
                    total += abs(cos(vs[a], vs[b]) + 1.0 / (cp - 1))
                    pairs += 1
        return total / pairs

    wm = np.array(ws)
    mt = np.array(v)  # M^T, C' x D
    nc3 = float(np.sum((wm / np.linalg.norm(wm) - mt / np.linalg.norm(mt)) ** 2))

    mismatches = 0
    for i in range(n):
        dists = [np.sum((h[i] - mu[k]) ** 2) for k in present]
        ncc = present[int(np.argmin(dists))]
        if ncc != pred[i]:
            mismatches += 1
    nc4 = mismatches / n

    drift_abs = float(np.linalg.norm(mu_g - mu_b))
    drift_norm = drift_abs / float(np.mean([np.linalg.norm(mu[k] - mu_b) for k in present]))

    mins = sorted(set(k for k in minority if k in counts))
    if len(mins) >= 2:
        cs = [cos(w[a], w[b]) for ia, a in enumerate(mins) for b in mins[ia + 1:]]
        minority_cosine = float(np.mean(cs))
    else:
        minority_cosine = None

    return {
        "nc1": nc1,
        "nc2_equinorm_features": equinorm(v),
        "nc2_equinorm_classifier": equinorm(ws),
        "nc2_equiangular_features": equiangular(v),
        "nc2_equiangular_classifier": equiangular(ws),
        "nc3": nc3,
        "nc4": nc4,
        "drift_abs": drift_abs,
        "drift_norm": drift_norm,
        "minority_cosine": minority_cosine,
        "empty_classes": c - cp,
    }


def main():
    h, y, pred, w, c = make_case()
    n, d = h.shape
    case = {
        "n": n,
        "d": d,
        "num_classes": c,
        "features": [float(x) for x in h.ravel()],
        "labels": [int(x) for x in y],
        "predictions": [int(x) for x in pred],
        "classifier": [float(x) for x in w.ravel()],
        "minority": MINORITY,
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nc_case.json")
    with open(path, "w") as f:
        json.dump(case, f)
        f.write("\n")
    print(f"wrote {path}")
    for centering in ("global", "balanced"):
        print(f"[{centering}]")
        for key, value in metrics(h, y, pred, w, c, MINORITY, centering).items():
            print(f"  {key} = {value!r}")


if __name__ == "__main__":
    main()
