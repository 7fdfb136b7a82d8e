"""The frontier-LVLM selector: `lvlm-rerank` asks a chat-completions endpoint to rank each query's k candidates.

Any OpenAI-compatible endpoint; answers cached on disk by request content; bounded threads; retries by the openai
client itself (429, 408/409, 5xx, timeouts and connection errors; exponential backoff, honouring Retry-After).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.fsutil import atomic_write_text
from .tables import (ERROR, ITEM_ID, QUERY_ID, RANKING, SELECTOR, SYSTEM, TableError, load_contexts, rank_matrices,
                     write_table)

log = logging.getLogger(__name__)

SYSTEM_PROMPT = ("You are an expert in medical image interpretation. You are shown a query image with a question, and "
                 "numbered reference cases (an image with its report) retrieved for it. Rank the reference cases by "
                 "how useful each is for answering the question about the query image, most useful first.")
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
_INT = re.compile(r"\d+")


def _openai():
    try:
        import openai
    except ImportError:
        raise SystemExit("lvlm-rerank needs the openai package; install it with: pip install 'dxrag[api]'") from None
    return openai


def _image_url(path: Path) -> dict[str, Any]:
    mime = _MIME.get(path.suffix.lower(), "image/png")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


def build_messages(question: str, options: list[str], query_image: Path,
                   candidates: list[tuple[str, Path]]) -> list[dict[str, Any]]:
    """The listwise prompt: query image and question, then candidate i (1-based) as its image and report text."""
    content: list[dict[str, Any]] = [
        {"type": "text", "text": f"Question about the query image: {question}\n"
                                 + (f"Answer options: {', '.join(options)}\n" if options else "") + "Query image:"},
        _image_url(query_image)]
    for i, (text, image) in enumerate(candidates, 1):
        content.append({"type": "text", "text": f"Reference case {i}. Report: {text}"})
        content.append(_image_url(image))
    content.append({"type": "text", "text": (
        f'Answer with JSON only: {{"ranking": [...]}}, listing all {len(candidates)} reference case numbers '
        f"(1 to {len(candidates)}), most useful first.")})
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]


def parse_ranking(text: str, n: int) -> list[int] | None:
    """1-based candidate numbers, best first, from a model's reply: JSON in code fences or amid prose, a
    {"ranking": [...]} object or a bare list. Invalid and repeated entries are dropped and the missing candidates
    appended in retriever order. None when the reply holds no usable candidate number."""
    if not text:
        return None
    found: list[Any] | None = None
    for match in re.finditer(r"\{[^{}]*\}|\[[^\[\]]*\]", text, flags=re.S):
        try:
            obj = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            obj = next((v for key, v in obj.items() if "rank" in key.lower() and isinstance(v, list)), None)
        if isinstance(obj, list):
            found = obj
            break
    if found is None:
        return None
    picked: list[int] = []
    for entry in found:
        digits = _INT.findall(str(entry)) if not isinstance(entry, bool) else []
        if digits and 1 <= int(digits[0]) <= n and int(digits[0]) not in picked:
            picked.append(int(digits[0]))
    if not picked:
        return None
    return picked + [i for i in range(1, n + 1) if i not in picked]


class ResponseCache:
    """One JSON file per request, named by the sha256 of the request content (model, messages, parameters)."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(request: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.root / f"{key}.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return None

    def put(self, key: str, value: dict[str, Any]) -> None:
        atomic_write_text(self.root / f"{key}.json", json.dumps(value))


@dataclass
class Outcome:
    ranking: list[int]  # ranks (not candidate numbers), best first; empty on failure
    error: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool


