"""Benchmark: EfficientNet-Lite0's forward on CPU under the pin, with the convolution kernels torch picks and with
`dxrag.core.fast_convs.swap_convs`, side by side in one process, repetitions interleaved.

Variants (one model's weights, four ways to run them):
  pinned          what dxrag runs today: the pin (AVX2), oneDNN off; torch picks Slow2d below 16 images, NNPACK from 16
  pinned-nonnpack the pin with NNPACK off too (torch.backends.nnpack): Slow2d (im2col + MKL sgemm) for every layer
  swapped         the pin + swap_convs: dense layers Slow2d, depthwise layers oneDNN's depthwise kernel (AVX2 cap)
  onednn          the pin with oneDNN on for every layer (what the pin turned off; not reproducible across CPUs)

Per (image size, batch): the median seconds of a forward (--reps repetitions, variants interleaved), the speedup over
`pinned`, and the largest |difference| of the pooled 1280-d features from `pinned`'s (and from `pinned-nonnpack`'s),
next to the largest |feature|. Then, for one setting, the seconds by layer kind (forward hooks). With
--check-depthwise, each depthwise layer's oneDNN output is compared bitwise with ATen's Slow2d.

With --layers it instead times the tower's distinct depthwise and 1x1 layers, at each --sizes and --batches, by every
candidate kernel, in milliseconds (best of --reps), with the largest |difference| from ATen's Slow2d, and sums each
candidate over the tower's layers (a distinct layer times its count). Candidates for depthwise layers: pinned (torch's
choice under the pin: Slow2d below 16 images, NNPACK from 16), Slow2d, a shifted sum (k*k multiply-adds of shifted
views, NCHW and channels-last), F.unfold + multiply + sum, F.unfold + bmm, oneDNN; for 1x1 layers: pinned, Slow2d,
torch.matmul over the (N, C, H*W) view, F.linear over the channels-last (N*H*W, C) view (conversion included), oneDNN.

With --probe NPZ it instead times the probe's own `image_features` (core/probe.py: 112 px, batch 64) on the first
--images test images of a MedMNIST-style .npz (`test_images`, written as PNGs to a temporary directory), pinned against
swapped, and compares the features; it also compares, on the pinned tower, a batch of 16 with the same images one
by one.

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_convs.py [--sizes 64 112] [--batches 1 16 64] [--reps 3]
       [--model tf_efficientnet_lite0] [--random-weights] [--check-depthwise] [--json PATH]
       OMP_NUM_THREADS=1 python benchmarks/bench_convs.py --layers [--sizes 64 112] [--batches 1 16 64] [--reps 3]
       OMP_NUM_THREADS=1 python benchmarks/bench_convs.py --probe pneumoniamnist.npz [--images 200] [--reps 2]
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import statistics
import sys
import time
from pathlib import Path

from dxrag.core import cpu_kernels  # noqa: E402

cpu_kernels.pin()
cpu_kernels.configure_torch()

import torch  # noqa: E402

from dxrag.core.fast_convs import check_depthwise, kernel_flags, swap_convs  # noqa: E402

VARIANTS = ("pinned", "pinned-nonnpack", "swapped", "onednn")


def load_model(name: str, random_weights: bool):
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=0).eval()
    source = "random init"
    if not random_weights and name == "tf_efficientnet_lite0":
        from dxrag.core.weights import WeightsError, load_into
        try:
            load_into(model, "efficientnet-lite0")
            source = "dxrag weights efficientnet-lite0"
        except WeightsError as e:
            print(f"(real weights not loaded: {e}; random init)", file=sys.stderr)
    return model, source


def run(variant: str, models: dict, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """One forward of `variant`, timed; the global flags are restored to the pin's afterwards."""
    model = models["swapped"] if variant == "swapped" else models["native"]
    nnpack = variant != "pinned-nonnpack"
    mkldnn = variant == "onednn"
    with kernel_flags(nnpack=nnpack, onednn=mkldnn), torch.inference_mode():
        t = time.perf_counter()
        y = model(x)
        return time.perf_counter() - t, y


def layer_kind(name: str, module: torch.nn.Conv2d) -> str:
    if name.startswith("conv_stem"):
        return "stem"
    if module.groups > 1:
        return f"dw {module.kernel_size[0]}x{module.kernel_size[0]} s{module.stride[0]}"
    return "pw 1x1" if module.kernel_size == (1, 1) else "other"


