"""Fine-tuning recipes of the real reader (recipe `effnet-smollm2`), closed-book on a MedMNIST dataset, compared on the
validation split (never the test split): accuracy, macro-F1, the share of "yes" answers and the AUC of p(yes) after
each `--eval-every` steps. The frozen tower's features are computed once and cached in `--work`, as a run does.

    OMP_NUM_THREADS=1 python benchmarks/study_reader_recipe.py --npz breastmnist.npz --work /tmp/study \\
        --steps 60 --loss candidates --balanced

Needs `make weights` (efficientnet-lite0, smollm2-135m-instruct). Prints one JSON line per evaluation.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--npz", type=Path, required=True)
    p.add_argument("--flag", default="breastmnist")
    p.add_argument("--work", type=Path, required=True, help="dataset, built reader and feature cache (reused)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--loss", default="answer", choices=["answer", "candidates"])
    p.add_argument("--balanced", action="store_true")
    p.add_argument("--projector-only", action="store_true", help="train the projector only (no LoRA)")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)

    from sklearn.metrics import f1_score, roc_auc_score

    from dxrag.core.base.dataset import load_dataset
    from dxrag.core.data.medmnist import convert_medmnist
    from dxrag.core.reader.build import RECIPES, build_reader
    from dxrag.core.reader.model import Reader, ScoreRequest, TargetRequest
    from dxrag.core.reader.settings import FinetuneSettings, LoraSettings, ReaderSettings
    from dxrag.core.tasks import Task
    from dxrag.core.training.finetune import finetune

    data, built, feats = args.work / args.flag, args.work / "effnet-smollm2", args.work / "features.safetensors"
    if not data.exists():
        convert_medmnist(args.flag, data, npz=args.npz, overwrite=True)
    if not built.exists():
        build_reader(RECIPES["effnet-smollm2"], built, seed=args.seed)
    ds = load_dataset(data)
    prompts = Task.of(ds.meta)
    reader = Reader.from_config(ReaderSettings(model=str(built), dtype="float32", autocast="bfloat16", batch_size=16,
                                               lora=None if args.projector_only else LoraSettings()), ds, args.seed)
    cache = reader.tower_cache
    if not (feats.is_file() and cache.load(feats, ds.root)):
        images = {str(ds.image_path(x.image)): x.id for x in ds.corpus}
        images.update({str(ds.image_path(q.image)): q.id for s in ds.queries.values() for q in s})
        cache.get(images, batch_size=16)
        cache.save(feats, ds.root)
    if args.projector_only:
        reader.model.requires_grad_(False)
        reader.hf_model.get_submodule(reader.family.projector).requires_grad_(True)
    train = [TargetRequest(prompts.prompt_query(q), None) for q in ds.queries["train"]]
    val = [ScoreRequest(prompts.prompt_query(q), None) for q in ds.queries["val"]]
    gold = np.array([q.label == "yes" for q in ds.queries["val"]])

    def report(step: int, seconds: float) -> None:
        scores = reader.score(val, ds.root, progress=False)
        p_yes = np.array([np.exp(s[list(r.answers).index("yes")]) for s, r in zip(scores, val)])
        pred = p_yes > 0.5
        print(json.dumps({**{k: v for k, v in vars(args).items() if k not in ("npz", "work")}, "step": step,
                          "val_accuracy": round(float((pred == gold).mean()), 3),
                          "val_macro_f1": round(float(f1_score(gold, pred, average="macro")), 3),
                          "val_auc": round(float(roc_auc_score(gold, p_yes)), 3),
                          "yes_share": round(float(pred.mean()), 3), "max_p_yes": round(float(p_yes.max()), 3),
                          "train_s": round(seconds, 1)}), flush=True)

    done, t0 = 0, time.perf_counter()
    while done < args.steps:
        # one cosine schedule over all steps, evaluated every eval_every: resume the same run from its checkpoint
        settings = FinetuneSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, closed_book_fraction=0.0,
                                    eval_every=0, checkpoint_every=args.eval_every, loss=args.loss,
                                    balanced_sampling=args.balanced)
        stop = min(done + args.eval_every, args.steps)
        _run_until(finetune, reader, train, ds.root, settings, args.seed, args.work / "ckpt", stop)
        done = stop
        report(done, time.perf_counter() - t0)


def _run_until(finetune, reader, train, root, settings, seed, ckpt, stop):
    """finetune() with a checkpoint every eval_every steps, interrupted after step `stop` (it resumes from there)."""
    import dataclasses
    import shutil

    class Stop(Exception):
        pass

    import dxrag.core.training.finetune as ft

    original = ft._save_checkpoint

    def save_then_stop(out, step, *a, **k):
        original(out, step, *a, **k)
        if step >= stop:
            raise Stop

    if stop == settings.checkpoint_every and ckpt.exists():
        shutil.rmtree(ckpt)
    ft._save_checkpoint = save_then_stop
    try:
        finetune(reader, train, root, dataclasses.replace(settings), seed=seed, checkpoint_dir=ckpt)
    except Stop:
        pass
    finally:
        ft._save_checkpoint = original
    reader.model.eval()


if __name__ == "__main__":
    main()
