"""Fixtures shared by the kernel tests."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """One OpenMP thread: the many small calls of a test then cost microseconds each, where
    two threads on a busy machine wait on each other at every barrier (the shape tests and
    `test_thread_count_does_not_change_the_bits` keep the threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
