"""core/base/fsutil.py: the per-directory process lock (atomic writes are tested where they are used)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from dxrag.core.base.fsutil import Busy, process_lock

HOLD = ("import sys, time\nfrom dxrag.core.base.fsutil import process_lock\n"
        "with process_lock(sys.argv[1], 'x'):\n    print('held', flush=True)\n    time.sleep(60)\n")


def test_a_second_holder_is_refused_naming_the_first_and_the_lock_is_released_after(tmp_path):
    lock = tmp_path / ".run.lock"
    with process_lock(lock, "run directory R"):
        with pytest.raises(Busy, match=rf"run directory R is in use by another dxrag process \(PID {os.getpid()}\)"):
            with process_lock(lock, "run directory R"):
                pass
    with process_lock(lock, "run directory R"):  # released at the end of the block
        pass


def test_a_killed_holder_leaves_no_lock_behind(tmp_path):
    lock = tmp_path / ".run.lock"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(Busy, match=f"PID {proc.pid}"):
            with process_lock(lock, "run directory R"):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 10
    while True:  # the kernel drops the lock with the process
        try:
            with process_lock(lock, "run directory R"):
                break
        except Busy:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert lock.read_text().strip() == str(os.getpid())
