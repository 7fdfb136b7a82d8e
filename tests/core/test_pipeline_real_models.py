"""The real-models path of configs/qwen2vl-7b.yaml on tiny local stand-ins: a `local-dir:` open_clip encoder, a
Qwen2-VL saved as a local HF model directory (LoRA on), and a ROCO-style JSONL corpus; plus `dxrag data corpus`; and
configs/pixtral-12b.yaml, qwen2.5-vl-7b.yaml, medgemma-4b.yaml with tiny stand-ins of their reader families.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dxrag.core.cli import main
from dxrag.core.data.corpus import build_corpus_dataset
from dxrag.core.base.dataset import DatasetError, load_dataset

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "qwen2vl-7b.yaml"


@pytest.fixture(scope="module")
def roco(tmp_path_factory) -> dict[str, Path]:
    """A small synthetic dataset (for its queries) and its corpus re-exported as a ROCO-style JSONL whose img_path
    values are relative to the JSONL's directory."""
    from dxrag.core.data.synth import generate

    base = tmp_path_factory.mktemp("roco")
    queries = generate(base / "queries", seed=1, n_patients=20, n_corpus=60, n_train=24, n_val=8, n_test=12)
    source = load_dataset(queries)
    jsonl = base / "roco.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for item in source.corpus:
            f.write(json.dumps({"id": f"ROCO_{item.id}", "img_path": f"queries/{item.image}", "text": item.text,
                                "source": "synthetic"}) + "\n")
    return {"base": base, "queries": queries, "jsonl": jsonl}


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ corpus builder


def test_corpus_builder_references_images_and_keeps_queries(roco, tmp_path):
    out = tmp_path / "built"
    assert main(["data", "corpus", "--jsonl", str(roco["jsonl"]), "--queries-from", str(roco["queries"]),
                 "--out", str(out)]) == 0
    ds = load_dataset(out, decode_images=True)
    source = load_dataset(roco["queries"])
    assert [c.id for c in ds.corpus] == [f"ROCO_{c.id}" for c in source.corpus]
    assert all(Path(c.image).is_absolute() and Path(c.image).is_file() for c in ds.corpus)
    assert ds.corpus[0].image == str((roco["queries"] / source.corpus[0].image).resolve())
    assert ds.corpus[0].metadata == {"source": "synthetic"}
    assert not any((out / "images").iterdir())  # nothing copied
    assert {s: [q.id for q in rows] for s, rows in ds.queries.items()} == \
        {s: [q.id for q in rows] for s, rows in source.queries.items()}
    assert all(Path(q.image).is_absolute() for rows in ds.queries.values() for q in rows)
    assert ds.meta.labels == source.meta.labels and ds.meta.task == source.meta.task
    from dxrag.core.base.dataset import sha256_file

    assert ds.meta.extra["corpus_jsonl_sha256"] == sha256_file(roco["jsonl"])
    assert "same_image_keys" not in ds.meta.extra and "same_image_keys" not in ds.meta.extra["queries_extra"]


def test_corpus_builder_image_root(roco, tmp_path):
    rows = [{"id": "a", "img_path": "images/c000000.png", "text": "grade 1"},
            {"id": "b", "img_path": str((roco["queries"] / "images" / "c000001.png").resolve()), "text": "x"}]
    jsonl = _write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(DatasetError, match=rf"{jsonl}:1: field 'img_path': image file .* not found"):
        build_corpus_dataset(jsonl, roco["queries"], tmp_path / "out")
    out = build_corpus_dataset(jsonl, roco["queries"], tmp_path / "out", image_root=roco["queries"])
    assert [c.image for c in load_dataset(out).corpus] == \
        [str((roco["queries"] / "images" / f"c00000{i}.png").resolve()) for i in range(2)]


GOOD = {"id": "a", "img_path": "queries/images/c000000.png", "text": "a caption"}


