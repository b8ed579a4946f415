# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The worker pool: N processes, each owning one SSH connection for its life, fed from one queue.

Processes, not threads: Paramiko does its framing in Python, so threads share one core while
processes use them all. The pool is forked (not spawned) because only Ansible's own processes
can import collection code, and no Paramiko transport exists in the coordinator yet to be
inherited (its connection for hashing on the target, see _push, comes later). The engine itself
never touches the network; it hands out jobs and reacts to events.

Jobs are the typed objects of _jobs, each with its own execute(); the engine only runs them. A
dropped connection puts the job's successor (job.after_loss: a range skips what was acknowledged)
back on the queue and the worker reconnects with backoff; a refusal by the server fails the whole
push at once. An observer (tests, diagnostics) hears of every job submitted and done, in the
coordinator.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import queue
import random
import signal
import threading
import time
from typing import Callable

from ansible_collections.multipush.sftp.plugins.plugin_utils import _sftp
from ansible_collections.multipush.sftp.plugins.plugin_utils._jobs import Job
from ansible_collections.multipush.sftp.plugins.plugin_utils._session import open_session
from ansible_collections.multipush.sftp.plugins.plugin_utils._sftp import ConnectionLost, RemoteError, RemoteFiles
from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import ConnectionSpec, SessionError, paramiko

EVENT_POLL_SECONDS = 0.2
CONTROLLER_CHECK_SECONDS = 0.05
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
MAX_BACKOFF_SECONDS = 30.0
PARENT_CHECK_SECONDS = 1.0
SESSION_WAIT_SECONDS = 30.0
MAX_WORKERS = 128  # as many as connections may be
# A global request OpenSSH answers without acting on it (what ssh's ServerAliveInterval sends): its
# reply times one round trip of the SSH path, jump hosts and all.
ROUND_TRIP_REQUEST = "keepalive@openssh.com"


class EngineError(Exception):
    """The push cannot go on. The message names what failed and what to do.

    keep_temps: the failure was the network, not a refusal: temp files stay for a resume.
    unreachable: no connection to the host could be made at all (Ansible's UNREACHABLE).
    """

    def __init__(self, message: str, keep_temps: bool = False, unreachable: bool = False):
        super().__init__(message)
        self.keep_temps = keep_temps
        self.unreachable = unreachable


def retries_ran_out(message: str, retries: int) -> EngineError:
    """A job lost its connection once more than `retries` allows: the network, so its temps stay."""
    return EngineError(f"{message}; gave up after {retries} retries. Check the network and the target's sshd, "
                       "or raise `retries`", keep_temps=True)


def backoff_delay(attempt: int, base: float) -> float:
    """Exponential backoff with jitter, so refused handshakes do not come back in lockstep."""
    return min(base * (2 ** max(attempt - 1, 0)), MAX_BACKOFF_SECONDS) * (0.5 + random.random() / 2)


def connect_with_retries(connect: Callable, retries: int, retry_delay: float, on_retry: Callable):
    """What connect() returns. A retryable SessionError (a dropped handshake, a refused TCP
    connection) is tried again after a backoff, up to `retries` times, and on_retry(exc) hears of
    each; the SessionError that ends the tries is raised (retryable: the retries ran out)."""
    attempt = 0
    while True:
        try:
            return connect()
        except SessionError as exc:
            attempt += 1
            if not exc.retryable or attempt > retries:
                raise
            on_retry(exc)
            time.sleep(backoff_delay(attempt, retry_delay))


