"""dxrag.analysis: oracle analysis of retrieval-augmented predictions, on prediction tables alone (no torch)."""

from ..core.base.answers import ANSWER_TYPES, AnswerSettings
from .report import OracleReport
from .tables import (ANSWER_COLUMNS, ANSWER_REQUIRED, CONTEXT_COLUMNS, CONTEXT_REQUIRED, RERANK_COLUMNS,
                     RERANK_REQUIRED, TableError, load_answers, load_contexts, load_rerank, normalize_answer,
                     rank_matrices, write_table)

__all__ = ["OracleReport", "AnswerSettings", "ANSWER_TYPES", "TableError", "load_contexts", "load_answers",
           "load_rerank", "rank_matrices", "write_table", "normalize_answer", "CONTEXT_COLUMNS", "CONTEXT_REQUIRED",
           "ANSWER_COLUMNS", "ANSWER_REQUIRED", "RERANK_COLUMNS", "RERANK_REQUIRED"]
