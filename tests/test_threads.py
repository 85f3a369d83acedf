"""qr_sampler.threads: splitting GIL-free host work over a few helper threads."""

from __future__ import annotations

import os
import threading
import time

import pytest

from qr_sampler import threads


def test_results_come_back_in_order_with_the_first_part_in_the_caller() -> None:
    seen: list[tuple[int, int]] = []

    helpers = threading.Barrier(3, timeout=30)  # parts 2-4 must run at once

    def work(i: int) -> int:
        seen.append((i, threading.get_ident()))
        if i > 1:
            helpers.wait()
        time.sleep(0.01 * (4 - i))  # later parts end first
        return i * i

    assert threads.run_split(work, [1, 2, 3, 4]) == [1, 4, 9, 16]
    by_part = dict(seen)
    assert by_part[1] == threading.get_ident()
    assert len(set(by_part.values())) == 4


def test_zero_or_one_part_runs_in_the_caller() -> None:
    assert threads.run_split(lambda i: threading.get_ident(), [0]) == [threading.get_ident()]
    assert threads.run_split(lambda i: i, []) == []


def test_an_error_is_raised_after_every_part_ended() -> None:
    ended: list[int] = []

    def work(i: int) -> int:
        if i == 2:
            raise RuntimeError("part 2 failed")
        time.sleep(0.05)
        ended.append(i)
        return i

    with pytest.raises(RuntimeError, match="part 2 failed"):
        threads.run_split(work, [1, 2, 3])
    assert sorted(ended) == [1, 3]


def test_too_many_parts_are_refused() -> None:
    with pytest.raises(ValueError, match=f"at most {threads.MAX_PARTS} parts, got 5"):
        threads.run_split(lambda i: i, [1, 2, 3, 4, 5])


def test_parts_follow_the_work_and_the_usable_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "usable_cpus", lambda: 16)
    assert threads.parts_for(10, 4) == 2
    assert threads.parts_for(3, 4) == 1
    assert threads.parts_for(1_000, 4) == threads.MAX_PARTS
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    assert threads.parts_for(1_000, 4) == 2


def test_usable_cpus_is_the_affinity() -> None:
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    assert threads.usable_cpus() == len(os.sched_getaffinity(0))


def test_a_forked_child_gets_its_own_helpers() -> None:
    """The pool is made anew after a fork (the parent's threads do not exist
    in the child): the child still splits and gets its answers."""
    threads.run_split(lambda i: i, [1, 2])  # the parent's pool exists
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            ok = threads.run_split(lambda i: i + 1, [1, 2, 3]) == [2, 3, 4]
            os.write(write, b"ok" if ok else b"no")
        finally:
            os._exit(0)
    os.close(write)
    try:
        assert os.read(read, 2) == b"ok"
    finally:
        os.close(read)
        os.waitpid(pid, 0)
