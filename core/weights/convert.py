"""Conversion recipes: a verified payload -> the directory layout dxrag loads. Each recipe writes into `out` (a
temporary directory the caller renames into place) and imports its heavy libraries when it runs.

Weights are read with `torch.load(weights_only=True)` or from GGUF tensors (plain arrays, no code) and written as
safetensors.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

EFFICIENTNET_FILE = "model.safetensors"


def efficientnet_timm(src, payload: list[Path], out: Path) -> None:
    """A lukemelas-named EfficientNet state dict -> timm's `tf_efficientnet_lite0` state dict, matched by position
    (both list the same 296 tensors in the same order; every shape is checked), saved fp32 as model.safetensors."""
    import timm
    import torch
    from safetensors.torch import save_file

    from . import WeightsError

    state = torch.load(payload[0], map_location="cpu", weights_only=True)
    model = timm.create_model(src.options["timm_model"], pretrained=False)
    target = model.state_dict()
    if len(state) != len(target):
        raise WeightsError(f"weights {src.name!r}: {payload[0]} holds {len(state)} tensors, timm's "
                           f"{src.options['timm_model']} {len(target)}; the position mapping does not apply")
    mapped = {}
    for (theirs, tensor), (ours, expected) in zip(state.items(), target.items()):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise WeightsError(f"weights {src.name!r}: tensor {theirs} {tuple(tensor.shape)} does not fit timm's "
                               f"{ours} {tuple(expected.shape)}; the position mapping does not apply")
        mapped[ours] = tensor.to(expected.dtype).contiguous()
    model.load_state_dict(mapped, strict=True)
    save_file(mapped, str(out / EFFICIENTNET_FILE), metadata={"timm_model": src.options["timm_model"]})


def copy_files(src, payload: list[Path], out: Path) -> None:
    """Copy the payload files (a transformers model directory) flat into `out`."""
    for p in payload:
        shutil.copyfile(p, out / p.name)


def gguf_transformers(src, payload: list[Path], out: Path) -> None:
    """A GGUF file -> a transformers directory in bf16 safetensors (config, weights, tokenizer, generation config,
    chat template). transformers loads GGUF dequantised but refuses to save such a model, so a fresh model is built
    from the config without its quantization_config and given the state dict. With `tie_word_embeddings`, the
    separate `output.weight` (equal to the embedding up to quantisation noise) is dropped for the tied embedding."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(payload[0])
    directory, filename = str(gguf.parent), gguf.name
    # float32 is the dequantised values exactly (the fastest GGUF load); bf16 happens once, in the fresh model
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if src.options.get("tie_word_embeddings"):
        config.tie_word_embeddings = True
        if hasattr(config, "get_text_config"):
            config.get_text_config().tie_word_embeddings = True
    state = loaded.state_dict()
    generation_config = loaded.generation_config
    del loaded
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        from . import WeightsError

        raise WeightsError(f"weights {src.name!r}: the GGUF state dict does not fit {type(model).__name__} (missing "
                           f"{missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


RECIPES: dict[str, Callable] = {
    "efficientnet-timm": efficientnet_timm,
    "copy": copy_files,
    "gguf-transformers": gguf_transformers,
}
