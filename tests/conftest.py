import os

import pytest
import torch

# CI has 2 cores; tests are written for it and must not oversubscribe.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