@pytest.mark.parametrize("rows, message", [
    ([GOOD, {"img_path": GOOD["img_path"], "text": "t"}], r":2: missing required field 'id'"),
    ([GOOD, {"id": "b", "img_path": GOOD["img_path"]}], r":2: missing required field 'text'"),
    ([{"id": 7, "img_path": GOOD["img_path"], "text": "t"}], r":1: field 'id' must be a string, got int"),
    ([GOOD, "", {**GOOD, "text": ["a"]}], r":3: field 'text' must be a string, got list"),
    ([GOOD, {**GOOD, "text": "again"}], r":2: field 'id': duplicate id 'a' \(first at line 1\)"),
    ([GOOD, {**GOOD, "id": "b", "img_path": "queries/images/nope.png"}], r":2: field 'img_path': image file .*nope"),
    ([GOOD, '{"id": "b", '], r":2: not valid JSON"),
    ([GOOD, "[1, 2]"], r":2: expected a JSON object .*got list"),
    ([{**GOOD, "img_path": " "}], r":1: field 'img_path' is empty"),
])
def test_corpus_builder_rejects_bad_lines_and_leaves_nothing(roco, rows, message):
    jsonl = _write_jsonl(roco["base"] / "bad.jsonl", rows)  # beside the good one: relative paths resolve
    out = roco["base"] / "bad-out"
    with pytest.raises(DatasetError, match=rf"^{jsonl}{message}"):
        build_corpus_dataset(jsonl, roco["queries"], out)
    assert not out.exists()
    assert not [p for p in roco["base"].iterdir() if p.name.startswith(".bad-out")]  # no temporary directory


