"""Tests of every reader family through the generic path (tiny random-weight models, offline word-level tokenizers):
batched = unbatched, multi-token = teacher forcing, LoRA step, save/load, fast path = generic path, bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dxrag.core.reader.families import FAMILIES  # noqa: E402
from dxrag.core.reader.model import GenerateRequest, Reader, ReaderError, ScoreRequest, TargetRequest  # noqa: E402,E501
from dxrag.core.reader.settings import LoraSettings, ReaderSettings, TinyReaderSettings  # noqa: E402
from dxrag.core.base.records import CorpusItem  # noqa: E402

from .conftest import LABELS  # noqa: E402
from .support import requests_for  # noqa: E402

MULTI = ("mild disease", "severe disease", "normal eye", "moderate")  # multi-token answers, mixed lengths
TESTED = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "gemma3", "idefics3", "internvl", "llava_onevision",
          "mllama", "fast_vlm"]
FAST = [f for f in TESTED if FAMILIES[f].fast_path]
TOWER = [f for f in TESTED if FAMILIES[f].tower_features]  # frozen towers: features cached per image


def settings(family: str, **kw) -> ReaderSettings:
    return ReaderSettings(model="tiny", device="cpu", batch_size=4, tiny=TinyReaderSettings(family=family), **kw)


@pytest.fixture(scope="module")
def readers(toy_dataset):
    """One tiny reader per family, built on first use and shared by this module's tests (never trained here)."""
    cache: dict[str, Reader] = {}

    def get(family: str, **kw) -> Reader:
        key = family + repr(sorted(kw.items()))
        if key not in cache:
            cache[key] = Reader.from_config(settings(family, **kw), dataset=toy_dataset)
        return cache[key]
    return get


def teacher_forced(reader, request, root):
    """Reference log p(candidate | prompt): one forward over prompt + candidate per candidate, log-softmaxed."""
    totals = []
    with torch.inference_mode():
        for ids in reader._candidate_ids(request):
            logits = reader.sequence_logits([(request.query, request.context, request.answers)], [ids], root)[0]
            logp = torch.log_softmax(logits[:-1].float(), dim=-1)
            totals.append(float(logp[torch.arange(len(ids)), torch.tensor(ids)].sum()))
    return torch.log_softmax(torch.tensor(totals, dtype=torch.float64), dim=0).numpy()


@pytest.mark.parametrize("family", TESTED)
def test_batched_equals_unbatched_and_teacher_forcing(readers, toy_dataset, family):
    reader = readers(family)
    assert reader.hf_model.config.model_type == family and reader.fast == FAMILIES[family].fast_path
    requests = requests_for(toy_dataset) + requests_for(toy_dataset, 4, MULTI)
    batched = reader.score(requests, toy_dataset.root, batch_size=4)
    for r, b in zip(requests, batched):
        np.testing.assert_allclose(b, reader.score([r], toy_dataset.root)[0], atol=1e-4)
        assert np.exp(b).sum() == pytest.approx(1.0, abs=1e-6)
    for r, b in zip(requests[-2:], batched[-2:]):  # multi-token candidates continued from the KV cache
        np.testing.assert_allclose(b, teacher_forced(reader, r, toy_dataset.root), atol=1e-4)
    # the images matter (zero-initialised projectors / gates are re-initialised by the tiny builders)
    q = toy_dataset.queries["val"][1]
    a, b = (reader.score([ScoreRequest(q, CorpusItem(id="x", image=toy_dataset.corpus[k].image, text="mild eye"))],
                         toy_dataset.root)[0] for k in (0, 1))
    assert np.abs(a - b).max() > 1e-4


@pytest.mark.parametrize("family", FAST)
@pytest.mark.parametrize("candidates", [None, MULTI])
def test_fast_path_equals_the_generic_path(readers, toy_dataset, family, candidates):
    """The gate of `Family.fast_path`: cached vision features + precomputed positions give the generic scores,
    single-token and multi-token, batched."""
    fast = readers(family)
    generic = Reader(fast.model, fast.processor, settings(family, fast_path=False))
    assert fast.fast and not generic.fast
    requests = requests_for(toy_dataset, 6, candidates)
    for a, b in zip(fast.score(requests, toy_dataset.root, batch_size=4),
                    generic.score(requests, toy_dataset.root, batch_size=4)):
        np.testing.assert_allclose(a, b, atol=1e-4)


