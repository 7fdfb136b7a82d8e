"""Benchmark: the reader at real model shapes, with random weights (no downloads), in bfloat16 on one CUDA GPU.

Per model: per-context scoring prompts/s on the generic path and, where the family has one, the fast path (and their
ratio), the cost of a multi-label context (14 per-label questions sharing their prompt prefix, `share_prefix`) in
closed questions, LoRA fine-tune steps/s (`core.training.finetune.finetune` itself), and the peak GPU memory of each
phase, at the batch sizes of the run config named per model (reader.batch_size, reader.finetune.batch_size and its
gradient_checkpointing; LoRA r 8). Models:

- qwen2-vl-2b, qwen2-vl-7b: Qwen2-VL-2B/7B-Instruct's shapes (configs/qwen2vl-7b.yaml's batch sizes), images at the
  config's pixel budget (401 408 px: up to 512 visual tokens per image).
- pixtral-12b: Pixtral-12B's LLaVA shape (Mistral-NeMo 12B language model, Pixtral vision tower;
  configs/pixtral-12b.yaml: images at longest edge 512 px, 1 024 patches per image).
- small: the small real reader's shape, LLaVA over SmolLM2-135M's language model with an EfficientNet-Lite0-sized
  vision feature map (1 280-d, 4x4 = 16 tokens per image). Its vision tower is a one-layer SigLIP stand-in of that
  output size (random weights either way; an EfficientNet-Lite0 costs about as little); batch sizes of
  configs/embedded.yaml.

Prompts are the pipeline's (context image + text, query image, question with 5 options) over 640x640 noise images, so
every image takes the full token budget. The tokenizer is the offline word-level one of the tiny readers (token ids
are inside every real vocabulary; the text length in tokens is what matters for cost). A model that fails (out of
memory, ...) gets an `error` and the others still run; memory is freed between models, and the results are
rewritten after every model (`--out X.md` writes X.md and X.json).

`--smoke` runs the same code on CPU in float32 at toy shapes (hidden 64, 2 layers, 32 px images, batch 2) in seconds:
CI's check that the script works (tests/benchmarks/test_bench_gpu.py). Designed to take under 10 minutes on one H100.
Usage: python benchmarks/bench_gpu.py [--models qwen2-vl-2b ...] [--out docs/gpu-bench.md] [--smoke]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
GRADES = ["normal", "mild", "moderate", "severe", "proliferative"]  # RetinaMNIST's 5 answers, one token each
FINDINGS = [f"finding{k}" for k in range(14)]  # a ChestMNIST-sized label set for the multi-label row
QUESTION = "What is the severity of diabetic retinopathy ?"

# Real shapes from the models' published config.json files.
QWEN_VISION = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
                   temporal_patch_size=2)
SHAPES = {
    "qwen2-vl-2b": dict(kind="qwen2_vl", config="configs/qwen2vl-7b.yaml", image_px=640,
                        text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                  num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                  mrope_section=[16, 24, 24], rope_theta=1e6, tie_word_embeddings=True)),
    "qwen2-vl-7b": dict(kind="qwen2_vl", config="configs/qwen2vl-7b.yaml", image_px=640,
                        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                  num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                  mrope_section=[16, 24, 24], rope_theta=1e6)),
    "pixtral-12b": dict(kind="pixtral", config="configs/pixtral-12b.yaml", image_px=640,
                        text=dict(hidden_size=5120, intermediate_size=14336, num_hidden_layers=40,
                                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=131072,
                                  rope_theta=1e9),
                        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                    num_attention_heads=16, head_dim=64, patch_size=16, image_size=1024)),
    "small": dict(kind="llava_features", config="configs/embedded.yaml", image_px=640,
                  text=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                            num_key_value_heads=3, head_dim=64, vocab_size=49152, rope_theta=1e5,
                            tie_word_embeddings=True),
                  vision=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=1, num_attention_heads=16,
                              image_size=64, patch_size=16)),
}
# --smoke: the same models at toy sizes
SMOKE_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=32, mrope_section=[6, 5, 5])
SMOKE_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, head_dim=32)


# ------------------------------------------------------------------------------------------------ models


def _tokenizer_and_template(family: str):
    """The tiny reader's offline word-level tokenizer and chat template of `family`, over the benchmark's words."""
    from dxrag.core.reader.families import FAMILIES, build_tiny_processor
    from dxrag.core.reader.prompts import LABEL_QUESTION_WORDS
    from dxrag.core.reader.settings import TinyReaderSettings

    texts = [QUESTION, "fundus photograph showing retinopathy .", *LABEL_QUESTION_WORDS]
    tiny = build_tiny_processor(FAMILIES[family], texts, GRADES + FINDINGS + ["yes", "no"],
                                TinyReaderSettings(family=family))
    return tiny.tokenizer, tiny.chat_template


def build(name: str, smoke: bool, max_pixels: int | None):
    """(model, processor) of a shape, random weights, on the current default device and dtype."""
    shape = SHAPES[name]
    text = dict(shape["text"], **(SMOKE_TEXT if smoke else {}))
    vision = dict(shape.get("vision", {}), **(SMOKE_VISION if smoke else {}))
    kind = shape["kind"]
    if kind == "qwen2_vl":
        from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                                  Qwen2VLProcessor, Qwen2VLVideoProcessor)

        from dxrag.core.reader.families import _qwen_tokens

        tok, template = _tokenizer_and_template("qwen2_vl")
        rope = {"rope_type": "default", "rope_theta": text.pop("rope_theta"),
                "mrope_section": text.pop("mrope_section")}
        text.pop("head_dim", None)
        qv = dict(QWEN_VISION, hidden_size=text["hidden_size"])
        if smoke:
            qv.update(depth=2, embed_dim=64, num_heads=2, mlp_ratio=2)
        config = Qwen2VLConfig(text_config=dict(text, rope_parameters=rope, max_position_embeddings=32768,
                                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id),
                               vision_config=qv, **_qwen_tokens(tok))
        pixels = (28 * 2) ** 2 if smoke else (max_pixels or 401408)
        images = Qwen2VLImageProcessor(min_pixels=min(pixels, 56 * 56), max_pixels=pixels, patch_size=14)
        processor = Qwen2VLProcessor(image_processor=images, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                                     chat_template=template)
        model = Qwen2VLForConditionalGeneration(config)
    else:
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        tok, template = _tokenizer_and_template("llava")
        image_token = tok.convert_tokens_to_ids("[IMG]")
        text = dict(text, max_position_embeddings=131072, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                    bos_token_id=tok.bos_token_id)
        if kind == "pixtral":
            from transformers import PixtralImageProcessor, PixtralProcessor

            edge = 32 if smoke else int((max_pixels or 262144) ** 0.5)
            vision_config = dict(model_type="pixtral", **dict(vision, image_size=max(edge, 32), patch_size=16))
            processor = PixtralProcessor(image_processor=PixtralImageProcessor(size={"longest_edge": edge},
                                                                              patch_size=16),
                                         tokenizer=tok, patch_size=16, spatial_merge_size=1, chat_template=template)
            text_type = "mistral"
        else:  # llava_features: a 4x4 map of 1280-d features per image (EfficientNet-Lite0's last feature map)
            from transformers import LlavaProcessor, SiglipImageProcessor

            vision = dict(vision, image_size=64, patch_size=16)
            vision_config = dict(model_type="siglip_vision_model", **{k: v for k, v in vision.items()
                                                                      if k != "head_dim"})
            processor = LlavaProcessor(image_processor=SiglipImageProcessor(size={"height": 64, "width": 64}),
                                       tokenizer=tok, patch_size=16, vision_feature_select_strategy="full",
                                       image_token="[IMG]", num_additional_image_tokens=0, chat_template=template)
            text_type = "llama"
        config = LlavaConfig(vision_config=vision_config, text_config=dict(model_type=text_type, **text),
                             image_token_index=image_token, vision_feature_select_strategy="full",
                             vision_feature_layer=-1, projector_hidden_act="gelu")
        model = LlavaForConditionalGeneration(config)
    return model, processor


# ------------------------------------------------------------------------------------------------ data


def make_dataset(out: Path, n: int, image_px: int):
    """n corpus items and n queries over noise images of image_px x image_px; a 14-label copy of the queries."""
    import numpy as np
    from PIL import Image

    from dxrag.core.base.dataset import DatasetMeta, DatasetWriter, load_dataset
    from dxrag.core.base.records import CorpusItem, Query

    rng = np.random.default_rng(0)
    with DatasetWriter(out) as w:
        for i in range(n):
            img = Image.fromarray(rng.integers(0, 256, (image_px, image_px, 3), dtype=np.uint8))
            w.corpus.append(CorpusItem(f"c{i}", w.add_image(f"c{i}", img),
                                       f"fundus photograph showing {GRADES[i % 5]} retinopathy .", GRADES[i % 5]))
            img = Image.fromarray(rng.integers(0, 256, (image_px, image_px, 3), dtype=np.uint8))
            w.queries["train"].append(Query(f"q{i}", w.add_image(f"q{i}", img), QUESTION, tuple(GRADES),
                                            GRADES[i % 5]))
        w.meta = DatasetMeta(name="bench-gpu", task="classification", labels=list(GRADES))
    return load_dataset(out)


# ------------------------------------------------------------------------------------------------ measurement


class Meter:
    """Wall time and peak accelerator memory of one phase (synchronised on CUDA)."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start
        self.peak_gib = self.torch.cuda.max_memory_allocated() / 2 ** 30 if self.cuda else None


