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
    # training objective: "answer" (cross-entropy of the gold answer's tokens over the whole vocabulary) or
    # "candidates" (cross-entropy of the softmax over the candidates' log-probabilities, scored as `Reader.score`
    # scores them: classification loss, so training matches how answers are chosen; open questions keep "answer")
    loss: str = "answer"
    # sample training prompts with probability inversely proportional to their answer's frequency (each answer drawn
    # equally often; with replacement) instead of epoch-wise shuffling: a reader on a skewed split (BreastMNIST 73 %
    # "no") otherwise learns the prior before the image
    balanced_sampling: bool = False


FINETUNE_LOSSES = ("answer", "candidates")


@dataclass
class AlignSettings:
    """Projector alignment before fine-tuning (LLaVA's stage 1): every corpus image captioned with its corpus text,
    closed-book, only the projector between a frozen vision tower and the frozen LLM training. For families with a
    projector (core/reader/families.py `projector`)."""

    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    warmup_fraction: float = 0.05
    question: str = "Describe the image."
    checkpoint_every: int = 50


@dataclass
class ReaderSettings:
    """How to build and run the reader. `model`: "tiny" (random weights, vocabulary from the dataset), a hub name or
    a local directory written by `Reader.save`, or a recipe of core/reader/build.py (`effnet-smollm2`: built into
    the run directory from installed weights on first use). `lora`: adapter settings for fine-tuning, or None to train
    every
    weight (the tiny reader has no pretrained weights to adapt)."""

    model: str = "tiny"
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16
    # mixed precision: weights stay in `dtype`, forward passes run under torch.autocast in this dtype (bfloat16 on CPU:
    # about 2x faster for SmolLM2 here, benchmarks/bench_real_reader.py); null: none
    autocast: str | None = None
    device: str = "auto"  # auto (cuda when available), cpu, cuda, cuda:1, ...
    batch_size: int = 64
    max_length: int | None = None  # prompt + answer tokens; None: the model's max_position_embeddings
    max_pixels: int | None = None  # images are resized to at most this many pixels; None: the processor's setting
    scoring: str = "auto"  # auto (single-token when every candidate is one token), first_token, full
    generate_max_tokens: int = 16  # open VQA questions: greedy generation stops after this many new tokens
    # the cached-vision-features path where the family has one that a parity test shows equals the generic
    # processor + model(**inputs) path: Qwen2-VL / 2.5-VL (families' fast_path: tower run once per image per score
    # call) and frozen-tower families (tower_features: fast_vlm, tower outputs cached for the run); false: generic
    fast_path: bool = True
    # requests marked `share_prefix` (the per-label questions of a multi-label context) encode their common prompt
    # prefix once and continue from its KV cache; false: one full pass each (the same scores, L times the cost)
    share_prefix: bool = True
    lora: LoraSettings | None = None
    adapter: str | None = None  # directory of saved LoRA adapters to load on top of `model`
    image_cache: int = 8192  # preprocessed images kept in memory (LRU)
    tiny: TinyReaderSettings = field(default_factory=TinyReaderSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    align: AlignSettings | None = None  # projector alignment before fine-tuning; None: none

    def check(self, where: str = "reader") -> None:
        """Raise ValueError naming the field when a value is outside its valid set."""
        if self.scoring not in SCORING_MODES:
            raise ValueError(f"{where}.scoring {self.scoring!r} is not one of {list(SCORING_MODES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"{where}.dtype {self.dtype!r} is not one of {list(DTYPES)}")
        if self.autocast not in (None, "bfloat16", "float16"):
            raise ValueError(f"{where}.autocast {self.autocast!r} is not one of [null, 'bfloat16', 'float16']")
        if self.generate_max_tokens < 1:
            raise ValueError(f"{where}.generate_max_tokens must be at least 1, got {self.generate_max_tokens}")
        if not 0 <= self.finetune.closed_book_fraction <= 1:
            raise ValueError(f"{where}.finetune.closed_book_fraction must lie in [0, 1]")
        if self.finetune.loss not in FINETUNE_LOSSES:
            raise ValueError(f"{where}.finetune.loss {self.finetune.loss!r} is not one of {list(FINETUNE_LOSSES)}")
