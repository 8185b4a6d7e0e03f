import logging
import os
import signal

import pytest
import torch

# CI has 2 cores; tests are written for it and must not oversubscribe.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Without a GPU, Triton kernels run in Triton's interpreter. It must be chosen before triton is first
# imported (triton.language's own helpers are decorated then), so it is set here, before any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _process_state_is_restored():
    """Undo what worker code sets for its whole process when a test runs it here: configure_logging
    leaves a stderr handler on the root logger at INFO, configure_compile_cache and the parallel
    launcher write TRITON_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR and NCCL settings into os.environ. Left
    in place, they would reach every later test (caches in an earlier test's temporary folder)."""
    environ = dict(os.environ)
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    for key in set(os.environ) - set(environ) - {"PYTEST_CURRENT_TEST"}:
        del os.environ[key]
    for key, value in environ.items():
        if os.environ.get(key) != value and key != "PYTEST_CURRENT_TEST":
            os.environ[key] = value
    root.setLevel(level)
    root.handlers[:] = handlers


@pytest.fixture
def ctrl_c_handled():
    """Python's own Ctrl-C handler for the test, as a foreground run has it: a run started in the
    background by a script (`pytest &`) inherits SIGINT ignored, which the code under test leaves be."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
