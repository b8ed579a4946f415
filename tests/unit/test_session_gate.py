"""The order in which the pool's SFTP sessions start (_engine.SessionGate): the first alone, the
others when the coordinator wants them. Threads stand in for the worker processes; the gate's
primitives are the fork context's, as in the engine. Every wait is bounded."""

from __future__ import annotations

import multiprocessing
import threading

import pytest

from ansible_collections.multipush.sftp.plugins.plugin_utils import _engine
from ansible_collections.multipush.sftp.plugins.plugin_utils._engine import SessionGate

BOUND = 10.0  # seconds any step of these tests may take before it counts as a hang


def make_gate(wanted: bool) -> SessionGate:
    return SessionGate(multiprocessing.get_context("fork"), wanted=wanted)


class Starter(threading.Thread):
    """One worker's session start: enters the gate's turn, says so, waits to be let go, and
    fails inside the turn if told to."""

    def __init__(self, gate: SessionGate, fail: bool = False, throttle=None):
        super().__init__(daemon=True)
        self.gate = gate
        self.throttle = throttle if throttle is not None else threading.BoundedSemaphore()
        self.fail = fail
        self.holding = threading.Event()  # has its handshake slot, about to wait for its turn
        self.inside = threading.Event()
        self.release = threading.Event()
        self.error = None

    def run(self):
        try:
            with self.throttle:  # as open_session holds its handshake slot
                self.holding.set()
                with self.gate.turn(self.throttle):
                    self.inside.set()
                    assert self.release.wait(BOUND)
                    if self.fail:
                        raise ConnectionError("the session did not start")
        except ConnectionError as exc:
            self.error = exc

    def finish(self):
        self.release.set()
        self.join(BOUND)
        assert not self.is_alive()


def test_the_first_session_starts_alone_and_then_the_others_together():
    gate = make_gate(wanted=True)
    first, second, third = Starter(gate), Starter(gate), Starter(gate)
    first.start()
    assert first.inside.wait(BOUND)
    second.start()
    third.start()
    assert not second.inside.wait(0.3) and not third.inside.is_set()
    first.finish()
    # Once one session is open, nothing holds the others back, not even each other.
    assert second.inside.wait(BOUND) and third.inside.wait(BOUND)
    second.finish()
    third.finish()


def test_a_failed_first_start_passes_the_turn_on():
    gate = make_gate(wanted=False)
    first, second = Starter(gate, fail=True), Starter(gate)
    first.start()
    assert first.inside.wait(BOUND)
    second.start()
    assert not second.inside.wait(0.3)
    first.finish()
    assert isinstance(first.error, ConnectionError)
    assert not gate.opened.is_set()
    # No session is open yet, so the next one leads: it does not wait for the pool to be wanted.
    assert second.inside.wait(BOUND)
    second.finish()
    assert gate.opened.is_set()


def test_after_the_first_session_the_others_wait_until_the_pool_is_wanted():
    gate = make_gate(wanted=False)
    first = Starter(gate)
    first.start()
    first.finish()
    later = Starter(gate)
    later.start()
    assert not later.inside.wait(0.3)
    gate.wanted.set()
    assert later.inside.wait(BOUND)
    later.finish()


def test_the_handshake_slot_serves_others_while_a_connection_waits_for_the_pool():
    gate = make_gate(wanted=False)
    first = Starter(gate)
    first.start()
    first.finish()
    throttle = threading.BoundedSemaphore(1)  # a single handshake slot for the whole push
    later = Starter(gate, throttle=throttle)
    later.start()
    assert later.holding.wait(BOUND)
    # Logged in and waiting for the survey: its slot is free for another login (the push's
    # connection for hashing, which the survey itself may need).
    assert throttle.acquire(timeout=2)
    gate.wanted.set()
    assert not later.inside.wait(0.3)  # the start takes the slot again: it waits for it
    throttle.release()
    assert later.inside.wait(BOUND)
    assert not throttle.acquire(blocking=False)  # held during the start
    later.finish()
    assert throttle.acquire(blocking=False)  # and given back after it


def test_every_wait_is_bounded(monkeypatch):
    monkeypatch.setattr(_engine, "SESSION_WAIT_SECONDS", 0.2)
    gate = make_gate(wanted=False)
    stuck = Starter(gate)  # a first start that never ends (a hung target)
    stuck.start()
    assert stuck.inside.wait(BOUND)
    patient = Starter(gate)
    patient.start()
    # It gave up waiting for the lead, then for the pool to be wanted: it starts anyway.
    assert patient.inside.wait(BOUND)
    patient.finish()
    stuck.finish()


@pytest.mark.parametrize("wanted", [True, False])
def test_the_gate_leaves_an_error_inside_the_turn_alone(wanted):
    gate = make_gate(wanted=wanted)
    throttle = threading.BoundedSemaphore()
    with pytest.raises(KeyError):
        with throttle, gate.turn(throttle):
            raise KeyError("from the session start")
    with throttle, gate.turn(throttle):  # and the lead is free again
        pass
    assert throttle.acquire(blocking=False)
    assert gate.opened.is_set()
