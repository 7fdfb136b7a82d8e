"""Real-weight readers for the `real` tests, and the independent teacher-forcing reference they are checked against.

`smollm2_llava`: the real SmolLM2-135M-Instruct (weights cache) as the language model of a LlavaForConditionalGeneration
with a small random CLIP vision tower, the real BPE tokenizer plus an `<image>` token, and SmolLM2's chat template
extended to image parts: what the tokenizer and scoring checks need, at a fraction of the cost of a pretrained vision
tower (the text side is what they test).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dxrag_test_support import real_weights
from dxrag.core.reader.build import SMOLLM2_SYSTEM, chatml_template

# SmolLM2-Instruct's own template (its default system turn included) with list content and image parts
SMOLLM2_IMAGE_TEMPLATE = chatml_template(SMOLLM2_SYSTEM, "<image>")

def smollm2_llava(out: Path) -> Path:
    """Build and save (bf16) the SmolLM2 LLaVA reader; the language model's weights are SmolLM2's unchanged, the new
    `<image>` embedding row is the mean of the others."""
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig,
                              LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)

    lm_dir = real_weights("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    text_config = AutoConfig.from_pretrained(lm_dir)
    vocab = text_config.vocab_size
    text_config.vocab_size = len(tokenizer)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=32, patch_size=16),
        text_config=text_config, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # the text config's dtype (bfloat16) would otherwise build the language model in bf16
        model = LlavaForConditionalGeneration(config).float()
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    state = lm.model.state_dict()
    embed = state["embed_tokens.weight"]
    state["embed_tokens.weight"] = torch.cat([embed, embed.mean(0, keepdim=True).expand(len(tokenizer) - vocab, -1)])
    model.model.language_model.load_state_dict(state)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                  crop_size={"height": 32, "width": 32}),
                               tokenizer=tokenizer, patch_size=16, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1,  # CLIP's CLS token, dropped by "default"
                               image_token="<image>", chat_template=SMOLLM2_IMAGE_TEMPLATE)
    model.to(torch.bfloat16).save_pretrained(out)
    processor.save_pretrained(out)
    return out


def teacher_forced(reader, query, context, answers, root: Path, end: str = "") -> torch.Tensor:
    """Reference candidate scores, independent of the reader's own answer tokenisation: for each answer, the processor
    tokenizes the whole text prompt + answer (+ `end`); log p of the tokens after the prompt's from one forward pass,
    summed; then normalised over the answers (float64)."""
    from dxrag.core.base.dataset import open_image
    from dxrag.core.reader.prompts import prompt_images, render_prompt

    prompt = render_prompt(reader.processor, query, context, answers)
    images = [open_image(root / rel) for rel in prompt_images(query, context)]
    model = reader.hf_model
    dtype = model.dtype

    def inputs(text):
        out = reader.processor(text=[text], images=[images], return_tensors="pt", add_special_tokens=False)
        return {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in out.items()}

    base = inputs(prompt)["input_ids"][0]
    totals = []
    with torch.inference_mode():
        for answer in answers:
            full = inputs(prompt + answer + end)
            ids = full["input_ids"][0]
            assert torch.equal(ids[:len(base)], base), f"the prompt's tokens change when {answer!r} follows it"
            logp = torch.log_softmax(model(**full).logits[0].float(), dim=-1)
            targets = ids[len(base):]
            totals.append(float(logp[torch.arange(len(base) - 1, len(ids) - 1), targets].sum()))
    return torch.log_softmax(torch.tensor(totals, dtype=torch.float64), dim=0)
