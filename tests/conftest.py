"""Suite-wide test settings.

Under CI (the CI variable is set) hypothesis runs derandomized with no example
database, so a run is repeatable: the same examples every time. Locally it keeps
exploring new examples."""
from __future__ import annotations

import os

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def one_thread():
    """torch on one thread for the test (decoder and training tests compare numbers
    that must not depend on how many threads summed them), restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
