# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""One fresh connection in the coordinator's own process, for the few jobs that come after the pool
closed or failed (removing the temp files of a refused push).

Not a forked worker, as the pool's are: by then the coordinator runs threads of its own (its
connection for hashing on the target, the pool's feeder threads), and a process forked from it
inherits whatever lock one of them held at that moment, an import's or a Paramiko transport's.
Such a child hangs for good at its first import or log-in, and the push with it.

The same contract as the engine for what it runs: submit(job, on_done) and run(); a dropped
connection resumes the job's successor on a new login, up to `retries` times; a refusal, or a
connection that cannot be made, raises EngineError.
"""

from __future__ import annotations

from typing import Callable

from ansible_collections.multipush.sftp.plugins.plugin_utils._engine import (
    EngineError, connect_with_retries, retries_ran_out,
)
from ansible_collections.multipush.sftp.plugins.plugin_utils._jobs import Job
from ansible_collections.multipush.sftp.plugins.plugin_utils._session import open_session
from ansible_collections.multipush.sftp.plugins.plugin_utils._sftp import ConnectionLost, RemoteError, RemoteFiles
from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import ConnectionSpec, SessionError


class SideConnection:
    """Jobs run one after another, in this process, on one connection of their own."""

    def __init__(self, spec: ConnectionSpec, retries: int, retry_delay: float = 1.0,
                 observer: Callable[[str, Job, dict | None], None] | None = None):
        self.spec = spec
        self.retries = retries
        self.retry_delay = retry_delay
        self.observer = observer
        self.pending: list[tuple[Job, Callable[[Job, dict], None]]] = []
        self.transport = None
        self.remote: RemoteFiles | None = None

    def __enter__(self) -> "SideConnection":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self._disconnect()

    def submit(self, job: Job, on_done: Callable[[Job, dict], None]) -> None:
        """Queue a job; on_done(job, result) runs when it has succeeded (job: its successor if the
        connection was lost on the way)."""
        if self.observer is not None:
            self.observer("submit", job, None)
        self.pending.append((job, on_done))

    def run(self) -> None:
        """Run every queued job, in order."""
        while self.pending:
            job, on_done = self.pending.pop(0)
            job, result = self._execute(job)
            if self.observer is not None:
                self.observer("done", job, result)
            on_done(job, result)

    def _execute(self, job: Job) -> tuple[Job, dict]:
        while True:
            if self.remote is None:
                self._connect()
            try:
                return job, job.execute(self.remote, lambda nbytes: None)
            except ConnectionLost as exc:
                self._disconnect()
                job = job.after_loss(exc.acked, exc.sent)
                if job.attempt > self.retries:
                    raise retries_ran_out(str(exc), self.retries) from exc
            except RemoteError as exc:
                raise EngineError(str(exc)) from exc

    def _connect(self) -> None:
        try:
            self.transport, sftp = connect_with_retries(lambda: open_session(self.spec), self.retries,
                                                        self.retry_delay, lambda exc: None)
        except SessionError as exc:
            raise EngineError(f"no connection to {self.spec.describe()}: {exc}", keep_temps=exc.retryable,
                              unreachable=getattr(exc, "unreachable", True)) from exc
        self.remote = RemoteFiles(self.transport, sftp)

    def _disconnect(self) -> None:
        if self.transport is not None:
            try:
                self.transport.close()
            except Exception:  # already gone: nothing left to close
                pass
        self.transport = None
        self.remote = None
