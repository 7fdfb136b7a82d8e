"""The random-weight tiny reader of every family, for tests and benchmarks: an offline word-level tokenizer, each
family's tiny processor and model builder, and `build_tiny` (moved out of `families`, which registers these builders
in `FAMILIES` and still re-exports the names other modules import from it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch

from .prompts import PROMPT_WORDS
from .settings import TinyReaderSettings

if TYPE_CHECKING:
    from .families import Family

UNK_TOKEN = "[UNK]"


@dataclass(frozen=True)
class ChatFormat:
    """The strings of a family's chat template around one user turn (the tiny processors' template and vocabulary)."""

    user_start: str
    user_end: str
    assistant_start: str
    image: str  # what an {"type": "image"} part renders to (the processor expands it)
    bos: str = ""
    words: tuple[str, ...] = ()  # further words the tiny vocabulary holds (the Qwen tiny reader's "system")

    def template(self) -> str:
        return (self.bos + "{% for message in messages %}" + self.user_start +
                "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
                "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + self.image +
                "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}" +
                self.user_end + "{% endfor %}{% if add_generation_prompt %}" + self.assistant_start + "{% endif %}")


# ------------------------------------------------------------------------------------------------ tiny builders


def word_tokenizer(words: Iterable[str], answers: Iterable[str], specials: Iterable[str], pad: str, eos: str,
                   bos: str | None = None, named: dict[str, str] | None = None):
    """An offline word-level fast tokenizer: every word is a token, every answer string one token (a whole word),
    plus special tokens (`named` ones also become tokenizer attributes such as `boi_token`)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    splitter = pre_tokenizers.Whitespace()
    answers = sorted({a.strip() for a in answers if a.strip()})
    vocab_words = set()
    for text in list(words) + answers:
        vocab_words.update(w for w, _ in splitter.pre_tokenize_str(text))
    vocab = {UNK_TOKEN: 0, **{w: i + 1 for i, w in enumerate(sorted(vocab_words))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = splitter
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    specials = list(dict.fromkeys([*specials, pad, eos] + ([bos] if bos else [])))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.add_tokens([AddedToken(a, single_word=True, normalized=False) for a in answers])
    extra = {"extra_special_tokens": dict(named)} if named else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=UNK_TOKEN, pad_token=pad, eos_token=eos,
                                   bos_token=bos, padding_side="left", **extra)


def template_words(chat: ChatFormat, specials: Iterable[str]) -> list[str]:
    """The plain words of a chat format (what remains after removing its special tokens)."""
    text = " ".join([chat.user_start, chat.user_end, chat.assistant_start, chat.image, chat.bos, *chat.words])
    for s in sorted(specials, key=len, reverse=True):
        text = text.replace(s, " ")
    return [text]


def build_tiny_processor(family: Family, texts: Iterable[str], answers: Iterable[str], settings: TinyReaderSettings):
    """The family's processor over an offline word-level tokenizer built from `texts` and `answers`."""
    chat = family.chat
    assert chat is not None and family.tiny_processor is not None
    specials = list(dict.fromkeys([*family.special_tokens, *family.named_tokens.values()]))
    words = list(texts) + list(PROMPT_WORDS) + template_words(chat, specials + [family.end_token])
    tokenizer = word_tokenizer(words, answers, specials, pad=family.special_tokens[0], eos=family.end_token,
                               bos=chat.bos or None, named=family.named_tokens)
    return family.tiny_processor(tokenizer, chat.template(), settings)


def _ids(tokenizer, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def _text(tokenizer, s: TinyReaderSettings, **extra) -> dict:
    """A text-config dict for the tiny LLM (Llama/Qwen2/Mistral/Gemma-style keys)."""
    text = dict(vocab_size=len(tokenizer), hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.heads,
                head_dim=s.hidden_size // s.heads, max_position_embeddings=s.max_position_embeddings,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id)
    return {**text, **extra}


def _vision(s: TinyReaderSettings, **extra) -> dict:
    return dict(hidden_size=s.vision_dim, intermediate_size=2 * s.vision_dim, num_hidden_layers=s.vision_depth,
                num_attention_heads=s.vision_heads, **extra)


def _seeded(build: Callable[[], Any], seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


# Qwen2-VL family ------------------------------------------------------------------------------------------------

QWEN_CHAT = ChatFormat("<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n",
                       "<|vision_start|><|image_pad|><|vision_end|>", words=("system",))
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>")


def _qwen_processor(patch: int | None):
    """Every image resized to 2x2 merged patches (4 LLM tokens); `patch` None: the settings' patch size."""
    def build(tokenizer, template: str, settings: TinyReaderSettings):
        from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

        size = patch or settings.patch_size
        pixels = (size * 4) ** 2
        images = Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels, patch_size=size)
        return Qwen2VLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
                                chat_template=template)
    return build


def _qwen_tokens(tok) -> dict:
    image, video, start, end = _ids(tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    return dict(image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end)


def _mrope(s: TinyReaderSettings, **extra) -> dict:
    head_dim = s.hidden_size // s.heads
    if sum(s.mrope_section) * 2 != head_dim:
        raise ValueError(f"tiny reader: mrope_section {s.mrope_section} must sum to head_dim/2 = {head_dim // 2} "
                         f"(hidden_size {s.hidden_size} / heads {s.heads} / 2)")
    return {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(s.mrope_section), **extra}


def tiny_qwen2_vl(tok, s: TinyReaderSettings):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = _text(tok, s, rope_parameters=_mrope(s), bos_token_id=None)
    text.pop("head_dim")
    config = Qwen2VLConfig(
        text_config=text, **_qwen_tokens(tok),
        vision_config=dict(depth=s.vision_depth, embed_dim=s.vision_dim, hidden_size=s.hidden_size,
                           num_heads=s.vision_heads, mlp_ratio=2, patch_size=s.patch_size, spatial_merge_size=2,
                           temporal_patch_size=2))
    return Qwen2VLForConditionalGeneration(config)


def tiny_qwen2_5_vl(tok, s: TinyReaderSettings):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = _text(tok, s, rope_parameters=_mrope(s), bos_token_id=None)
    text.pop("head_dim")
    config = Qwen2_5_VLConfig(
        text_config=text, **_qwen_tokens(tok),
        vision_config=dict(depth=s.vision_depth, hidden_size=s.vision_dim, intermediate_size=2 * s.vision_dim,
                           num_heads=s.vision_heads, out_hidden_size=s.hidden_size, patch_size=s.patch_size,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=2 * s.patch_size * 2,
                           fullatt_block_indexes=[s.vision_depth - 1]))
    return Qwen2_5_VLForConditionalGeneration(config)


def tiny_qwen3_vl(tok, s: TinyReaderSettings):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text = _text(tok, s, rope_parameters=_mrope(s, mrope_interleaved=True), bos_token_id=None)
    config = Qwen3VLConfig(
        text_config=text, **_qwen_tokens(tok),
        vision_config=dict(depth=s.vision_depth, hidden_size=s.vision_dim, intermediate_size=2 * s.vision_dim,
                           num_heads=s.vision_heads, out_hidden_size=s.hidden_size, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[0]))
    return Qwen3VLForConditionalGeneration(config)


# LLaVA with a Pixtral vision tower (Pixtral-12B) -----------------------------------------------------------------

PIXTRAL_CHAT = ChatFormat("[INST]", "[/INST]", "", "[IMG]", bos="<s>")


def _pixtral_processor(tokenizer, template: str, settings: TinyReaderSettings):
    from transformers import PixtralImageProcessor, PixtralProcessor

    images = PixtralImageProcessor(size={"longest_edge": 32}, patch_size=16)
    return PixtralProcessor(image_processor=images, tokenizer=tokenizer, patch_size=16, spatial_merge_size=1,
                            chat_template=template)


def tiny_pixtral(tok, s: TinyReaderSettings):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=dict(model_type="pixtral", image_size=32, patch_size=16, head_dim=s.vision_dim // s.vision_heads,
                           **_vision(s)),
        text_config=dict(model_type="mistral", **_text(tok, s)), image_token_index=_ids(tok, "[IMG]")[0],
        vision_feature_select_strategy="full", vision_feature_layer=-1, projector_hidden_act="gelu")
    return LlavaForConditionalGeneration(config)


# Gemma 3 / MedGemma ----------------------------------------------------------------------------------------------

GEMMA_CHAT = ChatFormat("<start_of_turn>user\n", "<end_of_turn>\n", "<start_of_turn>model\n", "<start_of_image>",
                        bos="<bos>")
GEMMA_NAMED = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}


def _gemma3_processor(tokenizer, template: str, settings: TinyReaderSettings):
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    images = Gemma3ImageProcessor(size={"height": 32, "width": 32})
    return Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=4, chat_template=template)


