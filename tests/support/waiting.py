"""Polling: wait for a condition the test cannot be told about."""

from __future__ import annotations

import time


def wait_until(condition, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll condition() until it returns something truthy and return that; fail the test (an
    AssertionError naming `what`) once `timeout` seconds have passed without it."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