def by_kind(variant: str, models: dict, x: torch.Tensor, reps: int) -> dict[str, float]:
    """Seconds per forward by layer kind (convolutions by forward hooks; 'rest' = the forward minus them)."""
    model = models["swapped"] if variant == "swapped" else models["native"]
    spent: dict[str, float] = collections.defaultdict(float)
    start: dict[int, float] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            kind = layer_kind(name, m)
            handles.append(m.register_forward_pre_hook(lambda mod, i: start.__setitem__(id(mod), time.perf_counter())))
            handles.append(m.register_forward_hook(
                lambda mod, i, o, k=kind: spent.__setitem__(k, spent[k] + time.perf_counter() - start[id(mod)])))
    total = 0.0
    try:
        run(variant, models, x)
        spent.clear()
        for _ in range(reps):
            total += run(variant, models, x)[0]
    finally:
        for h in handles:
            h.remove()
    out = {k: v / reps for k, v in sorted(spent.items())}
    out["rest"] = total / reps - sum(out.values())
    out["total"] = total / reps
    return out


def _out_size(h: int, k: int, s: int, p: int) -> int:
    return (h + 2 * p - k) // s + 1


def dw_shifted(x, w, s, p):
    """Depthwise convolution as k*k multiply-adds of strided views (the layout of `x` is kept)."""
    k, (n, c, h, wd) = w.shape[-1], x.shape
    xp = torch.nn.functional.pad(x, (p, p, p, p))
    ho, wo = _out_size(h, k, s, p), _out_size(wd, k, s, p)
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    out = torch.zeros((n, c, ho, wo)).contiguous(memory_format=fmt)
    for i in range(k):
        for j in range(k):
            out.addcmul_(xp[:, :, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s], w[:, 0, i, j].view(1, -1, 1, 1))
    return out


def dw_unfold_mul(x, w, s, p):
    k, (n, c, h, wd) = w.shape[-1], x.shape
    ho, wo = _out_size(h, k, s, p), _out_size(wd, k, s, p)
    u = torch.nn.functional.unfold(x, k, padding=p, stride=s).view(n, c, k * k, ho * wo)
    return (u * w.view(1, c, k * k, 1)).sum(2).view(n, c, ho, wo)


def dw_unfold_bmm(x, w, s, p):
    k, (n, c, h, wd) = w.shape[-1], x.shape
    ho, wo = _out_size(h, k, s, p), _out_size(wd, k, s, p)
    u = torch.nn.functional.unfold(x, k, padding=p, stride=s).view(n, c, k * k, ho * wo)
    u = u.permute(1, 2, 0, 3).reshape(c, k * k, n * ho * wo)
    return torch.bmm(w.view(c, 1, k * k), u).view(c, n, ho, wo).transpose(0, 1)


def _conv(nnpack: bool, onednn: bool):
    def f(x, w, s, p):
        with kernel_flags(nnpack=nnpack, onednn=onednn):
            return torch.nn.functional.conv2d(x, w, None, s, p, 1, w.shape[0] if w.shape[1] == 1 else 1)
    return f


def pw_matmul(x, w, s, p):
    n, c, h, wd = x.shape
    return torch.matmul(w.view(w.shape[0], c), x.reshape(n, c, h * wd)).view(n, -1, h, wd)


def pw_linear_cl(x, w, s, p):
    n, c, h, wd = x.shape
    y = torch.nn.functional.linear(x.permute(0, 2, 3, 1).reshape(n * h * wd, c), w.view(w.shape[0], c))
    return y.view(n, h, wd, -1).permute(0, 3, 1, 2)


DW_CANDIDATES = {"pinned": _conv(True, False), "slow2d": _conv(False, False), "shifted": dw_shifted,
                 "shifted-cl": lambda x, w, s, p: dw_shifted(x.contiguous(memory_format=torch.channels_last), w, s, p),
                 "unfold-mul": dw_unfold_mul, "unfold-bmm": dw_unfold_bmm, "onednn": _conv(False, True)}
PW_CANDIDATES = {"pinned": _conv(True, False), "slow2d": _conv(False, False), "matmul": pw_matmul,
                 "linear-cl": pw_linear_cl, "onednn": _conv(False, True)}
UNFOLD_MAX_ELEMENTS = 64 * 2**20  # unfold candidates skipped ("-") where the unfolded input would be larger


def tower_layers(model, size: int) -> list[tuple[tuple[int, int, int, int, int], int]]:
    """The model's depthwise and 1x1 convolutions at `size` px: ((in, out, input map, kernel, stride), count), in
    order of first occurrence. The candidates pad symmetrically (k // 2), which gives the output size of timm's SAME
    padding on these maps."""
    seen: dict[tuple[int, int, int, int, int], int] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.__setitem__(
        (mod.in_channels, mod.out_channels, i[0].shape[-1], mod.kernel_size[0], mod.stride[0]),
        seen.get((mod.in_channels, mod.out_channels, i[0].shape[-1], mod.kernel_size[0], mod.stride[0]), 0) + 1))
        for m in model.modules() if isinstance(m, torch.nn.Conv2d) and (m.groups > 1 or m.kernel_size == (1, 1))]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    return list(seen.items())


