"""The runtime suite on the CPU-backed CUDA driver: the real cuda.bindings and cuda.core
over ``tests/mock_cuda_driver.cpp``, TensorRT replaced by the CPU interpreter.

It runs in its own process, started by ``tests/test_cpu_driver.py`` with the driver first on
``LD_LIBRARY_PATH``. Every test fails if the driver recorded a broken CUDA rule (a block
used on a stream not ordered after its allocation or after conflicting work, freed under
pending work, pinned memory rewritten under a pending copy) that the test did not expect.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from cpu_driver import ENV_FLAG, Driver, InterpretedTensorRT

if not os.environ.get(ENV_FLAG):
    raise pytest.UsageError(f"tests/driver runs on the CPU-backed CUDA driver: run it through tests/test_cpu_driver.py "
                            f"(or set LD_LIBRARY_PATH to cpu_driver.build() and {ENV_FLAG})")


@pytest.fixture(scope="session")
def driver() -> Driver:
    return Driver()


@pytest.fixture(autouse=True)
def rules_kept(driver):
    """No CUDA rule broken, and no exception inside queued work, unless the test took them."""
    driver.violations()
    driver.errors.clear()
    yield
    broken, errors = driver.violations(), list(driver.errors)
    driver.errors.clear()
    assert not broken, "the CUDA rules were broken:\n" + "\n".join(broken)
    assert not errors, "queued work raised:\n" + "\n".join(errors)


@pytest.fixture
def plans(monkeypatch, driver):
    """{plan bytes: built network}: EngineRunner(plan) loads that network, run by the interpreter."""
    import trtvit_native as tv
    from trtvit_native import runtime

    table = {}
    real = tv.get_backend()
    backend = SimpleNamespace(trt=InterpretedTensorRT(real.trt, driver, table),
                              label=f"{real.label} runtime on the CPU interpreter")
    monkeypatch.setattr(runtime, "get_backend", lambda name=None: backend)
    return table
