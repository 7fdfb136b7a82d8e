"""Assemble a small real reader from installed pretrained parts (`dxrag.core.weights`): a frozen timm CNN (EfficientNet-
Lite0) -> a fresh 2-layer projector -> an instruction-tuned LLM (SmolLM2-135M-Instruct), saved as an ordinary Hugging
Face model directory of transformers' LLaVA class with a timm tower (model type `fast_vlm`), so it loads with
`AutoModelForImageTextToText` / `AutoProcessor` like any checkpoint and no code comes from the weights directory.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..base.fsutil import atomic_dir

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
# SmolLM2's own (ChatML) template, with list-style content whose image parts render as the image token
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chatml_template(system: str | None, image: str = IMAGE_TOKEN) -> str:
    """A ChatML chat template (`<|im_start|>role\\n...<|im_end|>\\n`) whose messages may be strings or lists of
    text/image parts; `system` is the default system turn added when the conversation has none."""
    default = ("{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n" + system +
               "<|im_end|>\\n' }}{% endif %}") if system else ""
    return ("{% for message in messages %}" + default + "{{ '<|im_start|>' + message['role'] + '\\n' }}"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '" + image + "' }}"
            "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
            "{{ '<|im_end|>\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@dataclass(frozen=True)
class BuildRecipe:
    """A reader built from installed weights: vision tower, language model, image size and chat template."""

    vision: str  # weights name of a timm state dict (`model.safetensors`)
    timm_model: str  # timm architecture the state dict belongs to
    vision_dim: int  # channels of the tower's last feature map (one image token per spatial position)
    language_model: str  # weights name of a transformers causal-LM directory
    image_size: int = 112  # 28x28 MedMNIST upscaled; EfficientNet-Lite0 maps 112x112 to 4x4: 16 image tokens
    system: str | None = None  # the chat template's default system turn


# Named readers `reader.model` can give instead of a directory: built into the run directory on first use.
RECIPES: dict[str, BuildRecipe] = {
    "effnet-smollm2": BuildRecipe(vision="efficientnet-lite0", timm_model="tf_efficientnet_lite0", vision_dim=1280,
                                  language_model="smollm2-135m-instruct", system=SMOLLM2_SYSTEM),
}


def recipe_of(name: str) -> BuildRecipe | None:
    return RECIPES.get(name)


def build_reader(recipe: BuildRecipe, out: str | os.PathLike, seed: int = 0) -> Path:
    """Write the assembled reader (model with a randomly initialised projector, processor, chat template) to `out`
    atomically. Raises `WeightsError` (naming `make weights`) when a part is not installed."""
    import torch
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor, FastVlmConfig,
                              FastVlmForConditionalGeneration, LlavaProcessor, TimmWrapperConfig)

    from ..weights import load_into, path as weights_path

    lm_dir = weights_path(recipe.language_model)
    weights_path(recipe.vision)  # both parts installed before anything is built
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    tokenizer.padding_side = "left"
    text_config = AutoConfig.from_pretrained(lm_dir)
    vision_config = TimmWrapperConfig(architecture=recipe.timm_model, do_pooling=False, num_labels=0)
    vision_config.hidden_size = recipe.vision_dim
    config = FastVlmConfig(vision_config=vision_config, text_config=text_config,
                           image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FastVlmForConditionalGeneration(config)
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    tower = model.model.vision_tower.timm_model
    load_into(tower, recipe.vision)  # the ImageNet classifier has no place in the tower
    # the processor counts image tokens as (size // patch)^2: the patch is the size over the tower's (padded) grid
    with torch.no_grad():
        grid = tower.forward_features(torch.zeros(1, 3, recipe.image_size, recipe.image_size)).shape[-1]
    if recipe.image_size % grid:
        raise ValueError(f"reader recipe: image_size {recipe.image_size} is not a multiple of the tower's "
                         f"{grid}x{grid} feature grid; choose a size the grid divides")
    tokens = model.config.image_seq_length = grid * grid
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.text_config.vocab_size = len(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    images = CLIPImageProcessor(size={"height": recipe.image_size, "width": recipe.image_size}, do_center_crop=False,
                                resample=3, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_convert_rgb=True)
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=recipe.image_size // grid,
                               vision_feature_select_strategy="full", image_token=IMAGE_TOKEN,
                               chat_template=chatml_template(recipe.system))
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
    log.info("built reader %s: %s + %s, %d image tokens per image", out, recipe.vision, recipe.language_model, tokens)
    return out
