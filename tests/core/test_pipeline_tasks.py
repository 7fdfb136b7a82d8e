"""`dxrag run` on the other task types: a multi-label dataset (per-context label-set predictions, subset accuracy and
label macro-F1) and a VQA dataset with open and closed questions (generated answers for the open ones)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dxrag.core.base.answers import normalize_open
from dxrag.core.cli import main
from dxrag.core.base.dataset import DatasetError, load_dataset
from dxrag.core.base.records import format_label_set, parse_label_set

from dxrag_test_support import _sets
from task_fixtures import FINDINGS, OPEN_ANSWERS, multilabel_dataset, open_vqa_dataset

REPO = Path(__file__).resolve().parents[2]
# a few seconds of each stage: the contrastive pre-training is left out (the index uses the untrained encoder)
QUICK = {"retriever.pretrain": None, "reader.finetune.steps": 60, "reader.finetune.eval_every": 0,
         "reader.batch_size": 32, "distill.steps": 3, "distill.batch_size": 8, "distill.candidates": 4,
         "distill.refresh_every": 2, "distill.checkpoint_every": 2, "figures": False}


def _run(tmp: Path, data: Path, name: str) -> dict:
    sets = {**QUICK, "run": name, "data.kind": "dir", "data.path": str(data)}
    code = main(["run", "--config", str(REPO / "configs" / "embedded.yaml"), "--run-dir", str(tmp / "trained"),
                 "--report-dir", str(tmp / "reports"), *_sets(sets)])
    assert code == 0
    return json.loads((tmp / "trained" / "metrics.json").read_text())


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ml")
    return _run(tmp, multilabel_dataset(tmp / "data"), "ml")


@pytest.fixture(scope="module")
def vqa_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vqa")
    return _run(tmp, open_vqa_dataset(tmp / "data"), "vqa")


def _label_f1(gold: list[tuple], pred: list[tuple]) -> dict[str, float]:
    out = {}
    for label in FINDINGS:
        g = np.array([label in s for s in gold])
        p = np.array([label in s for s in pred])
        if g.any():
            out[label] = 2 * (g & p).sum() / (2 * (g & p).sum() + (~g & p).sum() + (g & ~p).sum())
    return out


def test_multilabel_run_writes_set_predictions_and_set_metrics(multilabel_run):
    summary = multilabel_run
    contexts, answers = _rows(summary["contexts"]), _rows(summary["answers"])
    assert len(contexts) == 2 * 10 * 4 and len(answers) == 3 * 10
    for r in contexts + answers:
        members = parse_label_set(r["prediction"], FINDINGS)
        assert members is not None and format_label_set(members, FINDINGS) == r["prediction"]  # canonical
        assert r["answer_type"] == "set" and list(r["probs"]) == list(FINDINGS)  # p(yes) of each offered label
        assert all(0.0 <= v <= 1.0 for v in r["probs"].values())
    assert {r["label"] for r in answers} >= {"none", "opacity, effusion, nodule"}
    # the reader learnt something from 60 steps: not one set for every context
    assert len({r["prediction"] for r in contexts}) > 1
    for system in ("closed-book", "rag", "joint"):
        m = summary["metrics"][system]
        rows = [r for r in answers if r["system"] == system]
        assert m["accuracy"] == pytest.approx(np.mean([r["prediction"] == r["label"] for r in rows]))
        f1 = _label_f1([parse_label_set(r["label"], FINDINGS) for r in rows],
                       [parse_label_set(r["prediction"], FINDINGS) for r in rows])
        assert m["macro_f1"] == pytest.approx(np.mean(list(f1.values())))
    assert summary["metrics"]["joint_vs_rag"]["n"] == 10
    assert Path(summary["report"], "summary.csv").exists()


def test_open_vqa_run_generates_answers_for_open_questions(vqa_run):
    summary = vqa_run
    contexts, answers = _rows(summary["contexts"]), _rows(summary["answers"])
    by_type = {t: [r for r in contexts + answers if r["answer_type"] == t] for t in ("closed", "open")}
    assert len(by_type["open"]) == len(by_type["closed"]) == (2 * 4 + 3) * 10
    assert all(r["query_id"].endswith("o") and r["probs"] is None for r in by_type["open"])
    assert all(r["query_id"].endswith("c") and r["prediction"] in r["probs"] for r in by_type["closed"])
    assert {r["label"] for r in by_type["open"]} <= set(OPEN_ANSWERS.values())
    generated = {r["prediction"] for r in by_type["open"]}
    assert generated and all(p == p.strip() for p in generated)
    assert generated & set(OPEN_ANSWERS.values())  # 60 steps teach it the answers' wording and where they stop
    for system in ("closed-book", "rag", "joint"):
        m = summary["metrics"][system]
        for kind in ("closed", "open"):
            rows = [r for r in answers if r["system"] == system and r["answer_type"] == kind]
            right = [normalize_open(r["prediction"]) == normalize_open(r["label"]) for r in rows]
            assert m["by_answer_type"][kind] == {"n": 10, "accuracy": pytest.approx(np.mean(right))}
        assert m["n"] == 20


def test_the_sweeps_reanalysis_uses_the_runs_empty_set_rule(multilabel_run, monkeypatch):
    """`dxrag sweep` / `--expect` re-analyse a run with its dataset's `allow_empty` (the multi-label dataset here
    allows the empty set), as the pipeline's own report does."""
    from dxrag.analysis.report import OracleReport
    from dxrag.core.sweep import seed_row

    seen = []
    real = OracleReport.from_tables.__func__

    def recording(cls, *args, **kwargs):
        seen.append(kwargs.get("answer_settings"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(OracleReport, "from_tables", classmethod(recording))
    row = seed_row(Path(multilabel_run["run_dir"]))
    assert [s.allow_empty for s in seen] == [True]
    assert row["rag_acc"] == multilabel_run["metrics"]["rag"]["accuracy"]


def _fusion_matches_the_pipeline(summary: dict, answer_type: str) -> None:
    """The report's `fusion` selector, recomputed from the logged context rows with the run's temperature and
    empty-set rule, picks the pipeline's fused answer on every query of `answer_type` (one fusion rule, one home)."""
    from dxrag.analysis import OracleReport
    from dxrag.core.base.answers import AnswerSettings, normalize_answer

    answers = [r for r in _rows(summary["answers"]) if r["answer_type"] == answer_type]
    report = OracleReport.from_tables(summary["contexts"], answers=summary["answers"], reference="rag",
                                      fusion_temperature=0.2, answer_settings=AnswerSettings(allow_empty=True))
    table, compared = report.contexts, 0
    for qm in report.metrics:
        fused = next(s for s in report.selectors[qm.system] if s.name == "fusion")
        assert fused.n_fallback == 0
        chosen = {table.query_ids[q]: table.answers[c] for q, c in zip(qm.matrix.query, fused.answers(qm))}
        for r in answers:
            if r["system"] == qm.system:
                assert chosen[r["query_id"]] == normalize_answer(r["prediction"], answer_type), r
                compared += 1
    assert compared == 2 * 10  # rag and joint, every query of the type


def test_report_fusion_is_the_pipelines_fused_set(multilabel_run):
    _fusion_matches_the_pipeline(multilabel_run, "set")


def test_report_fusion_is_the_pipelines_fused_open_answer(vqa_run):
    _fusion_matches_the_pipeline(vqa_run, "open")
    _fusion_matches_the_pipeline(vqa_run, "closed")


def test_bad_multilabel_and_open_rows_are_errors(tmp_path):
    data = multilabel_dataset(tmp_path / "ml")
    path = data / "queries-test.jsonl"
    lines = path.read_text().splitlines()
    row = json.loads(lines[1])
    lines[1] = json.dumps({**row, "label": ["opacity", "fracture"]})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"queries-test.jsonl:2: field 'label': \['fracture'\] not in the label set"):
        load_dataset(data, verify_checksums=False)
    data = open_vqa_dataset(tmp_path / "vqa")
    path = data / "queries-train.jsonl"
    lines = path.read_text().splitlines()
    row = json.loads(lines[1])
    assert row["metadata"]["answer_type"] == "open"
    lines[1] = json.dumps({**row, "label": "  "})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"queries-train.jsonl:2: field 'label': empty; an open question needs"):
        load_dataset(data, verify_checksums=False)


