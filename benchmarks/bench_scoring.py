"""Benchmark: batched per-context scoring (`Reader.score`) against the reference code's naive way, on the same requests
in the same run, with the tiny reader of the embedded default and 5 candidate answers.

The naive way, mimicked from the reference implementation: one `generate` call per (query, context, candidate answer),
each call re-running the processor (tokenization, image preprocessing) and the whole prompt, with a batch of one.
Each call generates the candidate's tokens (greedy decoding forced onto the candidate with `prefix_allowed_tokens_fn`,
`max_new_tokens` = the candidate's length), keeps the raw logits of every step (`output_logits`), decodes the generated
text and checks that it parses back to the candidate. A candidate's naive score is its sequence log-probability (sum of
log-softmax of the raw logits at its tokens); the naive best answer is the candidate with the highest sequence score.
This is the most favourable reading of the reference's "one generate per candidate": it asks for the same quantity as
`score()` (no double softmax, all candidates scored), so `agree` should be exactly 1.0 and the comparison is about cost.

Output keys: agree (fraction of requests whose best answer agrees), speedup (naive seconds / score seconds),
max_abs_diff (largest difference between the two methods' normalised log-probabilities), timings and sizes.

With `--family F` (a model type of core/reader/families.py, or `all`) it instead compares, per family, the generic
scoring path (processor + model(**inputs)) with the cached-vision-features fast path on the same requests in the same
run, on a tiny random-weight reader of that family: generic_contexts_per_second, fast_contexts_per_second, ratio
(fast / generic), agree and max_abs_diff between the two; fast fields are null where the family has no fast path.
Usage: python benchmarks/bench_scoring.py [--requests 300] [--json PATH]
       python benchmarks/bench_scoring.py --family qwen2_vl [--requests 200] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LABELS = [f"grade {k}" for k in range(5)]
QUESTION = "What is the severity of diabetic retinopathy?"


def make_dataset(out: Path, n_corpus: int, n_queries: int, seed: int):
    """A small dataset of 32x32 noise images with a faint per-grade cue; corpus texts name their grade."""
    from PIL import Image

    from dxrag.core.base.dataset import DatasetMeta, DatasetWriter, load_dataset
    from dxrag.core.base.records import CorpusItem, Query

    rng = np.random.default_rng(seed)

    def image(k: int):
        pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        pixels[:6, :6] = 50 * k
        return Image.fromarray(pixels)

    with DatasetWriter(out) as w:
        for i in range(n_corpus):
            k = i % len(LABELS)
            w.corpus.append(CorpusItem(id=f"c{i:04d}", image=w.add_image(f"c{i:04d}", image(k)),
                                       text=f"fundus photograph showing {LABELS[k]} retinopathy .", label=LABELS[k]))
        for split, n in (("train", n_queries), ("test", n_queries)):
            for i in range(n):
                k = int(rng.integers(len(LABELS)))
                qid = f"{split}{i:04d}"
                w.queries[split].append(Query(id=qid, image=w.add_image(qid, image(k)), question=QUESTION,
                                              candidates=tuple(LABELS), label=LABELS[k]))
        w.meta = DatasetMeta(name="bench", task="classification", labels=list(LABELS))
    return load_dataset(out)


def naive_scores(reader, requests, root: Path) -> list[np.ndarray]:
    """One generate() per candidate answer, as the reference code does (see the module docstring)."""
    import torch

    from dxrag.core.base.dataset import open_image
    from dxrag.core.reader.prompts import prompt_images, render_prompt

    model, processor = reader.hf_model, reader.processor
    out = []
    with torch.inference_mode():
        for r in requests:
            images = [open_image(root / rel) for rel in prompt_images(r.query, r.context)]
            text = render_prompt(processor, r.query, r.context, r.answers)
            seq = []
            for answer in r.answers:
                target = reader.answer_ids(answer)
                enc = processor(text=[text], images=images, return_tensors="pt").to(reader.device)
                start = enc["input_ids"].shape[1]
                gen = model.generate(**enc, do_sample=False, max_new_tokens=len(target), min_new_tokens=len(target),
                                     prefix_allowed_tokens_fn=lambda b, ids: [target[len(ids) - start]],
                                     output_logits=True, return_dict_in_generate=True)
                produced = processor.batch_decode(gen.sequences[:, start:], skip_special_tokens=True)[0].strip()
                if produced != answer:
                    raise RuntimeError(f"naive generate produced {produced!r}, expected {answer!r}")
                seq.append(sum(float(torch.log_softmax(step[0].float(), dim=-1)[tok])
                               for step, tok in zip(gen.logits, target)))
            seq = np.array(seq)
            out.append(seq - np.logaddexp.reduce(seq))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="(query, context) requests to score")
    parser.add_argument("--train-steps", type=int, default=100, help="fine-tuning steps before scoring")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    parser.add_argument("--family", help="compare generic vs fast scoring for this model type (or 'all')")
    args = parser.parse_args(argv)
    if args.family:
        return family_bench(args)

    import torch

    from dxrag.core.training.finetune import finetune
    from dxrag.core.reader.model import Reader, ScoreRequest, TargetRequest
    from dxrag.core.reader.settings import FinetuneSettings, ReaderSettings

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ds = make_dataset(Path(tmp) / "data", n_corpus=100, n_queries=max(60, args.requests // 2), seed=0)
        reader = Reader.from_config(ReaderSettings(model="tiny", device="cpu", batch_size=64), dataset=ds)
        by_label = {k: [c for c in ds.corpus if c.label == k] for k in LABELS}
        train = [TargetRequest(q, by_label[q.label][i % 20]) for i, q in enumerate(ds.queries["train"])]
        finetune(reader, train, ds.root, FinetuneSettings(steps=args.train_steps, eval_every=0))

        rng = np.random.default_rng(1)
        queries = ds.queries["test"]
        requests = [ScoreRequest(queries[i % len(queries)], ds.corpus[int(rng.integers(len(ds.corpus)))])
                    for i in range(args.requests)]
        reader.score(requests[:64], ds.root)  # warm-up (first-call allocations), then start from a cold image cache
        reader._pixels.clear()
        t0 = time.perf_counter()
        fast = reader.score(requests, ds.root)
        t_fast = time.perf_counter() - t0
        t0 = time.perf_counter()
        slow = naive_scores(reader, requests, ds.root)
        t_slow = time.perf_counter() - t0

    agree = float(np.mean([int(np.argmax(a)) == int(np.argmax(b)) for a, b in zip(fast, slow)]))
    result = {
        "agree": agree,
        "speedup": t_slow / t_fast,
        "max_abs_diff": float(max(np.abs(a - b).max() for a, b in zip(fast, slow))),
        "requests": len(requests),
        "candidates": len(LABELS),
        "score_seconds": t_fast,
        "naive_seconds": t_slow,
        "score_contexts_per_second": len(requests) / t_fast,
        "naive_generate_calls": len(requests) * len(LABELS),
        "threads": args.threads,
    }
    _emit(result, args.json)
    return result


def _emit(result: dict, path: Path | None) -> None:
    print(json.dumps(result, indent=2))
    if path:
        from dxrag.core.base.fsutil import atomic_write_json

        atomic_write_json(path, result)


def _timed_score(reader, requests, root: Path):
    reader.score(requests[:16], root)  # warm-up (first-call allocations), then a cold pixel cache
    reader._pixels.clear()
    t0 = time.perf_counter()
    scores = reader.score(requests, root)
    return scores, time.perf_counter() - t0


def family_bench(args) -> dict:
    """Generic vs fast scoring per family on the same requests (see the module docstring)."""
    import torch

    from dxrag.core.reader.families import FAMILIES
    from dxrag.core.training.finetune import finetune
    from dxrag.core.reader.model import Reader, ScoreRequest, TargetRequest
    from dxrag.core.reader.settings import FinetuneSettings, ReaderSettings, TinyReaderSettings

    torch.set_num_threads(args.threads)
    families = sorted(FAMILIES) if args.family == "all" else [args.family]
    out: dict = {"requests": args.requests, "candidates": len(LABELS), "threads": args.threads, "families": {}}
    with tempfile.TemporaryDirectory() as tmp:
        ds = make_dataset(Path(tmp) / "data", n_corpus=100, n_queries=max(60, args.requests // 2), seed=0)
        rng = np.random.default_rng(1)
        queries = ds.queries["test"]
        requests = [ScoreRequest(queries[i % len(queries)], ds.corpus[int(rng.integers(len(ds.corpus)))])
                    for i in range(args.requests)]
        by_label = {k: [c for c in ds.corpus if c.label == k] for k in LABELS}
        train = [TargetRequest(q, by_label[q.label][i % 20]) for i, q in enumerate(ds.queries["train"])]
        for family in families:
            settings = ReaderSettings(model="tiny", device="cpu", batch_size=64,
                                      tiny=TinyReaderSettings(family=family))
            reader = Reader.from_config(settings, dataset=ds)
            if args.train_steps:
                finetune(reader, train, ds.root, FinetuneSettings(steps=args.train_steps, eval_every=0))
            generic = Reader(reader.model, reader.processor, ReaderSettings(**{**vars(settings), "fast_path": False}))
            g_scores, g_time = _timed_score(generic, requests, ds.root)
            row = {"fast_path": reader.fast, "generic_contexts_per_second": len(requests) / g_time,
                   "fast_contexts_per_second": None, "ratio": None, "agree": None, "max_abs_diff": None}
            if reader.fast:
                f_scores, f_time = _timed_score(reader, requests, ds.root)
                row.update(fast_contexts_per_second=len(requests) / f_time, ratio=g_time / f_time,
                           agree=float(np.mean([int(np.argmax(a)) == int(np.argmax(b))
                                                for a, b in zip(f_scores, g_scores)])),
                           max_abs_diff=float(max(np.abs(a - b).max() for a, b in zip(f_scores, g_scores))))
            out["families"][family] = row
            print(f"{family}: {json.dumps(row)}", file=sys.stderr)
    _emit(out, args.json)
    return out


if __name__ == "__main__":
    result = main()
    if "families" in result:
        sys.exit(0 if all(r["agree"] in (None, 1.0) for r in result["families"].values()) else 1)
    sys.exit(0 if result["agree"] == 1.0 and result["speedup"] >= result["candidates"] else 1)