class SessionGate:
    """When the workers' SFTP sessions may start: the first alone, the others when the pool is wanted.

    Starting a session runs sftp-server through the user's login shell on the target, the part of
    a login that costs the target CPU (a shell profile can take a tenth of a second). With every
    connection starting at once, the first session, the one the survey waits for, came up 0.2 s
    later at 50 ms, and a re-run with nothing to send paid for sessions it never used. So the
    first session starts alone, and the others start once the coordinator wants them (`wanted`,
    set at once unless it asked to decide), or when a connection drops. The round trips before a
    session (key exchange, authentication) overlap as before. Shared by the workers' processes;
    a session start that fails passes the turn on. The waits for the lead and for `wanted` end
    after SESSION_WAIT_SECONDS at the latest; taking the handshake slot back waits only for logins
    in progress, each bounded by its own timeout.
    """

    def __init__(self, context, wanted: bool):
        self.opened = context.Event()
        self.wanted = context.Event()
        self.lead = context.Lock()
        if wanted:
            self.wanted.set()

    @contextlib.contextmanager
    def turn(self, throttle):
        """Wait for the turn to start a session. throttle: the handshake slot the caller holds; a
        logged-in connection no longer counts against MaxStartups, so while it waits for the
        pool to be wanted (as long as the survey takes) the slot serves others, such as the
        push's connection for hashing, and is taken again for the start."""
        if not self.opened.is_set() and self.lead.acquire(timeout=SESSION_WAIT_SECONDS):
            try:
                if not self.opened.is_set():
                    yield
                    self.opened.set()
                    return
            finally:
                self.lead.release()
        if not self.wanted.is_set():
            throttle.release()
            try:
                self.wanted.wait(SESSION_WAIT_SECONDS)
            finally:
                throttle.acquire()
        yield


class Admission:
    """Which workers may hold a connection. The coordinator admits and retires workers (the pool's
    size, see _pool_growth); a worker not admitted holds no connection and waits for its turn, and one
    retired finishes its job, logs out and waits again. Shared by the workers' processes."""

    def __init__(self, context):
        self.flags = context.Array("b", MAX_WORKERS, lock=False)  # none admitted until set()
        self.changed = context.Condition()
        self.stopping = context.Event()

    def admitted(self, worker_id: int) -> bool:
        return bool(self.flags[worker_id])

    def wait(self, worker_id: int, parent_pid: int) -> bool:
        """Wait until admitted. False: the engine is closing or the coordinator is gone."""
        with self.changed:
            while not self.flags[worker_id]:
                if self.stopping.is_set() or os.getppid() != parent_pid:
                    return False
                self.changed.wait(PARENT_CHECK_SECONDS)
        return not self.stopping.is_set()

    def set(self, admitted: set[int]) -> None:
        with self.changed:
            for worker_id in range(MAX_WORKERS):
                self.flags[worker_id] = 1 if worker_id in admitted else 0
            self.changed.notify_all()

    def stop(self) -> None:
        self.stopping.set()
        with self.changed:
            self.changed.notify_all()


# ---------------------------------------------------------------------------------------------
# Worker side (runs in the forked child)
# ---------------------------------------------------------------------------------------------


