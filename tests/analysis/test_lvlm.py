"""lvlm-rerank against a loopback chat-completions server with faults: 429 then success, persistent 500, a timeout
then success, malformed and partial replies; then the cache makes a rerun free, and analyze-oracle reads the file.
Retries are the openai client's own: a 429's Retry-After header sets the wait, and a fake clock measures the waits."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from dxrag.analysis.cli import main as analyze
from dxrag.analysis.lvlm import main as lvlm_rerank
from dxrag.analysis.lvlm import parse_ranking
from dxrag.analysis.tables import load_rerank, write_table
from dxrag.core.base.dataset import DatasetWriter
from dxrag.core.base.records import CorpusItem, Query

pytest.importorskip("openai")
KEY = "sk-test-secret-0123456789"

# Per query (keyed by a marker in its question): what the server does on each successive request, as
# (status, reply content[, extra response headers]).
SCRIPT = {
    "case-1": [(429, None), (200, 'Sure! ```json\n{"ranking": [2, 1, 3]}\n``` Hope this helps.')],
    "case-2": [(500, None)] * 10,
    "case-3": [("sleep", None), (200, "[1, 2, 3]")],
    "case-4": [(200, "I cannot rank these images.")],
    "case-5": [(200, '{"ranking": ["Case 3", 3, 9]}')],  # duplicate and out of range: filled in retriever order
}


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.calls: dict[str, int] = {}
        self.times: dict[str, list[float]] = {}
        self.auth: set[str] = set()
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    server: ChatServer

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path.endswith("/chat/completions")
        self.server.auth.add(self.headers.get("Authorization", ""))
        text = json.dumps(body["messages"])
        case = next(c for c in SCRIPT if c in text)
        with self.server.lock:
            n = self.server.calls.get(case, 0)
            self.server.calls[case] = n + 1
            self.server.times.setdefault(case, []).append(time.monotonic())
        status, content, *extra = SCRIPT[case][min(n, len(SCRIPT[case]) - 1)]
        if status == "sleep":
            time.sleep(1.5)  # longer than the client's --timeout
            status, content = 200, "[2, 1, 3]"  # never read: the client timed out and retried
        content_type = "application/json"
        if status == "raw":  # a 200 whose body is `content` as it is: (raw, body, {"Content-Type": ...})
            status, payload = 200, content.encode()
            content_type = (extra[0] if extra else {}).get("Content-Type", content_type)
            extra = []
        elif status != 200:
            payload = json.dumps({"error": {"message": "fault", "type": "server_error"}}).encode()
        else:
            payload = json.dumps({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 7, "total_tokens": 107}}).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for name, value in (extra[0] if extra else {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            pass


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch) -> Path:
    """The default reply cache ($XDG_CACHE_HOME/dxrag/lvlm-rerank) inside the test's folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "dxrag" / "lvlm-rerank"


@pytest.fixture
def server():
    srv = ChatServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def make_dataset(root: Path) -> tuple[Path, Path]:
    from dxrag.core.base.dataset import DatasetMeta

    out = root / "ds"
    rows = []
    with DatasetWriter(out) as w:
        for i in range(1, 6):
            q = f"q{i}"
            w.queries["test"].append(Query(id=q, image=w.add_image(q, Image.new("RGB", (8, 8), (i * 40, 0, 0))),
                                           question=f"Grade? (case-{i})", candidates=("A", "B", "C"), label="A"))
            for rank in (1, 2, 3):
                cid = f"c{i}{rank}"
                w.corpus.append(CorpusItem(id=cid, image=w.add_image(cid, Image.new("RGB", (8, 8), (0, rank * 60, 0))),
                                           text=f"report {cid}", label="ABC"[rank - 1]))
                rows.append(dict(system="rag", query_id=q, rank=rank, label="A", prediction="ABC"[rank - 1],
                                 item_id=cid))
        w.meta = DatasetMeta(name="tiny", task="classification", labels=["A", "B", "C"])
    contexts = root / "ctx.csv"
    write_table(pd.DataFrame(rows), contexts)
    return out, contexts


def test_parse_ranking_is_robust():
    assert parse_ranking('```json\n{"ranking": [2, 3, 1]}\n```', 3) == [2, 3, 1]
    assert parse_ranking("Best first: [3, 1]. Explanation follows.", 3) == [3, 1, 2]
    assert parse_ranking('{"order": [1]} then {"ranking": ["2", "candidate 2", 7, 0]}', 3) == [2, 1, 3]
    assert parse_ranking("no numbers in brackets 1 2 3", 3) is None
    assert parse_ranking("", 3) is None


