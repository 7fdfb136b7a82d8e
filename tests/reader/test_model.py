"""Tests of the reader: tiny model construction, save/load, batched exact scoring, bad input, and fine-tuning."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dxrag.core.training.checkpoint import CheckpointError  # noqa: E402
from dxrag.core.training.finetune import accuracy, finetune  # noqa: E402
from dxrag.core.reader.model import (Reader, ReaderError, ScoreRequest, TargetRequest,  # noqa: E402
                                     predictions)
from dxrag.core.reader.settings import FinetuneSettings, LoraSettings, ReaderSettings  # noqa: E402
from dxrag.core.base.records import CorpusItem, Query  # noqa: E402

from .conftest import LABELS, context_for  # noqa: E402

MULTI = ("mild disease", "severe disease", "normal eye", "moderate")  # multi-token answers, mixed lengths


def mixed_requests(ds, n=14):
    """Closed-book and context requests with different prompt lengths."""
    out = []
    for i, q in enumerate(ds.queries["val"][:n]):
        ctx = None if i % 3 == 0 else ds.corpus[i]
        if i % 4 == 1:
            ctx = CorpusItem(id=f"long{i}", image=ds.corpus[i].image, text=ds.corpus[i].text + " mild eye" * i)
        out.append(ScoreRequest(q, ctx))
    return out


def teacher_forced(reader, request, candidates, root):
    """Reference log p(candidate | prompt) from one full forward over prompt + candidate, per candidate."""
    prompt = reader._encode([(request.query, request.context, candidates)], root)[0]
    totals = []
    with torch.inference_mode():
        for cand in candidates:
            ids = reader.answer_ids(cand)
            logits, _, _ = reader._forward([prompt], tails=[ids], logits_to_keep=len(ids) + 1)
            logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
            totals.append(float(logp[torch.arange(len(ids)), torch.tensor(ids)].sum()))
    return torch.log_softmax(torch.tensor(totals, dtype=torch.float64), dim=0).numpy()


def library_forward(reader, request, root):
    """Reference single-token scores from the plain transformers path: processor(text, images) -> model(**inputs),
    positions from the model's own get_rope_index."""
    from dxrag.core.base.dataset import open_image
    from dxrag.core.reader.prompts import prompt_images, render_prompt

    text = render_prompt(reader.processor, request.query, request.context, request.answers)
    images = [open_image(root / rel) for rel in prompt_images(request.query, request.context)]
    inputs = reader.processor(text=[text], images=images, return_tensors="pt")
    with torch.inference_mode():
        logits = reader.hf_model(**inputs).logits[0, -1].float()
    picked = logits[[reader.answer_ids(a)[0] for a in request.answers]]
    return torch.log_softmax(picked, dim=0).numpy()