def test_corpus_builder_refuses_bad_arguments(roco, tmp_path):
    assert main(["data", "corpus", "--jsonl", str(tmp_path / "missing.jsonl"), "--queries-from",
                 str(roco["queries"]), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
    with pytest.raises(DatasetError, match="is the --queries-from directory"):
        build_corpus_dataset(roco["jsonl"], roco["queries"], roco["queries"], overwrite=True)
    empty = _write_jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DatasetError, match="no corpus items"):
        build_corpus_dataset(empty, roco["queries"], tmp_path / "o")
    with pytest.raises(DatasetError, match="already exists"):
        build_corpus_dataset(roco["jsonl"], roco["queries"], roco["queries"].parent)


# ------------------------------------------------------------------------------------------------ the retriever


def _biomedclip_shaped_encoder(out: Path) -> Path:
    """A `local-dir:` open_clip model shaped like BiomedCLIP: an HF BERT text tower with its own HF tokenizer
    (`hf_model_name` / `hf_tokenizer_name`), here a 1-layer BERT saved locally, and the tiny config's vision tower."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from dxrag.core.retrieval.encoders import MODEL_CONFIG_DIR, TINY_MODEL

    bert = out / "bert"
    bert.mkdir(parents=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "grade", "findings", "retina", "0", "1", "2", "."]
    (bert / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(bert / "vocab.txt"))
    tokenizer.save_pretrained(bert)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(bert)
    tiny = json.loads((MODEL_CONFIG_DIR / f"{TINY_MODEL}.json").read_text(encoding="utf-8"))
    model_dir = out / "biomedclip-shaped"
    model_dir.mkdir()
    model_cfg = {"embed_dim": tiny["embed_dim"], "vision_cfg": tiny["vision_cfg"],
                 "text_cfg": {"hf_model_name": str(bert), "hf_tokenizer_name": str(bert), "hf_proj_type": "mlp",
                              "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 32}}
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}), encoding="utf-8")
    tokenizer.save_pretrained(model_dir)  # open_clip reads a local-dir model's HF tokenizer from the directory
    return model_dir


def test_biomedclip_shaped_encoder_survives_the_encoder_stage_round_trip(tmp_path):
    """The pipeline's encoder stage saves the loaded encoder and reloads it as `local-dir:`; a model with an HF text
    tower must come back with its tokenizer and give the same text embeddings."""
    import numpy as np

    from dxrag.core.retrieval.encoders import Encoder

    encoder = Encoder.load(f"local-dir:{_biomedclip_shaped_encoder(tmp_path)}")
    texts = ["grade 2 findings .", "retina grade 0"]
    reloaded = Encoder.load(f"local-dir:{encoder.save(tmp_path / 'saved')}")
    assert reloaded.weights_hash == encoder.weights_hash
    np.testing.assert_allclose(reloaded.encode_texts(texts), encoder.encode_texts(texts), atol=1e-6)


# ------------------------------------------------------------------------------------------------ the GPU config


def test_qwen2vl_config_is_the_setting_the_design_documents():
    """docs/design.md ("The paper's settings") describes configs/qwen2vl-7b.yaml: every setting it quotes is the one
    the loaded config holds (a change to either without the other fails here)."""
    from dxrag.core.config import load_config

    cfg = load_config(CONFIG)
    design = " ".join((REPO / "docs" / "design.md").read_text(encoding="utf-8").split())
    section = design[design.index("## The paper's settings"):design.index("## Architecture")]
    lora, tune, d = cfg.reader.lora, cfg.reader.finetune, cfg.distill
    heads = " then ".join(f"{h} head" for h in d.heads)

    def lr(x: float) -> str:  # 1e-4, as the design writes it
        return f"{x:.0e}".replace("e-0", "e-")

    quoted = [f"reader {cfg.reader.model.split('/')[-1]}",
              f"LoRA rank {lora.r}, alpha {lora.alpha}, dropout {lora.dropout:g}",
              f"lr {lr(tune.lr)}, cosine schedule with {tune.warmup_fraction:.0%} warm-up",
              f"top-{tune.contexts_per_head} items per head; distillation",
              f"K = {d.candidates} candidates", f"snapshot refreshed every {d.refresh_every} steps",
              f"α = {d.alpha:g}", f"AdamW lr {lr(d.lr)}, {heads}",
              f"inference with the top-{cfg.inference.top_n} items"]
    missing = [q for q in quoted if q not in section]
    assert not missing, missing
    assert cfg.retriever.encoder.startswith("hf-hub:") and cfg.retriever.pretrain is None  # a pretrained retriever
    assert cfg.reader.dtype == "bfloat16" and cfg.retriever.index.factory == "Flat"  # "exact inner-product search"


def test_pipeline_runs_the_gpu_config_on_local_stand_ins(roco, tmp_path):
    """configs/qwen2vl-7b.yaml with only model names/paths, device, dtype and sizes swapped: the hf-hub/hub loading
    path (local-dir: encoder, from_pretrained reader) with LoRA adapters, end to end."""
    import torch

    from dxrag.core.config import load_config
    from dxrag.core.pipeline import SYSTEMS, run_pipeline
    from dxrag.core.reader.model import Reader
    from dxrag.core.reader.settings import ReaderSettings
    from dxrag.core.retrieval.encoders import TINY_MODEL, Encoder

    data = build_corpus_dataset(roco["jsonl"], roco["queries"], tmp_path / "retinamnist-roco")
    ds = load_dataset(data)
    encoder_dir = Encoder.load(TINY_MODEL).save(tmp_path / "clip")
    reader_dir = Reader.from_config(ReaderSettings(model="tiny", device="cpu", dtype="float32"), ds).save(
        tmp_path / "qwen2vl")
    base_weights = {k: v.clone() for k, v in
                    Reader.from_config(ReaderSettings(model=str(reader_dir), device="cpu")).hf_model.state_dict().items()}
    overrides = {
        "threads": 1, "figures": False,
        "data.path": str(data),
        "retriever.encoder": f"local-dir:{encoder_dir}",
        "reader.model": str(reader_dir), "reader.device": "cpu", "reader.dtype": "float32",
        "retriever.device": "cpu",
        "reader.finetune.steps": 8, "reader.finetune.batch_size": 8, "reader.finetune.eval_every": 0,
        "reader.finetune.checkpoint_every": 4,
        "distill.steps": 4, "distill.batch_size": 8, "distill.candidates": 8, "distill.refresh_every": 2,
        "distill.checkpoint_every": 2, "probe.mode": "off",
    }
    cfg = load_config(CONFIG, overrides)
    assert cfg.reader.lora is not None and cfg.retriever.pretrain is None
    run_dir = tmp_path / "trained"
    summary = run_pipeline(cfg, run_dir, tmp_path / "reports")

    assert set(summary["metrics"]) == {*SYSTEMS, "joint_vs_rag"}
    answers = [json.loads(line) for line in (run_dir / "predictions" / "answers.jsonl").read_text().splitlines()]
    contexts = [json.loads(line) for line in (run_dir / "predictions" / "contexts.jsonl").read_text().splitlines()]
    n_test = len(ds.queries["test"])
    assert sorted({a["system"] for a in answers}) == sorted(SYSTEMS) and len(answers) == 3 * n_test
    assert {c["system"] for c in contexts} == {"rag", "joint"} and len(contexts) == 2 * n_test * 4
    assert all(c["item_id"].startswith("ROCO_") for c in contexts)
    assert (tmp_path / "reports" / "summary.csv").is_file()

    # LoRA: only adapters trained and were saved (safetensors), the base model's weights are untouched
    reader_out = run_dir / "reader"
    assert (reader_out / "adapter_model.safetensors").is_file()
    assert not list(reader_out.glob("model*.safetensors"))
    from safetensors import safe_open

    with safe_open(str(reader_out / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys)
    history = json.loads((run_dir / "stages" / "reader.json").read_text())["history"]
    assert 0 < history["trainable_parameters"] < sum(v.numel() for v in base_weights.values()) / 2
    # the trained adapters loaded over the base: every base weight is the one the run started from, the adapters moved
    # (peft initialises lora_B to zero, so a nonzero lora_B is the fine-tuning's doing)
    trained = Reader.from_config(ReaderSettings(model=str(reader_dir), adapter=str(reader_out), device="cpu"))
    state = trained.hf_model.state_dict()
    base_part = {k.removeprefix("base_model.model.").replace(".base_layer.", "."): v
                 for k, v in state.items() if "lora_" not in k}
    assert base_part.keys() == base_weights.keys()
    assert all(torch.equal(base_part[k], v) for k, v in base_weights.items())
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)

    config = json.loads((run_dir / "run.json").read_text())["config"]
    assert config["retriever"]["encoder"] == f"local-dir:{encoder_dir}"
    assert config["reader"]["model"] == str(reader_dir) and config["reader"]["lora"]["r"] == 8
    assert (config["distill"]["tau_gold"], config["distill"]["alpha"]) == (1.0, 0.15)


# ------------------------------------------------------------------------------------------------ other reader families

# (config, model name it holds, tiny stand-in family, the YAML's max_pixels)
FAMILY_CONFIGS = [("pixtral-12b", "mistral-community/pixtral-12b", "llava", 262144),
                  ("qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl", 401408),
                  ("medgemma-4b", "google/medgemma-4b-it", "gemma3", None)]
SMALL_IMAGES = {"llava": 32 * 32, "qwen2_5_vl": 56 * 56, "gemma3": None}  # a tiny stand-in's budget (short prompts)


@pytest.fixture(scope="module")
def family_dirs(roco, tmp_path_factory):
    """A saved tiny reader of each stand-in family, vocabulary from the ROCO-style dataset."""
    from dxrag.core.reader.model import Reader
    from dxrag.core.reader.settings import ReaderSettings, TinyReaderSettings

    out = tmp_path_factory.mktemp("family-readers")
    data = build_corpus_dataset(roco["jsonl"], roco["queries"], out / "retinamnist-roco")
    ds = load_dataset(data)
    dirs = {"data": data}
    for _, _, family, _ in FAMILY_CONFIGS:
        settings = ReaderSettings(model="tiny", device="cpu", dtype="float32", tiny=TinyReaderSettings(family=family))
        dirs[family] = Reader.from_config(settings, ds).save(out / family)
    return dirs


@pytest.mark.parametrize("name, model, family, max_pixels", FAMILY_CONFIGS)
def test_family_config_builds_its_reader_from_a_tiny_stand_in(family_dirs, name, model, family, max_pixels):
    """The YAML names the real model; with the model swapped for a saved tiny dir of the same family, the config's
    reader section loads (pixel budget through the family's processor kwargs, LoRA) and scores."""
    import numpy as np

    from dxrag.core.config import load_config
    from dxrag.core.reader.model import Reader, ScoreRequest, TargetRequest

    path = REPO / "configs" / f"{name}.yaml"
    cfg = load_config(path)
    assert (cfg.reader.model, cfg.reader.max_pixels, cfg.reader.dtype) == (model, max_pixels, "bfloat16")
    assert cfg.reader.lora is not None and cfg.run.startswith(name)
    cfg = load_config(path, {"reader.model": str(family_dirs[family]), "reader.device": "cpu",
                             "reader.dtype": "float32", "reader.max_pixels": SMALL_IMAGES[family]})
    reader = Reader.from_config(cfg.reader)
    assert reader.family.model_type == family
    if family == "llava":
        assert reader.processor.image_processor.size["longest_edge"] == 32  # sqrt of the pixel budget
    ds = load_dataset(family_dirs["data"])
    requests = [ScoreRequest(q, ds.corpus[i]) for i, q in enumerate(ds.queries["test"][:3])]
    for s in reader.score(requests, ds.root):
        assert np.exp(s).sum() == pytest.approx(1.0, abs=1e-6)
    reader.add_lora(cfg.reader.lora)
    assert reader.answer_loss([TargetRequest(r.query, r.context) for r in requests], ds.root).item() > 0


def test_fixed_size_family_rejects_a_pixel_budget(family_dirs):
    from dxrag.core.reader.model import Reader, ReaderError
    from dxrag.core.reader.settings import ReaderSettings

    with pytest.raises(ReaderError, match=r"reader.max_pixels: model type 'gemma3' resizes images to a fixed size; "
                                          r"set max_pixels to null"):
        Reader.from_config(ReaderSettings(model=str(family_dirs["gemma3"]), device="cpu", max_pixels=4096))


@pytest.mark.parametrize("name, model, family, max_pixels", FAMILY_CONFIGS)
def test_dxrag_run_with_a_tiny_reader_of_each_family(family_dirs, tmp_path, name, model, family, max_pixels):
    """`dxrag run --config configs/<name>.yaml` end to end with the reader swapped for a saved tiny dir of its family
    (LoRA fine-tuning, distillation with the reader as teacher, per-context predictions)."""
    from dxrag.core.retrieval.encoders import TINY_MODEL, Encoder

    from dxrag_test_support import _sets

    encoder_dir = Encoder.load(TINY_MODEL).save(tmp_path / "clip")
    overrides = {
        "threads": 1, "figures": False, "data.path": str(family_dirs["data"]),
        "retriever.encoder": f"local-dir:{encoder_dir}", "retriever.device": "cpu",
        "reader.model": str(family_dirs[family]), "reader.device": "cpu", "reader.dtype": "float32",
        "reader.max_pixels": SMALL_IMAGES[family], "reader.finetune.steps": 4, "reader.finetune.batch_size": 4,
        "reader.finetune.eval_every": 0, "reader.finetune.checkpoint_every": 2,
        "distill.steps": 2, "distill.batch_size": 4, "distill.candidates": 4, "distill.refresh_every": 2,
        "distill.checkpoint_every": 2, "probe.mode": "off",
    }
    run_dir = tmp_path / "trained"
    assert main(["run", "--config", str(REPO / "configs" / f"{name}.yaml"), *_sets(overrides),
                 "--run-dir", str(run_dir), "--report-dir", str(tmp_path / "reports")]) == 0
    answers = (run_dir / "predictions" / "answers.jsonl").read_text().splitlines()
    assert len(answers) == 3 * len(load_dataset(family_dirs["data"]).queries["test"])
    assert (run_dir / "reader" / "adapter_model.safetensors").is_file()
    assert json.loads((run_dir / "run.json").read_text())["config"]["reader"]["model"] == str(family_dirs[family])
