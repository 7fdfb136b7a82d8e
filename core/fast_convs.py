"""Fast convolutions under the CPU pin, with an explicit kernel per layer. `pin_convs` applies them wherever dxrag
loads a model that may hold convolutions (retrieval encoders, the probe's tower, readers), under the pin only.

Under the pin (`cpu_kernels`: oneDNN and NNPACK off) torch runs every convolution through ATen's Slow2d (im2col +
MKL sgemm), a depthwise one channel at a time: most of EfficientNet-Lite0's time on CPU (docs/performance.md,
"Convolutions under the CPU pin"; NNPACK, which torch would otherwise pick from 16 images, sums in an order that
depends on the batch and the CPU's L1 cache size).

`swap_convs(model)` replaces the model's eligible `nn.Conv2d` modules (timm's `Conv2dSame` included) by
`PinnedConv2d`, which shares their parameters (same state-dict keys) and calls one kernel, whatever the batch size
(an image's features then do not depend on its batch at one thread; with more threads ATen splits a batch across
them while a single image's gemm gets them all, and the sums are blocked otherwise):

- dense convolutions (groups == 1: the stem, every 1x1): `torch._C._nn.thnn_conv2d`, ATen's Slow2d: per image an
  im2col (data movement only) and one MKL sgemm, which MKL_CBWR=AVX2 makes bitwise equal on every AVX2 Intel CPU
  at a fixed thread count. This is the kernel the pin already runs.
- depthwise convolutions (groups == in == out channels): `torch.mkldnn_convolution`, oneDNN's depthwise kernel
  capped at AVX2 by ONEDNN_MAX_CPU_ISA. Each output value is a sum over the k*k taps of one channel, accumulated tap
  after tap in a register; there is no reduction across channels, so nothing of oneDNN's cache-dependent blocking
  (which splits the input-channel sums of dense convolutions, the reason the pin turns oneDNN off) reaches a value.
  The argument rests on oneDNN's code, not on a promise of its authors: `check_depthwise` compares this kernel
  bitwise with ATen's Slow2d on the machine at hand. Equal on every depthwise layer of EfficientNet-Lite0 at 64 and
  112 px; where an output map is a single pixel (inputs under 64 px), Slow2d's gemm degenerates to a dot product that
  MKL reduces in its own order, and the two differ by an ulp.

Only inference takes the fast path: where autograd records (a parameter or the input requires grad and grad mode is
on) a layer runs its original convolution, since oneDNN's weight gradient does reduce across the batch. With NNPACK
off under the pin, dense layers run the same kernel as before and depthwise ones the same sums, so swapping leaves
EfficientNet-Lite0's features bitwise equal at 64 px and above (`tests/core/test_fast_convs.py`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

DENSE = "dense"
DEPTHWISE = "depthwise"


def _same_pad(size: int, kernel: int, stride: int, dilation: int) -> int:
    """TF 'SAME' padding of one dimension, as timm's `get_same_padding` computes it."""
    return max((-(size // -stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def _is_conv2d_same(module: nn.Module) -> bool:
    try:
        from timm.layers import Conv2dSame
    except ImportError:  # no timm, no Conv2dSame to meet
        return False
    return type(module) is Conv2dSame


def conv_kind(module: nn.Module) -> str | None:
    """DENSE, DEPTHWISE, or None where `swap_convs` leaves the module alone (another class, dilation, zero padding
    mode not 'zeros', string padding, grouped but not depthwise, a channel multiplier)."""
    if not (type(module) is nn.Conv2d or _is_conv2d_same(module)):
        return None
    if module.padding_mode != "zeros" or isinstance(module.padding, str) or module.dilation != (1, 1):
        return None
    if module.groups == 1:
        return DENSE
    if module.groups == module.in_channels == module.out_channels:
        return DEPTHWISE
    return None


class PinnedConv2d(nn.Conv2d):
    """An `nn.Conv2d` that runs one explicit CPU kernel in inference (see the module docstring). Built by
    `from_conv`, sharing the original module's parameters."""

    kind: str
    same: bool

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "PinnedConv2d":
        kind = conv_kind(conv)
        if kind is None:
            raise ValueError(f"{type(conv).__name__}{tuple(conv.weight.shape)}: not a dense or depthwise Conv2d")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                     "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(new, name, getattr(conv, name))
        new.weight = conv.weight  # the same Parameter objects: state dicts and optimisers see no change
        new.bias = conv.bias
        new.training = conv.training
        new.kind = kind
        new.same = _is_conv2d_same(conv)
        return new

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel={self.kind}{', same' if self.same else ''}"

    def _pad_same(self, x: torch.Tensor) -> torch.Tensor:
        ph = _same_pad(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
        pw = _same_pad(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
        return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)) if ph or pw else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same:
            x = self._pad_same(x)
        records = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad
                                               or (self.bias is not None and self.bias.requires_grad))
        if records or x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4:
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return pinned_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.kind)


def pinned_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding,
                  kind: str) -> torch.Tensor:
    """The explicit kernel of a dense or depthwise 2-D convolution (float32, CPU, no dilation), for inference."""
    x = x.contiguous()
    if kind == DENSE:
        return torch._C._nn.thnn_conv2d(x, weight, list(weight.shape[-2:]), bias, list(stride), list(padding))
    if kind == DEPTHWISE:
        return torch.mkldnn_convolution(x, weight.contiguous(), bias, list(padding), list(stride), [1, 1],
                                        weight.shape[0])
    raise ValueError(f"unknown convolution kind {kind!r}: expected {DENSE!r} or {DEPTHWISE!r}")