def test_rerank_against_loopback_server(server, tmp_path, monkeypatch, capsys, user_cache):
    dataset, contexts = make_dataset(tmp_path)
    monkeypatch.setenv("TEST_KEY", KEY)
    out = tmp_path / "rerank.jsonl"
    args = ["--contexts", str(contexts), "--dataset", str(dataset), "--model", "mock-vlm",
            "--base-url", f"http://127.0.0.1:{server.server_port}/v1", "--api-key-env", "TEST_KEY",
            "--out", str(out), "--concurrency", "3", "--max-retries", "2", "--timeout", "0.5"]
    assert lvlm_rerank(args) == 0
    first_log = capsys.readouterr()
    assert server.auth == {f"Bearer {KEY}"}
    df = load_rerank(out).frame.set_index("query_id")
    assert df.loc["q1", "ranking"] == [2, 1, 3] and df.loc["q1", "error"] == ""  # 429, then success
    assert df.loc["q2", "ranking"] == [] and "HTTP 500" in df.loc["q2", "error"]  # 1 try + 2 retries, all 500
    assert df.loc["q3", "ranking"] == [1, 2, 3] and df.loc["q3", "error"] == ""  # timed out once, then answered
    assert "no ranking" in df.loc["q4", "error"]
    assert df.loc["q5", "ranking"] == [3, 1, 2]
    assert set(df["selector"]) == {"lvlm:mock-vlm"}
    assert server.calls["case-1"] == 2 and server.calls["case-2"] == 3 and server.calls["case-3"] >= 2
    raw = pd.read_json(out, lines=True).set_index("query_id")
    assert raw.loc["q1", "prompt_tokens"] == 100 and raw["completion_tokens"].sum() == 4 * 7
    assert "tokens: 400 prompt, 28 completion" in first_log.out

    # Rerun: every request that gave a ranking comes from the cache; the failed one and the reply without a ranking
    # go out again.
    calls = dict(server.calls)
    assert lvlm_rerank(args) == 0
    second_log = capsys.readouterr()
    assert {c: server.calls[c] - calls[c] for c in calls} == {"case-1": 0, "case-2": 3, "case-3": 0, "case-4": 1,
                                                              "case-5": 0}
    assert "3 from cache" in second_log.out and "tokens: 100 prompt, 7 completion" in second_log.out
    assert load_rerank(out).frame.set_index("query_id").loc["q1", "ranking"] == [2, 1, 3]

    # The key appears nowhere: not in output, logs, or cache.
    cache_text = "".join(p.read_text() for p in user_cache.glob("*.json"))
    assert cache_text and KEY not in cache_text
    for text in (out.read_text(), first_log.out, first_log.err, second_log.out, second_log.err):
        assert KEY not in text

    # analyze-oracle reads the file: q1 -> rank 2 (B, wrong), q3 -> rank 1 (A, right), q5 -> rank 3 (C, wrong);
    # q2 and q4 failed -> rank 1 (right). Accuracy 3/5 with 2 fallbacks.
    report = tmp_path / "report"
    assert analyze(["--contexts", str(contexts), "--rerank", str(out), "--out", str(report), "--no-figures"]) == 0
    sel = pd.read_csv(report / "selectors.csv").set_index("selector")
    assert sel.loc["lvlm:mock-vlm", "acc"] == pytest.approx(3 / 5)
    assert sel.loc["lvlm:mock-vlm", "n_fallback"] == 2


class FakeClock:
    """Stands in for the `time` module inside the openai client: its retry waits are recorded, and no real time
    passes (everything else is the real module's)."""

    def __init__(self):
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def __getattr__(self, name: str):
        return getattr(time, name)


@pytest.fixture
def fake_clock(monkeypatch) -> FakeClock:
    base_client = pytest.importorskip("openai._base_client")
    assert hasattr(base_client, "time"), "the openai client no longer waits through its `time`: update FakeClock"
    clock = FakeClock()
    monkeypatch.setattr(base_client, "time", clock)
    return clock


