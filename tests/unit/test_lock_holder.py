"""A refusal names the lock's holder even when it comes in the moment between the holder
taking the lock and writing its line (the race seen in test_locks' two concurrent embeds)."""

from __future__ import annotations

import os
import threading
import time

from dve_repro.artifacts import _holder_of


def test_a_holder_line_written_late_is_still_read(tmp_path):
    path = tmp_path / ".run.lock"
    path.write_text("")
    fd = os.open(path, os.O_RDWR)
    try:
        late = threading.Timer(0.1, lambda: path.write_text("pid 42 on host (dve embed)\n"))
        late.start()
        assert _holder_of(fd) == "pid 42 on host (dve embed)"
        late.join()
    finally:
        os.close(fd)


def test_a_lock_file_that_stays_empty_names_another_process(tmp_path):
    path = tmp_path / ".run.lock"
    path.write_text("")
    fd = os.open(path, os.O_RDWR)
    try:
        t0 = time.monotonic()
        assert _holder_of(fd, tries=3) == "another process"
        assert time.monotonic() - t0 < 1.0
    finally:
        os.close(fd)
