"""The learned context selector: a logistic regression fitted on validation per-context rows that predicts whether a
context's single-context answer is correct, from features the tables hold; it picks the best-scored context per query.

A model can pick worse than the retriever's rank 1 (few validation queries, features that do not carry over). So
whether to use it is decided on the validation split itself, by cross-validation over its queries: the model is used
only when its held-out picks beat rank 1 there; otherwise `learned` is rank 1 (every query counted as a fallback).
The model's own picks are reported either way, as `learned-raw`.

scikit-learn is imported only here and only when a selector is trained (extra `learn`); fitting on a query that is also
analysed is refused, so the reported accuracy is always out of sample.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .consistency import QueryMetrics, query_metrics
from .tables import HEAD, QUERY_ID, SYSTEM, AnswerTable, ContextTable, TableError, normalize_answer, rank_matrices

log = logging.getLogger(__name__)

EXTRA = "learn"
# Feature name -> the optional input it needs ("" = always available).
FEATURES = {
    "rank": "",
    "head_text": "the 'head' column (image / text)",
    "retrieval_score": "the 'retrieval_score' column",
    "score_margin": "the 'retrieval_score' column",
    "max_prob": "the 'probs' column",
    "entropy": "the 'probs' column",
    "vote_share": "",
    "closed_book_agree": "an answer table with a closed-book system",
}
DEFAULT_CLOSED_BOOK = "closed-book"  # the pipeline's closed-book system (core/pipeline.py SYSTEMS)
CV_FOLDS = 5  # folds over the validation queries that decide between the model and rank 1
CV_SEED = 0
RAW = "learned-raw"  # the selector name of the model's own picks


def _require_sklearn() -> Any:
    try:
        import sklearn  # noqa: F401
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        raise TableError(f"the learned selector needs scikit-learn: pip install 'dxrag[{EXTRA}]'") from None
    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))


@dataclass
class Features:
    """Per (query, rank) feature vectors of one system's top-k; NaN where the rank is absent or a value is missing."""

    values: dict[str, np.ndarray]  # feature -> (n_queries, k)
    unavailable: dict[str, str]  # feature -> why it cannot be computed for this table

    def matrix(self, names: list[str], present: np.ndarray) -> np.ndarray:
        return np.stack([self.values[n][present] for n in names], axis=1)


def closed_book_answers(answers: AnswerTable | None, system: str) -> dict[str, str] | None:
    """query_id -> normalised closed-book answer of `system` in the answer table, or None when it is not there."""
    if answers is None or system not in answers.systems:
        return None
    df = answers.frame[answers.frame[SYSTEM] == system]
    return dict(zip(df[QUERY_ID], df["prediction_norm"]))


def _row_entropy(table: ContextTable) -> np.ndarray:
    """-sum p log p of each file row's reader distribution (NaN for null rows)."""
    probs = table.probs
    p = probs.values
    terms = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    cs = np.concatenate([[0.0], np.cumsum(terms)])
    out = cs[probs.offsets[1:]] - cs[probs.offsets[:-1]]
    out[~probs.valid] = np.nan
    return out


def context_features(table: ContextTable, qm: QueryMetrics, closed_book: dict[str, str] | None) -> Features:
    """Every feature of FEATURES that this table can give, for the (query × rank) cells of one system."""
    m = qm.matrix
    present = m.present
    rows = np.maximum(m.row, 0)
    n, k = present.shape
    values: dict[str, np.ndarray] = {}
    unavailable: dict[str, str] = {}

    def put(name: str, value: np.ndarray) -> None:
        value = np.where(present, value, np.nan).astype(np.float64)
        if np.isnan(value[present]).any():
            unavailable[name] = f"{FEATURES[name]} has missing values for system {m.system!r}"
        else:
            values[name] = value

    put("rank", np.broadcast_to(np.arange(1, k + 1, dtype=np.float64), (n, k)))
    head = None
    if HEAD in table.raw.columns:
        codes, uniques = table.raw.encode(HEAD)
        names = [normalize_answer(u) if u is not None else "" for u in uniques.to_pylist()]
        allowed = {"image", "text"}
        cell = codes[rows]
        used = set(np.unique(cell[present]).tolist())
        if -1 in used or any(names[c] not in allowed for c in used if c >= 0):
            unavailable["head_text"] = f"{FEATURES['head_text']} holds values other than image / text"
        else:
            head = np.array([names[c] == "text" for c in range(len(names))], dtype=bool)[cell]
            put("head_text", head.astype(np.float64))
    else:
        unavailable["head_text"] = f"{FEATURES['head_text']} is absent"
    if m.score is None:
        unavailable["retrieval_score"] = unavailable["score_margin"] = f"{FEATURES['retrieval_score']} is absent"
    else:
        put("retrieval_score", m.score)
        if "retrieval_score" in values:
            put("score_margin", _score_margin(m.score, present, head))
        else:
            unavailable["score_margin"] = unavailable["retrieval_score"]
    if table.probs is None:
        unavailable["max_prob"] = unavailable["entropy"] = f"{FEATURES['max_prob']} is absent"
    else:
        put("max_prob", table.probs.row_max()[rows])
        put("entropy", _row_entropy(table)[rows])
    same = (m.prediction[:, :, None] == m.prediction[:, None, :]) & present[:, None, :]
    put("vote_share", same.sum(axis=2) / np.maximum(present.sum(axis=1, keepdims=True), 1))
    if closed_book is None:
        unavailable["closed_book_agree"] = f"{FEATURES['closed_book_agree']} was not given"
    else:
        index = {a: i for i, a in enumerate(table.answers)}
        qids = table.query_ids[m.query]
        cb = np.array([index.get(closed_book.get(q, ""), -2) if q in closed_book else -3 for q in qids])
        if (cb == -3).any():
            unavailable["closed_book_agree"] = (f"the closed-book answers miss {int((cb == -3).sum())} queries of "
                                                f"system {m.system!r} in {table.path}")
        else:
            put("closed_book_agree", (m.prediction == cb[:, None]).astype(np.float64))
    return Features(values, unavailable)


