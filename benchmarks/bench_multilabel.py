"""Benchmark: the cost of per-label yes/no scoring of multi-label queries (core/tasks.py), against scoring one closed
question per context, on the same contexts in the same run with the tiny reader (generic and fast path).

For L labels a context costs L requests ("Is <label> present?" over yes/no) instead of one. They are marked
`share_prefix` (as core/stages.py marks them): the prompt up to the question (context image and text, query image) is
encoded once per context and each label's question continues from its KV cache (`shared`), against one full pass per
label (`unshared`, ReaderSettings.share_prefix=false; the fast path then still encodes each image once). Output keys
per path: contexts, labels, requests_per_context, closed_s, per_label_s (shared), unshared_s, ratio (per_label_s /
closed_s: the cost of a multi-label context in closed questions), unshared_ratio, max_abs_diff (largest |Δ log p|
between shared and unshared scores), per_label_contexts_per_second.
Usage: python benchmarks/bench_multilabel.py [--labels 3 14] [--contexts 64] [--repeats 5] [--json PATH]
Timings are the best of --repeats interleaved runs (closed, shared, unshared, closed, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build(tmp: Path, n_labels: int, n: int):
    import numpy as np
    from PIL import Image

    from dxrag.core.base.dataset import DatasetMeta, DatasetWriter, load_dataset
    from dxrag.core.base.records import CorpusItem, Query

    labels = [f"finding{k}" for k in range(n_labels)]
    rng = np.random.default_rng(0)
    with DatasetWriter(tmp / f"ml{n_labels}") as w:
        for i in range(n):
            rel = w.add_image(f"c{i}", Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
            w.corpus.append(CorpusItem(f"c{i}", rel, f"prior report {i} : {labels[i % n_labels]} seen ."))
            q = w.add_image(f"q{i}", Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
            w.queries["test"].append(Query(f"q{i}", q, "Which of these findings are present?", tuple(labels), "",
                                           label_set=(labels[i % n_labels],)))
        w.meta = DatasetMeta(name="bench", task="multilabel", labels=labels)
    return load_dataset(tmp / f"ml{n_labels}")


def measure(ds, fast: bool, n: int, repeats: int) -> dict:
    import numpy as np

    from dxrag.core.reader.model import Reader, ScoreRequest
    from dxrag.core.reader.settings import ReaderSettings
    from dxrag.core.tasks import Task

    reader = Reader.from_config(ReaderSettings(model="tiny", device="cpu", batch_size=64, fast_path=fast), ds)
    unshared = Reader(reader.model, reader.processor,
                      ReaderSettings(model="tiny", device="cpu", batch_size=64, fast_path=fast, share_prefix=False))
    prompts = Task.of(ds.meta)
    queries = ds.queries["test"][:n]
    closed = [ScoreRequest(dataclasses.replace(q, label=q.candidates[0], label_set=None), c)
              for q, c in zip(queries, ds.corpus)]
    per_label = [ScoreRequest(a, c, share_prefix=True) for q, c in zip(queries, ds.corpus)
                 for a in prompts.asked(q)]
    reader.score(closed[:8], ds.root, progress=False)  # warm-up
    timings, scores = {}, {}
    for _ in range(repeats):  # interleaved, so that a burst of load on the shared machine hits every variant
        for name, model, requests in (("closed", reader, closed), ("per_label", reader, per_label),
                                      ("unshared", unshared, per_label)):
            t = time.perf_counter()
            scores[name] = model.score(requests, ds.root, progress=False)
            timings[name] = min(timings.get(name, float("inf")), time.perf_counter() - t)
    L = len(ds.meta.labels)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(scores["per_label"], scores["unshared"]))
    return {"path": "fast" if fast else "generic", "contexts": n, "labels": L, "requests_per_context": L,
            "closed_s": round(timings["closed"], 3), "per_label_s": round(timings["per_label"], 3),
            "unshared_s": round(timings["unshared"], 3), "ratio": round(timings["per_label"] / timings["closed"], 2),
            "unshared_ratio": round(timings["unshared"] / timings["closed"], 2), "max_abs_diff": diff,
            "per_label_contexts_per_second": round(n / timings["per_label"], 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, nargs="+", default=[3, 14])
    parser.add_argument("--contexts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n_labels in args.labels:
            ds = build(Path(tmp), n_labels, args.contexts)
            for fast in (False, True):
                rows.append(measure(ds, fast, args.contexts, args.repeats))
                print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
