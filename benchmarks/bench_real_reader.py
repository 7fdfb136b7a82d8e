"""Per-context scoring throughput (prompts/s) of a real reader on BreastMNIST prompts, with the vision tower's
features computed once per image and without (the processor and the tower run on every prompt), per thread count and
dtype. The two paths' scores are compared too (they must agree to fp32 rounding). Readers (`--reader`):

- `effnet-smollm2` (the default, the recipe of configs/*-real.yaml): EfficientNet-Lite0 -> projector ->
  SmolLM2-135M-Instruct. With the cache (`fast_path`): "cold" computes each distinct image's features once per pass,
  "warm" finds them computed, as in a run (the run directory's vision-features.safetensors); "none" is the generic path.
- `qwen2vl-2b-tower`: the Qwen2-VL family path with the real Qwen2.5-0.5B language model and tokenizer
  (core/reader/qwen2vl.py) and a vision tower of Qwen2-VL-2B/7B's size (32 blocks, width 1280, 16 heads: 0.6 B
  parameters, random weights: no pretrained Qwen2-VL tower installs offline, and the cost depends on the shape only),
  images at 112x112 (64 patches, 16 tokens). "cold" is the fast path (each distinct image encoded once per pass),
  "none" the generic path.

The tower's share of a prompt's cost is what the cache can remove: small for EfficientNet-Lite0 before a 135 M LM,
large for a real VLM's vision transformer.

    python benchmarks/bench_real_reader.py --npz breastmnist.npz --threads 1 2
    python benchmarks/bench_real_reader.py --npz breastmnist.npz --reader qwen2vl-2b-tower --queries 4 --threads 1 \
        --dtypes float32 --repeats 1

Needs `make weights` (efficientnet-lite0 and smollm2-135m-instruct; qwen2.5-0.5b-instruct for the second reader).
Prints one JSON line per setting. Runs under the CPU kernel pin as `dxrag run` does (`DXRAG_CPU_KERNELS=native`
measures the unpinned kernels instead; bf16 then needs it, since the pin turns oneDNN off).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from dxrag.core import cpu_kernels

cpu_kernels.pin()  # before numpy and torch load, as in `dxrag run`

import numpy as np  # noqa: E402
import torch  # noqa: E402

cpu_kernels.configure_torch()


READERS = ("effnet-smollm2", "qwen2vl-2b-tower")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--npz", type=Path, required=True, help="breastmnist.npz")
    p.add_argument("--reader", choices=READERS, default="effnet-smollm2")
    p.add_argument("--work", type=Path, default=None, help="directory for the dataset and the built reader "
                                                            "(default: a temporary one)")
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--contexts", type=int, default=4, help="contexts per query (plus one closed-book prompt)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dtypes", nargs="+", default=["float32", "autocast-bfloat16"],
                   help="float32, bfloat16 (weights cast) or autocast-bfloat16 (fp32 weights, bf16 compute)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="timed passes per setting (best is reported)")
    args = p.parse_args()

    from dxrag.core.data.medmnist import convert_medmnist
    from dxrag.core.base.dataset import load_dataset
    from dxrag.core.reader.build import RECIPES, build_reader
    from dxrag.core.reader.model import Reader, ScoreRequest
    from dxrag.core.reader.settings import ReaderSettings

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-real-reader-"))
    data, built = work / "breastmnist", work / args.reader
    if not data.exists():
        convert_medmnist("breastmnist", data, npz=args.npz, overwrite=True)
    if not built.exists():
        if args.reader == "effnet-smollm2":
            build_reader(RECIPES["effnet-smollm2"], built)
        else:
            from dxrag.core import weights
            from dxrag.core.reader.qwen2vl import VisionTowerSettings, assemble

            assemble(weights.path("qwen2.5-0.5b-instruct"), built, VisionTowerSettings(
                depth=32, embed_dim=1280, heads=16, mlp_ratio=4, image_size=112), dtype="float32")
    ds = load_dataset(data)
    queries, corpus = ds.queries["test"][:args.queries], ds.corpus
    rng = np.random.default_rng(0)
    requests = [ScoreRequest(q, corpus[int(i)]) for q in queries
                for i in rng.choice(len(corpus), args.contexts, replace=False)]
    requests += [ScoreRequest(q, None) for q in queries]
    scores = {}
    for dtype in args.dtypes:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for cached in (True, False):
                mixed = dtype.startswith("autocast-")
                reader = Reader.from_config(ReaderSettings(
                    model=str(built), fast_path=cached, dtype="float32" if mixed else dtype,
                    autocast=dtype.removeprefix("autocast-") if mixed else None, batch_size=args.batch_size))
                # cold: every pass pays for its distinct images once; warm: the features were computed before
                # (what a run does: stages.vision_features caches every corpus and query image up front)
                cache = reader.tower_cache
                for mode in ("cold", "warm") if cached and cache is not None else ("cold",) if cached else ("none",):
                    best = float("inf")
                    for _ in range(args.repeats):
                        if mode == "cold" and cache is not None:
                            cache.features.clear()
                        t = time.perf_counter()
                        out = reader.score(requests, ds.root, progress=False)
                        best = min(best, time.perf_counter() - t)
                    scores[dtype, cached] = np.array(out)
                    print(json.dumps({"reader": args.reader, "dtype": dtype, "threads": threads, "feature_cache": mode,
                                      "prompts": len(requests), "distinct_images": len(queries) + len(
                                          {r.context.id for r in requests if r.context is not None}),
                                      "seconds": round(best, 2), "prompts_per_s": round(len(requests) / best, 2)}),
                          flush=True)
        print(json.dumps({"dtype": dtype, "max_abs_logp_diff_cached_vs_generic":
                          float(np.abs(scores[dtype, True] - scores[dtype, False]).max())}), flush=True)


if __name__ == "__main__":
    main()
