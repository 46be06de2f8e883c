"""Test helpers (importable: pyproject puts tests/ on sys.path)."""
import contextlib
import os
import subprocess
import sys

import pytest
import torch


@contextlib.contextmanager
def num_threads(n: int):
    """torch (and so pyaccel) on n threads inside the block, as before after it."""
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def on_threads_unguarded(n: int, fn, tries: int = 10):
    """fn() on n threads while pyaccel's late-team guard keeps no window open
    (inside one the kernels run on the calling thread alone, so a test of the
    multi-thread split would test the one-thread path): waits out an open
    window, reruns when one opened during the call; skips after `tries`.
    A test that calls it carries @pytest.mark.serial: scripts/test.sh runs
    those alone, after the parallel (pytest-xdist) part, on idle cores."""
    import time

    from pyaccel import _native

    C = _native.lib()
    for _ in range(tries):
        while C.serial_for_now():
            time.sleep(0.05)
        trips = C.late_team_trips()
        with num_threads(n):
            out = fn()
        if C.late_team_trips() == trips and not C.serial_for_now():
            return out
    pytest.skip(f"the late-team guard kept tripping (a busy machine): the {n}-thread split did not run")


def run_unguarded_script(body: str, test_file: str, cwd) -> None:
    """Runs body (dedented Python; the test's own module importable by name,
    tests/ on the path) in a fresh process with the late-team guard off, for
    tests that run more threads than cores: the guard would otherwise put
    the calls on one thread. body must end by printing
    "ok", _native.lib().late_team_trips(); the guard must not have fired."""
    import textwrap
    from pathlib import Path

    here = Path(test_file).parent
    code = (f"import sys\nsys.path[:0] = [{str(here)!r}, {str(Path(__file__).parent)!r}]\n"
            + textwrap.dedent(body))
    env = dict(os.environ, PYACCEL_LATE_TEAM_GUARD="0")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=cwd, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["ok", "0"]


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach().double(), out.detach().double()
    return float(20 * torch.log10(ref.norm() / (ref - out).norm().clamp_min(1e-300)))


def triton_device() -> str:
    """Device for Triton kernel tests: "cuda" on a GPU, else "cpu" under
    TRITON_INTERPRET=1; skips the calling module otherwise or without Triton."""
    pytest.importorskip("triton", reason="Triton is not installed")
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)
    return "cpu"


def run_compile_script(code: str, cc: int, cwd) -> None:
    """Run a kernel-compiling script for compute capability `cc` in a fresh
    process without TRITON_INTERPRET (cwd: not the source tree); it must print
    "compiled <cc>"."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", code, str(cc)], capture_output=True, text=True, env=env,
                       timeout=600, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"compiled {cc}" in r.stdout