def tiny_gemma3(tok, s: TinyReaderSettings):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    boi, eoi, image = _ids(tok, *GEMMA_NAMED.values())
    config = Gemma3Config(
        text_config=_text(tok, s, sliding_window=s.max_position_embeddings, query_pre_attn_scalar=s.hidden_size // s.heads),
        vision_config=dict(model_type="siglip_vision_model", image_size=32, patch_size=8, **_vision(s)),
        mm_tokens_per_image=4, boi_token_index=boi, eoi_token_index=eoi, image_token_index=image)
    model = Gemma3ForConditionalGeneration(config)
    # zero-initialised projector: images would have no effect at all on a random-weight model
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.5)
    return model


# Idefics3 --------------------------------------------------------------------------------------------------------

IDEFICS3_CHAT = ChatFormat("<|im_start|>User:", "<end_of_utterance>\n", "Assistant:", "<image>")
IDEFICS3_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                     "<global-img>", *[f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])


def _idefics3_processor(tokenizer, template: str, settings: TinyReaderSettings):
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    images = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": 32},
                                    max_image_size={"longest_edge": 32})
    return Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4, chat_template=template)


def tiny_idefics3(tok, s: TinyReaderSettings):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    config = Idefics3Config(vision_config=_vision(s, image_size=32, patch_size=8),
                            text_config=dict(model_type="llama", **_text(tok, s)), scale_factor=2,
                            image_token_id=_ids(tok, "<image>")[0])
    return Idefics3ForConditionalGeneration(config)