def test_retries_give_up_within_the_documented_wait(server, tmp_path, monkeypatch, fake_clock):
    """--max-retries N: a query the server keeps failing is tried N + 1 times and given up after waiting at most what
    --help says (0.5 s doubling up to 8 s, less up to a quarter of jitter), then recorded as failed; a 429's
    Retry-After sets the wait instead. Measured on a fake clock: nothing really sleeps."""
    monkeypatch.setitem(SCRIPT, "case-1", [(429, None, {"Retry-After": "1.2"}), (200, "[3, 2, 1]")])
    dataset, contexts = make_dataset(tmp_path)
    monkeypatch.setenv("TEST_KEY", KEY)
    out = tmp_path / "rerank.jsonl"
    assert lvlm_rerank(_args(server, dataset, contexts, out, "--limit", "2", "--concurrency", "1",
                             "--max-retries", "6")) == 0
    assert server.calls == {"case-1": 2, "case-2": 7}
    df = load_rerank(out).frame.set_index("query_id")
    assert df.loc["q1", "ranking"] == [3, 2, 1] and df.loc["q1", "error"] == ""
    assert df.loc["q2", "ranking"] == [] and "HTTP 500" in df.loc["q2", "error"]
    retry_after, *backoff = fake_clock.sleeps  # q1's one wait, then q2's six
    assert retry_after == 1.2
    documented = [min(0.5 * 2 ** i, 8.0) for i in range(6)]  # 0.5, 1, 2, 4, 8, 8
    assert len(backoff) == len(documented)
    assert all(0.75 * d <= got <= d for got, d in zip(backoff, documented)), backoff
    assert sum(backoff) <= 23.5


def test_missing_key_and_unknown_item(tmp_path, monkeypatch, capsys):
    dataset, contexts = make_dataset(tmp_path)
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    base = ["--contexts", str(contexts), "--dataset", str(dataset), "--model", "m", "--out",
            str(tmp_path / "r.jsonl"), "--base-url", "http://127.0.0.1:9/v1"]
    assert lvlm_rerank(base + ["--api-key-env", "NO_SUCH_KEY"]) == 2
    assert "NO_SUCH_KEY" in capsys.readouterr().err
    monkeypatch.setenv("TEST_KEY", KEY)
    frame = pd.read_csv(contexts)
    frame.loc[4, "item_id"] = "nope"
    write_table(frame, contexts)
    assert lvlm_rerank(base + ["--api-key-env", "TEST_KEY"]) == 2
    err = capsys.readouterr().err
    assert f"{contexts}:6:" in err and "'item_id'" in err and not (tmp_path / "r.jsonl").exists()


def _args(server, dataset, contexts, out, *extra):
    return ["--contexts", str(contexts), "--dataset", str(dataset), "--model", "mock-vlm",
            "--base-url", f"http://127.0.0.1:{server.server_port}/v1", "--api-key-env", "TEST_KEY", "--out", str(out),
            "--max-retries", "0", "--timeout", "5", *extra]


def test_malformed_replies_fail_their_query_only(server, tmp_path, monkeypatch, capsys):
    # 200 replies that are no chat completion: text/plain, a JSON type that does not decode, no choices, empty choices
    monkeypatch.setitem(SCRIPT, "case-1", [("raw", "internal proxy page", {"Content-Type": "text/plain"})])
    monkeypatch.setitem(SCRIPT, "case-2", [("raw", "{not json", {"Content-Type": "application/json"})])
    monkeypatch.setitem(SCRIPT, "case-3", [("raw", json.dumps({"id": "x", "object": "chat.completion"}))])
    monkeypatch.setitem(SCRIPT, "case-4", [("raw", json.dumps({"id": "x", "object": "chat.completion",
                                                                "choices": []}))])
    dataset, contexts = make_dataset(tmp_path)
    monkeypatch.setenv("TEST_KEY", KEY)
    out = tmp_path / "rerank.jsonl"
    assert lvlm_rerank(_args(server, dataset, contexts, out, "--concurrency", "2")) == 0
    df = load_rerank(out).frame.set_index("query_id")
    for q in ("q1", "q2", "q3", "q4"):
        assert df.loc[q, "ranking"] == [] and "malformed reply" in df.loc[q, "error"], df.loc[q, "error"]
    assert df.loc["q5", "ranking"] == [3, 1, 2]
    # nothing unusable was cached: a rerun asks for the four again, and not for q5
    calls = dict(server.calls)
    assert lvlm_rerank(_args(server, dataset, contexts, out)) == 0
    assert {c: server.calls[c] - calls[c] for c in calls} == {"case-1": 1, "case-2": 1, "case-3": 1, "case-4": 1,
                                                              "case-5": 0}