def layer_table(model, sizes: list[int], batches: list[int], reps: int) -> dict:
    """Per image size and batch: milliseconds per call of every candidate kernel on each distinct depthwise and 1x1
    layer of the tower (best of `reps`, candidates interleaved), the max |diff| from Slow2d, and the sum over the
    tower's layers (each distinct layer times its count)."""
    torch.manual_seed(0)
    report: dict = {}
    for size in sizes:
        layers = tower_layers(model, size)
        for batch in batches:
            for label, cands in (("depthwise", DW_CANDIDATES), ("pointwise 1x1", PW_CANDIDATES)):
                shapes = [(shape, n) for shape, n in layers if (shape[3] == 1) == (label != "depthwise")]
                print(f"\n{label} layers, {size}x{size}, batch {batch}: ms per call (best of {reps}) / max |diff| "
                      f"from slow2d")
                print("| cin, cout, map, k, s (count) | " + " | ".join(cands) + " |")
                print("|---" * (len(cands) + 1) + "|")
                total = dict.fromkeys(cands, 0.0)
                worst = dict.fromkeys(cands, 0.0)
                rows = []
                for (cin, cout, h, k, st), count in shapes:
                    x = torch.randn(batch, cin, h, h)
                    w = torch.randn(cout, 1 if label == "depthwise" else cin, k, k) * 0.2
                    big = batch * cin * k * k * _out_size(h, k, st, k // 2) ** 2 > UNFOLD_MAX_ELEMENTS
                    run_now = {n: f for n, f in cands.items() if not (big and n.startswith("unfold"))}
                    best, diff = dict.fromkeys(run_now, float("inf")), {}
                    with torch.inference_mode():
                        ref = _conv(False, False)(x, w, st, k // 2)
                        for _ in range(reps):
                            for name, f in run_now.items():
                                t = time.perf_counter()
                                y = f(x, w, st, k // 2)
                                best[name] = min(best[name], time.perf_counter() - t)
                                diff[name] = float((y - ref).abs().max())
                    for name in cands:
                        total[name] += count * best.get(name, float("nan"))
                        worst[name] = max(worst[name], diff.get(name, 0.0))
                    rows.append({"shape": [cin, cout, h, k, st], "count": count,
                                 "ms": {n: 1e3 * b for n, b in best.items()}, "diff": diff})
                    print(f"| {cin}, {cout}, {h}, {k}, {st} ({count}) | " + " | ".join(
                        f"{1e3 * best[n]:.1f} / {diff[n]:.0e}" if n in best else "-" for n in cands) + " |",
                        flush=True)
                print("| tower sum / max diff | " + " | ".join(
                    "-" if total[n] != total[n] else f"{1e3 * total[n]:.0f} / {worst[n]:.0e}" for n in cands) + " |")
                report.setdefault(str(size), {}).setdefault(str(batch), {})[label] = {
                    "rows": rows, "sum_ms": {n: 1e3 * t for n, t in total.items()}, "max_diff": worst}
    return report


def probe_table(npz: Path, images: int, reps: int) -> dict:
    """The probe's feature extraction, pinned against swapped, on real images, and the pinned tower's batch
    dependence."""
    import tempfile

    import numpy as np
    from PIL import Image

    from dxrag.core import probe

    pinned, swapped = probe.load_encoder(), probe.load_encoder()
    swap_convs(swapped)
    with torch.inference_mode():
        x = torch.rand(16, 3, 112, 112) * 2 - 1
        batch, alone = pinned(x), torch.cat([pinned(x[i:i + 1]) for i in range(16)])
        report = {"pinned_batch16_vs_alone": float((batch - alone).abs().max()),
                  "swapped_batch16_equals_pinned_alone": bool(torch.equal(swapped(x), alone))}
    print(f"pinned tower, a batch of 16 against the same images one by one: max |diff| "
          f"{report['pinned_batch16_vs_alone']:.1e}; swapped batch of 16 bitwise equal to pinned one by one: "
          f"{report['swapped_batch16_equals_pinned_alone']}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, a in enumerate(np.load(npz)["test_images"][:images]):
            paths.append(Path(tmp) / f"{i}.png")
            Image.fromarray(a).save(paths[-1])
        seconds: dict[str, list[float]] = {"pinned": [], "swapped": []}
        feats = {}
        for _ in range(reps):
            for name, model in (("pinned", pinned), ("swapped", swapped)):
                t = time.perf_counter()
                feats[name] = probe.image_features(model, paths, 112, 64)
                seconds[name].append(time.perf_counter() - t)
    report.update({"images": len(paths), "seconds": seconds,
                   "max_abs_diff": float(np.abs(feats["pinned"] - feats["swapped"]).max()),
                   "max_abs_feature": float(np.abs(feats["pinned"]).max())})
    print(f"probe.image_features, {len(paths)} images, 112 px, batch 64: pinned "
          f"{', '.join(f'{t:.2f}' for t in seconds['pinned'])} s, swapped "
          f"{', '.join(f'{t:.2f}' for t in seconds['swapped'])}"
          f" s; max |diff| {report['max_abs_diff']:.1e} (max |feature| {report['max_abs_feature']:.2f})")
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 112])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--check-depthwise", action="store_true")
    ap.add_argument("--layers", action="store_true", help="time single layers by every candidate kernel")
    ap.add_argument("--probe", type=Path, metavar="NPZ", help="time the probe's image_features on real images")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.probe:
        report = probe_table(args.probe, args.images, args.reps)
        if args.json:
            args.json.write_text(json.dumps(report, indent=1) + "\n")
        return 0
    if args.layers:
        report = layer_table(load_model(args.model, args.random_weights)[0], args.sizes, args.batches, args.reps)
        if args.json:
            args.json.write_text(json.dumps(report, indent=1) + "\n")
        return 0
    native, source = load_model(args.model, args.random_weights)
    swapped = copy.deepcopy(native)
    counts = swap_convs(swapped)
    models = {"native": native, "swapped": swapped}
    print(f"{args.model} ({source}); torch {torch.__version__}, capability "
          f"{torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}; swapped {counts}")
    rows = []
    print("| size | batch | " + " | ".join(f"{v} s" for v in VARIANTS) + " | swapped vs pinned | swapped vs onednn"
          " | max abs diff swapped/pinned | swapped/nonnpack | max abs feature |")
    print("|---" * (len(VARIANTS) + 7) + "|")
    for size in args.sizes:
        for batch in args.batches:
            x = torch.rand(batch, 3, size, size) * 2 - 1
            times = {v: [] for v in VARIANTS}
            outs = {}
            for v in VARIANTS:  # warm-up (oneDNN primitive creation, allocator)
                run(v, models, x)
            for _ in range(args.reps):
                for v in VARIANTS:
                    dt, outs[v] = run(v, models, x)
                    times[v].append(dt)
            med = {v: statistics.median(t) for v, t in times.items()}
            row = {"size": size, "batch": batch, "seconds": med, "all_seconds": times,
                   "speedup_vs_pinned": med["pinned"] / med["swapped"],
                   "speedup_vs_onednn": med["onednn"] / med["swapped"],
                   "diff_vs_pinned": float((outs["swapped"] - outs["pinned"]).abs().max()),
                   "diff_vs_nonnpack": float((outs["swapped"] - outs["pinned-nonnpack"]).abs().max()),
                   "max_abs_feature": float(outs["pinned"].abs().max())}
            rows.append(row)
            print(f"| {size} | {batch} | " + " | ".join(f"{med[v]:.3f}" for v in VARIANTS)
                  + f" | {row['speedup_vs_pinned']:.1f}x | {row['speedup_vs_onednn']:.2f}x"
                  f" | {row['diff_vs_pinned']:.1e}"
                  f" | {row['diff_vs_nonnpack']:.1e} | {row['max_abs_feature']:.2f} |", flush=True)
    size, batch = args.sizes[0], args.batches[-1]
    x = torch.rand(batch, 3, size, size) * 2 - 1
    kinds = {v: by_kind(v, models, x, max(1, args.reps - 1)) for v in VARIANTS}
    names = sorted({k for d in kinds.values() for k in d} - {"rest", "total"}) + ["rest", "total"]
    print(f"\nseconds per forward by layer kind, {size}x{size}, batch {batch}:")
    print("| layer kind | " + " | ".join(VARIANTS) + " |")
    print("|---" * (len(VARIANTS) + 1) + "|")
    for k in names:
        print(f"| {k} | " + " | ".join(f"{kinds[v].get(k, 0.0):.3f}" for v in VARIANTS) + " |")
    report = {"model": args.model, "weights": source, "torch": torch.__version__, "swapped": counts,
              "rows": rows, "by_kind": {"size": size, "batch": batch, "seconds": kinds}}
    if args.check_depthwise:
        checks = check_depthwise(swapped, torch.rand(batch, 3, size, size) * 2 - 1)
        worst = max((c["max_abs_diff"] for c in checks), default=0.0)
        print(f"\ndepthwise oneDNN vs Slow2d: {len(checks)} layers, largest |diff| {worst:.1e}"
              f" ({sum(c['max_abs_diff'] == 0.0 for c in checks)} bitwise equal)")
        report["depthwise_check"] = checks
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