def _score_margin(score: np.ndarray, present: np.ndarray, head: np.ndarray | None) -> np.ndarray:
    """score - the score of the next lower-ranked context (of the same head when heads are known: heads score on
    different scales); 0 for the last one."""
    n, k = score.shape
    out = np.zeros((n, k))
    groups = [present] if head is None else [present & head, present & ~head]
    for member in groups:
        for j in range(k):
            nxt = np.full(n, np.nan)
            for j2 in range(k - 1, j, -1):  # nearest following member wins: scan from the far end
                nxt = np.where(member[:, j2], score[:, j2], nxt)
            out[:, j] = np.where(member[:, j], np.where(np.isnan(nxt), 0.0, score[:, j] - nxt), out[:, j])
    return out


@dataclass
class SystemModel:
    """The fitted model of one system and what it was trained on."""

    system: str
    features: list[str]
    model: Any
    n_queries: int
    n_rows: int
    positive_rate: float
    coefficients: dict[str, float] = field(default_factory=dict)  # on standardised features
    cv: dict[str, Any] = field(default_factory=dict)  # folds, held-out accuracy of the model and of rank 1
    use_model: bool = True  # the cross-validation's verdict: the model's picks beat rank 1 on held-out queries


@dataclass
class LearnedSelector:
    """Per-system models trained on a validation context table; `select` scores a test system's contexts."""

    train_path: str
    models: dict[str, SystemModel]
    dropped: dict[str, dict[str, str]]  # system -> feature -> why it was left out
    skipped: dict[str, str]  # system -> why no model was trained
    _features: dict[str, Features] = field(default_factory=dict, repr=False)  # test-table features per system

    def select(self, table: ContextTable, qm: QueryMetrics, raw: bool = False) -> tuple[np.ndarray, bool] | None:
        """(chosen column per query, whether they are the model's picks) for this system, or None when it has no
        model. Without `raw` the picks are rank 1's where the cross-validation chose rank 1."""
        sm = self.models.get(qm.system)
        if sm is None:
            return None
        if not (raw or sm.use_model):
            return qm.top1_col, False
        return _pick_best(sm.model, self._features[qm.system].matrix(sm.features, qm.matrix.present),
                          qm.matrix.present), True

    def summary(self) -> dict[str, Any]:
        """What the models use and were trained on (written as learned_selector.json)."""
        return {"train": self.train_path, "model": "StandardScaler + LogisticRegression(C=1)",
                "target": "this context's single-context prediction is correct",
                "choice": (f"per system, the model when its picks beat rank 1 on held-out validation queries "
                           f"({CV_FOLDS}-fold cross-validation over queries), else rank 1; '{RAW}' is the model "
                           f"either way"),
                "systems": {s: dict(features=sm.features, train_queries=sm.n_queries, train_rows=sm.n_rows,
                                    train_positive_rate=sm.positive_rate, coefficients=sm.coefficients,
                                    selects="model" if sm.use_model else "rank 1", cv=sm.cv,
                                    dropped=self.dropped.get(s, {}))
                            for s, sm in self.models.items()},
                "skipped": self.skipped}


