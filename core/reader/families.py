"""Per-model-type reader adapters, registered as data (`FAMILIES`): processor pixel budgets and call quirks, the extra
inputs a KV-cache continuation needs, LoRA targets, and the tiny random-weight builder of each family for tests (the
builders themselves live in `tiny`).

Scoring itself is generic (`model.Reader`): AutoProcessor + AutoModelForImageTextToText + the chat template. An adapter
only says what differs. Add a family by adding a `Family` to `FAMILIES` and a parametrised case to tests/reader.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .settings import TinyReaderSettings
# the tiny builders live in `tiny`; the names other modules import from here stay importable from here
from .tiny import (  # noqa: F401
    GEMMA_CHAT, GEMMA_NAMED, IDEFICS3_CHAT, IDEFICS3_SPECIALS, INTERNVL_CHAT, INTERNVL_NAMED, MLLAMA_CHAT,
    ONEVISION_CHAT, PIXTRAL_CHAT, QWEN_CHAT, QWEN_SPECIALS, UNK_TOKEN, ChatFormat, _gemma3_processor,
    _idefics3_processor, _internvl_processor, _mllama_processor, _onevision_processor, _pixtral_processor,
    _qwen_processor, _qwen_tokens, _timm_processor, build_tiny, build_tiny_processor, template_words, tiny_gemma3,
    tiny_idefics3, tiny_internvl, tiny_mllama, tiny_onevision, tiny_pixtral, tiny_qwen2_5_vl, tiny_qwen2_vl,
    tiny_qwen3_vl, tiny_timm_llava, word_tokenizer)

# Every projection of the language model's attention and MLP (cross-attention layers included), none of the vision
# tower's; `{lm}` is the language model's module name.
LORA_TEMPLATE = r".*{lm}.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass(frozen=True)
class Family:
    """What one model type needs beyond the generic path. Callables take the HF processor / model / settings."""

    model_type: str
    language_model: str = "language_model"  # module holding the LLM (LoRA targets)
    # from_pretrained kwargs of the processor for a `max_pixels` budget; None: the processor resizes to a fixed size
    pixel_budget: Callable[[int], dict] | None = None
    # kwargs for every processor call (e.g. re-asserting a saved image-processor setting the call defaults override)
    call_kwargs: Callable[[Any], dict] = lambda processor: {}
    drop_inputs: tuple[str, ...] = ()  # processor outputs the model must not get
    # per-token processor outputs besides input_ids/attention_mask, and their value at appended answer tokens:
    # a number, or "repeat" (copy the prompt's last position; Mllama's cross-attention mask)
    tail_fill: dict[str, float | str] = field(default_factory=dict)
    # inputs the prompt's forward leaves for its continuation: (model, processor inputs) -> state per row; computed
    # before the prompt's forward, which takes the state's `position_ids` when it has them
    prefill_state: Callable[[Any, dict], dict] | None = None
    # extra kwargs of a continuation of T tokens for rows `rows` of the prompt batch: (state, rows, T) -> kwargs
    continuation: Callable[[dict, torch.Tensor, int], dict] | None = None
    # batch only prompts with the same number of images (Mllama: a closed-book prompt batched with two-image prompts
    # moved log p by 4e-3, measured; its padded image slot is not exactly neutral)
    same_image_count: bool = False
    fast_path: bool = False  # the cached-vision-features path (model.Reader._fast_*) equals the generic one (tested)
    chat: ChatFormat | None = None
    end_token: str = "<|im_end|>"  # the tiny tokenizer's end of an assistant turn
    tiny: Callable[[Any, TinyReaderSettings], Any] | None = None  # (processor parts, settings) -> model
    tiny_processor: Callable[[Any, str, TinyReaderSettings], Any] | None = None  # (tokenizer, template, settings)
    special_tokens: tuple[str, ...] = ()  # the tiny tokenizer's special tokens besides the chat format's
    named_tokens: dict[str, str] = field(default_factory=dict)  # tokenizer attributes the processor reads
    # A frozen vision tower whose output the trainable rest of the model reuses: `tower_features(model, pixels)` ->
    # (images, tokens, dim) before the projector and `project(model, features)` -> image-token embeddings. Families
    # with both score and train on tower features computed once per image (tower_cache.VisionFeatureCache), which a parity
    # test shows equals the generic path; `tower` / `projector` name the modules (kept frozen / trained in alignment).
    tower_features: Callable[[Any, torch.Tensor], torch.Tensor] | None = None
    project: Callable[[Any, torch.Tensor], torch.Tensor] | None = None
    tower: str | None = None
    projector: str | None = None

    @property
    def lora_targets(self) -> str:
        return LORA_TEMPLATE.format(lm=self.language_model)


# ------------------------------------------------------------------------------------------------ continuation hooks


def mrope_state(model, inputs: dict) -> dict:
    """Qwen M-RoPE: the position after each prompt, from the model's own rope index (text continues past images),
    and the prompt's positions themselves (`position_ids`: the prompt's forward takes them instead of computing the
    rope index a second time)."""
    base = model.model
    kwargs = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "mm_token_type_ids") if k in inputs}
    positions, _ = base.get_rope_index(inputs["input_ids"], attention_mask=inputs["attention_mask"], **kwargs)
    masked = positions.masked_fill(inputs["attention_mask"][None] == 0, -1)
    return {"next_position": masked.amax(dim=(0, 2)) + 1, "position_ids": positions}


def mrope_continuation(state: dict, rows: torch.Tensor, steps: int) -> dict:
    pos = state["next_position"][rows][:, None] + torch.arange(steps, device=rows.device)[None]
    return {"position_ids": pos.unsqueeze(0).expand(3, -1, -1)}


def cross_attention_state(model, inputs: dict) -> dict:
    return {"cross_attention_mask": inputs["cross_attention_mask"]}


def cross_attention_continuation(state: dict, rows: torch.Tensor, steps: int) -> dict:
    """Mllama: continuation tokens attend to the images the prompt's last token attends to."""
    last = state["cross_attention_mask"][rows][:, -1:]
    return {"cross_attention_mask": last.expand(-1, steps, -1, -1)}