@pytest.mark.parametrize("status", [401, 403])
def test_rejected_key_stops_after_one_request(server, tmp_path, monkeypatch, capsys, status):
    for case in SCRIPT:
        monkeypatch.setitem(SCRIPT, case, [(status, None)])
    dataset, contexts = make_dataset(tmp_path)
    monkeypatch.setenv("TEST_KEY", KEY)
    out = tmp_path / "rerank.jsonl"
    assert lvlm_rerank(_args(server, dataset, contexts, out, "--concurrency", "4", "--max-retries", "3")) == 2
    err = capsys.readouterr().err
    assert sum(server.calls.values()) == 1
    assert f"HTTP {status}" in err and "API key" in err and len(err.strip().splitlines()) == 1 and KEY not in err
    assert not out.exists()


def test_every_query_failed_exits_nonzero(server, tmp_path, monkeypatch, capsys):
    for case in SCRIPT:
        monkeypatch.setitem(SCRIPT, case, [(500, None)])
    dataset, contexts = make_dataset(tmp_path)
    monkeypatch.setenv("TEST_KEY", KEY)
    out = tmp_path / "rerank.jsonl"
    assert lvlm_rerank(_args(server, dataset, contexts, out)) == 1
    assert "every query failed" in capsys.readouterr().err
    assert (load_rerank(out).frame["error"] != "").all()  # the errors are still recorded


@pytest.mark.parametrize("bad", ["rerank.txt", "afile/rerank.jsonl", "adir"])
def test_out_is_checked_before_any_request(server, tmp_path, monkeypatch, capsys, bad):
    dataset, contexts = make_dataset(tmp_path)
    monkeypatch.setenv("TEST_KEY", KEY)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    assert lvlm_rerank(_args(server, dataset, contexts, tmp_path / bad)) == 2
    err = capsys.readouterr().err
    assert err.startswith("lvlm-rerank: error: --out") and len(err.strip().splitlines()) == 1
    assert server.calls == {}


def test_cache_is_keyed_by_request_not_by_out(server, tmp_path, monkeypatch, capsys):
    dataset, contexts = make_dataset(tmp_path)
    monkeypatch.setenv("TEST_KEY", KEY)
    monkeypatch.setitem(SCRIPT, "case-1", [(200, "[1, 3, 2]")])
    monkeypatch.setitem(SCRIPT, "case-2", [(200, "[2, 3, 1]")])
    monkeypatch.setitem(SCRIPT, "case-3", [(200, "[3, 2, 1]")])
    assert lvlm_rerank(_args(server, dataset, contexts, tmp_path / "a.jsonl")) == 0
    calls = sum(server.calls.values())
    assert lvlm_rerank(_args(server, dataset, contexts, tmp_path / "b" / "b.parquet")) == 0
    assert sum(server.calls.values()) - calls == 1  # only case-4 (no ranking) asks again
    a, b = (load_rerank(p).frame.set_index("query_id") for p in (tmp_path / "a.jsonl", tmp_path / "b" / "b.parquet"))
    assert a.loc["q2", "ranking"] == b.loc["q2", "ranking"] == [2, 3, 1]


def test_a_cached_reply_without_ranking_is_asked_again(server, tmp_path, monkeypatch, user_cache):
    """A cache written before unusable replies stopped being stored: such an entry is a miss, not an answer."""
    from dxrag.analysis.lvlm import ResponseCache

    dataset, contexts = make_dataset(tmp_path)
    monkeypatch.setenv("TEST_KEY", KEY)
    monkeypatch.setitem(SCRIPT, "case-1", [(200, "[2, 1, 3]")])
    out = tmp_path / "r.jsonl"
    assert lvlm_rerank(_args(server, dataset, contexts, out, "--limit", "1")) == 0
    (entry,) = user_cache.glob("*.json")
    ResponseCache(user_cache).put(entry.stem, {"content": "no idea", "prompt_tokens": 1, "completion_tokens": 1})
    assert lvlm_rerank(_args(server, dataset, contexts, out, "--limit", "1")) == 0
    assert server.calls["case-1"] == 2
    assert load_rerank(out).frame.set_index("query_id").loc["q1", "ranking"] == [2, 1, 3]