def _pick_best(model: Any, x: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Per query, the column the model scores most likely correct (ties -> the best rank)."""
    proba = np.full(present.shape, -np.inf)
    proba[present] = model.predict_proba(x)[:, 1]
    return np.argmax(proba, axis=1)  # argmax takes the first maximum


def cross_validate(make_model: Any, feats: Features, names: list[str], qm: QueryMetrics,
                   folds: int = CV_FOLDS, seed: int = CV_SEED) -> dict[str, Any]:
    """Held-out accuracy of the model's picks and of rank 1 over `folds` folds of the training table's queries
    (each query held out once; a fold whose training rows are all correct or all wrong keeps rank 1)."""
    present, correct = qm.matrix.present, qm.matrix.correct
    n = len(present)
    folds = min(folds, n)
    if folds < 2:
        return {"folds": folds, "model_acc": float("nan"), "top1_acc": float("nan"), "n_queries": n}
    fold = np.empty(n, dtype=np.int64)
    fold[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds
    x_all = feats.matrix(names, present)
    row_fold = np.broadcast_to(fold[:, None], present.shape)[present]
    y_all = correct[present]
    col = qm.top1_col.copy()
    for f in range(folds):
        fit = row_fold != f
        if y_all[fit].all() or not y_all[fit].any():
            continue
        model = make_model()
        model.fit(x_all[fit], y_all[fit])
        held = fold == f
        col[held] = _pick_best(model, x_all[~fit], present[held])
    picked = correct[np.arange(n), col]
    return {"folds": folds, "n_queries": n, "model_acc": float(picked.mean()),
            "top1_acc": float(qm.top1_correct.mean())}


def train_learned(train: ContextTable, test: ContextTable, test_metrics: list[QueryMetrics], k: int | None,
                  short: str, train_closed: dict[str, str] | None,
                  test_closed: dict[str, str] | None) -> LearnedSelector:
    """Fits one model per system found in both tables on the training table's rows (ranks 1..k, the test depth).

    Raises TableError when a training query_id is also a test query_id, or a system's training rows are all correct
    or all wrong. A feature is used only when both tables give it for that system (the reason is kept otherwise)."""
    make_model = _require_sklearn
    shared = np.intersect1d(train.query_ids.astype(str), test.query_ids.astype(str))
    if len(shared):
        raise TableError(f"{train.path}: {len(shared)} query_id(s) of the selector's training table are also "
                         f"analysed in {test.path} (e.g. {shared[0]!r}); train the learned selector on validation "
                         f"queries only, never on the queries it is evaluated on")
    train_by_system = {qm.system: qm for qm in (query_metrics(m) for m in rank_matrices(train, k=k, short=short))}
    out = LearnedSelector(train_path=str(train.path), models={}, dropped={}, skipped={})
    for qm in test_metrics:
        s = qm.system
        tq = train_by_system.get(s)
        if tq is None:
            out.skipped[s] = f"system {s!r} has no rows in {train.path} (systems there: {train.systems})"
            log.warning("learned selector: %s", out.skipped[s])
            continue
        if tq.matrix.k != qm.matrix.k:
            raise TableError(f"{train.path}: system {s!r} has depth k={tq.matrix.k} there but k={qm.matrix.k} in "
                             f"{test.path}; pass --k to use the same depth in both")
        f_train = context_features(train, tq, train_closed)
        f_test = context_features(test, qm, test_closed)
        names = [n for n in FEATURES if n in f_train.values and n in f_test.values]
        dropped = {n: f_train.unavailable.get(n) or f_test.unavailable.get(n) for n in FEATURES if n not in names}
        dropped = {n: (why + (f" (training table {train.path})" if n in f_train.unavailable else
                              f" (analysed table {test.path})")) for n, why in dropped.items()}
        for n, why in dropped.items():
            log.warning("learned selector, system %s: feature %s left out: %s", s, n, why)
        present = tq.matrix.present
        y = tq.matrix.correct[present]
        if y.all() or not y.any():
            raise TableError(f"{train.path}: every training context of system {s!r} is "
                             f"{'correct' if y.all() else 'wrong'}; the learned selector needs both kinds")
        model = make_model()
        model.fit(f_train.matrix(names, present), y)
        coef = model[-1].coef_[0]
        cv = cross_validate(make_model, f_train, names, tq)
        use_model = bool(cv["model_acc"] > cv["top1_acc"])  # NaN (too few queries) compares False: rank 1
        out.models[s] = SystemModel(s, names, model, n_queries=tq.n_queries, n_rows=int(present.sum()),
                                    positive_rate=float(y.mean()),
                                    coefficients={n: float(c) for n, c in zip(names, coef)}, cv=cv,
                                    use_model=use_model)
        log.info("learned selector, system %s: held-out validation accuracy %.3f (model) vs %.3f (rank 1) over %d "
                 "folds: %s", s, cv["model_acc"], cv["top1_acc"], cv["folds"],
                 "the model selects" if use_model else "rank 1 selects")
        out.dropped[s] = dropped
        out._features[s] = f_test
        log.info("learned selector, system %s: trained on %d contexts of %d queries with %s", s,
                 int(present.sum()), tq.n_queries, names)
    return out