@pytest.mark.slow
def test_chestmnist_config_runs_on_a_generated_npz(tmp_path):
    """configs/chestmnist.yaml end to end (MedMNIST's multi-label flag, 14 findings) on a small generated npz in the
    MedMNIST layout (the real one needs a download), with the stages shortened."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 40), ("val", 6), ("test", 8)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (rng.random((n, 14)) < 0.15).astype(np.uint8)
    np.savez(tmp_path / "chestmnist.npz", **arrays)
    sets = {**QUICK, "data.npz": str(tmp_path / "chestmnist.npz"), "retriever.index": {"factory": "Flat"},
            "reader.finetune.steps": 20}
    code = main(["run", "--config", str(REPO / "configs" / "chestmnist.yaml"), "--run-dir", str(tmp_path / "t"),
                 "--report-dir", str(tmp_path / "r"), *_sets(sets)])
    assert code == 0
    summary = json.loads((tmp_path / "t" / "metrics.json").read_text())
    ds = load_dataset(tmp_path / "t" / "data")
    assert ds.meta.task == "multilabel" and len(ds.meta.labels) == 14
    contexts = _rows(summary["contexts"])
    assert len(contexts) == 2 * 8 * 4 and all(r["answer_type"] == "set" for r in contexts)  # top_n 2 per head
    assert all(parse_label_set(r["prediction"], ds.meta.labels) is not None for r in contexts)
    assert set(summary["metrics"]["rag"]) >= {"accuracy", "macro_f1", "micro_f1"}