@contextmanager
def kernel_flags(*, nnpack: bool, onednn: bool) -> Iterator[None]:
    """torch's global NNPACK and oneDNN switches set for the block and restored after it (torch's own `flags()`
    context managers also reset oneDNN's TF32 setting, with a warning on builds without Intel GPU support)."""
    before = (torch._C._get_nnpack_enabled(), torch.backends.mkldnn.enabled)
    torch._C._set_nnpack_enabled(nnpack)
    torch.backends.mkldnn.enabled = onednn
    try:
        yield
    finally:
        torch._C._set_nnpack_enabled(before[0])
        torch.backends.mkldnn.enabled = before[1]


def swap_convs(model: nn.Module) -> dict[str, int]:
    """Replace `model`'s dense and depthwise Conv2d modules (in place) by `PinnedConv2d` modules sharing their
    parameters; returns how many of each kind were swapped and how many convolutions were left alone."""
    counts = {DENSE: 0, DEPTHWISE: 0, "left": 0}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PinnedConv2d) or not isinstance(child, nn.Conv2d):
                continue
            kind = conv_kind(child)
            if kind is None:
                counts["left"] += 1
                continue
            setattr(parent, name, PinnedConv2d.from_conv(child))
            counts[kind] += 1
    return counts


def pin_convs(model: nn.Module) -> dict[str, int] | None:
    """`swap_convs(model)` where the CPU pin is on (torch's oneDNN off, `cpu_kernels.configure_torch`): there the
    depthwise layers otherwise run ATen's Slow2d one channel at a time (EfficientNet-Lite0's tower 3-12x slower);
    dense layers keep the kernel the pin already runs. Natively (oneDNN on) the model is left as it is: returns
    None."""
    if torch.backends.mkldnn.enabled:
        return None
    return swap_convs(model)


def check_depthwise(model: nn.Module, image: torch.Tensor) -> list[dict[str, Any]]:
    """Run `model` on `image` once and compare, for each depthwise `PinnedConv2d`, its oneDNN output with ATen's
    Slow2d on the same input (NNPACK off for the comparison). Returns one row per layer: name, input shape, kernel,
    stride, max_abs_diff (0.0 where the two kernels agree bitwise)."""
    rows: list[dict[str, Any]] = []

    def hook(module, inputs, output, name):
        x = module._pad_same(inputs[0]) if module.same else inputs[0]
        with kernel_flags(nnpack=False, onednn=False):
            ref = F.conv2d(x, module.weight, module.bias, module.stride, module.padding, 1, module.groups)
        rows.append({"name": name, "input": tuple(x.shape), "kernel": module.kernel_size[0],
                     "stride": module.stride[0], "max_abs_diff": float((output - ref).abs().max())})

    handles = [m.register_forward_hook(lambda mod, i, o, n=n: hook(mod, i, o, n))
               for n, m in model.named_modules() if isinstance(m, PinnedConv2d) and m.kind == DEPTHWISE]
    try:
        with torch.inference_mode():
            model(image)
    finally:
        for h in handles:
            h.remove()
    return rows
