# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Digests of files on the target, by the cheapest way that works on that target.

Three ways, each answering in the verify module's form ({path, exists, size, checksum,
chunk_checksums}):

- ``ssh``: the hashing service on an SSH connection of the push's own (_remote_hash). Needs an
  exec channel, a POSIX shell and Python on the target; costs one login and one Python start.
- ``module``: multipush.sftp.verify through Ansible's connection. Used with become (sudo stays
  Ansible's business), and where the service found a shell but no Python in the usual places
  (Ansible's interpreter settings may know better). Seconds per call.
- ``sftp``: the pool's own connections read the written bytes back and the controller hashes
  them. Needs nothing but SFTP, so it works on appliances, `ForceCommand internal-sftp` accounts
  and SFTP servers that are not OpenSSH; it costs reading every checked byte back once.

A way that fails hands over to the next for the rest of the push, with a warning that says why,
and the question is asked again the new way: a target that cannot hash never fails a push that
SFTP alone can check.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from ansible_collections.multipush.sftp.plugins.plugin_utils._fast_crc import new_hasher
from ansible_collections.multipush.sftp.plugins.plugin_utils._jobs import ReadDigests
from ansible_collections.multipush.sftp.plugins.plugin_utils._remote_hash import HasherUnavailable

SERVICE, MODULE, SFTP = "ssh", "module", "sftp"  # as the result's remote_hashing.via names them
# A read-back of many ranges of one file is cut into jobs of about this size, so that every
# connection of the pool reads a share.
READ_BACK_JOB_BYTES = 64 * 1024 * 1024
# Generous deadline for the hashing service: a slow disk or CPU on the target hashing at 10 MB/s.
SERVICE_BASE_SECONDS = 120
SERVICE_FLOOR_BYTES_PER_SECOND = 10e6

_NEXT_WAY_TEXT = {
    MODULE: "using the multipush.sftp.verify module instead (slower)",
    SFTP: "checking by reading the written data back over SFTP instead (every checked byte travels back once)",
}


class WayFailed(Exception):
    """One way of hashing cannot serve this target. `shell`: the target did run a shell command."""

    def __init__(self, message: str, shell: bool = False):
        super().__init__(message)
        self.shell = shell


class Asked:
    """Digests asked of the target: `done()` and `result()` as a future's, called from the
    coordinator's thread only, where a failed way is replaced by the next and asked again."""

    def __init__(self, owner: "TargetDigests", requests: list, sizes: dict, whole: bool):
        self.owner = owner
        self.requests = requests
        self.sizes = sizes
        self.whole = whole
        self.way = owner.way
        self.future = owner.start(self)

    def done(self) -> bool:
        while self.future.done():
            error = self.future.exception()
            if not isinstance(error, WayFailed):
                return True
            self.owner.give_up_on(self.way, error)
            self.way = self.owner.way
            self.future = self.owner.start(self)
        return False

    def result(self) -> list:
        if not self.done():
            raise RuntimeError("result() of digests that are still being computed")
        return self.future.result()


class TargetDigests:
    """The push's one door to digests of files on the target.

    engine: returns the push's Engine (for read-back jobs and to wake its loop); hashing: the
    HashingConnection of the service; module: runs multipush.sftp.verify (None: not available);
    way: SERVICE, or MODULE when the push runs with become.
    """

    def __init__(self, algorithm: str, engine: Callable, hashing, module: Callable | None, way: str,
                 warn: Callable[[str], None]):
        self.algorithm = algorithm
        self.engine = engine
        self.hashing = hashing
        self.module = module
        self.way = way if module is not None or way != MODULE else SFTP
        self.warn = warn
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="multipush-verify")
        self.calls = 0
        self.seconds = 0.0
        self.bytes_read = 0
        self.via: str | None = None

    # -- asking --------------------------------------------------------------------------------

    def ask(self, requests: list, sizes: dict, whole: bool = True) -> Asked:
        """requests: dicts {path, chunk_size, chunk_indexes, get_checksum} as for the verify module;
        sizes: path -> the size the file should have (what a read-back reads, and the deadline)."""
        return Asked(self, requests, sizes, whole)

    def warm(self) -> None:
        """Have the service log in and start while the first bytes travel (a refusal is kept for
        the first question, which then hands over)."""
        if self.way == SERVICE:
            self.thread.submit(self.hashing.start)

    def start(self, asked: Asked) -> Future:
        if asked.way == SFTP:
            return self._read_back(asked.requests, asked.sizes)
        function = self._by_service if asked.way == SERVICE else self._by_module
        future = self.thread.submit(function, asked.requests, asked.sizes, asked.whole)
        future.add_done_callback(lambda _future: self.engine().wake())
        return future

    def give_up_on(self, way: str, error: WayFailed) -> None:
        if self.way != way:  # another question found out first
            return
        self.way = MODULE if way == SERVICE and error.shell and self.module is not None else SFTP
        self.warn(f"{error}; {_NEXT_WAY_TEXT[self.way]}")

    def close(self) -> None:
        self.thread.shutdown(wait=True, cancel_futures=True)
        self.hashing.close()

    def report(self) -> dict:
        return {"calls": self.calls, "via": self.via, "seconds": round(self.seconds, 3), "bytes_read": self.bytes_read}

    def _count(self, started: float, via: str) -> None:
        self.calls += 1
        self.seconds += time.monotonic() - started
        self.via = via

    # -- the ways ------------------------------------------------------------------------------

    def _by_service(self, requests: list, sizes: dict, whole: bool) -> list:
        """(In the thread.)"""
        started = time.monotonic()
        deadline = SERVICE_BASE_SECONDS + sum(sizes.values()) / SERVICE_FLOOR_BYTES_PER_SECOND
        try:
            files = self.hashing.digests(requests, self.algorithm, whole, deadline)
        except HasherUnavailable as exc:
            raise WayFailed(f"hashing on the target over an SSH connection of the push did not work ({exc})",
                            shell=exc.shell) from None
        self._count(started, SERVICE)
        return files

    def _by_module(self, requests: list, sizes: dict, whole: bool) -> list:
        """(In the thread.)"""
        started = time.monotonic()
        try:
            files = self.module(requests, self.algorithm, whole=whole)
        except Exception as exc:  # whatever stops the module (no Python, no exec channel, sudo) hands over
            raise WayFailed(f"the multipush.sftp.verify module could not hash on the target ({exc})") from None
        self._count(started, MODULE)
        return files

    def _read_back(self, requests: list, sizes: dict) -> Future:
        """Read-back jobs on the pool for every request; the future is settled by their results,
        which the engine's loop delivers in the coordinator's thread."""
        future: Future = Future()
        answers = []
        pending = {"jobs": 0}
        started = time.monotonic()

        def finished() -> None:
            pending["jobs"] -= 1
            if pending["jobs"] == 0:
                self._count(started, SFTP)
                future.set_result(answers)

        jobs = []
        for request in requests:
            answer, regions = self._plan_read_back(request, sizes.get(request["path"], 0))
            answers.append(answer)
            jobs.extend((answer, request, start, end, block) for start, end, block in regions)
        if not jobs:
            self._count(started, SFTP)
            future.set_result(answers)
            return future
        pending["jobs"] = len(jobs)
        for answer, request, start, end, block in jobs:
            def done(job, result, answer=answer, request=request):
                self._take(answer, request, job, result)
                finished()

            self.engine().submit(ReadDigests(path=request["path"], start=start, end=end, block=block,
                                             algorithm=self.algorithm), done)
        return future

    @staticmethod
    def _plan_read_back(request: dict, size: int) -> tuple[dict, list]:
        """The answer to fill in and its (start, end, block) regions."""
        answer = {"path": request["path"], "exists": True, "size": size}
        chunk = request.get("chunk_size")
        if not chunk:
            return answer, [(0, size, max(size, 1))]
        count = math.ceil(size / chunk)
        answer["chunk_checksums"] = [None] * count
        indexes = request.get("chunk_indexes")
        if indexes is not None:
            return answer, [(index * chunk, min(size, (index + 1) * chunk), chunk) for index in indexes]
        step = max(chunk, READ_BACK_JOB_BYTES // chunk * chunk)
        return answer, [(start, min(size, start + step), chunk) for start in range(0, size, step)]

    def _take(self, answer: dict, request: dict, job: dict, result: dict) -> None:
        if not result["exists"]:
            answer.update(exists=False, size=None)
            return
        answer["size"] = result["size"]
        self.bytes_read += max(0, min(job.end, result["size"]) - job.start)
        digests = result["digests"]
        if "chunk_checksums" not in answer:
            answer["checksum"] = digests[0] if digests else new_hasher(job.algorithm).hexdigest()
            return
        first = job.start // job.block
        chunks = answer["chunk_checksums"]
        for offset, digest in enumerate(digests):
            if first + offset < len(chunks):
                chunks[first + offset] = digest
