"""Benchmark: the cost of per-label yes/no scoring of multi-label queries (core/tasks.py), against scoring one closed
question per context, on the same contexts in the same run with the tiny reader (generic and fast path).

For L labels a context costs L requests ("Is <label> present?" over yes/no) instead of one. They are marked
`share_prefix` (as core/stages.py marks them): the prompt up to the question (context image and text, query image) is
encoded once per context and each label's question continues from its KV cache (`shared`), against one full pass per
label (`unshared`, ReaderSettings.share_prefix=false; the fast path then still encodes each image once).

Timing on a shared, loaded machine: the variants run interleaved (closed, shared, unshared, closed, ...) for
--repeats rounds in one process, and each run is timed both by the process's CPU time (what the scoring itself costs;
robust to other jobs taking the cores) and by wall-clock time. A ratio is the median over rounds of that round's
shared (or unshared) time over its closed time, measured side by side; `*_min` figures are the fastest run.
Output keys per path: contexts, labels, requests_per_context; closed_s, per_label_s, unshared_s (CPU seconds, median
over rounds) and their *_min; ratio (shared / closed: the cost of a multi-label context in closed questions, CPU
time), ratio_wall, unshared_ratio (CPU); lm_positions: the language-model positions each variant feeds per context
(padding included; closed, shared, unshared), the part of the cost that sharing cannot remove; max_abs_diff (largest
|Δ log p| between shared and unshared scores); per_label_contexts_per_second (from the median CPU time); load (the
1-minute load average before the path ran).
Usage: python benchmarks/bench_multilabel.py [--labels 3 14] [--contexts 64] [--repeats 7] [--json PATH]
       [--model DIR --batch-size 16]   # a real reader instead of the tiny one (fp32)
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


def measure(ds, fast: bool, n: int, repeats: int, model_name: str = "tiny", batch_size: int = 64) -> dict:
    import statistics

    import numpy as np

    from dxrag.core.reader.model import Reader, ScoreRequest
    from dxrag.core.reader.settings import ReaderSettings
    from dxrag.core.tasks import Task

    settings = ReaderSettings(model=model_name, device="cpu", dtype="float32", batch_size=batch_size, fast_path=fast)
    reader = Reader.from_config(settings, ds)
    unshared = Reader(reader.model, reader.processor, dataclasses.replace(settings, share_prefix=False))
    prompts = Task.of(ds.meta)
    queries = ds.queries["test"][:n]
    closed = [ScoreRequest(dataclasses.replace(q, label=q.candidates[0], label_set=None), c)
              for q, c in zip(queries, ds.corpus)]
    per_label = [ScoreRequest(a, c, share_prefix=True) for q, c in zip(queries, ds.corpus)
                 for a in prompts.asked(q)]
    variants = (("closed", reader, closed), ("per_label", reader, per_label), ("unshared", unshared, per_label))
    positions = {}

    def count(module, args, kwargs):  # positions fed to the model per forward (rows x sequence, padding included)
        x = kwargs.get("input_ids")
        x = kwargs["inputs_embeds"] if x is None else x
        positions[current] = positions.get(current, 0) + x.shape[0] * x.shape[1]

    for current, model, requests in variants:  # warm-up, and the positions each variant feeds
        hook = model.hf_model.register_forward_pre_hook(count, with_kwargs=True)
        try:
            model.score(requests, ds.root, progress=False)
        finally:
            hook.remove()
    load = os.getloadavg()[0]
    cpu: dict[str, list[float]] = {}
    wall: dict[str, list[float]] = {}
    scores = {}
    for _ in range(repeats):  # interleaved, so that a burst of load on the shared machine hits every variant
        for name, model, requests in variants:
            c, t = time.process_time(), time.perf_counter()
            scores[name] = model.score(requests, ds.root, progress=False)
            cpu.setdefault(name, []).append(time.process_time() - c)
            wall.setdefault(name, []).append(time.perf_counter() - t)

    def ratio(times, name):  # per round, side by side with that round's closed run
        return round(statistics.median(a / b for a, b in zip(times[name], times["closed"])), 2)

    L = len(ds.meta.labels)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(scores["per_label"], scores["unshared"]))
    med = {k: statistics.median(v) for k, v in cpu.items()}
    return {"model": model_name, "path": "fast" if fast else "generic", "contexts": n, "labels": L, "requests_per_context": L,
            **{f"{k}_s": round(med[k], 4) for k in ("closed", "per_label", "unshared")},
            **{f"{k}_s_min": round(min(cpu[k]), 4) for k in ("closed", "per_label", "unshared")},
            "ratio": ratio(cpu, "per_label"), "ratio_wall": ratio(wall, "per_label"),
            "unshared_ratio": ratio(cpu, "unshared"),
            "lm_positions": [round(positions[k] / n) for k in ("closed", "per_label", "unshared")],
            "max_abs_diff": diff, "per_label_contexts_per_second": round(n / med["per_label"], 1),
            "load": round(load, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, nargs="+", default=[3, 14])
    parser.add_argument("--contexts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--model", default="tiny", help="reader.model: tiny (default), or a saved reader directory, e.g. "
                        "`dxrag reader build effnet-smollm2 --out DIR` (a real LM and its tokenizer)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n_labels in args.labels:
            ds = build(Path(tmp), n_labels, args.contexts)
            for fast in (False, True):
                rows.append(measure(ds, fast, args.contexts, args.repeats, args.model, args.batch_size))
                print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
