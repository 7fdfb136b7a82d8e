"""Contracts at the bottom of core, torch-free and pandas-free at import: records, answer types and their judging,
fusion, table columns and the writer, the dataset-directory format, JSONL, atomic files, provenance. Both the
library (data, retrieval, reader, training, tasks, predictions) and the analysis build on this package alone."""
