"""`import dxrag.analysis` and a full analyze-oracle run (figures included) must not import torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_analysis_never_imports_torch(jsonl_files, tmp_path):
    paths = jsonl_files
    code = textwrap.dedent(f"""
        import sys
        import dxrag.analysis, dxrag.analysis.lvlm, dxrag.analysis.figures
        from dxrag.analysis.cli import main
        assert 'torch' not in sys.modules, 'import'
        assert main(['--contexts', {str(paths['contexts'])!r}, '--answers', {str(paths['answers'])!r},
                     '--rerank', {str(paths['rerank'])!r}, '--out', {str(tmp_path / 'out')!r}]) == 0
        assert 'torch' not in sys.modules, 'run'
        print('ok')
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"MPLBACKEND": "Agg", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")
    assert (tmp_path / "out" / "figures" / "oracle_at_k.pdf").exists()
