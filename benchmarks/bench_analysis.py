"""Scale benchmark of the oracle analysis: N queries × k contexts in Parquet (against pandas' read time) or in JSONL
(`--jsonl`, against pyarrow.json.read_json's time), both measured side by side in one run.

Measures the read time, OracleReport time (load + validate + all metrics, without and with writing the CSVs),
peak memory (fresh subprocesses, RSS), and a straightforward pandas groupby-apply implementation on a subsample.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq

ANSWERS = ["0", "1", "2", "3", "4"]


def generate(path: Path, n_queries: int, k: int, seed: int = 0, probs: bool = False, shuffle: bool = False) -> None:
    """A context table as a pipeline writes it: query by query, ranks 1..k; ~30% of queries inconsistent; Parquet
    or JSONL by the suffix of `path`. With `probs`, every row carries a distribution over the 5 answers (a map
    column); with `shuffle`, the rows are in random order (the loader then sorts them)."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, len(ANSWERS), n_queries)
    noisy = rng.random(n_queries) < 0.35  # queries whose contexts may disagree
    wrong = rng.random((n_queries, k)) < np.where(noisy, 0.4, 0.0)[:, None]
    pred = np.where(wrong, rng.integers(0, len(ANSWERS), (n_queries, k)), label[:, None]).ravel()
    n = n_queries * k
    answers = pa.array(ANSWERS)
    qid = pa.array(np.char.add("q", np.arange(n_queries).astype(str)).astype(object))
    item = pa.array(np.char.add("c", np.arange(50_000).astype(str)).astype(object))
    table = pa.table({
        "system": pa.array(np.full(n, "rag", dtype=object), pa.string()),
        "query_id": qid.take(pa.array(np.repeat(np.arange(n_queries), k))),
        "rank": np.tile(np.arange(1, k + 1, dtype=np.int64), n_queries),
        "label": answers.take(pa.array(np.repeat(label, k))),
        "prediction": answers.take(pa.array(pred)),
        "item_id": item.take(pa.array(rng.integers(0, len(item), n))),
        "head": pa.array(["image", "text"]).take(pa.array(np.tile(np.arange(k) % 2, n_queries))),
        "retrieval_score": np.sort(rng.random((n_queries, k)), axis=1)[:, ::-1].ravel(),
    })
    if probs:
        raw = rng.random((n, len(ANSWERS))) + 3 * (np.arange(len(ANSWERS)) == pred[:, None])
        raw /= raw.sum(axis=1, keepdims=True)
        offsets = pa.array(np.arange(0, n * len(ANSWERS) + 1, len(ANSWERS), dtype=np.int32))
        keys = answers.take(pa.array(np.tile(np.arange(len(ANSWERS)), n)))
        table = table.append_column("probs", pa.MapArray.from_arrays(offsets, keys, pa.array(raw.ravel())))
    if shuffle:
        table = table.take(pa.array(rng.permutation(n)))
    if path.suffix == ".jsonl":
        write_jsonl(table, path)
    else:
        pq.write_table(table, path)


