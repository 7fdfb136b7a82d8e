"""Console logging for the command-line tools: dxrag's own progress at INFO, third-party libraries (faiss's loader,
open_clip, transformers, httpx) at WARNING unless `-v`. Torch-free."""

from __future__ import annotations

import logging


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """`verbose`: dxrag at DEBUG and every library at INFO; `quiet`: dxrag at WARNING too (tools whose output is the
    report itself); default: dxrag at INFO, libraries at WARNING."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)
    own = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.getLogger("dxrag").setLevel(own)
