"""speckv_eval.services.ServiceProcess, the benchmarks' and demo's way to start a server:
a child that dies before it listens, or stays silent past the timeout, is reported as such
with its last stderr lines and in bounded time; a listening child is found and stopped."""

from __future__ import annotations

import sys
import time

import pytest
from speckv_eval.services import ServiceProcess

PY = sys.executable


def test_a_child_that_exits_before_listening_is_reported_at_once_with_its_stderr() -> None:
    code = "import sys; print('bad flag --frobnicate', file=sys.stderr); sys.exit(3)"
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        ServiceProcess("svc", [PY, "-c", code], timeout_s=60)
    assert time.monotonic() - t0 < 20  # not the 60 s timeout
    assert "svc exited with code 3 before it listened" in str(err.value)
    assert "bad flag --frobnicate" in str(err.value)


def test_a_silent_child_times_out_although_it_prints_nothing() -> None:
    code = "import sys, time; print('loading', file=sys.stderr, flush=True); time.sleep(60)"
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        ServiceProcess("svc", [PY, "-c", code], timeout_s=1.5)
    assert time.monotonic() - t0 < 20  # the child would sleep 60 s
    assert "svc did not start within 1.5 s" in str(err.value)
    assert "loading" in str(err.value)


def test_a_listening_child_is_found_and_its_chatter_drained() -> None:
    code = (
        "import time; print('listening on 127.0.0.1:5', flush=True)\n"
        "for i in range(200000): print(i)\n"  # more than a pipe holds: must be drained
        "time.sleep(60)"
    )
    proc = ServiceProcess("svc", [PY, "-c", code], timeout_s=30)
    try:
        assert proc.address == "127.0.0.1:5"
    finally:
        assert proc.stop(grace_s=5) is not None