# InternVL --------------------------------------------------------------------------------------------------------

INTERNVL_NAMED = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                  "video_token": "<video>"}
INTERNVL_CHAT = ChatFormat("<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n", "<IMG_CONTEXT>")


def _internvl_processor(tokenizer, template: str, settings: TinyReaderSettings):
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    images = GotOcr2ImageProcessor(size={"height": 32, "width": 32}, crop_to_patches=False)
    return InternVLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=InternVLVideoProcessor(),
                             image_seq_length=4, chat_template=template)


def tiny_internvl(tok, s: TinyReaderSettings):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    config = InternVLConfig(vision_config=_vision(s, image_size=[32, 32], patch_size=[8, 8]),
                            text_config=dict(model_type="qwen2", **_text(tok, s)), downsample_ratio=0.5,
                            image_token_id=_ids(tok, "<IMG_CONTEXT>")[0])
    return InternVLForConditionalGeneration(config)


# LLaVA-OneVision -------------------------------------------------------------------------------------------------

ONEVISION_CHAT = ChatFormat("<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n", "<image>")


def _onevision_processor(tokenizer, template: str, settings: TinyReaderSettings):
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    images = LlavaOnevisionImageProcessor(size={"height": 32, "width": 32}, image_grid_pinpoints=[[32, 32]])
    return LlavaOnevisionProcessor(image_processor=images, tokenizer=tokenizer,
                                   video_processor=LlavaOnevisionVideoProcessor(), num_image_tokens=16,
                                   vision_feature_select_strategy="full", chat_template=template)


def tiny_onevision(tok, s: TinyReaderSettings):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", image_size=32, patch_size=8, **_vision(s)),
        text_config=dict(model_type="qwen2", **_text(tok, s)), image_grid_pinpoints=[[32, 32]],
        image_token_index=_ids(tok, "<image>")[0], video_token_index=_ids(tok, "<video>")[0],
        vision_feature_select_strategy="full", vision_feature_layer=-1)
    return LlavaOnevisionForConditionalGeneration(config)


