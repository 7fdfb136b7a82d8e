"""The `probe` baseline on a MedMNIST dataset, outside a run: the pipeline stage's own pieces (core/probe.py: frozen
EfficientNet-Lite0 features at 112², logistic regression fitted on train, C and class weighting chosen on val),
reported on the test split with macro-F1, the answers' class counts and the majority-class accuracy.

    python benchmarks/probe_baseline.py --flag breastmnist --npz breastmnist.npz
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flag", required=True, help="MedMNIST flag, e.g. breastmnist, pneumoniamnist")
    p.add_argument("--npz", type=Path, required=True, help="the flag's npz file")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch
    from sklearn.metrics import f1_score

    from dxrag.core.data.medmnist import convert_medmnist
    from dxrag.core.dataset import load_dataset
    from dxrag.core.probe import ProbeSettings, fit, image_features, load_encoder

    torch.set_num_threads(args.threads)
    settings = ProbeSettings()
    with tempfile.TemporaryDirectory() as tmp:
        ds = load_dataset(convert_medmnist(args.flag, Path(tmp) / args.flag, npz=args.npz))
        encoder = load_encoder(settings.weights)
        t = time.perf_counter()
        feats = {s: image_features(encoder, [ds.image_path(q.image) for q in ds.queries[s]], settings.image_size)
                 for s in ("train", "val", "test")}
        seconds = time.perf_counter() - t
    labels = {s: np.array([q.label for q in ds.queries[s]]) for s in feats}
    probe = fit(feats["train"], labels["train"], feats["val"], labels["val"], settings.c_grid, settings.balanced)
    pred = np.array(probe.classes)[probe.predict_proba(feats["test"]).argmax(1)]
    values, counts = np.unique(labels["train"], return_counts=True)
    majority = values[counts.argmax()]
    print(json.dumps({
        "flag": args.flag, "train": len(labels["train"]), "test": len(pred), "C": probe.c, "balanced": probe.balanced,
        "val_accuracy": round(probe.val_accuracy, 4), "test_accuracy": round(float(np.mean(pred == labels["test"])), 4),
        "test_macro_f1": round(float(f1_score(labels["test"], pred, average="macro")), 4),
        "answers": {c: int((pred == c).sum()) for c in probe.classes},
        "majority_class_accuracy": round(float(np.mean(labels["test"] == majority)), 4),
        "feature_seconds": round(seconds, 1), "images": sum(len(v) for v in labels.values())}))


if __name__ == "__main__":
    main()