def write_jsonl(table: pa.Table, path: Path, rows_per_block: int = 1_000_000) -> None:
    """One JSON object per line, formatted by arrow compute (json.dumps per row would take minutes at 10M rows).
    Holds for the generated tables only: strings need no escaping and every probs map has the same 5 entries."""
    with open(path, "wb") as f:
        for start in range(0, table.num_rows, rows_per_block):
            block = table.slice(start, rows_per_block)
            parts: list = []
            for i, name in enumerate(block.column_names):
                col = block.column(name).combine_chunks()
                parts.append(("{" if i == 0 else ", ") + f'"{name}": ')
                if name == "probs":
                    keys, items = col.keys.to_pylist()[:len(ANSWERS)], pc.cast(col.items, pa.string())
                    for j, key in enumerate(keys):
                        parts += [("{" if j == 0 else ", ") + f'"{key}": ',
                                  items.take(pa.array(np.arange(j, len(items), len(keys))))]
                    parts.append("}")
                elif pa.types.is_string(col.type):
                    parts += ['"', col, '"']
                else:
                    parts.append(pc.cast(col, pa.string()))
            parts.append("}\n")
            lines = pc.binary_join_element_wise(*parts, "")
            offsets = np.frombuffer(lines.buffers()[1], np.int32)[lines.offset:lines.offset + len(lines) + 1]
            f.write(memoryview(lines.buffers()[2])[offsets[0]:offsets[-1]])


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(mode: str, path: str, out: str | None) -> dict:
    """Runs one measurement in this (fresh) process; returns seconds and peak RSS growth over the imports."""
    from dxrag.analysis.report import OracleReport

    # Warm up both paths on a tiny file of the same kind (lazy imports, arrow thread pools), so neither pays for it.
    jsonl = path.endswith(".jsonl")
    tiny = Path(path).with_name("warm-up" + Path(path).suffix)
    pa_json.read_json(tiny) if jsonl else pd.read_parquet(tiny)
    OracleReport.from_tables(tiny).summary()
    base = _rss_bytes()
    t0, cpu0 = time.perf_counter(), time.process_time()
    result: dict = {}
    if mode == "read":
        if jsonl:  # pyarrow's JSON reader as is (default options: inferred types)
            table = pa_json.read_json(path)
            result["seconds"] = time.perf_counter() - t0
            result["in_memory_bytes"] = int(table.nbytes)
        else:
            df = pd.read_parquet(path)
            result["seconds"] = time.perf_counter() - t0
            result["in_memory_bytes"] = int(df.memory_usage(deep=True).sum())
        result["cpu_s"] = time.process_time() - cpu0
    else:
        declined: list[str] = []  # set when the loader leaves pyarrow's reader for the line-by-line pass
        handler = logging.Handler()
        handler.emit = lambda record: declined.append(record.getMessage()) if "declined" in record.msg else None
        logging.getLogger("dxrag.analysis.tables").addHandler(handler)
        logging.getLogger("dxrag.analysis.tables").setLevel(logging.INFO)
        report = OracleReport.from_tables(path)
        for frame in (report.summary(), report.oracle_at_k(), report.subsets(), report.selectors_frame(),
                      report.mcnemar()):
            assert len(frame)
        result["analysis_s"] = time.perf_counter() - t0
        result["cpu_s"] = time.process_time() - cpu0
        if out:
            report.write(out, figures=False)
        result["seconds"] = time.perf_counter() - t0
        result["summary"] = report.summary().to_dict(orient="records")
        result["line_by_line_fallback"] = declined
        result["selectors"] = sorted({s for sel in report.selectors.values() for s in (x.name for x in sel)})
    result["peak_bytes"] = _peak_rss_bytes() - base
    return result


