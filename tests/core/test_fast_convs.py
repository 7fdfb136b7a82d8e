"""core/fast_convs.py: the swapped convolutions compute what the originals compute (to 1e-5 of the largest value against
torch's own choice of kernel; bitwise against ATen's Slow2d), share their parameters, give each image the same features
whatever batch it comes in, and leave training to the original kernels."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from dxrag.core.fast_convs import (DENSE, DEPTHWISE, PinnedConv2d, check_depthwise, conv_kind,  # noqa: E402
                                   kernel_flags, swap_convs)



@pytest.fixture(autouse=True)
def pinned_kernels():
    """torch's kernel choice with oneDNN off and NNPACK on (what the pinned pipeline ran before `configure_torch` turned
    NNPACK off too), so that `conv(x)` below takes NNPACK from 16 images and Slow2d below; restored afterwards."""
    with kernel_flags(nnpack=True, onednn=False):
        yield


# (in, out, kernel, stride, groups, height): the layer types of EfficientNet-Lite0
LAYERS = [(3, 32, 3, 2, 1, 33), (32, 16, 1, 1, 1, 16), (96, 96, 3, 2, 96, 16), (144, 144, 3, 1, 144, 8),
          (144, 144, 5, 2, 144, 8), (240, 240, 5, 1, 240, 4), (1152, 320, 1, 1, 1, 2)]


def slow2d(x, conv):
    """ATen's Slow2d on `conv`'s weights (NNPACK and oneDNN off), the kernel the pin runs below 16 images."""
    with kernel_flags(nnpack=False, onednn=False):
        return conv(x) if not isinstance(conv, PinnedConv2d) else F.conv2d(
            x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


@pytest.mark.parametrize("batch", [1, 20])  # 20: torch's own choice is NNPACK from 16 images
@pytest.mark.parametrize("layer", LAYERS, ids=lambda s: "x".join(map(str, s)))
def test_pinned_conv_matches_torch_and_slow2d(layer, batch):
    cin, cout, k, s, groups, h = layer
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=True).eval()
    pinned = PinnedConv2d.from_conv(conv)
    assert pinned.kind == (DENSE if groups == 1 else DEPTHWISE)
    x = torch.randn(batch, cin, h, h)
    with torch.inference_mode():
        ref, fast, slow = conv(x), pinned(x), slow2d(x, conv)
    assert fast.shape == ref.shape and fast.is_contiguous()
    assert (fast - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert torch.equal(fast, slow)  # dense: the same kernel; depthwise: oneDNN's taps summed in Slow2d's order


def test_single_pixel_depthwise_output_is_close_not_bitwise():
    """A depthwise output of one pixel: Slow2d's gemm is then a dot product MKL reduces in its own order (an ulp off
    oneDNN's tap-by-tap sum); the pinned kernel stays within 1e-6 of the largest value."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(672, 672, 5, 2, 0, groups=672, bias=False).eval()
    x = torch.randn(16, 672, 5, 5)
    with torch.inference_mode():
        fast, slow = PinnedConv2d.from_conv(conv)(x), slow2d(x, conv)
    assert fast.shape == (16, 672, 1, 1)
    assert (fast - slow).abs().max() <= 1e-6 * slow.abs().max()


def test_swap_keeps_parameters_and_features_of_a_timm_model():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
    keys = list(model.state_dict())
    params = {id(p) for p in model.parameters()}
    x = torch.rand(20, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        ref = model(x)
    counts = swap_convs(model)
    assert counts == {DENSE: 33, DEPTHWISE: 16, "left": 0}  # Conv2dSame (stride-2 layers) included
    assert sum(isinstance(m, PinnedConv2d) for m in model.modules()) == 49
    assert list(model.state_dict()) == keys and {id(p) for p in model.parameters()} == params
    assert swap_convs(model) == {DENSE: 0, DEPTHWISE: 0, "left": 0}  # idempotent
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as dxrag runs (`threads: 1`): with more, ATen splits a batch across threads while one
    try:                      # image's gemm gets them all, and MKL then blocks it otherwise (measured: not bitwise)
        with torch.inference_mode():
            fast = model(x)
            alone = torch.cat([model(x[i:i + 1]) for i in (0, 7, 19)])
    finally:
        torch.set_num_threads(threads)
    assert (fast - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert torch.equal(alone, fast[[0, 7, 19]])  # per-image kernels: an image's features do not depend on its batch
    rows = check_depthwise(model, x[:2])
    assert len(rows) == 16 and all(r["max_abs_diff"] == 0.0 for r in rows)


def test_training_runs_the_original_kernel():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 32, 3, 1, 1, groups=32)
    pinned = PinnedConv2d.from_conv(conv)
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    out = pinned(x)
    assert out.grad_fn is not None and "Convolution" in type(out.grad_fn).__name__
    out.sum().backward()
    assert conv.weight.grad is not None and x.grad is not None  # the shared Parameter got the gradient


def test_conv_kind_leaves_other_convolutions_alone():
    assert conv_kind(torch.nn.Conv2d(8, 16, 3, groups=4)) is None  # grouped, not depthwise
    assert conv_kind(torch.nn.Conv2d(8, 16, 3, groups=8)) is None  # channel multiplier 2
    assert conv_kind(torch.nn.Conv2d(8, 8, 3, dilation=2)) is None
    assert conv_kind(torch.nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")) is None
    assert conv_kind(torch.nn.Conv2d(8, 8, 3, padding="same")) is None
    assert conv_kind(torch.nn.Conv1d(8, 8, 3)) is None
    with pytest.raises(ValueError, match="not a dense or depthwise"):
        PinnedConv2d.from_conv(torch.nn.Conv2d(8, 16, 3, groups=4))
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, dilation=2), torch.nn.Conv2d(8, 8, 1))
    assert swap_convs(model) == {DENSE: 1, DEPTHWISE: 0, "left": 1}
    assert type(model[0]) is torch.nn.Conv2d and isinstance(model[1], PinnedConv2d)


def test_pin_convs_swaps_under_the_pin_only_and_keeps_the_pinned_features():
    """`pin_convs` (what encoders, the probe and readers call on load): under the pin (oneDNN and NNPACK off) it swaps,
    and EfficientNet-Lite0's features stay bitwise what the pin computed before at 64 px; natively it does nothing."""
    timm = pytest.importorskip("timm")
    from dxrag.core.fast_convs import pin_convs

    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
    x = torch.rand(20, 3, 64, 64) * 2 - 1
    with kernel_flags(nnpack=True, onednn=True):
        assert pin_convs(model) is None
    assert not any(isinstance(m, PinnedConv2d) for m in model.modules())
    with kernel_flags(nnpack=False, onednn=False), torch.inference_mode():
        before = model(x)
        assert pin_convs(model) == {DENSE: 33, DEPTHWISE: 16, "left": 0}
        assert torch.equal(model(x), before)


def test_encoders_load_with_pinned_convs():
    """The retrieval encoder's image tower is swapped on load under the pin (the test session runs pinned)."""
    pytest.importorskip("open_clip")
    from dxrag.core.retrieval.encoders import Encoder

    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1, groups=4), torch.nn.Conv2d(4, 8, 1))
    with kernel_flags(nnpack=False, onednn=False):
        Encoder(model, "test")
    assert all(isinstance(m, PinnedConv2d) for m in model)
