"""The frontier-LVLM selector: `lvlm-rerank` asks a chat-completions endpoint to rank each query's k retrieved items.

Any OpenAI-compatible endpoint; usable answers cached on disk by request content (endpoint, model, messages,
parameters), so a rerun, under any --out, pays only for what failed; bounded threads; retries by the openai client
itself (429, 408/409, 5xx, timeouts and connection errors; exponential backoff, honouring Retry-After). A malformed
reply fails its query only; a rejected key (401/403) stops the run after its first request.
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
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.base.fsutil import atomic_write_text
from .tables import (ERROR, ITEM_ID, QUERY_ID, RANKING, SELECTOR, SUFFIXES, SYSTEM, TableError, load_contexts,
                     rank_matrices, write_table)

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
                   cases: list[tuple[str, Path]]) -> list[dict[str, Any]]:
    """The listwise prompt: query image and question (with its answer options), then retrieved item i (1-based) as
    "reference case i": its image and report text."""
    content: list[dict[str, Any]] = [
        {"type": "text", "text": f"Question about the query image: {question}\n"
                                 + (f"Answer options: {', '.join(options)}\n" if options else "") + "Query image:"},
        _image_url(query_image)]
    for i, (text, image) in enumerate(cases, 1):
        content.append({"type": "text", "text": f"Reference case {i}. Report: {text}"})
        content.append(_image_url(image))
    content.append({"type": "text", "text": (
        f'Answer with JSON only: {{"ranking": [...]}}, listing all {len(cases)} reference case numbers '
        f"(1 to {len(cases)}), most useful first.")})
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]


def parse_ranking(text: str, n: int) -> list[int] | None:
    """1-based reference-case numbers (the query's retrieved items in rank order), best first, from a model's reply:
    JSON in code fences or amid prose, a {"ranking": [...]} object or a bare list. Invalid and repeated entries are
    dropped and the missing cases appended in retriever order. None when the reply holds no usable case number."""
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


def default_cache_dir() -> Path:
    """Where replies are cached unless --cache says otherwise: one place per user ($XDG_CACHE_HOME or ~/.cache), so
    the same request is never paid twice, whatever --out is called."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dxrag" / "lvlm-rerank"


class ResponseCache:
    """One JSON file per request, named by the sha256 of the request content (endpoint, model, messages,
    parameters). Only replies that held a ranking are stored."""

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
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        return value if isinstance(value, dict) and isinstance(value.get("content"), str) else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        atomic_write_text(self.root / f"{key}.json", json.dumps(value))


class KeyRejected(Exception):
    """The endpoint refused the API key (HTTP 401 / 403): every further request would fail the same way."""


class MalformedReply(Exception):
    """A 200 reply that is not a chat completion (not JSON, no `choices`, no message)."""


@dataclass
class Outcome:
    ranking: list[int]  # ranks (not candidate numbers), best first; empty on failure
    error: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool


def _reply_of(resp: Any) -> dict[str, Any]:
    """{content, prompt_tokens, completion_tokens} of a chat completion, or MalformedReply. The openai client
    returns a non-JSON body as a string and builds its models without validation, so a broken reply surfaces here."""
    if isinstance(resp, (str, bytes)):
        raise MalformedReply(f"malformed reply (not a JSON chat completion): {str(resp)[:80]!r}")
    try:
        content = resp.choices[0].message.content
    except (AttributeError, IndexError, KeyError, TypeError):
        raise MalformedReply(f"malformed reply (no choices[0].message): {str(resp)[:80]!r}") from None
    if content is not None and not isinstance(content, str):
        raise MalformedReply(f"malformed reply (message content is {type(content).__name__}, not text)")
    usage = getattr(resp, "usage", None)

    def count(name: str) -> int:
        try:
            return int(getattr(usage, name, 0) or 0)
        except (TypeError, ValueError):
            return 0

    return {"content": content or "", "prompt_tokens": count("prompt_tokens"),
            "completion_tokens": count("completion_tokens")}


class Reranker:
    """Sends cached requests through an openai client; the client's own `max_retries` handles transient faults.

    Until one request has been answered by the endpoint (any answer but 401/403), requests go out one at a time:
    a wrong key costs one request, not one per thread."""

    def __init__(self, client: Any, model: str, cache: ResponseCache, temperature: float = 0.0,
                 max_tokens: int = 300, endpoint: str | None = None):
        self.client, self.model, self.cache = client, model, cache
        self.temperature, self.max_tokens, self.endpoint = temperature, max_tokens, endpoint
        self._openai = _openai()
        self._gate = threading.Lock()
        self._key_ok = False
        self.rejected: str | None = None  # the one-line reason once the endpoint refused the key

    def _request(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        return {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens}

    def _send(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.rejected:
            raise KeyRejected(self.rejected)
        try:
            resp = self.client.chat.completions.create(**request)
        except (self._openai.AuthenticationError, self._openai.PermissionDeniedError) as e:
            self.rejected = (f"the endpoint refused the API key (HTTP {getattr(e, 'status_code', '?')}, "
                             f"{type(e).__name__}); check --api-key-env, --base-url and the key's permissions")
            raise KeyRejected(self.rejected) from None
        except ValueError as e:  # a JSON content type whose body does not decode
            self._key_ok = True
            raise MalformedReply(f"malformed reply ({type(e).__name__}: {str(e)[:60]})") from None
        self._key_ok = True
        return _reply_of(resp)

    def complete(self, messages: list[dict[str, Any]], use_cache: bool = True) -> tuple[dict[str, Any], bool, str]:
        """The reply {content, prompt_tokens, completion_tokens}, whether it came from the cache, and its cache key
        (the caller stores it once it proved usable)."""
        request = self._request(messages)
        key = ResponseCache.key({**request, "endpoint": self.endpoint})
        hit = self.cache.get(key) if use_cache else None
        if hit is not None:
            return hit, True, key
        if self._key_ok:
            return self._send(request), False, key
        with self._gate:  # the first request alone: a rejected key stops everything after one request
            return self._send(request), False, key

    def rerank(self, messages: list[dict[str, Any]], ranks: list[int]) -> Outcome:
        try:
            reply, cached, key = self.complete(messages)
            if cached and parse_ranking(reply["content"], len(ranks)) is None:  # cached unusable (an older version)
                reply, cached, key = self.complete(messages, use_cache=False)
        except MalformedReply as e:
            return Outcome([], str(e), 0, 0, False)
        except Exception as e:
            if not isinstance(e, self._openai.OpenAIError):
                raise
            status = getattr(e, "status_code", None)
            return Outcome([], f"{type(e).__name__}" + (f" (HTTP {status})" if status else ""), 0, 0, False)
        tokens = (0, 0) if cached else (reply["prompt_tokens"], reply["completion_tokens"])
        order = parse_ranking(reply["content"], len(ranks))
        if order is None:  # not cached: a rerun asks again
            return Outcome([], f"no ranking in the reply: {reply['content'][:80]!r}", *tokens, cached)
        if not cached:
            self.cache.put(key, reply)
        return Outcome([ranks[i - 1] for i in order], "", *tokens, cached)


def check_out(path: Path) -> str | None:
    """Why the rerank file cannot be written at `path` (checked before any paid request), or None."""
    if path.suffix.lower() not in SUFFIXES:
        return f"--out {path}: unsupported file type {path.suffix!r}; expected one of {', '.join(SUFFIXES)}"
    if path.is_dir():
        return f"--out {path}: is a directory; expected a file path"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"--out {path}: cannot write there ({e.strerror or e})"
    return None


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
    p.add_argument("--k", type=int, help="retrieved items per query: ranks 1..k (default: each system's largest rank)")
    p.add_argument("--limit", type=int, help="only the first N queries of each system")
    p.add_argument("--cache", type=Path, help="response cache directory, keyed by request content (default: "
                                              "$XDG_CACHE_HOME/dxrag/lvlm-rerank, else ~/.cache/dxrag/lvlm-rerank)")
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

    from dxrag.core.base.dataset import DatasetError, load_dataset

    key = os.environ.get(args.api_key_env)
    if not key:
        print(f"lvlm-rerank: error: environment variable {args.api_key_env} is not set (the API key)", file=sys.stderr)
        return 2
    problem = check_out(args.out)
    if problem:
        print(f"lvlm-rerank: error: {problem}", file=sys.stderr)
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
            cases = []
            for c in cols:
                item = corpus.get(item_ids[int(m.row[i, c])] or "")
                if item is None:
                    print(f"lvlm-rerank: error: {table.raw.locate(int(m.row[i, c]))}: field '{ITEM_ID}': "
                          f"{item_ids[int(m.row[i, c])]!r} is not a corpus item of {args.dataset}", file=sys.stderr)
                    return 2
                cases.append((item.text, dataset.image_path(item.image)))
            q = queries[qid]
            jobs.append((m.system, qid, [c + 1 for c in cols],
                         build_messages(q.question, list(q.candidates), dataset.image_path(q.image), cases)))

    client = openai.OpenAI(base_url=args.base_url, api_key=key, timeout=args.timeout, max_retries=args.max_retries)
    cache = ResponseCache(args.cache or default_cache_dir())
    reranker = Reranker(client, args.model, cache, temperature=args.temperature, max_tokens=args.max_tokens,
                        endpoint=str(client.base_url))
    results: list[Outcome | None] = [None] * len(jobs)
    with ThreadPoolExecutor(max_workers=max(1, args.concurrency)) as pool:
        futures = {pool.submit(reranker.rerank, messages, ranks): i for i, (_, _, ranks, messages) in enumerate(jobs)}
        try:
            for fut in tqdm(as_completed(futures), total=len(futures), desc="lvlm-rerank", disable=None):
                results[futures[fut]] = fut.result()
        except KeyRejected as e:
            for fut in futures:
                fut.cancel()
            print(f"lvlm-rerank: error: {e}; nothing written", file=sys.stderr)
            return 2
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
    if rows and n_failed == len(rows):
        print(f"lvlm-rerank: error: every query failed (first: {rows[0][ERROR]})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