def run_child(mode: str, path: Path, out: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--path", str(path)] + (["--out", str(out)] if out else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"benchmark child {mode} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def naive(df: pd.DataFrame) -> pd.DataFrame:
    """The straightforward implementation: groupby-apply with a Python function per query."""
    df = df.assign(pred=df["prediction"].str.strip().str.casefold(), gold=df["label"].str.strip().str.casefold())
    k = int(df["rank"].max())

    def per_query(g: pd.DataFrame) -> pd.Series:
        g = g.sort_values("rank")
        preds = list(g["pred"])
        gold = g["gold"].iloc[0]
        counts = pd.Series(preds).value_counts(sort=False)
        best = counts.max()
        majority = next(p for p in preds if counts[p] == best)
        out = {"n_distinct": len(counts), "top1_correct": preds[0] == gold, "majority_correct": majority == gold,
               "oracle_correct": gold in preds}
        for j in range(1, k + 1):
            out[f"oracle@{j}"] = gold in preds[:j]
        return pd.Series(out)

    return df.groupby(["system", "query_id"], sort=False).apply(per_query, include_groups=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--queries", type=int, default=1_000_000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--rows", type=int, help="table rows (sets --queries to rows / k)")
    p.add_argument("--jsonl", action="store_true",
                   help="JSONL table, timed against pyarrow.json.read_json instead of pd.read_parquet")
    p.add_argument("--probs", action="store_true", help="add a probs map column (confidence and fusion selectors)")
    p.add_argument("--shuffle", action="store_true", help="write the rows in random order")
    p.add_argument("--naive-queries", type=int, default=20_000, help="subsample size for groupby-apply")
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs for read and analysis")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--child", choices=("read", "analyse"), help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.path, args.out)))
        return 0
    if args.rows is not None:
        args.queries = max(1, args.rows // args.k)
    suffix = ".jsonl" if args.jsonl else ".parquet"

    with tempfile.TemporaryDirectory(prefix="bench-analysis-") as tmp:
        path = Path(tmp) / f"contexts{suffix}"
        t0 = time.perf_counter()
        generate(path, args.queries, args.k, probs=args.probs, shuffle=args.shuffle)
        gen_s = time.perf_counter() - t0
        file_bytes = path.stat().st_size
        generate(path.with_name(f"warm-up{suffix}"), 3, args.k, seed=2, probs=args.probs, shuffle=args.shuffle)
        reads, ours = [], []
        for i in range(args.repeats):  # alternating, so a change in machine load hits both alike
            reads.append(run_child("read", path))
            ours.append(run_child("analyse", path, Path(tmp) / f"report-{i}"))
        read_s = min(r["seconds"] for r in reads)
        analysis_s = min(r["analysis_s"] for r in ours)
        in_memory = reads[0]["in_memory_bytes"]
        peak = max(r["peak_bytes"] for r in ours)
        with_write_s = min(r["seconds"] for r in ours)

        # The naive implementation on a smaller table of the same kind, extrapolated linearly to all queries.
        sub_q = min(args.naive_queries, args.queries)
        sub_path = Path(tmp) / "sub" / f"contexts{suffix}"
        sub_path.parent.mkdir()
        generate(sub_path.with_name(f"warm-up{suffix}"), 3, args.k, seed=2, probs=args.probs, shuffle=args.shuffle)
        generate(sub_path, sub_q, args.k, seed=1, probs=args.probs, shuffle=args.shuffle)
        sub_columns = ["system", "query_id", "rank", "label", "prediction"]
        sub = (pa_json.read_json(sub_path).select(sub_columns).to_pandas() if args.jsonl
               else pd.read_parquet(sub_path, columns=sub_columns))
        t0 = time.perf_counter()
        ref = naive(sub)
        naive_sub_s = time.perf_counter() - t0
        naive_s = naive_sub_s * args.queries / sub_q
        check = run_child("analyse", sub_path)["summary"][0]
        matches = (abs(check["top1_acc"] - ref["top1_correct"].mean()) < 1e-12
                   and abs(check["majority_acc"] - ref["majority_correct"].mean()) < 1e-12
                   and abs(check["oracle_acc"] - ref["oracle_correct"].mean()) < 1e-12
                   and abs(check["mean_n_distinct"] - ref["n_distinct"].mean()) < 1e-12)

    read_name = "read_json_pyarrow_s" if args.jsonl else "read_parquet_s"
    ratio = "ratio_to_pyarrow_read" if args.jsonl else "ratio_to_read"
    result = {
        "format": suffix[1:], "queries": args.queries, "k": args.k, "rows": args.queries * args.k,
        "probs": args.probs, "shuffled": args.shuffle, "file_bytes": file_bytes,
        "selectors": ours[0]["selectors"], "generate_s": round(gen_s, 3),
        read_name: round(read_s, 3), "analysis_s": round(analysis_s, 3),
        "analysis_with_csv_write_s": round(with_write_s, 3),
        ratio: round(analysis_s / read_s, 3),
        f"{ratio}_cpu": round(min(r["cpu_s"] for r in ours) / min(r["cpu_s"] for r in reads), 3),
        f"{ratio}_with_write": round(with_write_s / read_s, 3),
        "in_memory_bytes": in_memory, "peak_bytes": peak, "peak_mem_ratio": round(peak / in_memory, 3),
        "naive_subsample_queries": sub_q, "naive_subsample_s": round(naive_sub_s, 3),
        "naive_extrapolated_s": round(naive_s, 1), "speedup_vs_naive": round(naive_s / analysis_s, 1),
        "naive_matches_fast_path": bool(matches),
        "line_by_line_fallback": any(r["line_by_line_fallback"] for r in ours), "cpu_count": os.cpu_count(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "note": "read (pd.read_parquet, or pyarrow.json.read_json with default options for --jsonl) and analysis "
                "each best of --repeats fresh, warmed-up processes, alternating; analysis = load + validate + "
                "every metric and table except per_query; with_write adds writing every CSV, summary.md and "
                "provenance.json (an analyze-oracle --no-figures run), in the same processes; peak = RSS "
                "high-water mark over the process's size after imports and warm-up; naive time extrapolated "
                "linearly from the subsample",
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
