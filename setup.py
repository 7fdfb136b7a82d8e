"""Package list for the dxrag.core / dxrag.analysis mapping (metadata lives in setup.cfg)."""
from pathlib import Path

from setuptools import setup


def _packages(src: str, name: str) -> list[str]:
    root = Path(__file__).parent / src
    found = [name]
    for init in sorted(root.rglob("__init__.py")):
        rel = init.parent.relative_to(root)
        if rel.parts and "__pycache__" not in rel.parts:
            found.append(".".join((name, *rel.parts)))
    return found


setup(packages=_packages("core", "dxrag.core") + _packages("analysis", "dxrag.analysis"))
