"""The runtime suite (tests/driver/) on the CPU-backed CUDA driver, in its own process.

The driver library is built here and put first on the child's ``LD_LIBRARY_PATH``, so the
real ``cuda.bindings`` and ``cuda.core`` load it as ``libcuda.so.1``. No test there may skip:
the suite is the runtime's proof on this machine.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import cpu_driver

ROOT = Path(__file__).resolve().parent.parent


def test_the_runtime_suite_passes_on_the_cpu_backed_driver():
    folder = cpu_driver.build()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests/driver"],
                          cwd=ROOT, env=cpu_driver.environment(folder), capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    assert proc.returncode == 0, out[-12000:]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary and "xfail" not in summary, out[-6000:]
    print(summary)
