"""A Qwen2-VL reader around a real pretrained Qwen2 language model: `Qwen2VLForConditionalGeneration` whose language
model is the Qwen2.5 LLM unchanged (its state dict loads as is; M-RoPE on text positions is its 1-D RoPE, so the
text-only logits are the LLM's), the LLM's own 151,936-id tokenizer, a Qwen2-VL chat template (the LLM's template
is text-only and fails on image parts) and a Qwen2-VL vision tower at random init sized by `VisionTowerSettings`.

Written as an ordinary Hugging Face directory, so `Reader.from_config(ReaderSettings(model=<dir>))` loads it like any
checkpoint and both scoring paths (generic and the cached-vision fast path) apply. No pretrained Qwen2-VL vision
tower installs offline here: the tower learns from scratch with the reader (or stays what the tests need: a vision
input the scoring paths must handle identically).

    from dxrag.core import weights
    from dxrag.core.reader.qwen2vl import assemble
    assemble(weights.path("qwen2.5-0.5b-instruct"), "trained/qwen2vl-0.5b")
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..base.fsutil import atomic_dir

# M-RoPE split of the rotary half-dimension (temporal, height, width): Qwen2-VL's [16, 24, 24] scaled to the
# 0.5B's head_dim 64 (sums to 32)
MROPE_SECTION = (8, 12, 12)

# Qwen2-VL-Instruct's chat template (its default system turn; images as <|vision_start|><|image_pad|><|vision_end|>)
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


@dataclass
class VisionTowerSettings:
    """The randomly initialised Qwen2-VL vision tower and the processor's image size. An image of `image_size`²
    pixels is (image_size / patch_size)² patches, merged 2x2 into (image_size / 28)² language-model tokens (224: 64,
    112: 16, 56: 4)."""

    depth: int = 2
    embed_dim: int = 128
    heads: int = 4
    mlp_ratio: int = 2
    patch_size: int = 14
    image_size: int = 224

    def check(self) -> None:
        if self.image_size % (2 * self.patch_size):
            raise ValueError(f"image_size {self.image_size} must be a multiple of 2 x patch_size = "
                             f"{2 * self.patch_size} (2x2 patches merge into one token)")
        if self.embed_dim % self.heads:
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by heads {self.heads}")


def assemble(lm_dir: str | os.PathLike, out: str | os.PathLike, vision: VisionTowerSettings | None = None,
             seed: int = 0, dtype: str = "bfloat16") -> Path:
    """Write the Qwen2-VL reader of the Qwen2 LLM in `lm_dir` (a transformers directory: config, safetensors,
    tokenizer) to `out` atomically, weights in `dtype`. Raises ValueError naming what is wrong with `lm_dir`."""
    import torch
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor,
                              Qwen2VLVideoProcessor)

    vision = vision or VisionTowerSettings()
    vision.check()
    lm_dir = Path(lm_dir)
    text = AutoConfig.from_pretrained(lm_dir)
    if text.model_type != "qwen2":
        raise ValueError(f"{lm_dir}: model type {text.model_type!r}; the Qwen2-VL reader takes a Qwen2 language "
                         f"model (qwen2)")
    head_dim = text.hidden_size // text.num_attention_heads
    if 2 * sum(MROPE_SECTION) != head_dim:
        raise ValueError(f"{lm_dir}: head_dim {head_dim}; mrope_section {list(MROPE_SECTION)} needs head_dim "
                         f"{2 * sum(MROPE_SECTION)}")
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    ids = tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))
    if tokenizer.unk_token_id in ids or None in ids:
        raise ValueError(f"{lm_dir}: the tokenizer lacks Qwen's vision tokens {list(VISION_TOKENS)}")
    text_config = text.to_dict()
    for key in ("architectures", "model_type", "_name_or_path", "transformers_version", "dtype"):
        text_config.pop(key, None)
    rope = dict(text_config.pop("rope_parameters", None) or {"rope_type": "default",
                                                            "rope_theta": text_config.pop("rope_theta")})
    text_config["rope_parameters"] = {**rope, "mrope_section": list(MROPE_SECTION)}
    image, video, start, end = ids
    config = Qwen2VLConfig(
        text_config=text_config, image_token_id=image, video_token_id=video, vision_start_token_id=start,
        vision_end_token_id=end, tie_word_embeddings=bool(text.tie_word_embeddings),
        vision_config=dict(depth=vision.depth, embed_dim=vision.embed_dim, num_heads=vision.heads,
                           mlp_ratio=vision.mlp_ratio, hidden_size=text.hidden_size, patch_size=vision.patch_size,
                           spatial_merge_size=2, temporal_patch_size=2))
    from transformers.initialization import no_init_weights
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    with no_init_weights():  # the language model's weights are loaded below: skip initialising 0.5 B of them
        model = Qwen2VLForConditionalGeneration(config).float()  # fp32 whatever dtype the text config names
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.model.visual = Qwen2VisionTransformerPretrainedModel._from_config(config.vision_config,
                                                                                dtype=torch.float32)
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).eval()
    model.model.language_model.load_state_dict(lm.model.state_dict())
    if text.tie_word_embeddings:
        # built without initialisation, the output layer is not tied yet: tie it, or an untied garbage lm_head is saved
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    else:
        model.lm_head.load_state_dict(lm.lm_head.state_dict())
    probe = tokenizer(["The capital of France is"], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        gap = float((model.eval()(input_ids=probe).logits - lm(input_ids=probe).logits).abs().max())
    if gap > 1e-4:
        raise ValueError(f"{lm_dir}: the assembled reader's text-only logits differ from the language model's by "
                         f"{gap:.3g}; its weights did not load as they are")
    del lm
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    pixels = vision.image_size ** 2
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels, patch_size=vision.patch_size),
        tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.to(getattr(torch, dtype)).save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
    return out
