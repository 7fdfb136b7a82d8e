"""The Qwen2-VL reader around the real Qwen2.5-0.5B language model and its 151,936-id tokenizer
(core/reader/qwen2vl.py): text-only logits equal the standalone LLM's; on multi-token, leading-space and prefix
candidates the cached-vision fast path equals the generic path, which equals teacher forcing over the processor's
tokens; batched generation, a LoRA step and adapter save/load. Few and cheap: one assembly (~30 s), prompts of ~60
tokens (a Qwen forward of 1x128 tokens is ~1.7 s fp32 on one thread)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dxrag.core.reader.model import Reader, ScoreRequest, TargetRequest  # noqa: E402
from dxrag.core.reader.settings import ReaderSettings  # noqa: E402
from dxrag.core.base.records import CorpusItem  # noqa: E402

from dxrag_test_support import real_weights  # noqa: E402

from .real_support import teacher_forced  # noqa: E402
from .support import assert_generate_is_greedy, lora_losses  # noqa: E402

pytestmark = pytest.mark.real

QWEN = "qwen2.5-0.5b-instruct"
END = "<|im_end|>"
CANDIDATE_SETS = [
    (("malignant", " benign tumour", "yes", " yes"), ""),  # 3 tokens, 3 tokens, and one token with/without a space
    (("no", "no lesion"), END),  # a token-level prefix: both closed by the end of the assistant turn
]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from dxrag.core.reader.qwen2vl import VisionTowerSettings, assemble

    torch.set_num_threads(1)
    return assemble(real_weights(QWEN), tmp_path_factory.mktemp("qwen2vl") / "reader",
                    VisionTowerSettings(image_size=56, embed_dim=64, heads=2))  # 4 image tokens per image


@pytest.fixture(scope="module")
def fast(qwen_dir):
    return Reader.from_config(ReaderSettings(model=str(qwen_dir), device="cpu", dtype="float32", batch_size=3))


def test_chat_template_and_tokens(fast):
    assert fast.family.model_type == "qwen2_vl" and fast.fast
    assert fast.hf_model.config.text_config.vocab_size == 151_936
    assert fast._header == "<|im_end|>\n<|im_start|>assistant\n"
    text = fast.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it malignant?"}]}],
        tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Is it malignant?<|im_end|>\n<|im_start|>assistant\n")
    assert fast.tokenizer.convert_ids_to_tokens(fast.answer_ids(" benign tumour")) == ["Ġbenign", "Ġtum", "our"]
    assert fast.answer_ids("yes") != fast.answer_ids(" yes")


def test_text_only_logits_equal_the_standalone_llm(fast):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(real_weights(QWEN), dtype=torch.float32).eval()
    ids = fast.tokenizer(["The capital of France is"], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        ours = fast.hf_model(input_ids=ids).logits[0]
        theirs = lm(input_ids=ids).logits[0]
    assert (ours - theirs).abs().max() < 1e-5
    paris, berlin = (fast.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" Paris", " Berlin"))
    assert ours[-1, paris] - ours[-1, berlin] > 3  # REAL_WEIGHTS.md: about 8


def test_fast_path_equals_generic_path_and_teacher_forcing(fast, toy_dataset):
    generic = Reader(fast.model, fast.processor, dataclasses.replace(fast.config, fast_path=False))
    assert not generic.fast
    root = toy_dataset.root
    base = toy_dataset.corpus[2]
    contexts = [None, toy_dataset.corpus[1],
                CorpusItem(id="long", image=base.image, text=base.text + " dilated vessels" * 4)]
    for candidates, end in CANDIDATE_SETS:
        requests = [ScoreRequest(q, c, candidates) for q, c in zip(toy_dataset.queries["val"], contexts)]
        batched_fast = fast.score(requests, root, batch_size=3)
        assert max(np.ptp(s) for s in batched_fast) > 0.1  # not uniform: a real output layer is in place
        for r, got in zip(requests, batched_fast):
            one_generic = generic.score([r], root, batch_size=1)[0]
            want = teacher_forced(generic, r.query, r.context, candidates, root, end).numpy()
            assert np.abs(got - one_generic).max() < 1e-4, (r.describe(), got, one_generic)
            assert np.abs(one_generic - want).max() < 1e-4, (r.describe(), one_generic, want)


def test_training_loss_is_the_same_on_both_paths(fast, toy_dataset):
    """Teacher forcing for training (`answer_loss`: prompt + answer tokens in one pass, the processor's per-token
    inputs extended over the answer on the generic path) agrees between the fast and the generic path."""
    generic = Reader(fast.model, fast.processor, dataclasses.replace(fast.config, fast_path=False))
    examples = [TargetRequest(toy_dataset.queries["train"][0], None),
                TargetRequest(toy_dataset.queries["train"][1], toy_dataset.corpus[3])]
    with torch.inference_mode():
        losses = [float(r.answer_loss(examples, toy_dataset.root)) for r in (fast, generic)]
    assert abs(losses[0] - losses[1]) < 1e-4 and 0 < losses[0] < 30, losses


def test_generate_is_the_greedy_continuation(fast, toy_dataset):
    """Batched, left-padded generation (M-RoPE positions continue per row) equals a plain greedy loop per prompt."""
    reader = Reader(fast.model, fast.processor, dataclasses.replace(fast.config, generate_max_tokens=4))
    assert_generate_is_greedy(reader, toy_dataset, ["Describe the image.",
                                                    "What colour dominates this image? Answer in one word."],
                              batch_size=2)


def test_lora_step_and_adapter_save_load_on_the_fast_path(qwen_dir, toy_dataset, tmp_path):
    from dxrag.core.reader.settings import LoraSettings

    reader = Reader.from_config(ReaderSettings(model=str(qwen_dir), device="cpu", dtype="float32", batch_size=2))
    reader.add_lora(LoraSettings(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    examples = [(toy_dataset.queries["train"][0], toy_dataset.corpus[0]), (toy_dataset.queries["train"][1], None)]
    losses = lora_losses(reader, examples, toy_dataset.root, steps=2, lr=2e-3)
    assert losses[-1] < losses[0], losses
    requests = [ScoreRequest(q, c) for q, c in examples]
    trained = reader.score(requests, toy_dataset.root)
    reader.save(tmp_path / "adapter")
    loaded = Reader.from_config(ReaderSettings(model=str(qwen_dir), adapter=str(tmp_path / "adapter"), device="cpu",
                                               dtype="float32"))
    assert max(np.abs(a - b).max() for a, b in zip(trained, loaded.score(requests, toy_dataset.root))) < 1e-5