def shared_requests(ds, candidates=None) -> list[ScoreRequest]:
    """Questions of different lengths over each of three (query image, context) pairs, one closed-book and one with a
    longer context, marked `share_prefix` as the per-label questions of a multi-label context are (with common
    leading words, as a legend gives them: 1 and 2 tokens); and two unmarked requests in between."""
    questions = ["report findings mild disease ?", "report findings severe ?", "report normal eye disease ?",
                 "report findings consistent with What is the severity of the retinopathy ?"]
    qs = ds.queries["val"]
    contexts = [ds.corpus[1], None, CorpusItem(id="long", image=ds.corpus[2].image,
                                               text=ds.corpus[2].text + " mild eye" * 5)]
    asked = [questions[1:] + questions[:1], questions[::-1], questions[:2]]
    out = [ScoreRequest(dataclasses.replace(qs[i], question=text), ctx, candidates, share_prefix=True)
           for i, (ctx, texts) in enumerate(zip(contexts, asked)) for text in texts]
    return out[:5] + [ScoreRequest(qs[4], ds.corpus[4], candidates), ScoreRequest(qs[5], None, candidates)] + out[5:]


@pytest.mark.parametrize("family", TESTED)
@pytest.mark.parametrize("candidates", [None, MULTI])
def test_shared_prefix_equals_the_unshared_path_and_the_whole_prompt(readers, toy_dataset, family, candidates):
    """`share_prefix` requests encode each distinct prefix once (3 prefix rows for 10 requests) and give the scores
    of one full pass per request over the same two pieces, single-token and multi-token candidates, batched; with
    the word-level tokenizers the pieces are also the whole prompt's tokens, so the scores equal unmarked scoring."""
    reader = readers(family)
    paths = [reader] + ([Reader(reader.model, reader.processor, settings(family, fast_path=False))]
                        if reader.fast else [])
    requests = shared_requests(toy_dataset, candidates)
    for shared in paths:
        unshared = Reader(shared.model, shared.processor, settings(family, fast_path=shared.fast,
                                                                   share_prefix=False))
        prefix_rows = []
        run = shared._run
        shared._run = lambda items, *a, **kw: prefix_rows.append(len(items)) or run(items, *a, **kw)
        try:
            a = shared.score(requests, toy_dataset.root, batch_size=2)
        finally:
            del shared._run
        assert sum(prefix_rows) == 2 + 3  # the two unmarked requests, then the three distinct prefixes
        # batch 4: the three prefixes in one pass, their continuations in full waves that continue the prefixes'
        # cache without copying it (every wave must leave it as it was for the next)
        whole = shared.score(requests, toy_dataset.root, batch_size=4)
        b = unshared.score(requests, toy_dataset.root, batch_size=3)
        c = shared.score([dataclasses.replace(r, share_prefix=False) for r in requests], toy_dataset.root)
        for x, y, z, w in zip(a, b, c, whole):
            np.testing.assert_allclose(x, y, atol=1e-4)
            np.testing.assert_allclose(x, z, atol=1e-4)
            np.testing.assert_allclose(w, y, atol=1e-4)
        # the questions matter: the suffixes are not ignored
        assert np.abs(a[0] - a[1]).max() > 1e-4


def test_continuations_run_in_waves_of_whole_chunks():
    """Every prompt's first continuation, then every prompt's second, ...; chunks hold whole waves (a full wave is
    every prompt once: continued without a copy of the cache), splitting only a wave longer than a chunk."""
    waves = Reader._waves
    assert waves([0, 0, 0, 1, 1, 2], 3) == ([0, 3, 5, 1, 4, 2], [range(0, 3), range(3, 6)])
    assert waves([0, 0, 0, 1, 1, 2], 4) == ([0, 3, 5, 1, 4, 2], [range(0, 3), range(3, 6)])
    assert waves([0] * 3, 2) == ([0, 1, 2], [range(0, 2), range(2, 3)])  # three waves of one, two per chunk
    assert waves([0, 1, 2, 0, 1, 2], 2) == ([0, 1, 2, 3, 4, 5], [range(0, 2), range(2, 3), range(3, 5), range(5, 6)])
    order, parts = waves([r for r in range(64) for _ in range(14)], 64)  # the benchmark's batch: 14 full waves
    assert parts == [range(64 * k, 64 * (k + 1)) for k in range(14)] and order[:2] == [0, 14]
    assert waves([], 4) == ([], [])


