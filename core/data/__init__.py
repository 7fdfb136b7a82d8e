"""Dataset producers: the embedded synthetic default (`synth`) and converters of real datasets into the
dataset-directory format of `dxrag.core.base.dataset`."""
