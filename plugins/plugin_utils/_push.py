# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""One push, start to finish: the conductor over the rooms that do the work.

survey (_survey) -> directories (_directories) -> sending (_sending), with resume (_resume) and
verification (_verifier) in the engine's idle hook, files put in place (_placing) -> directory
attributes -> the result (_result). The rooms share the push's state (_push_state.PushRun); the
engine (_engine) runs their jobs (_jobs) on a pool of connections; digests on the target come
through one door (_target_digests).
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from ansible_collections.multipush.sftp.plugins.plugin_utils import _plan, _result
from ansible_collections.multipush.sftp.plugins.plugin_utils._arguments import AUTO, PushOptions, connection_ceiling
from ansible_collections.multipush.sftp.plugins.plugin_utils._directories import Directories
from ansible_collections.multipush.sftp.plugins.plugin_utils._engine import Engine, EngineError, connect_with_retries
from ansible_collections.multipush.sftp.plugins.plugin_utils._fanout_ledger import CONTROLLER
from ansible_collections.multipush.sftp.plugins.plugin_utils._fast_crc import CRC32_LIBRARY
from ansible_collections.multipush.sftp.plugins.plugin_utils._placing import Placer
from ansible_collections.multipush.sftp.plugins.plugin_utils._pool_growth import START_LONG, START_SHORT, PoolGrowth
from ansible_collections.multipush.sftp.plugins.plugin_utils._progress import Progress
from ansible_collections.multipush.sftp.plugins.plugin_utils._push_state import PushRun
from ansible_collections.multipush.sftp.plugins.plugin_utils._remote_hash import HasherUnavailable, HashingConnection
from ansible_collections.multipush.sftp.plugins.plugin_utils._resume import Resumer
from ansible_collections.multipush.sftp.plugins.plugin_utils._sending import Sender, remove_temps_after_failure
from ansible_collections.multipush.sftp.plugins.plugin_utils._session import open_connection
from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import ConnectionSpec, SessionError
from ansible_collections.multipush.sftp.plugins.plugin_utils._survey import Survey
from ansible_collections.multipush.sftp.plugins.plugin_utils._target_digests import MODULE, SERVICE, TargetDigests
from ansible_collections.multipush.sftp.plugins.plugin_utils._verifier import Verifier


# How long the pool's sizing waits for the round trip timed beside the survey (a server that does not
# answer it only costs this once; the pool then starts as on a short path).
ROUND_TRIP_WAIT_SECONDS = 1.0


def _all_of(*observers: Callable | None) -> Callable:
    """One engine observer that tells each of `observers` (None: none) in turn."""
    chosen = [observer for observer in observers if observer is not None]

    def observe(event, job, result) -> None:
        for observer in chosen:
            observer(event, job, result)

    return observe