class _Worker:
    def __init__(self, worker_id, spec, settings, jobs, events, handshakes, sessions, admission, parent_pid):
        self.worker_id = worker_id
        self.admission = admission
        self.round_trip_timed = False
        self.spec = spec
        self.settings = settings
        self.jobs = jobs
        self.events = events
        self.handshakes = handshakes
        self.sessions = sessions
        self.parent_pid = parent_pid
        self.transport = None
        self.remote: RemoteFiles | None = None
        self.write_size_reported = False

    def emit(self, kind: str, job_id=None, payload=None) -> None:
        self.events.put((kind, self.worker_id, job_id, payload))

    def connect(self) -> bool:
        """Open the connection, retrying retryable failures with backoff. False: give up."""
        retries = self.settings["retries"]
        try:
            self.transport, sftp = connect_with_retries(
                lambda: open_session(self.spec, self.handshakes, self.sessions.turn),
                retries, self.settings["retry_delay"],
                lambda exc: self.emit("handshake_retry", payload={"message": str(exc)}))
        except SessionError as exc:
            if exc.retryable:
                self.emit("lost", payload={"message": f"{exc} (gave up after {retries} retries)"})
            else:
                self.emit("fatal", payload={"message": str(exc), "unreachable": getattr(exc, "unreachable", True)})
            return False
        self.remote = RemoteFiles(self.transport, sftp, self.settings.get("write_size"), self.settings.get("budget"))
        self.emit("ready", payload={"cipher": self.transport.local_cipher, "host_key": self._host_key()})
        self.write_size_reported = False
        if not self.round_trip_timed:
            self.round_trip_timed = True
            threading.Thread(target=self._time_round_trip, args=(self.transport,), daemon=True,
                             name="multipush-round-trip").start()
        return True

    def _host_key(self) -> tuple[str, str] | None:
        """The target's host key as this login verified it; None when the connection already dropped
        (Paramiko has no session to ask then: the job loop finds the loss and logs in again)."""
        try:
            key = self.transport.get_remote_server_key()
        except Exception:  # SSHException("No existing session")
            return None
        return key.get_name(), key.get_base64()

    def _time_round_trip(self, transport) -> None:
        """One round trip of the SSH path, beside the jobs (the pool's size depends on it). Not the
        login's own requests: sshd answers the first one after authentication only once it has set
        up the user's session, tens of milliseconds even on loopback. The server answers this request
        without acting on it; no answer (the connection went away) times nothing."""
        started = time.monotonic()
        try:
            transport.global_request(ROUND_TRIP_REQUEST, wait=True)
        except Exception:  # nothing depends on the measurement but the pool's size
            return
        if transport.is_active():
            self.emit("round_trip", payload=time.monotonic() - started)

    def disconnect(self) -> None:
        if self.transport is not None:
            try:
                self.transport.close()
            except Exception:
                pass
        self.transport = None
        self.remote = None

    def run(self) -> None:
        while self.admission.wait(self.worker_id, self.parent_pid):
            if not self.connect():
                return
            retired = self.serve()
            self.disconnect()
            if not retired:
                return
            self.emit("retired")

    def serve(self) -> bool:
        """Run jobs until told to stop (False) or retired from the pool (True)."""
        while True:
            if not self.admission.admitted(self.worker_id):
                return True
            try:
                job = self.jobs.get(timeout=PARENT_CHECK_SECONDS)
            except queue.Empty:
                if os.getppid() != self.parent_pid:  # coordinator was killed: do not linger
                    return False
                continue
            if job is None or os.getppid() != self.parent_pid:
                return False
            job_id, job = job
            self.emit("begin", job_id)
            try:
                result = job.execute(self.remote, lambda nbytes, job_id=job_id: self.emit("progress", job_id, nbytes))
                self.emit("done", job_id, result)
            except ConnectionLost as exc:
                self.emit("requeue", job_id, {"message": str(exc), "acked": exc.acked, "sent": exc.sent})
                # Its next login must not wait for the pool's turn: the job it lost may be the
                # survey that gives it. And a link that drops connections wants them all up.
                self.sessions.wanted.set()
                self.disconnect()
                if not self.connect():
                    return False
            except RemoteError as exc:
                self.emit("error", job_id, {"message": self._explain(job, exc)})
            except Exception as exc:  # a bug or local I/O error: report it, never hang the play
                self.emit("error", job_id, {"message": f"{type(exc).__name__}: {exc} (while: {job.describe()})"})
            self._report_write_size()

    def _report_write_size(self) -> None:
        """The negotiated write size, once its reply came in along with a job's replies."""
        if self.remote is not None and not self.write_size_reported and self.remote.write_size_known:
            self.write_size_reported = True
            self.emit("write_size", payload=self.remote.write_size)

    def _explain(self, job, exc: RemoteError) -> str:
        """A refused write, told apart: a read-only file system, or a disk too full for the data."""
        message = str(exc)
        writes = job.writes()
        if writes is None or exc.code not in _sftp.UNEXPLAINED_CODES or self.remote is None:
            return message
        directory, size = writes
        free, read_only = self.remote.fs_status(directory)
        if read_only:
            return message + f" — {directory} is on a read-only file system on the target; choose another dest"
        # A temp file is allocated sparse at full size, so a full disk shows as free < size.
        if free is not None and free < size:
            return message + (f" — the target has {free} bytes free in {directory} and the file needs "
                              f"{size}; free space there or choose another dest")
        return message + job.hint_when_refused()


