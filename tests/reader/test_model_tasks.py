"""The reader on the other task types: greedy generation for open questions (batched = one at a time, learns the
answers it is fine-tuned on, stops at its token budget), open-answer gold scores, per-label yes/no questions of
multi-label queries, and legends in the prompt and the tiny vocabulary."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dxrag.core.base.dataset import DatasetMeta, DatasetWriter, load_dataset  # noqa: E402
from dxrag.core.training.finetune import finetune  # noqa: E402
from dxrag.core.reader.model import GenerateRequest, Reader, ReaderError, ScoreRequest, TargetRequest  # noqa: E402,E501
from dxrag.core.reader.settings import FinetuneSettings, ReaderSettings  # noqa: E402
from dxrag.core.base.records import CorpusItem, Query  # noqa: E402
from dxrag.core.tasks import NO, YES, Task  # noqa: E402

from .conftest import LABELS, _noise  # noqa: E402

# open answers of several words (texts of the tiny vocabulary), one per label
ANSWERS = {"normal": "no lesion seen", "mild": "few small spots", "moderate": "dot haemorrhages here",
           "severe": "many haemorrhages with beading", "proliferative": "new vessels"}
LEGEND = {"normal": "no disease", "mild": "early signs", "moderate": "clear signs", "severe": "heavy signs",
          "proliferative": "new vessels grow"}


@pytest.fixture(scope="module")
def vqa_dataset(tmp_path_factory):
    """Open and closed questions over noise images whose corpus texts name the label; the legend is set."""
    rng = np.random.default_rng(1)
    out = tmp_path_factory.mktemp("tasks") / "vqa"
    with DatasetWriter(out) as w:
        for i in range(20):
            k = i % len(LABELS)
            rel = w.add_image(f"c{i:03d}", _noise(rng, k))
            w.corpus.append(CorpusItem(f"c{i:03d}", rel, f"report : {LABELS[k]} disease .", LABELS[k]))
        for i in range(20):
            k = i % len(LABELS)
            rel = w.add_image(f"q{i:03d}", _noise(rng, k))
            w.queries["train"].append(Query(f"o{i:03d}", rel, "What does the eye show?", (),
                                            ANSWERS[LABELS[k]], {"answer_type": "open"}))
            w.queries["train"].append(Query(f"c{i:03d}", rel, "What is the grade?", tuple(LABELS), LABELS[k],
                                            {"answer_type": "closed"}))
        w.meta = DatasetMeta(name="vqa", task="vqa", labels=list(LABELS), legend=LEGEND)
    return load_dataset(out)


@pytest.fixture(scope="module")
def vqa_reader(vqa_dataset):
    return Reader.from_config(ReaderSettings(model="tiny", device="cpu", batch_size=8, generate_max_tokens=6),
                              dataset=vqa_dataset, seed=3)


def _open(ds):
    return [q for q in ds.queries["train"] if q.answer_type == "open"]


def test_tiny_vocabulary_holds_open_answers_and_the_legend(vqa_dataset, vqa_reader):
    prompts = Task.of(vqa_dataset.meta)
    tok = vqa_reader.tokenizer
    for q in _open(vqa_dataset)[:5]:
        ids = vqa_reader.answer_ids(q.label)
        assert tok.unk_token_id not in ids and len(ids) == len(q.label.split()) > 1  # words, not one answer token
        asked = prompts.prompt_query(q)
        assert asked.question.startswith("Provide answer according to the labels:\nnormal - 'no disease'\n")
        text = vqa_reader._render(asked, vqa_dataset.corpus[0], ())
        assert "Options" not in text  # an open question offers no candidates
        assert tok.unk_token_id not in tok(text, add_special_tokens=False)["input_ids"]


def test_generate_batched_equals_one_at_a_time(vqa_dataset, vqa_reader):
    qs = _open(vqa_dataset)
    requests = [GenerateRequest(q, None if i % 3 == 0 else vqa_dataset.corpus[i]) for i, q in enumerate(qs[:9])]
    requests[4] = GenerateRequest(qs[4], CorpusItem("long", vqa_dataset.corpus[4].image,
                                                 vqa_dataset.corpus[4].text + " mild disease" * 6))
    batched = vqa_reader.generate(requests, vqa_dataset.root, batch_size=9)
    single = [vqa_reader.generate([r], vqa_dataset.root, batch_size=1)[0] for r in requests]
    assert batched == single
    assert all(isinstance(t, str) and t == t.strip() for t in batched)
    # the budget bounds the answer: at most generate_max_tokens words of the word-level vocabulary
    assert max(len(t.split()) for t in batched) <= vqa_reader.config.generate_max_tokens


def test_finetuned_reader_generates_the_open_answers_and_scores_gold_higher(vqa_dataset):
    reader = Reader.from_config(ReaderSettings(model="tiny", device="cpu", batch_size=16), dataset=vqa_dataset,
                                seed=0)
    prompts = Task.of(vqa_dataset.meta)
    items = {it.label: it for it in vqa_dataset.corpus}
    gold_of = {v: k for k, v in ANSWERS.items()}
    examples = [TargetRequest(prompts.prompt_query(q), items[gold_of[q.label]]) for q in _open(vqa_dataset)]
    before = reader.gold_logprobs(examples, vqa_dataset.root)
    finetune(reader, examples, vqa_dataset.root, FinetuneSettings(steps=60, batch_size=16, lr=5e-3, eval_every=0,
                                                                  closed_book_fraction=0.0))
    texts = reader.generate([GenerateRequest(r.query, r.context) for r in examples], vqa_dataset.root)
    assert np.mean([t == r.query.label for t, r in zip(texts, examples)]) >= 0.9  # stops after the answer
    after = reader.gold_logprobs(examples, vqa_dataset.root)
    assert after.mean() > before.mean() + 1.0 and (after <= 0).all()
    # gold score = mean per-token log p of the answer + end token, from one teacher-forced pass
    q, c = examples[0].query, examples[0].context
    ids = reader.target_ids(q)
    assert ids[-1] == reader.tokenizer.eos_token_id
    with torch.inference_mode():
        logits = reader.sequence_logits([(q, c, ())], [ids], vqa_dataset.root)
    logp = torch.log_softmax(logits[0, :-1].float(), -1)[torch.arange(len(ids)), torch.tensor(ids)]
    assert after[0] == pytest.approx(float(logp.mean()), abs=1e-5)


def test_generation_budget_is_checked():
    with pytest.raises(ValueError, match="generate_max_tokens must be at least 1"):
        ReaderSettings(generate_max_tokens=0).check()


def test_over_long_open_prompt_is_an_error(vqa_dataset):
    reader = Reader.from_config(ReaderSettings(model="tiny", device="cpu", max_length=40), dataset=vqa_dataset)
    q = _open(vqa_dataset)[0]
    with pytest.raises(ReaderError, match=r"query 'o000' .*exceeds the reader's context of 40 tokens"):
        reader.generate([GenerateRequest(q, vqa_dataset.corpus[0])], vqa_dataset.root)


def test_each_reader_method_takes_its_own_request_type(vqa_dataset, vqa_reader):
    """score: ScoreRequest, generate: GenerateRequest, gold_logprobs / answer_loss: TargetRequest; another type is
    refused with the method and the type it wants."""
    q = _open(vqa_dataset)[0]
    for method, wrong, wants in (("generate", ScoreRequest(q, None), "GenerateRequest"),
                                 ("gold_logprobs", GenerateRequest(q, None), "TargetRequest"),
                                 ("answer_loss", ScoreRequest(q, None), "TargetRequest"),
                                 ("score", TargetRequest(q, None), "ScoreRequest")):
        with pytest.raises(ReaderError, match=rf"Reader.{method}: request 0 is a \w+, not a {wants}"):
            getattr(vqa_reader, method)([wrong], vqa_dataset.root)


def test_multilabel_queries_become_per_label_yes_no_questions(tmp_path):
    rng = np.random.default_rng(0)
    with DatasetWriter(tmp_path / "ml") as w:
        rel = w.add_image("c0", _noise(rng, 0))
        w.corpus.append(CorpusItem("c0", rel, "report : opacity ."))
        w.queries["train"] += [Query("q0", rel, "Which findings?", ("opacity", "mass", "effusion"), "",
                                     label_set=("opacity", "effusion")),
                               Query("q1", rel, "Which findings?", ("mass", "opacity"), "", label_set=())]
        w.meta = DatasetMeta(name="ml", task="multilabel", labels=["opacity", "effusion", "mass"], allow_empty=True)
    ds = load_dataset(tmp_path / "ml")
    prompts = Task.of(ds.meta)
    q0, q1 = ds.queries["train"]
    asked = prompts.asked(q0)
    assert [a.question for a in asked] == ["Is opacity present?", "Is effusion present?", "Is mass present?"]
    assert [a.label for a in asked] == [YES, YES, NO] and all(a.candidates == (YES, NO) for a in asked)
    assert prompts.set_answer(q0, [0.9, 0.2, 0.7]) == "opacity, mass"
    assert prompts.set_answer(q0, [0.1, 0.2, 0.3]) == "none"
    assert prompts.set_answer(q1, [0.4, 0.51]) == "mass"  # q1 offers (opacity, mass), in label-set order
    strict = Task("multilabel", ("opacity", "effusion", "mass"), {}, allow_empty=False)
    assert strict.set_answer(q0, [0.1, 0.4, 0.3]) == "effusion"  # no empty set: the most probable label alone
    examples = prompts.training_requests([(q0, "ctx0"), (q1, None)])  # built on access, in pair order
    assert len(examples) == 5
    assert list(examples) == ([TargetRequest(a, "ctx0") for a in asked] +
                              [TargetRequest(a, None) for a in prompts.asked(q1)])
    assert examples[-1] == examples[4] and examples[1:3] == [TargetRequest(asked[1], "ctx0"),
                                                             TargetRequest(asked[2], "ctx0")]
    reader = Reader.from_config(ReaderSettings(model="tiny", device="cpu"), dataset=ds)
    scores = reader.score([ScoreRequest(a, ds.corpus[0]) for a in asked], ds.root)  # yes/no are in the vocabulary
    assert all(np.exp(s).sum() == pytest.approx(1) for s in scores)
