"""dxrag.core.retrieval: the multimodal retriever (open_clip encoders, dual query heads, FAISS indexes, Retriever).

Importing this package does not import torch; import the submodules (encoders, heads, index, retriever; their
settings in `settings`, torch-free) to use them.
"""
