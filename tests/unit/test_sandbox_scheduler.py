"""The sandbox's background task queue: order, bound, clear and stop."""

from __future__ import annotations

import threading

import pytest

from sandbox_provider.scheduler import Scheduler

WAIT_S = 5.0


@pytest.fixture
def scheduler():
    scheduler = Scheduler("test-scheduler")
    yield scheduler
    scheduler.stop()


def test_tasks_run_by_due_time_then_in_the_order_scheduled(scheduler):
    ran, done = [], threading.Event()
    gate = threading.Event()
    scheduler.schedule(0, lambda: gate.wait(WAIT_S))  # hold the thread while we queue
    scheduler.schedule(0.05, lambda: (ran.append("late"), done.set()))
    for name in ("a", "b", "c"):
        scheduler.schedule(0, lambda name=name: ran.append(name))
    gate.set()
    assert done.wait(WAIT_S)
    assert ran == ["a", "b", "c", "late"]


def test_a_full_queue_refuses_the_task():
    scheduler = Scheduler("test-bounded", max_tasks=2)
    try:
        assert scheduler.schedule(60, lambda: None)
        assert scheduler.schedule(60, lambda: None)
        assert not scheduler.schedule(0, lambda: None)
        assert scheduler.pending() == 2
    finally:
        scheduler.stop()


def test_clear_drops_queued_tasks(scheduler):
    ran = []
    scheduler.schedule(60, lambda: ran.append("dropped"))
    scheduler.clear()
    assert scheduler.pending() == 0
    done = threading.Event()
    scheduler.schedule(0, done.set)
    assert done.wait(WAIT_S)
    assert ran == []


def test_a_failing_task_does_not_stop_later_ones(scheduler, capsys):
    done = threading.Event()
    scheduler.schedule(0, lambda: 1 / 0)
    scheduler.schedule(0, done.set)
    assert done.wait(WAIT_S)
    assert "ZeroDivisionError" in capsys.readouterr().err


def test_stop_ends_the_thread_and_refuses_new_tasks():
    scheduler = Scheduler("test-stop")
    scheduler.schedule(60, lambda: None)
    scheduler.stop()
    assert not scheduler._thread.is_alive()
    assert not scheduler.schedule(0, lambda: None)
