"""Generated multi-label and open-VQA datasets for the task-type tests: the synthetic exams relabelled, so the images
and the report texts (what retrieval ranks by) still carry the grade the new labels are derived from."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dxrag.core.data.synth import GRADES, generate
from dxrag.core.base.dataset import DatasetMeta, DatasetWriter, load_dataset
from dxrag.core.base.records import CorpusItem, Query

FINDINGS = ("opacity", "effusion", "nodule")
# grade index -> the findings present (grade 0: the empty set)
GRADE_FINDINGS = {0: (), 1: ("opacity",), 2: ("opacity", "nodule"), 3: ("opacity", "effusion"),
                  4: ("opacity", "effusion", "nodule")}
# grade -> free-text answer of the open question (words of the report texts and questions)
OPEN_ANSWERS = {0: "no lesion spots", 1: "a few spots", 2: "dot haemorrhages", 3: "venous beading",
                4: "neovascularisation"}
OPEN_QUESTION = "What does the exam show?"
# small, and the generator without latent difficulty (the images these tests were written against)
SIZES = {"n_patients": 12, "n_corpus": 48, "n_train": 24, "n_val": 8, "n_test": 10, "lesion_haze": 0.0,
         "lesion_fade": 0.0, "noise_gain": 0.0, "jitter_gain": 0.0, "misleading_fraction": 0.05,
         "mislabeled_fraction": 0.03}


def _copy(w: DatasetWriter, src: Path, rel: str, name: str) -> str:
    return w.copy_image(src / rel, name)


def multilabel_dataset(out: Path, allow_empty: bool = True, seed: int = 0) -> Path:
    """A multi-label dataset: labels FINDINGS, each query's gold set GRADE_FINDINGS of its grade."""
    base = load_dataset(generate(out.parent / f"{out.name}-synth", seed=seed, **SIZES))
    with DatasetWriter(out) as w:
        for item in base.corpus:
            w.corpus.append(CorpusItem(item.id, _copy(w, base.root, item.image, item.id), item.text, None,
                                       item.metadata))
        for split, qs in base.queries.items():
            for q in qs:
                members = GRADE_FINDINGS[GRADES.index(q.label)]
                if not members and not allow_empty:
                    members = ("opacity",)
                w.queries[split].append(Query(q.id, _copy(w, base.root, q.image, q.id),
                                              "Which of these findings are present?", FINDINGS, "", q.metadata,
                                              label_set=tuple(f for f in FINDINGS if f in members)))
        w.meta = DatasetMeta(name="ml-fixture", task="multilabel", labels=list(FINDINGS), allow_empty=allow_empty,
                             description="test fixture: synthetic exams relabelled as finding sets")
    return out


def open_vqa_dataset(out: Path, seed: int = 0) -> Path:
    """A VQA dataset: per exam the closed grade question and an open question (answer OPEN_ANSWERS of its grade)."""
    base = load_dataset(generate(out.parent / f"{out.name}-synth", seed=seed, **SIZES))
    with DatasetWriter(out) as w:
        for item in base.corpus:
            w.corpus.append(CorpusItem(item.id, _copy(w, base.root, item.image, item.id), item.text, item.label,
                                       item.metadata))
        for split, qs in base.queries.items():
            for q in qs:
                rel = _copy(w, base.root, q.image, q.id)
                w.queries[split].append(Query(q.id + "c", rel, q.question, q.candidates, q.label,
                                              {**q.metadata, "answer_type": "closed"}))
                w.queries[split].append(Query(q.id + "o", rel, OPEN_QUESTION, (),
                                              OPEN_ANSWERS[GRADES.index(q.label)],
                                              {**q.metadata, "answer_type": "open"}))
        w.meta = DatasetMeta(name="vqa-fixture", task="vqa", labels=list(GRADES),
                             description="test fixture: synthetic exams with closed and open questions")
    return out


def rewrite_set(members: list[str], rng: np.random.Generator) -> str:
    """The same set written differently: shuffled, random case and spacing, a duplicate, an empty part."""
    if not members:
        return (" None", "none ", "NONE")[int(rng.integers(3))]
    parts = [m.upper() if rng.random() < 0.5 else m for m in rng.permutation(members)]
    if parts and rng.random() < 0.5:
        parts.append(parts[0])
    if rng.random() < 0.5:
        parts.insert(int(rng.integers(len(parts) + 1)), "")
    return ",".join(" " * int(rng.integers(3)) + p + " " * int(rng.integers(3)) for p in parts)
