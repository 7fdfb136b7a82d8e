"""The reader's settings: one dataclass per concern, filled as is by the `reader:` section of a run's YAML and taken as
is by `Reader.from_config` and `finetune`. Torch-free, so `dxrag.core.config` can build them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SCORING_MODES = ("auto", "first_token", "full")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class LoraSettings:
    """PEFT LoRA adapter settings (the paper's settings, docs/design.md: rank 8, alpha 16, dropout 0, the language model's linear layers)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str | list[str] | None = None  # a regex (full match) or module-name suffixes; None: the LLM's linears


@dataclass
class TinyReaderSettings:
    """Shape of the random-weight reader of `model: tiny`: by default the Qwen2-VL of the embedded default (docs/design.md's
    measured settings, ~0.3 M params); `family` builds another model type of the same size (tests, benchmarks)."""

    family: str = "qwen2_vl"  # model type (a key of core/reader/families.py FAMILIES)
    hidden_size: int = 64
    intermediate_size: int = 128
    layers: int = 2
    heads: int = 2
    mrope_section: list[int] = field(default_factory=lambda: [6, 5, 5])  # Qwen: sums to hidden_size / heads / 2
    vision_depth: int = 2
    vision_dim: int = 64
    vision_heads: int = 2
    patch_size: int = 14  # Qwen2-VL / Qwen2.5-VL vision patches; the other tiny families use fixed small sizes
    max_position_embeddings: int = 512


@dataclass
class FinetuneSettings:
    """Reader fine-tuning on single-context prompts (docs/design.md: tiny reader AdamW lr 2e-3, ~600 steps, batch 16;
    LoRA lr 1e-4)."""

    steps: int = 600
    batch_size: int = 16
    lr: float = 2e-3
    warmup_fraction: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    closed_book_fraction: float = 0.2  # share of training prompts whose context is dropped, so one model serves both
    gradient_checkpointing: bool = False  # recompute the language model's activations in backward (7B on one GPU)
    contexts_per_head: int = 2  # the pipeline's training prompts: each training query with its top-n items per head
    eval_every: int = 100  # validation accuracy every this many steps (and after the last); 0: only after the last
    checkpoint_every: int = 100


@dataclass
class ReaderSettings:
    """How to build and run the reader. `model`: "tiny" (random weights, vocabulary from the dataset), a hub name or
    a local directory written by `Reader.save`. `lora`: adapter settings for fine-tuning, or None to train every
    weight (the tiny reader has no pretrained weights to adapt)."""

    model: str = "tiny"
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16
    device: str = "auto"  # auto (cuda when available), cpu, cuda, cuda:1, ...
    batch_size: int = 64
    max_length: int | None = None  # prompt + answer tokens; None: the model's max_position_embeddings
    max_pixels: int | None = None  # images are resized to at most this many pixels; None: the processor's setting
    scoring: str = "auto"  # auto (single-token when every candidate is one token), first_token, full
    generate_max_tokens: int = 16  # open VQA questions: greedy generation stops after this many new tokens
    # the cached-vision-features scoring path where the family has one that a parity test shows equals the generic
    # processor + model(**inputs) path (families.FAMILIES[...].fast_path: qwen2_vl, qwen2_5_vl); false: always generic
    fast_path: bool = True
    # requests marked `share_prefix` (the per-label questions of a multi-label context) encode their common prompt
    # prefix once and continue from its KV cache; false: one full pass each (the same scores, L times the cost)
    share_prefix: bool = True
    lora: LoraSettings | None = None
    adapter: str | None = None  # directory of saved LoRA adapters to load on top of `model`
    image_cache: int = 8192  # preprocessed images kept in memory (LRU)
    tiny: TinyReaderSettings = field(default_factory=TinyReaderSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)

    def check(self, where: str = "reader") -> None:
        """Raise ValueError naming the field when a value is outside its valid set."""
        if self.scoring not in SCORING_MODES:
            raise ValueError(f"{where}.scoring {self.scoring!r} is not one of {list(SCORING_MODES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"{where}.dtype {self.dtype!r} is not one of {list(DTYPES)}")
        if self.generate_max_tokens < 1:
            raise ValueError(f"{where}.generate_max_tokens must be at least 1, got {self.generate_max_tokens}")
        if not 0 <= self.finetune.closed_book_fraction <= 1:
            raise ValueError(f"{where}.finetune.closed_book_fraction must lie in [0, 1]")
