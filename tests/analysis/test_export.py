"""How analyze-oracle publishes its folder: outputs follow the umask, two writers of a new --out never mix (one
wins, the other fails cleanly), and a folder it cannot write (read-only, full disk) is a one-line error that leaves
nothing behind."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pandas as pd
import pytest

from dxrag.analysis import OracleReport
from dxrag.analysis.cli import main as analyze
from dxrag.analysis.report import ReportWriteError
from dxrag.analysis.tables import write_table


@pytest.fixture
def contexts(jsonl_files) -> Path:
    return jsonl_files["contexts"]


@pytest.fixture
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    os.umask(old)
    yield set_mask
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name or p.name.endswith(".tmp")]


@pytest.mark.parametrize("mask", [0o002, 0o022, 0o077])
def test_outputs_follow_the_umask(tmp_path, contexts, umask, mask):
    umask(mask)
    out = tmp_path / "report"
    assert analyze(["--contexts", str(contexts), "--out", str(out), "--no-figures"]) == 0
    assert _mode(out) == 0o777 & ~mask and _mode(out / "trec") == 0o777 & ~mask
    for name in ("summary.csv", "summary.md", "provenance.json", "per_query.csv"):
        assert _mode(out / name) == 0o666 & ~mask, name
    # tables written atomically elsewhere (prediction tables, rerank files) too
    assert _mode(write_table(pd.read_json(contexts, lines=True), tmp_path / "again.csv")) == 0o666 & ~mask


def test_two_writers_of_a_new_out_never_mix(tmp_path, contexts, monkeypatch):
    out = tmp_path / "report"
    first = OracleReport.from_tables(contexts)
    second = OracleReport.from_tables(contexts, reference="joint")
    # While the first builds its report, the second writes the whole folder.
    build = OracleReport.to_markdown

    def racing(self):
        if self is first:
            second.write(out, figures=False)
        return build(self)

    monkeypatch.setattr(OracleReport, "to_markdown", racing)
    with pytest.raises(ReportWriteError, match="another writer created it.*nothing written"):
        first.write(out, figures=False)
    assert (out / "summary.md").read_text(encoding="utf-8") == build(second)  # the second's report, whole
    assert not _leftovers(tmp_path)


@pytest.mark.parametrize("fault", [errno.ENOSPC, errno.EROFS, errno.EACCES])
@pytest.mark.parametrize("existing", [False, True])
def test_unwritable_out_is_one_line(tmp_path, contexts, monkeypatch, capsys, fault, existing):
    out = tmp_path / "report"
    if existing:
        assert analyze(["--contexts", str(contexts), "--out", str(out), "--no-figures"]) == 0
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        capsys.readouterr()
    import pyarrow.csv as pacsv

    def failing(*args, **kwargs):  # the disk fills / the folder turns read-only mid-write (root ignores chmod)
        raise OSError(fault, os.strerror(fault))

    monkeypatch.setattr(pacsv, "write_csv", failing)
    assert analyze(["--contexts", str(contexts), "--out", str(out), "--no-figures"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("analyze-oracle: error: ") and "Traceback" not in err
    assert os.strerror(fault) in err and str(out) in err
    assert not _leftovers(tmp_path)
    if existing:
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    else:
        assert not out.exists()


def test_out_parent_cannot_be_made(tmp_path, contexts, capsys):
    (tmp_path / "afile").write_text("x")
    assert analyze(["--contexts", str(contexts), "--out", str(tmp_path / "afile" / "report"), "--no-figures"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot write the report there" in err
