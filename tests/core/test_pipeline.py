"""The end-to-end job on a small embedded dataset: tables, metrics, report, and resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dxrag.core.config import ConfigError, load_config
from dxrag.core.pipeline import SYSTEMS, run_pipeline

from dxrag_test_support import SMALL, _sets

REPO = Path(__file__).resolve().parents[2]

def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tables_and_metrics(small_run):
    base, summary = small_run
    contexts = _rows(Path(summary["contexts"]))
    answers = _rows(Path(summary["answers"]))
    assert {r["system"] for r in answers} == set(SYSTEMS)
    assert {r["system"] for r in contexts} == {"rag", "joint"}
    assert len(answers) == 3 * 40
    assert len(contexts) == 2 * 40 * 4  # top-2 per head, 2 heads
    assert {r["rank"] for r in contexts} == {1, 2, 3, 4}
    assert {r["head"] for r in contexts} == {"image", "text"}
    for r in contexts[:20]:
        assert abs(sum(r["probs"].values()) - 1) < 1e-4
        assert r["prediction"] == max(r["probs"], key=r["probs"].get)
    assert set(summary["metrics"]) == {*SYSTEMS, "joint_vs_rag"}
    for system in SYSTEMS:
        m = summary["metrics"][system]
        assert 0 <= m["accuracy_lo"] <= m["accuracy"] <= m["accuracy_hi"] <= 1 and 0 <= m["macro_f1"] <= 1
        by_query = {r["query_id"]: r for r in answers if r["system"] == system}
        assert m["accuracy"] == pytest.approx(np.mean([r["label"] == r["prediction"] for r in by_query.values()]))
    paired = summary["metrics"]["joint_vs_rag"]
    right = {s: {r["query_id"] for r in answers if r["system"] == s and r["label"] == r["prediction"]}
             for s in ("joint", "rag")}
    assert (paired["only_joint"], paired["only_rag"]) == (len(right["joint"] - right["rag"]),
                                                           len(right["rag"] - right["joint"]))
    run_json = json.loads((base / "trained" / "run.json").read_text())
    assert run_json["seed"] == 0 and "torch" in run_json["versions"] and run_json["config"]["run"] == "small"
    assert (base / "trained" / "heads" / "text.safetensors").exists()
    assert (base / "reports" / "summary.csv").exists()


def test_val_queries_limits_the_validation_predictions(small_run, tmp_path):
    """`inference.val_queries`: validation predictions for a seeded sample of that many queries; the test split's
    predictions are those of the run that predicts every validation query."""
    _, full = small_run
    cfg = load_config(REPO / "configs" / "embedded.yaml", {**SMALL, "inference.val_queries": 7})
    summary = run_pipeline(cfg, tmp_path / "trained", tmp_path / "reports")
    val = _rows(Path(summary["val_answers"]))
    every = _rows(Path(full["val_answers"]))
    assert len({r["query_id"] for r in every}) == 30 and len(val) == 3 * 7
    kept = {r["query_id"] for r in val}
    assert len(kept) == 7 and all(r["query_id"] in kept for r in _rows(Path(summary["val_contexts"])))
    assert _rows(Path(summary["answers"])) == _rows(Path(full["answers"]))


def test_rerun_skips_everything(small_run):
    base, summary = small_run
    cfg = load_config(REPO / "configs" / "embedded.yaml", SMALL)
    again = run_pipeline(cfg, base / "trained", base / "reports")
    assert again["metrics"] == summary["metrics"]
    assert again["timings"]["reader"] < summary["timings"]["reader"]
    # metrics.json keeps what building the stages cost, not only the reload times of the latest invocation
    assert summary["invocations"] == [{"timings": summary["timings"], "wall_s": summary["wall_s"],
                                       "reused_stages": []}]
    assert again["invocations"][0] == summary["invocations"][0] and again["invocations"][-1]["reused_stages"]
    assert json.loads((base / "trained" / "metrics.json").read_text())["invocations"] == again["invocations"]


def test_other_config_is_refused(small_run):
    base, _ = small_run
    cfg = load_config(REPO / "configs" / "embedded.yaml", {**SMALL, "distill.steps": 13})
    with pytest.raises(ConfigError, match="differs at distill.steps"):
        run_pipeline(cfg, base / "trained", base / "reports")


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'stepz'; valid keys: .*steps"):
        load_config(REPO / "configs" / "embedded.yaml", {"distill.stepz": 3})
    with pytest.raises(ConfigError, match=r"distill.steps: expected int, got str"):
        load_config(REPO / "configs" / "embedded.yaml", {"distill.steps": "many"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("reader: [1, 2]\n")
    with pytest.raises(ConfigError, match=f"{bad}.*reader: expected a mapping"):
        load_config(bad)


@pytest.mark.parametrize("key, value", [("distill.steps", -1), ("inference.top_n", 0), ("distill.batch_size", 0),
                                        ("reader.batch_size", 0), ("retriever.batch_size", 0),
                                        ("reader.finetune.batch_size", 0), ("distill.candidates", 0),
                                        ("inference.val_queries", 0)])
def test_counts_are_checked_at_load(key, value):
    with pytest.raises(ConfigError, match=rf"embedded.yaml: {key.replace('.', '[.]')} must be at least \d, got {value}"):
        load_config(REPO / "configs" / "embedded.yaml", {key: value})


def test_other_cpu_kernels_are_refused(small_run, monkeypatch):
    base, _ = small_run
    assert json.loads((base / "trained" / "run.json").read_text())["cpu_kernels"]["level"] == "avx2"
    monkeypatch.setenv("DXRAG_CPU_KERNELS", "native")
    cfg = load_config(REPO / "configs" / "embedded.yaml", SMALL)
    with pytest.raises(ConfigError, match=r"differs at CPU kernels \(avx2 then, native now"):
        run_pipeline(cfg, base / "trained", base / "reports")


def test_changed_queries_or_corpus_are_refused(tmp_path):
    import dataclasses

    from dxrag.core.data.synth import generate
    from dxrag.core.base.dataset import load_dataset
    from dxrag.core.pipeline import check_inputs

    ds = load_dataset(generate(tmp_path / "data", seed=0, **SMALL["data.synth"]))
    run = tmp_path / "run"
    run.mkdir()
    check_inputs(run, ds)  # first start: recorded
    check_inputs(run, ds)  # same inputs: continues
    test = list(ds.queries["test"])
    test[3] = dataclasses.replace(test[3], label="severe" if test[3].label != "severe" else "mild")
    with pytest.raises(ConfigError, match=r"changed since this run began \(test queries differ.*--overwrite"):
        check_inputs(run, dataclasses.replace(ds, queries={**ds.queries, "test": test}))
    with pytest.raises(ConfigError, match=r"\(test queries differ"):
        check_inputs(run, dataclasses.replace(ds, queries={**ds.queries, "test": ds.queries["test"][:-1]}))
    (ds.root / "corpus.jsonl").write_text((ds.root / "corpus.jsonl").read_text() + "\n")
    ds.meta.checksums.clear()
    with pytest.raises(ConfigError, match=r"\(corpus differ"):
        check_inputs(run, ds)


def test_a_start_that_finished_no_stage_does_not_lock_the_run_dir(tmp_path):
    from dxrag.core.base.dataset import DatasetError

    run_dir = tmp_path / "trained"
    for name in ("missing-a", "missing-b"):  # a wrong path, then the corrected config (wrong again, differently)
        cfg = load_config(REPO / "configs" / "embedded.yaml",
                          {**SMALL, "data.kind": "dir", "data.path": str(tmp_path / name)})
        with pytest.raises(DatasetError, match=name):
            run_pipeline(cfg, run_dir, tmp_path / "reports")
        assert json.loads((run_dir / "run.json").read_text())["config"]["data"]["path"].endswith(name)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(small_run, tmp_path):
    """Kill a run during retriever distillation, resume it, and compare with the uninterrupted run."""
    base, summary = small_run
    run_dir = tmp_path / "trained"
    cmd = [sys.executable, "-m", "dxrag.core.cli", "run", "--config", str(REPO / "configs" / "embedded.yaml"),
           "--run-dir", str(run_dir), "--report-dir", str(tmp_path / "reports"), *_sets(SMALL)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = run_dir / "checkpoints" / "distill-text" / "state.json"
    deadline = time.time() + 600
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before its first distillation checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "stages" / "distill-text.json").exists()
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_same_tables(run_dir, summary, exact=True)  # the judge cache came back with the checkpoint


def _assert_same_tables(run_dir: Path, summary: dict, exact: bool = False) -> None:
    """Same predictions; `exact`: every number equal, else probabilities equal up to float noise (batches composed
    differently: batched scores equal one-at-a-time scores to ~1e-7, not bit for bit)."""
    for name in ("contexts", "answers"):
        got, want = _rows(run_dir / "predictions" / f"{name}.jsonl"), _rows(Path(summary[name]))
        assert len(got) == len(want)
        if exact:
            assert got == want
            continue
        for a, b in zip(got, want):
            assert {k: v for k, v in a.items() if k not in ("probs", "retrieval_score")} == \
                   {k: v for k, v in b.items() if k not in ("probs", "retrieval_score")}
            assert a["probs"] == pytest.approx(b["probs"], abs=1e-4)
            if "retrieval_score" in a:
                assert a["retrieval_score"] == pytest.approx(b["retrieval_score"], abs=1e-5)


@pytest.mark.slow
def test_two_processes_give_the_same_tables(small_run, tmp_path):
    """torchrun with 2 CPU processes (gloo): sharded reader training, distillation scoring and predictions."""
    base, summary = small_run
    run_dir = tmp_path / "trained"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "dxrag.core.cli", "run", "--config", str(REPO / "configs" / "embedded.yaml"),
           "--run-dir", str(run_dir), "--report-dir", str(tmp_path / "reports"), *_sets(SMALL)]
    done = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "predictions").glob("log-*.jsonl")) == ["log-0.jsonl", "log-1.jsonl"]
    assert json.loads((run_dir / "run.json").read_text())["world_size"] == 2
    _assert_same_tables(run_dir, summary)


def test_helpers_exclusions_interleave_fuse(tmp_path):
    import numpy as np
    from PIL import Image

    from dxrag.core.base.dataset import DatasetMeta, DatasetWriter, load_dataset
    from dxrag.core.base.fusion import fuse
    from dxrag.core.stages import answerable, interleave, same_image_exclusions
    from dxrag.core.base.records import CorpusItem, Query

    with DatasetWriter(tmp_path / "d") as w:
        for i in range(3):
            rel = w.add_image(f"c{i}", Image.new("RGB", (4, 4), (i, 0, 0)))
            w.corpus.append(CorpusItem(f"c{i}", rel, "t", "a", {"source_split": "train", "source_index": i}))
        w.queries["train"] += [Query("q0", "images/c1.png", "?", ("a", "b"), "a",
                                     {"source_split": "train", "source_index": 1}),
                               Query("q1", "images/c2.png", "?", (), "free text", {"answer_type": "open"}),
                               Query("q2", "images/c0.png", "?", ("a",), "a")]
        w.meta = DatasetMeta(name="d", task="vqa", labels=["a", "b"],
                             extra={"same_image_keys": ["source_split", "source_index"]})
    ds = load_dataset(tmp_path / "d")
    assert same_image_exclusions(ds, ds.queries["train"]) == [{"c1"}, set(), set()]
    # open questions are kept (answered by generation); a closed question needs two candidates
    assert [q.id for q in answerable(ds).queries["train"]] == ["q0", "q1"]
    ranked = interleave({"image": [("c0", 0.9), ("c1", 0.8)], "text": [("c2", 0.3)]}, ["image", "text"])
    assert ranked == [("image", "c0", 0.9), ("text", "c2", 0.3), ("image", "c1", 0.8)]
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert fuse(probs, np.array([0.5, 0.5]), 0.1) == pytest.approx([0.5, 0.5])
    assert fuse(probs, np.array([0.9, 0.3]), 0.2) == pytest.approx([1 / (1 + np.exp(-3)), 1 - 1 / (1 + np.exp(-3))])


def test_cli_reports_input_errors_without_traceback(tmp_path, capsys):
    from dxrag.core.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("distill: {steps: many}\n")
    assert main(["run", "--config", str(bad)]) == 2
    assert "distill.steps: expected int" in capsys.readouterr().err
    missing = tmp_path / "nope"
    assert main(["run", "--config", str(REPO / "configs" / "embedded.yaml"), "--run-dir", str(tmp_path / "t"),
                 "--report-dir", str(tmp_path / "r"), "--set", "data.kind=dir", "--set", f"data.path={missing}"]) == 2
    assert f"{missing}: not a directory" in capsys.readouterr().err


def test_a_second_process_on_one_run_directory_is_refused_before_it_touches_anything(tmp_path):
    """Two `dxrag run`s on one run directory would interleave checkpoints and stage markers (it happened to a sweep
    started twice): the second stops at once, naming the directory and the first one's PID, and changes nothing."""
    from dxrag.core.base.fsutil import process_lock

    cfg = load_config(REPO / "configs" / "embedded.yaml")
    run_dir = tmp_path / "run"
    with process_lock(tmp_path / ".run.lock", "the first run"):
        with pytest.raises(ConfigError, match=rf"run directory {run_dir} is in use by another dxrag process "
                                              rf"\(PID {os.getpid()}\)"):
            run_pipeline(cfg, run_dir, tmp_path / "report")
    assert not run_dir.exists() and not (tmp_path / "report").exists()
