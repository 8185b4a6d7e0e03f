import os

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
