"""`dxrag run`'s pipeline with a transformers retriever (`hf:` directory) and an approximate index set from the
config: the encoder stage saves and reloads it, the index manifests record it, and a rerun reuses both."""

from __future__ import annotations

import json


from dxrag_test_support import SMALL


def test_pipeline_runs_with_an_hf_encoder_and_an_hnsw_index(tmp_path, tiny_hf_builder):
    import torch

    from dxrag.core.config import load_config
    from dxrag.core.data.synth import generate
    from dxrag.core.base.dataset import load_dataset
    from dxrag.core.pipeline import SYSTEMS, run_pipeline

    torch.set_num_threads(1)
    data = generate(tmp_path / "data", seed=0, **SMALL["data.synth"])
    texts = [item.text for item in load_dataset(data).corpus]
    model_dir = tiny_hf_builder(tmp_path / "tiny-clip", "clip", texts)
    overrides = {**{k: v for k, v in SMALL.items() if k != "data.synth"}, "threads": 1, "data.kind": "dir",
                 "data.path": str(data), "retriever.encoder": f"hf:{model_dir}",
                 "retriever.index": {"factory": "HNSW16", "ef_search": 32}}
    cfg = load_config(None, overrides)
    run_dir = tmp_path / "trained"
    summary = run_pipeline(cfg, run_dir, tmp_path / "reports")
    assert set(summary["metrics"]) >= set(SYSTEMS)
    assert (run_dir / "encoder" / "config.json").is_file()
    for head in ("image", "text"):
        manifest = json.loads((run_dir / "index" / head / "manifest.json").read_text())
        assert manifest["encoder_name"] == f"hf:{model_dir}" and manifest["factory"] == "HNSW16"
        assert manifest["params"]["ef_search"] == 32 and 0 < manifest["recall_vs_flat"]["recall"] <= 1
    again = run_pipeline(cfg, run_dir, tmp_path / "reports")  # every stage done: reloads encoder and indexes
    assert again["metrics"] == summary["metrics"]