def _connection_threads() -> bool:
    """Whether a Paramiko transport runs in this process (its thread is the transport)."""
    return paramiko is not None and any(isinstance(thread, paramiko.Transport) for thread in threading.enumerate())


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel stop this worker the moment its coordinator dies (Linux), so a killed
    controller never leaves workers emptying the job queue on their own."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # no prctl: the parent check between jobs remains
        pass
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os._exit(0)


def _worker_main(worker_id, spec, settings, jobs, events, handshakes, sessions, admission, parent_pid) -> None:
    # Forked from Ansible's task worker, a worker inherits its Python SIGTERM handler, which in a
    # grandchild raises TypeError instead of exiting: terminate() and the parent-death signal would
    # surface as an error inside the job at hand (and fail the push as if the target had refused
    # it). A worker that is told to stop must just stop.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator decides when to stop
    _die_with_parent(parent_pid)
    worker = _Worker(worker_id, spec, settings, jobs, events, handshakes, sessions, admission, parent_pid)
    try:
        worker.run()
    except BaseException as exc:  # last resort: say why before dying
        try:
            events.put(("lost", worker_id, None, {"message": f"worker crashed: {type(exc).__name__}: {exc}"}))
        except Exception:
            pass
        raise
    finally:
        # Let the event feeder thread flush before the process ends.
        events.close()
        events.join_thread()


# ---------------------------------------------------------------------------------------------
# Coordinator side
# ---------------------------------------------------------------------------------------------


