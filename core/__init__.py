"""dxrag.core: the retrieval-augmented diagnosis system (records, datasets, retriever, reader, training, pipeline).

Importing this package does not import torch; the torch-using modules are imported where they are used.
"""

__version__ = "0.1.0"
