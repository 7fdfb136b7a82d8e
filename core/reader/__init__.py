"""The reader: an image-text-to-text LVLM scoring candidate answers per (query, retrieved context), and its fine-tuning.

Importing this package does not import torch; use `dxrag.core.reader.model`, `.prompts` and `.finetune` directly.
"""
