"""Side threads run torch on one OpenMP thread; the main thread keeps its own setting."""

from __future__ import annotations

import threading

import torch

from loraquilt.server.torch_threads import one_thread_off_main


def test_a_side_thread_is_limited_and_the_main_thread_is_not():
    main_before = torch.get_num_threads()
    seen = {}

    def side():
        one_thread_off_main()
        one_thread_off_main()  # idempotent
        seen["threads"] = torch.get_num_threads()
        seen["sum"] = float(torch.arange(100_000, dtype=torch.float64).sum())  # ops still run

    worker = threading.Thread(target=side)
    worker.start()
    worker.join()
    one_thread_off_main()  # on the main thread: a no-op
    assert seen["threads"] == 1
    assert seen["sum"] == 100_000 * 99_999 / 2
    assert torch.get_num_threads() == main_before


def count_on_a_new_thread() -> int:
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


def test_threads_started_later_keep_the_process_default():
    default = count_on_a_new_thread()  # not the main thread's: an engine that stepped there set its own
    limited = threading.Thread(target=one_thread_off_main)
    limited.start()
    limited.join()
    later = {}
    thread = threading.Thread(target=lambda: later.setdefault("threads", torch.get_num_threads()))
    thread.start()
    thread.join()
    assert later["threads"] == default


def test_the_limit_holds_after_the_process_wide_count_was_set():
    # once torch.set_num_threads has run anywhere, torch's lazy per-thread setup re-applies
    # that count on a thread's first get_num_threads: the limit must come after it
    torch.set_num_threads(torch.get_num_threads())
    seen = {}

    def side():
        one_thread_off_main()
        seen["threads"] = torch.get_num_threads()
        seen["sum"] = float(torch.arange(100_000, dtype=torch.float64).sum())
        seen["after"] = torch.get_num_threads()

    worker = threading.Thread(target=side)
    worker.start()
    worker.join()
    assert seen == {"threads": 1, "sum": 100_000 * 99_999 / 2, "after": 1}
