# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The fan-out ledger: which hosts of one task hold the tree, which are being fed, by whom.

Ansible runs each host's task in a worker process of its own, forked by ansible-playbook; the
workers share nothing but the controller's file system. So the ledger is one small JSON file per
task run (keyed by the run key: ansible-playbook's pid and the task's id), read and rewritten
under an exclusive `flock`. Why a file and not a coordinator process: a file needs no process
that outlives the worker that started it, survives `serial` batches (the next batch's workers
find the hosts of earlier batches as sources), and each host keeps its own task result because
each worker still runs its own push. Entries record the worker's pid: a worker that died without
updating its entry counts as failed, so nobody waits on it.

choose_source() is the policy, pure logic over the ledger's state:
- a peer before the controller: a host of the same group holding the same tree, known to be able
  to send (or not yet tried), with fewer than fanout_per_source receivers, not failed for this
  receiver before; the least busy first, then the one done earliest. A host holds the tree once
  it is done, and already while a peer's complete copy in its temps is being checked ("holding"):
  its temps are a source then, and its files once renamed. A round of the cascade so waits for
  the copies, not for their checks; what a holding host passes on is compared with the
  controller's source by its receivers like any peer's copy;
- then a host still receiving the tree ("streaming"): it passes on what it already has while it
  gets the rest (its `stream` file says which byte spans of its temps are there; see
  _fanout.Fanout). Copies so flow down a tree of hosts at once instead of round after round, and
  the controller's seed overlaps the whole cascade. Never a host whose own source, or its
  source's, and so on up, is the one choosing: no host waits on itself;
- the controller seeds a group: it feeds a host when the group has no copy and none on the way.
  Once a copy exists or is being made, hosts wait for a peer slot instead: the controller's uplink
  is the link fan-out exists to spare, and the peers' number doubles while they wait;
- the controller is also where a host goes when a peer failed it and no other peer is free
  (`no_wait`), or when no peer can reach it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass

from ansible_collections.multipush.sftp.plugins.plugin_utils._controller_dir import (
    process_gone, prune_runs, run_file, runtime_dir,
)

CONTROLLER = "controller"
# States of a host in the ledger.
WAITING, RECEIVING, HOLDING, DONE, FAILED = "waiting", "receiving", "holding", "done", "failed"
SOURCES = (HOLDING, DONE)  # the states of a host that can feed others
LEDGER_KIND = "fanout"  # the ledger's and its copy maps' names start with it (see _controller_dir.run_file)


@dataclass(frozen=True)
class Choice:
    """What a waiting host does now: take `source` (CONTROLLER or a host's name), or wait (None)."""

    source: str | None
    why: str


def _alive(pid) -> bool:
    return isinstance(pid, int) and not process_gone(pid)


def live(entry: dict) -> dict:
    """An entry as it stands: a host whose worker died before it was done has failed (a holding
    host's temps may be gone)."""
    if entry.get("state") in (WAITING, RECEIVING, HOLDING) and not _alive(entry.get("pid")):
        return dict(entry, state=FAILED)
    return entry


def choose_source(state: dict, host: str, group: str, tree: str, per_source: int, no_wait: bool = False) -> Choice:
    """The source for `host` now, or wait. `state` is the ledger's content (see Ledger)."""
    hosts = {name: live(entry) for name, entry in state.get("hosts", {}).items() if name != host}
    failed = set(state.get("failed_pairs", {}).get(host, []))
    same = {name: entry for name, entry in hosts.items()
            if entry.get("group") == group and entry.get("tree") == tree}
    peers = [(entry.get("feeding", 0), entry.get("done_at", 0.0), name) for name, entry in same.items()
             if entry.get("state") in SOURCES and entry.get("can_send") is not False and name not in failed]
    free = sorted(peer for peer in peers if peer[0] < per_source)
    if free:
        return Choice(free[0][2], f"{free[0][2]} holds the tree and feeds {free[0][0]} of {per_source}")
    # The nearest to the controller first: a tree of depth log2(hosts), not a chain through them all
    # (every hop adds a range's delay, and a host that fails stalls fewer below it).
    above = {name: _sources_above(hosts, name) for name, entry in same.items()
             if entry.get("state") == RECEIVING and entry.get("stream") and entry.get("feeding", 0) < per_source
             and entry.get("can_send") is not False and name not in failed}
    streaming = sorted((len(sources), same[name].get("feeding", 0), same[name].get("since", 0.0), name)
                       for name, sources in above.items() if host not in sources)
    if streaming:
        _depth, feeding, _since, name = streaming[0]
        return Choice(name, f"{name} is receiving the tree and passes it on as it comes "
                            f"(feeds {feeding} of {per_source})")
    if no_wait:
        return Choice(CONTROLLER, "no other peer is free")
    on_the_way = [name for name, entry in same.items()
                  if entry.get("state") == RECEIVING and entry.get("can_send") is not False and name not in failed]
    if peers:
        return Choice(None, f"waiting for a free peer ({len(peers)} busy)")
    if on_the_way:
        return Choice(None, f"waiting for a copy on its way ({', '.join(sorted(on_the_way)[:3])})")
    return Choice(CONTROLLER, "no host of its group holds the tree or is receiving it")


