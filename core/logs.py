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


_WEIGHT_BARS = ("Loading weights", "Writing model shards")


def quiet_weight_bars() -> None:
    """Hide transformers' per-model "Loading weights" / "Writing model shards" bars (a pipeline loads and saves its
    reader a dozen times, each bar a fraction of a second); download bars stay. Imports transformers: call it from
    the commands that train or load models, not from the torch-free tools."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # a base install without the train extra: nothing to quieten
        return

    def hook(factory, args, kwargs):
        if kwargs.get("desc") in _WEIGHT_BARS:
            kwargs = {**kwargs, "disable": True}
        return factory(*args, **kwargs)

    hf_logging.set_tqdm_hook(hook)