class Push:
    """Runs one push. `remote_digests(requests, algorithm, whole=True)` hashes files on the target
    with the verify module (see _target_digests); observer(event, job, result) hears of every job of
    the push's engines (tests, diagnostics)."""

    def __init__(self, options: PushOptions, spec: ConnectionSpec,
                 remote_digests: Callable[..., list] | None, warn: Callable[[str], None],
                 progress: Progress | None = None, observer: Callable | None = None, feed=None):
        self.options = options
        self.spec = spec
        self.progress = progress or Progress("push", 0, lambda text, verbosity: None)
        if feed is not None:  # the host passes on what its own pool writes (see _fanout.Fanout.observe)
            observer = _all_of(observer, feed.observe)
        self.run_state = PushRun(options, spec, warn, self.progress, observer)
        self.local_hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="multipush-hash")
        self.target = TargetDigests(options.checksum_algorithm, lambda: self.run_state.engine,
                                    HashingConnection(self._hashing_transport, options.python_interpreter),
                                    remote_digests, SERVICE if options.hash_over_ssh else MODULE, warn)
        self.hashing_handshake_retries = 0  # the pool's are in the engine's stats
        self.phases: dict[str, float] = {}  # phase -> seconds, in the order they ran
        self.phase_mark = time.monotonic()
        self.crc32_library = CRC32_LIBRARY
        self.growth = PoolGrowth(connection_ceiling(options), options.connections == AUTO)
        self.tree_work = 0
        self.tree_sizes: tuple = ()
        self.engine_started = 0.0
        self.surveying = True
        # With fan-out (_fanout.Fanout): picks this host's source and has a peer write its temps.
        self.feed = feed
        self.fed: frozenset = frozenset()  # temps a peer is to write, compared block by block afterwards

    def run(self) -> dict:
        options, state = self.options, self.run_state
        started = time.monotonic()
        tree = _plan.scan_source(options.src, follow=options.follow, exclude=options.exclude)
        for message in tree.skipped:
            state.warn(message)
        self.tree_sizes = tuple(item.size for item in tree.files)
        self.tree_work = self._work(self.tree_sizes, len(tree.links))
        engine = state.engine = Engine(self.spec, self._first_workers(), options.max_concurrent_handshakes,
                                       options.retries, options.retry_delay, options.request_size,
                                       on_progress=self._bytes_sent, pool_on_demand=True,
                                       observer=state.observer, admitted=1, on_round_trip=self._round_trip,
                                       budget=state.budget)
        self.engine_started = time.monotonic()
        try:
            with engine:
                planned = Survey(state, self.target).plan(tree)
                self.surveying = False
                state.absolute_dest = _result.absolute_dest(state)
                if engine.first_ready is not None:
                    self.phases["connect"] = round(engine.first_ready - self.phase_mark, 3)
                    self.phase_mark = engine.first_ready
                self._phase("survey")
                if self.feed is not None and not options.check_mode:
                    self.fed = self.feed.choose(planned)
                    self._phase("source")
                self._size_pool(planned)
                if options.check_mode:
                    _result.preview(state, planned)
                else:
                    self._apply(planned)
        finally:
            self.target.close()
            self.local_hasher.shutdown(wait=True, cancel_futures=True)
        result = self._result(time.monotonic() - started)
        if not options.check_mode:
            state.progress.finish(result)
        return result

    def _apply(self, planned) -> None:
        directories = Directories(self.run_state)
        directories.make(planned.dirs, planned.remote)
        self._phase("directories")
        if self.feed is not None:
            sized_for_a_feed = bool(self.fed)
            if sized_for_a_feed:
                # The comparison that follows the feed hashes on the target: its service logs in and
                # starts while the peer writes.
                self.target.warm()
            engine = self.run_state.engine
            self.fed = self.feed.write(engine.host_key, engine.stats["write_size"])
            self._phase("peer_feed")
            if sized_for_a_feed and self.feed.source == CONTROLLER:
                # Whatever the peers wrote (perhaps nothing: a feed that never started), the rest is
                # the controller's now, and the pool was sized for a few checks.
                self._regrow(planned)
        try:
            self._transfer(planned)
        except EngineError as exc:
            # The pool stops first: a worker still in its job could otherwise make a temp file (a batch's
            # opens, a range's) after the cleanup removed it.
            self.run_state.engine.halt()
            if not exc.keep_temps:  # a refusal, not the network: no temp file stays behind
                remove_temps_after_failure(self.run_state)
            directories.settle_after_failure(planned.dirs)
            raise
        self._phase("transfer")
        directories.set_attributes(planned.dirs)
        self._phase("directory_attributes")

    def _transfer(self, planned) -> None:
        """Send what the plan says, check it, put it in place: the rooms wired to one another."""
        state = self.run_state
        sending = [file_plan for file_plan in planned.plans if file_plan.action == "send"]
        state.progress.start(sum(file_plan.local.size for file_plan in sending), len(sending))
        rooms: dict = {}  # the verifier, made once what it calls exists; the others call it through here

        def expect(file_state, index) -> None:
            rooms["verifier"].expect(file_state, index)

        placer = Placer(state, expect)
        sender = Sender(state, self.local_hasher, placer, expect)
        verifier = rooms["verifier"] = Verifier(state, self.target, placer, sender.resend,
                                                lambda: sender.data_jobs == 0)
        resumer = Resumer(state, self.target, self.local_hasher, sender, placer, fed=self.fed)
        verifier.prepare(sending)
        resumable = sender.send(planned.plans, planned.links, planned.temps_found, fed=self.fed)
        if resumable:
            # Workers are already busy with everything else while the leftovers are compared.
            resumer.start(resumable)

        def idle() -> bool:
            state.progress.tick()
            self._grow()
            resumed = resumer.idle()
            return verifier.idle() and resumed

        state.engine.run(idle=idle)

    def _phase(self, name: str) -> None:
        now = time.monotonic()
        self.phases[name] = round(now - self.phase_mark, 3)
        self.phase_mark = now

    # -- the pool's size (see _pool_growth) --------------------------------------------------------

    def _work(self, sizes, links: int) -> int:
        """Jobs for files of these sizes and `links` links: one per range or small file, one per link."""
        ceiling = self.growth.ceiling
        work = links
        for size in sizes:
            work += max(1, math.ceil(size / _plan.chunk_size_for(size, self.options.chunk_size, ceiling)))
        return work

    def _first_workers(self) -> int:
        """Processes to start with: the first connection's. With compare: checksum the survey opens
        a connection of the coordinator's own, after which none may be forked: then all that may be
        needed are forked at once."""
        if self.options.compare == "checksum":
            return max(1, min(self.growth.ceiling, self.tree_work))
        return 1

    def _round_trip(self, seconds: float) -> None:
        """A connection timed the path. While the survey runs, the workers its neighbours need are
        forked now, overlapping it (forking after the survey held the push up), and on a long path
        they are admitted to log in alongside it."""
        self.growth.note_round_trip(seconds)
        engine = self.run_state.engine
        if engine.first_ready is not None:  # timed once logged in: the login it took is known
            self.growth.note_login(engine.first_ready - self.engine_started)
        # With fan-out the source is chosen after the survey: a host a peer feeds needs no more connections.
        if self.surveying and self.feed is None:
            engine.add_workers(max(1, min(self.growth.ceiling, self.tree_work, START_LONG)))
            engine.admit(self.growth.early_logins(self.tree_work, self.tree_sizes))

    def _bytes_sent(self, nbytes: int) -> None:
        self.run_state.progress.add_bytes(nbytes)
        self.growth.add_bytes(nbytes)

    def _size_pool(self, planned) -> None:
        """After the survey: the pool sized by the work to send (a push with nothing to send opens no
        more connections, one changed small file no more than one)."""
        engine = self.run_state.engine
        work, nbytes = self._to_send(planned, self.fed)  # what a peer writes is not this push's work...
        work += bool(self.fed)  # ...but comparing it is
        # Links alone are a few round trips on one connection.
        needed = not self.options.check_mode and any(plan.action == "send" for plan in planned.plans)
        if needed and self.growth.auto and self.growth.round_trip is None:
            # Timed beside the survey: the answer is due about when a one-round-trip survey ends.
            engine.wait_for_round_trip(ROUND_TRIP_WAIT_SECONDS)
        if needed:
            # On a long path the pool grows no wider than the work pays logins for: no process beyond that.
            worth = self.growth.worth(plan.local.size for plan in planned.plans
                                      if plan.action == "send" and plan.temp not in self.fed)
            forks = max(min(work, worth or work), self._fallback_workers(planned))
            workers = engine.add_workers(min(self.growth.ceiling, forks))
            engine.admit(self.growth.start(work, nbytes, workers, worth))
        else:
            self.growth.start(0, 0)
            engine.admit(1)
        engine.use_pool(needed)

    def _fallback_workers(self, planned) -> int:
        """Processes to fork, not logged in, for a host a peer is to feed: should the feed fail, the
        controller sends the rest, and by then the hashing service's connection is open in this
        process, after which none can be forked (see Engine.add_workers). As many as a plain push
        starts with on this path (see PoolGrowth.start), no more: every host of a fan-out pays for them."""
        if not self.fed:
            return 0
        return min(self._to_send(planned)[0], START_LONG if self.growth.long_path else START_SHORT)

    def _regrow(self, planned) -> None:
        """The peers failed this host: what they left is the controller's, as much as the whole push
        (the pool was sized for a few checks)."""
        round_trip = self.growth.round_trip
        self.growth = PoolGrowth(connection_ceiling(self.options), self.options.connections == AUTO)
        if round_trip is not None:
            self.growth.note_round_trip(round_trip)
        engine = self.run_state.engine
        work, nbytes = self._to_send(planned)
        workers = engine.add_workers(min(self.growth.ceiling, work))  # those forked beforehand, if it cannot fork
        engine.admit(self.growth.start(work, nbytes, workers))

    @staticmethod
    def _to_send(planned, leaving: frozenset = frozenset()) -> tuple[int, int]:
        """(jobs, bytes) of what the plan sends, but the files whose temps are in `leaving`: one job
        per range (or small file) and per link."""
        own = [plan for plan in planned.plans if plan.action == "send" and plan.temp not in leaving]
        return (len(planned.links) + sum(max(1, len(plan.ranges)) for plan in own),
                sum(plan.local.size for plan in own))

    def _grow(self) -> None:
        if self.growth.settled:  # the idle hook runs on every engine event: nothing to ask the engine for
            return
        engine = self.run_state.engine
        count = self.growth.tick(time.monotonic(), engine.serving, engine.queued)
        if count is not None:
            engine.admit(count)

    def _hashing_transport(self):
        """The connection for hashing: logged in like the pool's, under the same handshake
        throttle, its retries counted with theirs. (In the verifier's thread.) Once the pool has
        logged in, a dropped login here means the target takes no more connections from this client
        (a per-client limit) or shed this one (MaxStartups): one more try, not the pool's backoff of
        `retries`, and then the pool's own connections check by reading back."""
        engine = self.run_state.engine
        retries = min(1, self.options.retries) if engine.first_ready is not None else self.options.retries
        try:
            return connect_with_retries(lambda: open_connection(self.spec, engine.handshakes),
                                        retries, self.options.retry_delay, self._hashing_handshake_retried)
        except SessionError as exc:
            raise HasherUnavailable(f"no connection for it: {exc}") from None

    def _hashing_handshake_retried(self, exc: SessionError) -> None:
        self.hashing_handshake_retries += 1

    def _result(self, seconds: float) -> dict:
        engine = self.run_state.engine
        stats = dict(engine.stats) if engine else {}
        stats["handshake_retries"] = stats.get("handshake_retries", 0) + self.hashing_handshake_retries
        stats["pool_size"] = stats.get("most_connections", 0)
        round_trip = stats.get("round_trip")
        return _result.build(self.run_state, seconds, stats, {
            "connections_reason": self.growth.reason,
            "round_trip_ms": round(round_trip * 1000, 1) if round_trip is not None else None,
            "crc32_library": self.crc32_library, "phases": self.phases, "remote_hashing": self.target.report(),
            **({"source": self.feed.source, "fanout": self.feed.report()} if self.feed is not None else
               {"source": CONTROLLER})})