def phase(row: dict, name: str, fn) -> None:
    """Run one measurement; an error (out of memory, ...) is recorded in the row and the next phase still runs."""
    import torch

    try:
        fn()
    except Exception as e:  # noqa: BLE001 - a benchmark row records any failure and goes on
        row.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        traceback.print_exc()
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def measure(name: str, args, device, dtype) -> dict:
    import torch

    from dxrag.core.config import load_config
    from dxrag.core.training.finetune import finetune
    from dxrag.core.reader.model import Reader, ScoreRequest, TargetRequest
    from dxrag.core.reader.settings import LoraSettings
    from dxrag.core.tasks import Task

    shape = SHAPES[name]
    cfg = load_config(REPO / shape["config"])
    rs = cfg.reader
    batch = 2 if args.smoke else rs.batch_size
    ft = dataclasses.replace(rs.finetune, steps=args.steps, batch_size=2 if args.smoke else rs.finetune.batch_size,
                             eval_every=0, checkpoint_every=0)
    row: dict = {"model": name, "config": shape["config"], "device": str(device), "dtype": str(dtype).split(".")[-1],
                 "score_batch": batch, "finetune_batch": ft.batch_size,
                 "gradient_checkpointing": ft.gradient_checkpointing}
    n = max(args.requests, batch) if not args.smoke else 4
    with tempfile.TemporaryDirectory() as tmp:
        ds = make_dataset(Path(tmp) / "ds", n, 32 if args.smoke else shape["image_px"])
        torch.manual_seed(0)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with Meter(device) as m, torch.device(device):
                model, processor = build(name, args.smoke, rs.max_pixels)
        finally:
            torch.set_default_dtype(previous)
        model = model.to(device=device, dtype=dtype).eval()
        row["build_s"] = round(m.seconds, 1)
        row["parameters_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
        settings = dict(model=name, device=str(device), dtype=str(dtype).split(".")[-1], batch_size=batch,
                        max_pixels=None)
        from dxrag.core.reader.settings import ReaderSettings

        generic = Reader(model, processor, ReaderSettings(**settings, fast_path=False))
        fast = Reader(model, processor, ReaderSettings(**settings)) if generic.family.fast_path else None
        queries, corpus = ds.queries["train"], ds.corpus
        requests = [ScoreRequest(q, c) for q, c in zip(queries, corpus)]
        row["prompt_tokens"] = int(generic._generic_inputs([(q, c, q.candidates) for q, c in zip(queries[:1], corpus)],
                                                           ds.root)["input_ids"].shape[1])

        def scoring(reader, key):
            def run():
                reader.score(requests[:batch], ds.root, progress=False)  # warm-up
                with Meter(device) as m:
                    reader.score(requests, ds.root, progress=False)
                row[f"{key}_prompts_per_s"] = round(len(requests) / m.seconds, 2)
                row[f"{key}_peak_gib"] = m.peak_gib and round(m.peak_gib, 2)
            return run

        phase(row, "generic", scoring(generic, "generic"))
        if fast is not None:
            phase(row, "fast", scoring(fast, "fast"))
            if row.get("fast_prompts_per_s") and row.get("generic_prompts_per_s"):
                row["fast_over_generic"] = round(row["fast_prompts_per_s"] / row["generic_prompts_per_s"], 2)

        def multilabel(reader, key):
            # per-label questions of a 14-label task over `batch` contexts, prefix shared, against closed questions
            def run():
                prompts = Task("multilabel", tuple(FINDINGS), {})
                k = min(len(requests), batch)
                asked = [dataclasses.replace(q, candidates=tuple(FINDINGS), label="", label_set=(FINDINGS[0],))
                         for q in queries[:k]]
                per_label = [ScoreRequest(a, c, share_prefix=True) for q, c in zip(asked, corpus)
                             for a in prompts.asked(q)]
                reader.score(per_label[:len(FINDINGS)], ds.root, progress=False)  # warm-up
                with Meter(device) as closed:
                    reader.score(requests[:k], ds.root, progress=False)
                with Meter(device) as shared:
                    reader.score(per_label, ds.root, progress=False)
                row["multilabel_contexts"] = k
                row[f"{key}_multilabel_over_closed"] = round(shared.seconds / closed.seconds, 2)
                row[f"{key}_multilabel_peak_gib"] = shared.peak_gib and round(shared.peak_gib, 2)
            return run

        phase(row, "generic_multilabel", multilabel(generic, "generic"))
        if fast is not None:
            phase(row, "fast_multilabel", multilabel(fast, "fast"))

        def training():
            reader = Reader(model, processor, ReaderSettings(**settings, lora=LoraSettings(r=8, alpha=16)))
            examples = [TargetRequest(q, c) for q, c in zip(queries, corpus)]
            finetune(reader, examples, ds.root, dataclasses.replace(ft, steps=1))  # warm-up (adds the adapters)
            with Meter(device) as m:
                finetune(reader, examples, ds.root, ft)
            row["finetune_steps_per_s"] = round(ft.steps / m.seconds, 3)
            row["finetune_peak_gib"] = m.peak_gib and round(m.peak_gib, 2)
            row["lora_parameters_m"] = round(sum(p.numel() for p in reader.model.parameters()
                                                 if p.requires_grad) / 1e6, 2)

        phase(row, "finetune", training)
        del generic, fast, model
    return row


# ------------------------------------------------------------------------------------------------ output

COLUMNS = ["model", "parameters_b", "prompt_tokens", "score_batch", "generic_prompts_per_s", "fast_prompts_per_s",
           "fast_over_generic", "generic_peak_gib", "generic_multilabel_over_closed", "fast_multilabel_over_closed",
           "finetune_batch", "finetune_steps_per_s",
           "finetune_peak_gib", "build_s"]


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| " + " | ".join(COLUMNS) + " | errors |", "|" + "---|" * (len(COLUMNS) + 1)]
    for r in rows:
        cells = ["" if r.get(c) is None else str(r[c]) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " | " + "; ".join(f"{k}: {v}" for k, v in r.get("errors", {}).items())
                     + " |")
    return "\n".join(lines) + "\n"


def write(out: Path, rows: list[dict], header: str) -> None:
    """X.md and X.json, each written to a temporary file and renamed (never half-written)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out.with_suffix(".md"), markdown(rows, header)),
                       (out.with_suffix(".json"), json.dumps(rows, indent=1))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--requests", type=int, default=128, help="scoring requests per path (at least one batch)")
    parser.add_argument("--steps", type=int, default=4, help="timed fine-tune steps (after one warm-up step)")
    parser.add_argument("--smoke", action="store_true", help="CPU, float32, toy shapes: checks the script in seconds")
    parser.add_argument("--out", type=Path, help="write OUT.md and OUT.json (rewritten after every model)")
    args = parser.parse_args(argv)
    import torch

    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        torch.set_num_threads(1)
        args.steps = 1
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: run with --smoke on CPU")
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke: toy shapes)"
    header = (f"# Reader at real shapes (random weights): {name}, {str(dtype).split('.')[-1]}, torch "
              f"{torch.__version__}\n\nCommand: `python benchmarks/bench_gpu.py {' '.join(argv or sys.argv[1:])}`")
    rows = []
    for model in args.models:
        t = time.perf_counter()
        try:
            row = measure(model, args, device, dtype)
        except Exception as e:  # noqa: BLE001 - building failed (out of memory, ...): keep the other models' rows
            traceback.print_exc()
            row = {"model": model, "errors": {"build": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}}
        row["total_s"] = round(time.perf_counter() - t, 1)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            write(args.out, rows, header)
    return 0 if all("errors" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
