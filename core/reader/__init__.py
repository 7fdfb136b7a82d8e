"""The reader: an image-text-to-text LVLM scoring candidate answers per (query, retrieved context), generating
answers and teacher-forcing gold answers (its training loop is `dxrag.core.training.finetune`).

Importing this package does not import torch; use `dxrag.core.reader.model`, `.requests`, `.prompts` and `.settings`
directly.
"""