def tiny_qwen2_5_vl(tiny_reader):
    """A random-weight Qwen2.5-VL over the tiny reader's vocabulary (window attention in the vision tower)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    base = tiny_reader.hf_model.config
    text = base.text_config.to_dict()
    config = Qwen2_5_VLConfig(
        text_config=text, image_token_id=base.image_token_id, video_token_id=base.video_token_id,
        vision_start_token_id=base.vision_start_token_id, vision_end_token_id=base.vision_end_token_id,
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]))
    torch.manual_seed(0)
    return Reader(Qwen2_5_VLForConditionalGeneration(config).eval(), tiny_reader.processor,
                  ReaderSettings(model="tiny-qwen2.5-vl"))


def test_tiny_reader_shape(tiny_reader, toy_dataset):
    n_params = sum(p.numel() for p in tiny_reader.model.parameters())
    assert 0.2e6 < n_params < 0.5e6
    q = toy_dataset.queries["val"][0]
    prompt = tiny_reader._encode([(q, toy_dataset.corpus[0], q.candidates)], toy_dataset.root)[0]
    assert prompt.ids.count(tiny_reader.image_token_id) == 8  # 32x32 -> 56x56 -> 4 tokens per image, two images
    assert all(len(tiny_reader.answer_ids(a)) == 1 for a in LABELS)
    assert prompt.positions.shape == (3, len(prompt.ids))


def test_scores_are_normalised_and_follow_candidate_order(tiny_reader, toy_dataset):
    q = toy_dataset.queries["val"][0]
    ctx = toy_dataset.corpus[3]
    requests = [ScoreRequest(q, ctx), ScoreRequest(q, ctx, tuple(reversed(LABELS)))]
    for request, scores in zip(requests, tiny_reader.score(requests, toy_dataset.root)):
        assert scores.shape == (len(LABELS),)
        assert np.exp(scores).sum() == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(scores, teacher_forced(tiny_reader, request, request.answers, toy_dataset.root),
                                   atol=1e-4)


def test_batched_equals_one_at_a_time(tiny_reader, toy_dataset):
    requests = mixed_requests(toy_dataset)
    requests += [ScoreRequest(r.query, r.context, MULTI) for r in requests[:6]]
    batched = tiny_reader.score(requests, toy_dataset.root, batch_size=5)
    single = [tiny_reader.score([r], toy_dataset.root)[0] for r in requests]
    for b, s in zip(batched, single):
        np.testing.assert_allclose(b, s, atol=1e-4)


def test_precomputed_positions_match_the_models_rope_index(tiny_reader, toy_dataset):
    q = toy_dataset.queries["val"][1]
    prompt = tiny_reader._encode([(q, toy_dataset.corpus[2], q.candidates)], toy_dataset.root)[0]
    ids = torch.tensor([prompt.ids])
    grid = torch.tensor([[1, 4, 4], [1, 4, 4]])
    ref, _ = tiny_reader.hf_model.model.get_rope_index(ids, (ids == tiny_reader.image_token_id).long(), grid)
    np.testing.assert_array_equal(ref[:, 0].numpy(), prompt.positions)
    assert prompt.next_position == int(ref.max()) + 1


@pytest.mark.parametrize("candidates", [tuple(LABELS), MULTI])
def test_kv_cache_and_single_token_paths_equal_teacher_forcing(tiny_reader, toy_dataset, candidates):
    queries = toy_dataset.queries["val"][:3]
    requests = [ScoreRequest(q, toy_dataset.corpus[i], candidates) for i, q in enumerate(queries)]
    scores = tiny_reader.score(requests, toy_dataset.root)
    for r, s in zip(requests, scores):
        np.testing.assert_allclose(s, teacher_forced(tiny_reader, r, candidates, toy_dataset.root), atol=1e-4)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_fast_path_equals_the_library_forward(tiny_reader, toy_dataset, family):
    """Cached vision features + precomputed M-RoPE positions give the scores of the plain transformers forward."""
    reader = tiny_reader if family == "qwen2_vl" else tiny_qwen2_5_vl(tiny_reader)
    assert reader.hf_model.config.model_type == family
    requests = mixed_requests(toy_dataset, 5)
    for r, s in zip(requests, reader.score(requests, toy_dataset.root, batch_size=3)):
        np.testing.assert_allclose(s, library_forward(reader, r, toy_dataset.root), atol=1e-4)


def test_single_token_mode_equals_full_mode(toy_dataset, tiny_reader):
    requests = mixed_requests(toy_dataset, 6)
    full = Reader(tiny_reader.model, tiny_reader.processor, ReaderSettings(model="tiny", scoring="full"))
    for a, b in zip(tiny_reader.score(requests, toy_dataset.root), full.score(requests, toy_dataset.root)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_prefix_candidates_are_scored_as_complete_answers(tiny_reader, toy_dataset):
    q = toy_dataset.queries["val"][0]
    (s,) = tiny_reader.score([ScoreRequest(q, toy_dataset.corpus[0], ("mild", "mild disease"))], toy_dataset.root)
    assert np.exp(s).sum() == pytest.approx(1.0, abs=1e-6)
    assert tiny_reader._candidate_ids(ScoreRequest(q, None, ("mild", "mild disease")))[0][-1] == \
        tiny_reader.tokenizer.eos_token_id


def test_shared_first_token_is_an_error_in_single_token_mode(tiny_reader, toy_dataset):
    first = Reader(tiny_reader.model, tiny_reader.processor, ReaderSettings(model="tiny", scoring="first_token"))
    q = toy_dataset.queries["val"][0]
    with pytest.raises(ReaderError, match="share their first token 'mild'"):
        first.score([ScoreRequest(q, None, ("mild disease", "mild eye"))], toy_dataset.root)


def test_unknown_candidate_word_is_an_error(tiny_reader, toy_dataset):
    q = toy_dataset.queries["val"][0]
    with pytest.raises(ReaderError, match="'glaucoma' contains words outside"):
        tiny_reader.score([ScoreRequest(q, None, ("mild", "glaucoma"))], toy_dataset.root)


def test_over_long_prompt_is_an_error(tiny_reader, toy_dataset):
    q = toy_dataset.queries["val"][0]
    long = CorpusItem(id="huge", image=toy_dataset.corpus[0].image, text="mild eye " * 400)
    with pytest.raises(ReaderError, match="query 'val000' with context 'huge'.*exceeds the reader's context of 512"):
        tiny_reader.score([ScoreRequest(q, long)], toy_dataset.root)


def test_unreadable_image_is_an_error_naming_it(tiny_reader, toy_dataset, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    q = Query(id="qbad", image="images/broken.png", question="What is it?", candidates=tuple(LABELS), label="mild")
    with pytest.raises(ReaderError, match=r"query 'qbad' field 'image'.*broken\.png.*does not decode"):
        tiny_reader.score([ScoreRequest(q, None)], tmp_path)


def test_save_load_round_trip_gives_identical_scores(tiny_reader, toy_dataset, tmp_path):
    requests = mixed_requests(toy_dataset, 6)
    out = tiny_reader.save(tmp_path / "reader")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    loaded = Reader.from_config(ReaderSettings(model=str(out), device="cpu"))
    for a, b in zip(tiny_reader.score(requests, toy_dataset.root), loaded.score(requests, toy_dataset.root)):
        np.testing.assert_array_equal(a, b)


def test_finetune_with_context_beats_closed_book(toy_dataset):
    """Toy task where the context's text states the answer: the fine-tuned reader reads it, closed-book cannot."""
    reader = Reader.from_config(ReaderSettings(model="tiny", device="cpu"), dataset=toy_dataset, seed=1)
    examples = [TargetRequest(q, context_for(toy_dataset, q)) for q in toy_dataset.queries["train"]]
    val = [ScoreRequest(q, context_for(toy_dataset, q)) for q in toy_dataset.queries["val"]]
    wrong = [ScoreRequest(q, context_for(toy_dataset, q, shift=2)) for q in toy_dataset.queries["val"]]
    before = accuracy(reader, val, toy_dataset.root)
    history = finetune(reader, examples, toy_dataset.root, FinetuneSettings(steps=80, eval_every=40), val_requests=val)
    assert len(history.losses) == 80 and history.val_steps == [40, 80]
    assert history.losses[-1] < history.losses[0] / 4
    assert history.val_accuracy[-1] >= 0.9 > before + 0.3
    closed = accuracy(reader, [ScoreRequest(r.query, None) for r in val], toy_dataset.root)
    assert history.val_accuracy[-1] > closed + 0.3
    assert accuracy(reader, wrong, toy_dataset.root) < 0.3  # it follows the context, not a memorised prior