class Reranker:
    """Sends cached requests through an openai client; the client's own `max_retries` handles transient faults."""

    def __init__(self, client: Any, model: str, cache: ResponseCache, temperature: float = 0.0,
                 max_tokens: int = 300):
        self.client, self.model, self.cache = client, model, cache
        self.temperature, self.max_tokens = temperature, max_tokens
        self._openai = _openai()

    def complete(self, messages: list[dict[str, Any]]) -> tuple[dict[str, Any], bool]:
        """The reply {content, prompt_tokens, completion_tokens} and whether it came from the cache."""
        request = {"model": self.model, "messages": messages, "temperature": self.temperature,
                   "max_tokens": self.max_tokens}
        key = ResponseCache.key(request)
        hit = self.cache.get(key)
        if hit is not None:
            return hit, True
        resp = self.client.chat.completions.create(**request)
        usage = getattr(resp, "usage", None)
        reply = {"content": resp.choices[0].message.content or "",
                 "prompt_tokens": int(getattr(usage, "prompt_tokens", 0) or 0),
                 "completion_tokens": int(getattr(usage, "completion_tokens", 0) or 0)}
        self.cache.put(key, reply)
        return reply, False

    def rerank(self, messages: list[dict[str, Any]], ranks: list[int]) -> Outcome:
        try:
            reply, cached = self.complete(messages)
        except Exception as e:
            if not isinstance(e, self._openai.OpenAIError):
                raise
            status = getattr(e, "status_code", None)
            return Outcome([], f"{type(e).__name__}" + (f" (HTTP {status})" if status else ""), 0, 0, False)
        tokens = (0, 0) if cached else (reply["prompt_tokens"], reply["completion_tokens"])
        order = parse_ranking(reply["content"], len(ranks))
        if order is None:
            return Outcome([], f"no ranking in the reply: {reply['content'][:80]!r}", *tokens, cached)
        return Outcome([ranks[i - 1] for i in order], "", *tokens, cached)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lvlm-rerank", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Rank each query's top-k retrieved items with a frontier LVLM behind an OpenAI-compatible "
                    "chat-completions endpoint; writes a rerank file for analyze-oracle --rerank.",
        epilog="example:\n  OPENAI_API_KEY=... lvlm-rerank --contexts ctx.parquet --dataset data/retina "
               "--model gpt-4o --out rerank.jsonl\n  analyze-oracle --contexts ctx.parquet --rerank rerank.jsonl "
               "--out reports/x")
    p.add_argument("--contexts", required=True, type=Path, help="context-prediction table (needs item_id)")
    p.add_argument("--dataset", required=True, type=Path, help="dataset directory the queries and items come from")
    p.add_argument("--model", required=True, help="model name at the endpoint; the selector is named lvlm:<model>")
    p.add_argument("--base-url", default=None, help="endpoint base URL (default: the openai package's default)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--out", required=True, type=Path, help="rerank file to write (.jsonl, .csv or .parquet)")
    p.add_argument("--system", action="append", help="context system(s) to rerank (default: all)")
    p.add_argument("--k", type=int, help="candidates per query: ranks 1..k (default: each system's largest rank)")
    p.add_argument("--limit", type=int, help="only the first N queries of each system")
    p.add_argument("--cache", type=Path, help="response cache directory (default: <out>.cache/)")
    p.add_argument("--concurrency", type=int, default=4, help="parallel requests (default 4)")
    p.add_argument("--max-retries", type=int, default=5,
                   help="the openai client's retries on 429, 408/409, 5xx, timeouts and connection errors, waiting "
                        "as a Retry-After header says, else 0.5 s doubling up to 8 s (default 5)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-tokens", type=int, default=300)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    openai = _openai()
    from tqdm import tqdm

    from dxrag.core.dataset import DatasetError, load_dataset

    key = os.environ.get(args.api_key_env)
    if not key:
        print(f"lvlm-rerank: error: environment variable {args.api_key_env} is not set (the API key)", file=sys.stderr)
        return 2
    try:
        table = load_contexts(args.contexts, columns=(ITEM_ID,))
        if ITEM_ID not in table.raw.columns:
            raise TableError(f"{args.contexts}: field '{ITEM_ID}': missing column; lvlm-rerank needs the retrieved "
                             f"items' ids to show their images")
        matrices = [m for m in rank_matrices(table, k=args.k, short="keep")
                    if not args.system or m.system in args.system]
        dataset = load_dataset(args.dataset)
    except (TableError, DatasetError) as e:
        print(f"lvlm-rerank: error: {e}", file=sys.stderr)
        return 2
    corpus, queries = dataset.corpus_by_id(), dataset.queries_by_id()
    item_ids = table.raw.columns[ITEM_ID].to_pylist()

    jobs = []
    for m in matrices:
        n = len(m.query) if args.limit is None else min(args.limit, len(m.query))
        for i in range(n):
            qid = str(table.query_ids[m.query[i]])
            cols = [int(c) for c in (m.prediction[i] >= 0).nonzero()[0]]
            where = table.raw.locate(int(m.row[i, cols[0]])) if cols else str(args.contexts)
            if qid not in queries:
                print(f"lvlm-rerank: error: {where}: field '{QUERY_ID}': {qid!r} is not a query of {args.dataset}",
                      file=sys.stderr)
                return 2
            cands = []
            for c in cols:
                item = corpus.get(item_ids[int(m.row[i, c])] or "")
                if item is None:
                    print(f"lvlm-rerank: error: {table.raw.locate(int(m.row[i, c]))}: field '{ITEM_ID}': "
                          f"{item_ids[int(m.row[i, c])]!r} is not a corpus item of {args.dataset}", file=sys.stderr)
                    return 2
                cands.append((item.text, dataset.image_path(item.image)))
            q = queries[qid]
            jobs.append((m.system, qid, [c + 1 for c in cols],
                         build_messages(q.question, list(q.candidates), dataset.image_path(q.image), cands)))

    client = openai.OpenAI(base_url=args.base_url, api_key=key, timeout=args.timeout, max_retries=args.max_retries)
    cache = ResponseCache(args.cache or args.out.with_name(args.out.name + ".cache"))
    reranker = Reranker(client, args.model, cache, temperature=args.temperature, max_tokens=args.max_tokens)
    results: list[Outcome | None] = [None] * len(jobs)
    with ThreadPoolExecutor(max_workers=max(1, args.concurrency)) as pool:
        futures = {pool.submit(reranker.rerank, messages, ranks): i for i, (_, _, ranks, messages) in enumerate(jobs)}
        for fut in tqdm(as_completed(futures), total=len(futures), desc="lvlm-rerank", disable=None):
            results[futures[fut]] = fut.result()
    rows = [{SYSTEM: system, QUERY_ID: qid, SELECTOR: f"lvlm:{args.model}", RANKING: r.ranking, ERROR: r.error,
             "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens, "cached": r.cached}
            for (system, qid, _, _), r in zip(jobs, results) if r is not None]
    write_table(pd.DataFrame(rows, columns=[SYSTEM, QUERY_ID, SELECTOR, RANKING, ERROR, "prompt_tokens",
                                            "completion_tokens", "cached"]), args.out)
    n_failed = sum(1 for r in rows if r[ERROR])
    stats = {"queries": len(rows), "cached": sum(r["cached"] for r in rows), "failed": n_failed,
             "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
             "completion_tokens": sum(r["completion_tokens"] for r in rows)}
    print(f"lvlm-rerank: {stats['queries']} queries ({stats['cached']} from cache, {n_failed} failed, recorded in "
          f"'{ERROR}'); tokens: {stats['prompt_tokens']} prompt, {stats['completion_tokens']} completion; "
          f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