class Engine:
    """Runs jobs on a pool of connections. Use as a context manager; `run()` processes events."""

    def __init__(self, spec: ConnectionSpec, workers: int, max_handshakes: int, retries: int,
                 retry_delay: float = 1.0, write_size: int | None = None,
                 on_progress: Callable[[int], None] | None = None, pool_on_demand: bool = False,
                 observer: Callable[[str, Job, dict | None], None] | None = None, admitted: int | None = None,
                 on_round_trip: Callable[[float], None] | None = None, budget=None):
        """workers: the processes started at once (add_workers starts more); admitted: how many of them
        log in at once (default all; admit() changes it). pool_on_demand: the connections beyond the
        first wait before starting their SFTP sessions until `use_pool(True)` (see SessionGate).
        observer(event, job, result): told of each job "submit"ted and "done", in the coordinator (for
        tests and diagnostics). on_round_trip(seconds): a connection timed the path's round trip.
        budget: the bandwidth budget every worker's requests take from (_bandwidth.Budget, made
        before the workers fork: its shared state is what they inherit), or None for no limit."""
        self.spec = spec
        self.observer = observer
        # Ansible's task worker runs in its own session: killing ansible-playbook does not kill it.
        # Its parent changing is how it learns the controller is gone.
        self.controller_pid = os.getppid()
        self.size = max(1, min(workers, MAX_WORKERS))
        self.admitted_ids = set(range(self.size if admitted is None else max(1, min(admitted, self.size))))
        self.on_round_trip = on_round_trip
        self.admission: Admission | None = None
        self.max_handshakes = max(1, max_handshakes)
        self.retries = retries
        self.settings = {"retries": retries, "retry_delay": retry_delay, "write_size": write_size, "budget": budget}
        self.on_progress = on_progress
        self.context = multiprocessing.get_context("fork")
        self.jobs = None
        self.events = None
        self.handshakes = None
        self.pool_on_demand = pool_on_demand
        self.sessions: SessionGate | None = None
        self.processes: dict[int, multiprocessing.Process] = {}
        self.exitcodes: dict[int, int | None] = {}  # of the workers, as close() found them
        self.alive: set[int] = set()
        self.ready: set[int] = set()
        self.inflight: dict[int, int] = {}  # worker -> job id
        self.pending: dict[int, tuple[dict, Callable]] = {}
        self.next_id = 0
        self.first_ready: float | None = None  # when the first connection was up (monotonic)
        # The target's host key as the connections verified it: (type, base64), for peers to pin (fan-out).
        self.host_key: tuple[str, str] | None = None
        # Stop workers still logging in at close instead of waiting for them: set when they were
        # never needed (a re-run with nothing to send would otherwise wait for every handshake).
        self.stop_unready = False
        self.last_error = ""
        self.stats = {"connections_opened": 0, "handshake_retries": 0, "requeued_jobs": 0, "write_size": None,
                      "cipher": None, "round_trip": None, "most_connections": 0}

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> "Engine":
        self.start()
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(abort=exc_type is not None)

    def start(self) -> None:
        self.closing = threading.Event()
        self.jobs = self.context.Queue()
        self.events = self.context.Queue()
        # shared with the coordinator's own connection for hashing (see _push)
        self.handshakes = self.context.BoundedSemaphore(self.max_handshakes)
        self.sessions = SessionGate(self.context, wanted=not self.pool_on_demand)
        self.admission = Admission(self.context)
        self.admission.set(self.admitted_ids)
        for worker_id in range(self.size):
            self._fork(worker_id)
        threading.Thread(target=self._watch_controller, name="multipush-controller-watch", daemon=True).start()

    def _fork(self, worker_id: int) -> None:
        process = self.context.Process(
            target=_worker_main,
            args=(worker_id, self.spec, self.settings, self.jobs, self.events, self.handshakes, self.sessions,
                  self.admission, os.getpid()),
            name=f"multipush-worker-{worker_id}",
            daemon=True,
        )
        process.start()
        self.processes[worker_id] = process
        self.alive.add(worker_id)

    def add_workers(self, total: int) -> int:
        """Start processes up to `total`, not admitted yet; returns how many there are. Only while no
        connection of the coordinator's own is open: a fork copies a process mid-way through
        whatever its other threads hold, and a Paramiko transport's thread holds locks a worker's own
        connection needs. Then the pool stays as it is."""
        total = min(total, MAX_WORKERS)
        if total > len(self.processes) and not _connection_threads():
            for worker_id in range(len(self.processes), total):
                self._fork(worker_id)
            self.size = len(self.processes)
        return self.size

    def admit(self, count: int) -> None:
        """Have `count` workers hold connections: admit more (those already forked, lowest first) or
        retire the newest (those still logging in first); a retired worker finishes its job first."""
        alive_admitted = self.admitted_ids & self.alive
        count = max(1, count)
        if count > len(alive_admitted):
            spare = sorted(self.alive - self.admitted_ids)
            self.admitted_ids |= set(spare[:count - len(alive_admitted)])
        elif count < len(alive_admitted):
            leaving = sorted(alive_admitted, key=lambda worker_id: (worker_id in self.ready, worker_id))
            self.admitted_ids -= set(leaving[:len(alive_admitted) - count])
            self.sessions.wanted.set()  # one logging in now finishes its login only to leave
        self.admission.set(self.admitted_ids)
        self.stats["most_connections"] = max(self.stats["most_connections"], len(self.admitted_ids & self.alive))

    def wait_for_round_trip(self, timeout: float) -> float | None:
        """The path's round trip, waiting up to `timeout` for a connection to have timed it."""
        deadline = time.monotonic() + timeout
        self.run(idle=lambda: self.stats["round_trip"] is not None or time.monotonic() >= deadline)
        return self.stats["round_trip"]

    @property
    def serving(self) -> int:
        """Connections up and admitted: the pool's size right now."""
        return len(self.ready & self.admitted_ids)

    @property
    def queued(self) -> int:
        """Jobs waiting for a connection."""
        return max(0, len(self.pending) - len(self.inflight))

    def _watch_controller(self) -> None:
        """Stop the workers the moment the controller is gone, whatever the event loop is doing:
        on a busy machine the loop's own check may come only after the last bytes went out."""
        while not self.closing.wait(CONTROLLER_CHECK_SECONDS):
            if os.getppid() != self.controller_pid:
                for process in list(self.processes.values()):
                    if process.is_alive():
                        process.terminate()
                return

    def halt(self) -> None:
        """Stop every worker now, mid-job, and wait until they are gone; close() still follows. For
        the cleanup after a failure: a worker left in its job could create a temp file after the
        cleanup removed it. (What a stopped worker had already sent, its server runs within
        milliseconds; the cleanup's own login takes several round trips.)"""
        if self.jobs is not None:
            self._stop_workers(abort=True)

    def close(self, abort: bool = False) -> None:
        """Stop the workers. After a failure they stop at once, mid-job: the queue may still hold
        work that must not go on (the controller is gone, or the push failed)."""
        if self.jobs is None:
            return
        self._stop_workers(abort)
        for worker_id, process in self.processes.items():
            self.exitcodes[worker_id] = process.exitcode
            if not process.is_alive():
                process.close()  # its sentinel descriptor now, not whenever the garbage collector runs
        self._drain_stats()
        for channel in (self.jobs, self.events):
            channel.cancel_join_thread()
            channel.close()
        self.jobs = None

    def _stop_workers(self, abort: bool) -> None:
        """Idle workers (and with abort, all) are stopped at once; the others finish their job and
        leave at the end of the queue; whoever is left after a few seconds is stopped too."""
        self.closing.set()
        self.admission.stop()
        for worker_id, process in self.processes.items():
            idle = worker_id not in self.admitted_ids or (self.stop_unready and worker_id not in self.ready)
            if (abort or idle) and process.is_alive():
                process.terminate()
        for _worker in self.processes:
            self.jobs.put(None)
        deadline = time.monotonic() + 5
        for process in self.processes.values():
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self.processes.values():
            if process.is_alive():
                process.terminate()
                process.join(2)
            if process.is_alive():
                process.kill()
                process.join(2)

    def _drain_stats(self) -> None:
        """Count connections that came up after the last job was done (their events are still queued)."""
        try:
            while True:
                kind, worker_id, _job_id, payload = self.events.get_nowait()
                self._note_connection_event(kind, worker_id, payload)
        except (queue.Empty, OSError, EOFError, ValueError):
            pass

    def _note_connection_event(self, kind: str, worker_id: int, payload) -> bool:
        """A connection's own news for the stats (up, a retried handshake, its write size), from
        the loop or from what is still queued at close. False: not one of those."""
        if kind == "ready":
            self._count_ready(worker_id, payload)
        elif kind == "handshake_retry":
            self.last_error = payload["message"]
            self.stats["handshake_retries"] += 1
        elif kind == "write_size":
            self.stats["write_size"] = payload
        elif kind == "round_trip":
            self._note_round_trip(payload)
        elif kind == "retired":
            self.ready.discard(worker_id)
        else:
            return False
        return True

    def _count_ready(self, worker_id: int, payload: dict) -> None:
        if self.first_ready is None:
            self.first_ready = time.monotonic()
        self.ready.add(worker_id)
        self.stats["connections_opened"] += 1
        self.stats["cipher"] = payload["cipher"]
        self.host_key = payload.get("host_key") or self.host_key

    def _note_round_trip(self, seconds: float) -> None:
        if self.stats["round_trip"] is None or seconds < self.stats["round_trip"]:
            self.stats["round_trip"] = seconds
        if self.on_round_trip is not None:
            self.on_round_trip(seconds)

    def use_pool(self, needed: bool) -> None:
        """The coordinator's word on the connections beyond the first: start their sessions now,
        or (not needed) stop at close those not up yet instead of waiting for them."""
        if needed:
            self.sessions.wanted.set()
        else:
            self.stop_unready = True

    # -- jobs ----------------------------------------------------------------------------------

    def submit(self, job: Job, on_done: Callable[[Job, dict], None]) -> int:
        """Queue a job; on_done(job, result) runs in the coordinator when it has succeeded (job: the
        one that succeeded, after_loss's successor if its connection was lost on the way)."""
        job_id = self.next_id
        self.next_id += 1
        self.pending[job_id] = (job, on_done)
        if self.observer is not None:
            self.observer("submit", job, None)
        self.jobs.put((job_id, job))
        return job_id

    def run(self, idle: Callable[[], bool] | None = None) -> None:
        """Process events until no job is pending and `idle()` (other work in flight) says done."""
        while True:
            # The hook runs on every turn, not only when the queue is empty: remote hashing
            # must overlap with the transfer of the files still in flight.
            if os.getppid() != self.controller_pid:
                raise EngineError("the controller process (ansible-playbook) went away; the push stops here and "
                                  "its temp files stay for the next run to resume", keep_temps=True)
            outside_done = idle() if idle is not None else True
            if outside_done and not self.pending:
                return
            try:
                event = self.events.get(timeout=EVENT_POLL_SECONDS)
            except queue.Empty:
                self._check_workers()
                continue
            self._handle(*event)

    def wake(self) -> None:
        """Have run() look at its idle hook now, not when the next worker event or the poll timeout
        comes: for work the coordinator finishes in its own threads (remote hashing), which would
        otherwise wait up to EVENT_POLL_SECONDS at the end of a push, when no worker is busy."""
        try:
            self.events.put(("wake", None, None, None))
        except (AttributeError, ValueError, OSError):  # not started, or closed: nobody to wake
            pass

    def _handle(self, kind: str, worker_id: int, job_id, payload) -> None:
        if kind == "wake" or self._note_connection_event(kind, worker_id, payload):
            return
        if kind == "progress":
            if self.on_progress is not None:
                self.on_progress(payload)
        elif kind == "begin":
            self.inflight[worker_id] = job_id
        elif kind == "done":
            self.inflight.pop(worker_id, None)
            if job_id in self.pending:  # a job requeued after its worker vanished may finish twice
                job, on_done = self.pending.pop(job_id)
                if self.observer is not None:
                    self.observer("done", job, payload)
                on_done(job, payload)
        elif kind == "requeue":
            self.inflight.pop(worker_id, None)
            self._requeue(job_id, payload["message"], payload.get("acked", 0), payload.get("sent", 0))
        elif kind == "error":
            raise EngineError(payload["message"])
        elif kind == "fatal":
            # Refused before any byte moved (host key, authentication): Ansible's ssh plugin calls
            # that unreachable too. A become (sudo) refusal is a task failure, as in Ansible.
            raise EngineError(payload["message"], unreachable=payload.get("unreachable", True) and not self.ready)
        elif kind == "lost":
            self.last_error = payload["message"]
            self._worker_gone(worker_id)

    def _requeue(self, job_id: int, message: str, acked: int, sent: int = 0) -> None:
        if job_id not in self.pending:
            return
        job, on_done = self.pending[job_id]
        self.last_error = message
        job = job.after_loss(acked, sent)
        if job.attempt > self.retries:
            raise retries_ran_out(message, self.retries)
        self.stats["requeued_jobs"] += 1
        self.pending[job_id] = (job, on_done)
        self.jobs.put((job_id, job))

    def _worker_gone(self, worker_id: int) -> None:
        self.alive.discard(worker_id)
        job_id = self.inflight.pop(worker_id, None)
        if job_id is not None:
            self._requeue(job_id, self.last_error or f"connection {worker_id} ended", 0)
        if not self.alive & self.admitted_ids:
            hint = "" if self.ready else (" — sshd may be dropping handshakes beyond its MaxStartups: lower "
                                          "max_concurrent_handshakes or raise MaxStartups (multipush.sftp.sshd_tuning)")
            reason = self.last_error or "all failed"
            raise EngineError(f"no connection to {self.spec.describe()} is left: {reason}{hint}",
                              keep_temps=True, unreachable=not self.ready)

    def _check_workers(self) -> None:
        for worker_id in list(self.alive):
            process = self.processes[worker_id]
            if process.exitcode is not None:
                # Drain whatever it said last before judging it.
                try:
                    while True:
                        self._handle(*self.events.get_nowait())
                except queue.Empty:
                    pass
                if worker_id in self.alive:
                    self.last_error = self.last_error or f"connection process {worker_id} exited ({process.exitcode})"
                    self._worker_gone(worker_id)
