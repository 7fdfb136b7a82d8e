"""The small real reader (recipe `effnet-smollm2`: frozen EfficientNet-Lite0 -> projector -> SmolLM2-135M-Instruct as
transformers' `fast_vlm`) with real weights and the real BPE tokenizer: built into an ordinary HF directory, loaded
without remote code, text-only logits = the standalone LLM's, cached tower features = the generic path, projector
alignment trains only the projector, LoRA + projector save/load round trip. Skipped without `make weights`."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dxrag.core.reader.model import GenerateRequest, Reader, ScoreRequest  # noqa: E402
from dxrag.core.reader.settings import LoraSettings, ReaderSettings  # noqa: E402
from dxrag.core.base.records import CorpusItem  # noqa: E402

from ..dxrag_test_support import real_weights  # noqa: E402

pytestmark = pytest.mark.real

# several BPE tokens each, with and without a leading space, one a prefix of another
CANDIDATES = ("mild disease", "mild", " severe disease", "normal eye")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from dxrag.core.reader.build import RECIPES, build_reader

    recipe = RECIPES["effnet-smollm2"]
    real_weights(recipe.vision), real_weights(recipe.language_model)
    return build_reader(recipe, tmp_path_factory.mktemp("real") / "effnet-smollm2")


def settings(path, **kw) -> ReaderSettings:
    return ReaderSettings(model=str(path), device="cpu", dtype="float32", batch_size=4, **kw)


@pytest.fixture(scope="module")
def reader(built):
    torch.set_num_threads(1)
    return Reader.from_config(settings(built))


def requests(ds, candidates=None, n=4):
    return [ScoreRequest(q, None if i % 3 == 0 else ds.corpus[i], candidates)
            for i, q in enumerate(ds.queries["val"][:n])]


def test_the_built_directory_is_a_standard_model_without_remote_code(built):
    config = json.loads((built / "config.json").read_text())
    assert config["model_type"] == "fast_vlm" and config["vision_config"]["model_type"] == "timm_wrapper"
    assert "auto_map" not in config and not list(built.glob("*.py"))
    processor = json.loads((built / "processor_config.json").read_text())
    assert processor["processor_class"] == "LlavaProcessor"


def test_text_only_logits_equal_the_standalone_llm(reader):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm_dir = real_weights("smollm2-135m-instruct")
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(lm_dir)("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        a = lm(**ids).logits
        b = reader.hf_model(**ids).logits
    assert b.shape[-1] == a.shape[-1] + 1  # the added image token
    assert (a - b[..., :a.shape[-1]]).abs().max().item() == 0.0


def test_cached_tower_features_equal_the_generic_path(reader, toy_dataset):
    generic = Reader(reader.model, reader.processor, settings(reader.config.model, fast_path=False))
    for candidates in (None, CANDIDATES):
        reqs = requests(toy_dataset, candidates)
        for a, b in zip(reader.score(reqs, toy_dataset.root), generic.score(reqs, toy_dataset.root)):
            np.testing.assert_allclose(a, b, atol=1e-4)
    # and the image matters
    q = toy_dataset.queries["val"][1]
    a, b = (reader.score([ScoreRequest(q, CorpusItem(id="x", image=toy_dataset.corpus[k].image, text="a report"))],
                         toy_dataset.root)[0] for k in (0, 1))
    assert np.abs(a - b).max() > 1e-5


def test_generate_batched_equals_unbatched(reader, toy_dataset):
    reqs = [GenerateRequest(r.query, r.context) for r in requests(toy_dataset)]
    reader.config.generate_max_tokens = 6
    batched = reader.generate(reqs, toy_dataset.root, batch_size=4)
    assert batched == [reader.generate([r], toy_dataset.root, batch_size=1)[0] for r in reqs]
    assert all(batched)  # SmolLM2 answers in words


def test_alignment_trains_only_the_projector_and_lowers_the_caption_loss(built, toy_dataset):
    from dxrag.core.training.finetune import align_settings, caption_examples, finetune
    from dxrag.core.reader.settings import AlignSettings

    reader = Reader.from_config(settings(built))
    before = {n: p.detach().clone() for n, p in reader.hf_model.state_dict().items()}
    examples = caption_examples(toy_dataset.corpus[:4], "Describe the image.")
    with torch.no_grad():
        loss0 = reader.answer_loss(examples, toy_dataset.root).item()
    finetune(reader, examples, toy_dataset.root, align_settings(AlignSettings(steps=4, batch_size=4, lr=1e-3)),
             projector_only=True)
    with torch.no_grad():
        loss1 = reader.answer_loss(examples, toy_dataset.root).item()
    assert loss1 < loss0
    changed = {n for n, v in reader.hf_model.state_dict().items() if not torch.equal(v, before[n])}
    assert changed and all(n.startswith("model.multi_modal_projector.") for n in changed)  # BN statistics included


def test_lora_and_projector_save_load_round_trip(built, toy_dataset, tmp_path):
    reader = Reader.from_config(settings(built, lora=LoraSettings(r=4, alpha=8)))
    reader.add_lora(reader.config.lora)
    with torch.no_grad():  # move the projector copy so that a lost projector would show
        for p in reader.hf_model.model.multi_modal_projector.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    reqs = requests(toy_dataset, CANDIDATES)
    saved = reader.save(tmp_path / "adapters")
    loaded = Reader.from_config(settings(built, adapter=str(saved)))
    for a, b in zip(reader.score(reqs, toy_dataset.root), loaded.score(reqs, toy_dataset.root)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_reader_build_cli_writes_the_recipe_deterministically(built, tmp_path, capsys):
    """`dxrag reader build RECIPE --out DIR [--seed N]`: prints the directory it wrote, which is the same model as
    build_reader's (same seed: the same projector initialisation; another seed: another one) and loads as a Reader."""
    from safetensors.torch import load_file

    from dxrag.core.cli import main

    assert main(["reader", "build", "effnet-smollm2", "--out", str(tmp_path / "cli")]) == 0
    out = tmp_path / "cli"
    assert capsys.readouterr().out.strip() == str(out)
    assert json.loads((out / "config.json").read_text()) == json.loads((built / "config.json").read_text())
    projector = lambda d: {k: v for k, v in load_file(str(next(d.glob("*.safetensors")))).items()  # noqa: E731
                           if "projector" in k}
    same, ours = projector(built), projector(out)
    assert same and same.keys() == ours.keys() and all(torch.equal(same[k], ours[k]) for k in same)
    assert main(["reader", "build", "effnet-smollm2", "--out", str(tmp_path / "s1"), "--seed", "1"]) == 0
    other = projector(tmp_path / "s1")
    assert not all(torch.equal(same[k], other[k]) for k in same)
    assert Reader.from_config(settings(out)).family.projector


def test_reader_build_cli_names_the_known_recipes_for_an_unknown_one(tmp_path, capsys):
    from dxrag.core.cli import main

    assert main(["reader", "build", "no-such-recipe", "--out", str(tmp_path / "x")]) == 2
    assert "effnet-smollm2" in capsys.readouterr().err and not (tmp_path / "x").exists()
