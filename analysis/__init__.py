"""dxrag.analysis: oracle analysis of retrieval-augmented predictions, on prediction tables alone (no torch)."""