def test_shared_prefix_falls_back_to_the_whole_prompt_when_the_template_hides_the_question(readers, toy_dataset):
    base = readers("llava")
    reader = Reader(base.model, base.processor, settings("llava"))
    reader._render.split = lambda *args: None  # a chat template that does not insert the question verbatim
    requests = shared_requests(toy_dataset)
    assert reader._split(requests) == ({}, {})
    for a, b in zip(reader.score(requests, toy_dataset.root),
                    base.score([dataclasses.replace(r, share_prefix=False) for r in requests], toy_dataset.root)):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("family", TOWER)
@pytest.mark.parametrize("candidates", [None, MULTI])
def test_vision_feature_cache_equals_the_generic_path(readers, toy_dataset, family, candidates, tmp_path):
    """The gate of `Family.tower_features`: the projector over cached tower outputs gives the generic scores (the
    processor and the tower on every prompt), single- and multi-token, batched; the run-directory file round-trips
    and a file of another tower is not used."""
    cached = readers(family)
    generic = Reader(cached.model, cached.processor, settings(family, fast_path=False))
    assert cached.tower_cache is not None and generic.tower_cache is None
    cached.tower_cache.features.clear()  # the shared reader scored other images in earlier tests
    requests = requests_for(toy_dataset, 6, candidates)
    for a, b in zip(cached.score(requests, toy_dataset.root, batch_size=4),
                    generic.score(requests, toy_dataset.root, batch_size=4)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    n = len(cached.tower_cache.features)
    assert n == len({r.query.image for r in requests} | {r.context.image for r in requests if r.context})
    file = cached.tower_cache.save(tmp_path / "features.safetensors", toy_dataset.root)
    fresh = Reader(cached.model, cached.processor, settings(family))
    assert fresh.tower_cache.load(file, toy_dataset.root) == n
    for key, value in cached.tower_cache.features.items():
        torch.testing.assert_close(fresh.tower_cache.features[key], value, rtol=0, atol=0)
    other = Reader.from_config(settings(family), dataset=toy_dataset, seed=1)  # another random tower
    assert other.tower_cache.load(file, toy_dataset.root) == 0


def test_frozen_tower_stays_in_eval_mode_and_out_of_training(toy_dataset):
    """BatchNorm in a frozen CNN tower must neither use batch statistics nor update its running ones."""
    reader = Reader.from_config(settings("fast_vlm"), dataset=toy_dataset)
    tower = reader.hf_model.get_submodule(FAMILIES["fast_vlm"].tower)
    reader.model.train()
    assert not tower.training and reader.hf_model.model.language_model.training
    assert not any(p.requires_grad for p in tower.parameters())


def test_qwen3_vl_is_kept_off_the_fast_path(readers, toy_dataset):
    """Forcing the Qwen2-VL fast path onto Qwen3-VL drops its deepstack features: plausible but wrong scores."""
    generic = readers("qwen3_vl")
    forced = Reader(generic.model, generic.processor, settings("qwen3_vl"))
    forced.fast, forced.merge = True, generic.hf_model.config.vision_config.spatial_merge_size
    requests = requests_for(toy_dataset, 4)
    diff = max(np.abs(a - b).max() for a, b in zip(forced.score(requests, toy_dataset.root),
                                                   generic.score(requests, toy_dataset.root)))
    assert diff > 1e-3


@pytest.mark.parametrize("family", TESTED)
def test_lora_step_reduces_the_loss_and_save_load_round_trips(toy_dataset, family, tmp_path):
    reader = Reader.from_config(settings(family), dataset=toy_dataset)
    requests = requests_for(toy_dataset, 4) + requests_for(toy_dataset, 2, MULTI)
    out = reader.save(tmp_path / "full")
    loaded = Reader.from_config(ReaderSettings(model=str(out), device="cpu", batch_size=4))
    assert loaded.family is reader.family
    for a, b in zip(reader.score(requests, toy_dataset.root), loaded.score(requests, toy_dataset.root)):
        np.testing.assert_allclose(a, b, atol=1e-6)

    reader.add_lora(LoraSettings(r=4, alpha=8))
    examples = [TargetRequest(q, toy_dataset.corpus[i]) for i, q in enumerate(toy_dataset.queries["train"][:4])]
    params = [p for p in reader.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    reader.model.train()
    before = reader.answer_loss(examples, toy_dataset.root)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = reader.answer_loss(examples, toy_dataset.root)
    assert after.item() < before.item()
    trained = {n for n, p in reader.model.named_parameters() if p.requires_grad}
    projector = reader.family.projector  # trains beside the adapters where the family has one
    assert trained and all(("lora_" in n and reader.family.language_model in n) or
                           (projector and "modules_to_save" in n and projector.rsplit(".", 1)[-1] in n)
                           for n in trained)
    assert bool(projector) == any("modules_to_save" in n for n in trained)


# ------------------------------------------------------------------------------------------------ bad input


def test_unknown_model_type_is_an_error_listing_the_supported_ones(toy_dataset):
    from transformers import BertConfig, BertModel

    with pytest.raises(ReaderError, match=r"reader.tiny.family: model type 'blip_2' is not supported; supported: "
                                          r"\[.*'gemma3'.*'qwen2_vl'"):
        Reader.from_config(settings("blip_2"), dataset=toy_dataset)
    bert = BertModel(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=8))
    processor = Reader.from_config(settings("qwen2_vl"), dataset=toy_dataset).processor
    with pytest.raises(ReaderError, match=r"model type 'bert' is not supported; supported: \[.*'llava'"):
        Reader(bert, processor, ReaderSettings(model="some/bert"))


def test_processor_yielding_the_wrong_number_of_image_tokens_is_an_error(readers, toy_dataset):
    from transformers import Gemma3Processor

    good = readers("gemma3")
    bad = Gemma3Processor(image_processor=good.processor.image_processor, tokenizer=good.processor.tokenizer,
                          image_seq_length=3, chat_template=good.processor.chat_template)
    reader = Reader(good.model, bad, settings("gemma3"))
    q = toy_dataset.queries["val"][0]
    with pytest.raises(ReaderError, match=r"query 'val000' with context 'c000': the model rejected the processor's "
                                          r"inputs .* yielded \[6\] image tokens for \[2\] images"):
        reader.score([ScoreRequest(q, toy_dataset.corpus[0])], toy_dataset.root)


def test_chat_template_with_the_wrong_placeholder_count_is_an_error(readers, toy_dataset):
    good = readers("llava")
    reader = Reader(good.model, good.processor, settings("llava"))
    reader._render = lambda q, c, cands: good._render(q, c, cands).replace("[IMG]", "", 1)
    q = toy_dataset.queries["val"][0]
    with pytest.raises(ReaderError, match=r"query 'val000' \(closed-book\): the chat template produced 0 image "
                                          r"placeholders \('\[IMG\]'\) for 1 images"):
        reader.score([ScoreRequest(q, None)], toy_dataset.root)


@pytest.mark.parametrize("family", ["gemma3", "qwen3_vl"])
def test_empty_and_prefix_candidates(readers, toy_dataset, family):
    reader = readers(family)
    q = toy_dataset.queries["val"][0]
    with pytest.raises(ReaderError, match=r"query 'val000' \(closed-book\): candidate ' ' encodes to no tokens; "
                                          r"candidates must contain at least one token"):
        reader.score([ScoreRequest(q, None, ("mild", " "))], toy_dataset.root)
    # a prefix of another candidate is scored as a complete answer (closed by the end-of-turn token)
    ids = reader._candidate_ids(ScoreRequest(q, None, ("mild", "mild disease")))
    assert ids[0][-1] == ids[1][-1] == reader.tokenizer.convert_tokens_to_ids(FAMILIES[family].end_token)
    (s,) = reader.score([ScoreRequest(q, None, ("mild", "mild disease"))], toy_dataset.root)
    assert np.exp(s).sum() == pytest.approx(1.0, abs=1e-6)


def test_answer_tokens_are_the_suffix_after_the_assistant_header(readers):
    reader = readers("idefics3")  # header ends in "Assistant:", a word-level token before the answer
    assert reader._header.endswith("Assistant:")
    assert reader.answer_ids("mild") == [reader.tokenizer.convert_tokens_to_ids("mild")]
    assert all(len(reader.answer_ids(a)) == 1 for a in LABELS)


@pytest.mark.parametrize("family", TESTED)
def test_generate_batched_equals_unbatched(readers, toy_dataset, family):
    """Greedy generation (open questions) through the model's own generate on left-padded batches."""
    reader = readers(family, generate_max_tokens=4)
    requests = [GenerateRequest(r.query, r.context) for r in requests_for(toy_dataset)]
    batched = reader.generate(requests, toy_dataset.root, batch_size=5)
    assert batched == [reader.generate([r], toy_dataset.root, batch_size=1)[0] for r in requests]
    assert all(isinstance(t, str) and len(t.split()) <= 4 for t in batched)
    # the random tiny fast_vlm's first greedy token is the end token for every prompt (seed 0): empty answers, still
    # batched = unbatched; test_build_effnet_smollm2.py generates text with real weights
    assert any(batched) or family == "fast_vlm"
