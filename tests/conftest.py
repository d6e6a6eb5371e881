"""Test-wide settings: one intra-op thread; one reference store shared by the tests that compare
a sweep's bytes with an uninterrupted local one.

The models under test are tiny; with two threads PyTorch's thread pool costs more than it saves,
and under load (other processes on a 2-core machine) it can slow a test a hundredfold. One thread
also keeps floating-point reductions in one fixed order.
"""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def paper04_smoke(tmp_path_factory) -> dict[str, bytes]:
    """paper04's smoke runs (a base and 3 adapters, the smallest smoke experiment) trained once
    per session, uninterrupted, in this process: ``store_bytes`` of that store. Every executor,
    a resumed sweep and an interrupted ``probe reproduce`` must end with these very bytes."""
    from helpers import store_bytes

    from analysis.experiments import EXPERIMENTS
    from analysis.report import PROFILES
    from analysis.runs import Store, run_all

    root = tmp_path_factory.mktemp("paper04_smoke")
    assert run_all(EXPERIMENTS["paper04"].runs(PROFILES["smoke"]), Store(root)) == 4
    return store_bytes(root)