# Mllama (Llama 3.2 Vision) ---------------------------------------------------------------------------------------

MLLAMA_CHAT = ChatFormat("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>",
                         "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|image|>", bos="<|begin_of_text|>")


def _mllama_processor(tokenizer, template: str, settings: TinyReaderSettings):
    from transformers import MllamaImageProcessor, MllamaProcessor

    images = MllamaImageProcessor(size={"height": 32, "width": 32}, max_image_tiles=1)
    return MllamaProcessor(image_processor=images, tokenizer=tokenizer, chat_template=template)


def tiny_mllama(tok, s: TinyReaderSettings):
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    # one more layer, the second cross-attending: the cache's length is read from layer 0 (self-attention), and
    # self-attention after the cross-attention carries the context image (seen by the context text) to the answer
    text = _text(tok, s, num_hidden_layers=s.layers + 1, cross_attention_layers=[1],
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    text.pop("head_dim")
    config = MllamaConfig(
        vision_config=dict(hidden_size=s.vision_dim, intermediate_size=2 * s.vision_dim, num_hidden_layers=2,
                           num_global_layers=1, attention_heads=s.vision_heads, image_size=32, patch_size=8,
                           max_num_tiles=1, vision_output_dim=2 * s.vision_dim, intermediate_layers_indices=[0],
                           supported_aspect_ratios=[[1, 1]]),
        text_config=text, image_token_index=_ids(tok, "<|image|>")[0])
    model = MllamaForConditionalGeneration(config)
    with torch.no_grad():  # zero-initialised gates: the cross-attention layers would ignore the images
        for name, p in model.named_parameters():
            if "cross_attn_attn_gate" in name or "cross_attn_mlp_gate" in name:
                p.fill_(1.0)
    return model


# LLaVA with a timm CNN tower (transformers' `fast_vlm`: EfficientNet-Lite0 + SmolLM2, core/reader/build.py) --------


def _timm_processor(tokenizer, template: str, settings: TinyReaderSettings):
    from transformers import CLIPImageProcessor, LlavaProcessor

    images = CLIPImageProcessor(size={"height": 64, "width": 64}, do_center_crop=False, image_mean=[0.5] * 3,
                                image_std=[0.5] * 3)
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=32,
                          vision_feature_select_strategy="full", image_token="<image>", chat_template=template)


def tiny_timm_llava(tok, s: TinyReaderSettings):
    """timm's `test_efficientnet` (64x64 -> a 2x2 map of 256 channels) + a tiny Llama, as `fast_vlm`."""
    from transformers import FastVlmConfig, FastVlmForConditionalGeneration, TimmWrapperConfig

    vision = TimmWrapperConfig(architecture="test_efficientnet", do_pooling=False, num_labels=0)
    vision.hidden_size = 256
    config = FastVlmConfig(vision_config=vision, text_config=dict(model_type="llama", **_text(tok, s)),
                           image_token_index=_ids(tok, "<image>")[0], image_seq_length=4)
    model = FastVlmForConditionalGeneration(config).eval()
    # with transformers' init (normal, std 0.02) and default BatchNorm statistics the CNN's output is ~1e-14 and images
    # would have no effect: BatchNorm statistics measured on random images instead (a pretrained tower has its own)
    tower = model.model.vision_tower.timm_model
    for module in tower.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batch
    with torch.no_grad():
        tower.train()
        tower.forward_features(torch.randn(16, 3, 64, 64))
    return model.eval()


def build_tiny(family: Family, texts: Iterable[str], answers: Iterable[str], settings: TinyReaderSettings,
               seed: int = 0):
    """(processor, randomly initialised model) of `family` sized by `settings` over a word-level vocabulary."""
    processor = build_tiny_processor(family, texts, answers, settings)
    model = _seeded(lambda: family.tiny(processor.tokenizer, settings), seed)
    tok = processor.tokenizer
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return processor, model
