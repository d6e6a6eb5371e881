"""Test-wide settings: one intra-op thread.

The models under test are tiny; with two threads PyTorch's thread pool costs more than it saves,
and under load (other processes on a 2-core machine) it can slow a test a hundredfold. One thread
also keeps floating-point reductions in one fixed order.
"""

import torch

torch.set_num_threads(1)