# ------------------------------------------------------------------------------------------------ tower hooks


def timm_tower_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """The timm tower's last feature map as a token sequence (what FastVlmModel.get_image_features projects)."""
    tower = model.model.vision_tower
    return tower(pixels.to(tower.dtype), return_dict=True).last_hidden_state.flatten(2).transpose(1, 2)


def llava_project(model, features: torch.Tensor) -> torch.Tensor:
    return model.model.multi_modal_projector(features)


# ------------------------------------------------------------------------------------------------ registry

_QWEN = dict(pixel_budget=lambda n: {"max_pixels": n}, prefill_state=mrope_state, continuation=mrope_continuation,
             tail_fill={"mm_token_type_ids": 0}, chat=QWEN_CHAT, special_tokens=QWEN_SPECIALS)

FAMILIES: dict[str, Family] = {f.model_type: f for f in [
    Family("qwen2_vl", fast_path=True, tiny=tiny_qwen2_vl, tiny_processor=_qwen_processor(None), **_QWEN),
    Family("qwen2_5_vl", fast_path=True, tiny=tiny_qwen2_5_vl, tiny_processor=_qwen_processor(None), **_QWEN),
    # the fast path drops Qwen3-VL's deepstack features (measured 0.12 off in log p): generic only
    Family("qwen3_vl", tiny=tiny_qwen3_vl, tiny_processor=_qwen_processor(16), **_QWEN),
    Family("llava", pixel_budget=lambda n: {"size": {"longest_edge": math.isqrt(n)}}, chat=PIXTRAL_CHAT,
           end_token="</s>", special_tokens=("<pad>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"),
           tiny=tiny_pixtral, tiny_processor=_pixtral_processor),
    Family("gemma3", tail_fill={"token_type_ids": 0}, chat=GEMMA_CHAT, end_token="<end_of_turn>",
           special_tokens=("<pad>", "<start_of_turn>"), named_tokens=GEMMA_NAMED, tiny=tiny_gemma3,
           tiny_processor=_gemma3_processor),
    Family("idefics3", language_model="text_model",
           pixel_budget=lambda n: {"size": {"longest_edge": math.isqrt(n)}}, chat=IDEFICS3_CHAT,
           end_token="<end_of_utterance>", special_tokens=IDEFICS3_SPECIALS, tiny=tiny_idefics3,
           tiny_processor=_idefics3_processor),
    # the processor call defaults crop_to_patches=True over the saved image processor's setting (13 tiles per image)
    Family("internvl", call_kwargs=lambda p: {"crop_to_patches": p.image_processor.crop_to_patches},
           chat=INTERNVL_CHAT, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
           named_tokens=INTERNVL_NAMED, tiny=tiny_internvl, tiny_processor=_internvl_processor),
    Family("llava_onevision", chat=ONEVISION_CHAT,
           special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"), tiny=tiny_onevision,
           tiny_processor=_onevision_processor),
    Family("fast_vlm", chat=ONEVISION_CHAT, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"),
           tiny=tiny_timm_llava, tiny_processor=_timm_processor, tower_features=timm_tower_features,
           project=llava_project, tower="model.vision_tower", projector="model.multi_modal_projector"),
    Family("mllama", same_image_count=True, prefill_state=cross_attention_state, continuation=cross_attention_continuation,
           tail_fill={"cross_attention_mask": "repeat"}, chat=MLLAMA_CHAT, end_token="<|eot_id|>",
           special_tokens=("<|finetune_right_pad_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|image|>",
                           "<|python_tag|>"), tiny=tiny_mllama, tiny_processor=_mllama_processor),
]}


def family_of(model_type: str, where: str) -> Family:
    """The adapter of `model_type`, or a ValueError naming `where` and the supported types."""
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"{where}: model type {model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    return family