def test_lora_trains_only_adapters_and_saves_safetensors(toy_dataset, tmp_path):
    config = ReaderSettings(model="tiny", device="cpu", lora=LoraSettings(r=4, alpha=8))
    reader = Reader.from_config(config, dataset=toy_dataset)
    reader.add_lora(config.lora)
    before = {k: v.clone() for k, v in reader.model.state_dict().items()}
    examples = [TargetRequest(q, context_for(toy_dataset, q)) for q in toy_dataset.queries["train"]]
    history = finetune(reader, examples, toy_dataset.root, FinetuneSettings(steps=5, eval_every=0, lr=1e-2))
    after = {k: v for k, v in reader.model.state_dict().items()}
    changed = {k for k in after if k in before and not torch.equal(before[k], after[k])}
    assert len(changed) > 4 and all("lora_" in k for k in changed)
    assert all("language_model" in k for k in changed)  # the vision tower gets no adapters by default
    assert 0 < history.trainable_parameters < 0.1 * sum(p.numel() for p in reader.model.parameters())
    out = reader.save(tmp_path / "adapters")
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    requests = mixed_requests(toy_dataset, 4)
    reloaded_base = Reader.from_config(ReaderSettings(model="tiny", device="cpu"), dataset=toy_dataset)
    reloaded = Reader.from_config(ReaderSettings(model="tiny", device="cpu", adapter=str(out)), dataset=toy_dataset)
    for a, b, c in zip(reader.score(requests, toy_dataset.root), reloaded.score(requests, toy_dataset.root),
                       reloaded_base.score(requests, toy_dataset.root)):
        np.testing.assert_allclose(a, b, atol=1e-6)
        assert not np.allclose(a, c, atol=1e-6)
    assert predictions(requests, reader.score(requests, toy_dataset.root))[0] in LABELS


def test_interrupted_finetune_resumes_to_the_same_result(toy_dataset, tmp_path, monkeypatch):
    examples = [TargetRequest(q, context_for(toy_dataset, q)) for q in toy_dataset.queries["train"]]
    config = FinetuneSettings(steps=8, batch_size=4, eval_every=0, checkpoint_every=3)
    ckpt = tmp_path / "ckpt"
    fresh = lambda: Reader.from_config(ReaderSettings(model="tiny", device="cpu"), dataset=toy_dataset)  # noqa: E731
    whole = finetune(fresh(), examples, toy_dataset.root, FinetuneSettings(steps=8, batch_size=4, eval_every=0))

    interrupted = fresh()
    calls = {"n": 0}
    real_loss = Reader.answer_loss

    def failing_loss(self, batch, root):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_loss(self, batch, root)

    monkeypatch.setattr(Reader, "answer_loss", failing_loss)
    with pytest.raises(KeyboardInterrupt):
        finetune(interrupted, examples, toy_dataset.root, config, checkpoint_dir=ckpt)
    monkeypatch.setattr(Reader, "answer_loss", real_loss)
    assert (tmp_path / "ckpt" / "weights.safetensors").is_file()
    resumed = finetune(fresh(), examples, toy_dataset.root, config, checkpoint_dir=ckpt)  # picks up after step 3
    assert resumed.losses == whole.losses  # exact: weights, optimizer, schedule, order and random states restored
    with pytest.raises(CheckpointError, match=r"differ from .* \(at steps\)"):
        finetune(fresh(), examples, toy_dataset.root, FinetuneSettings(steps=9, batch_size=4),
                 checkpoint_dir=ckpt)