def _sources_above(hosts: dict, name: str) -> set:
    """The hosts `name` gets its copy from, directly or through others (the controller excluded)."""
    above: set = set()
    source = (hosts.get(name) or {}).get("source")
    while source not in (None, CONTROLLER) and source not in above:
        above.add(source)
        source = (hosts.get(source) or {}).get("source")
    return above


class Ledger:
    """The ledger of one task run. Every method takes the lock, reads, changes, writes."""

    def __init__(self, run_key: str, directory: str | None = None):
        self.directory = directory or runtime_dir()
        self.path = run_file(self.directory, LEDGER_KIND, run_key, ".json")  # its copy maps: the same head
        self.run_key = run_key
        prune_runs(self.directory, (LEDGER_KIND,))

    @contextlib.contextmanager
    def _open(self):
        with open(self.path + ".lock", "a+", encoding="utf-8") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                try:
                    with open(self.path, encoding="utf-8") as stream:
                        before = stream.read()
                    state = json.loads(before)
                except (FileNotFoundError, ValueError):
                    before, state = "", {"run_key": self.run_key, "hosts": {}, "failed_pairs": {}}
                yield state
                if before and json.dumps(state, sort_keys=True) == json.dumps(json.loads(before), sort_keys=True):
                    return  # a waiting host's look changed nothing: nothing to write
                handle, temp = tempfile.mkstemp(dir=self.directory, prefix=".fanout-")
                with os.fdopen(handle, "w", encoding="utf-8") as stream:
                    json.dump(state, stream)
                os.replace(temp, self.path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def snapshot(self) -> dict:
        with self._open() as state:
            return json.loads(json.dumps(state))

    def join(self, host: str, group: str, tree: str) -> None:
        """The host waits for a source (its survey found something to send)."""
        with self._open() as state:
            entry = state["hosts"].setdefault(host, {})
            entry.update(state=WAITING, group=group, tree=tree, pid=os.getpid(), feeding=entry.get("feeding", 0))

    def take(self, host: str, group: str, tree: str, per_source: int, no_wait: bool = False,
             stream: str | None = None) -> Choice:
        """Choose a source and, if there is one, hold its slot (the controller's or a peer's).
        stream: the file where this host will say which spans of its temps are there (it passes
        them on while it receives: see choose_source)."""
        with self._open() as state:
            choice = choose_source(state, host, group, tree, per_source, no_wait)
            if choice.source is None:
                return choice
            entry = state["hosts"].setdefault(host, {"group": group, "tree": tree})
            entry.update(state=RECEIVING, source=choice.source, pid=os.getpid())
            if stream:
                entry.setdefault("since", time.time())
                entry["stream"] = stream
            if choice.source != CONTROLLER:
                state["hosts"][choice.source]["feeding"] = state["hosts"][choice.source].get("feeding", 0) + 1
            return choice

    def release(self, host: str, source: str) -> None:
        """The host no longer takes data from `source` (done, or failed)."""
        if source == CONTROLLER:
            return
        with self._open() as state:
            entry = state["hosts"].get(source)
            if entry is not None:
                entry["feeding"] = max(0, entry.get("feeding", 0) - 1)

    def source_failed(self, receiver: str, source: str, cannot_send: bool) -> None:
        """A feed from `source` to `receiver` failed: never that pair again; with cannot_send, that
        host can feed nobody (no ssh client, no Python, cannot read its copy)."""
        with self._open() as state:
            pairs = state.setdefault("failed_pairs", {}).setdefault(receiver, [])
            if source not in pairs:
                pairs.append(source)
            if cannot_send and source in state["hosts"]:
                state["hosts"][source]["can_send"] = False

    def sent_from(self, source: str) -> None:
        """`source` fed a host: it can send."""
        with self._open() as state:
            if source in state["hosts"]:
                state["hosts"][source]["can_send"] = True

    def holding(self, host: str, copy_map: str) -> None:
        """A peer wrote the host's whole copy into its temps (listed in `copy_map`), which are now
        being checked: it can feed others meanwhile."""
        with self._open() as state:
            entry = state["hosts"].get(host)
            if entry is not None and entry.get("state") == RECEIVING:
                entry.update(state=HOLDING, copy_map=copy_map, done_at=time.time())

    def finish(self, host: str, ok: bool, group: str, tree: str, copy_map: str | None) -> None:
        """The host's push ended: done (a source from now on, its copies listed in `copy_map`, a
        file next to the ledger) or failed."""
        with self._open() as state:
            entry = state["hosts"].setdefault(host, {"feeding": 0})
            entry.update(state=DONE if ok else FAILED, group=group, tree=tree, done_at=time.time(),
                         copy_map=copy_map, pid=os.getpid())

    def write_copy_map(self, host: str, copies: dict, kind: str = "copies") -> str:
        """Where each source file's copy is on `host` next to the ledger: local path -> remote path,
        or [temp, final path] for a copy still being checked (kind "held")."""
        digest = hashlib.sha256(host.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        path = f"{self.path[:-len('.json')]}-{digest}.{kind}.json"
        handle, temp = tempfile.mkstemp(dir=self.directory, prefix=".copies-")
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(copies, stream)
        os.replace(temp, path)
        return path


def read_copy_map(path: str) -> dict:
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)
