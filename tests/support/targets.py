"""The test targets as the push's own code sees them: the ConnectionSpec of a test sshd (direct or
through a relay), and what the verify module would answer about its files, computed in-process."""

from __future__ import annotations

import os
from pathlib import Path

from ansible_collections.multipush.sftp.plugins.module_utils._digest import hash_many
from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import ConnectionSpec


def spec_for(server, **overrides) -> ConnectionSpec:
    """The connection to `server` (an SshServer or anything with its attributes): its client key and
    known_hosts, a 10 s timeout; `overrides` replace any field."""
    values = dict(host=server.host, port=server.port, user=server.user, private_key_file=str(server.client_key),
                  known_hosts_files=[str(server.known_hosts)], timeout=10.0)
    values.update(overrides)
    return ConnectionSpec(**values)


def spec_via(server, relay, known_hosts: Path, timeout: float = 10.0) -> ConnectionSpec:
    """The connection to `server` through `relay`, whose port `known_hosts` names (relay.known_hosts_line)."""
    return spec_for(server, host=relay.host, port=relay.port, known_hosts_files=[str(known_hosts)], timeout=timeout)


def local_verify(requests: list, algorithm: str, whole: bool = True) -> list:
    """What multipush.sftp.verify answers, computed in-process (the target is this machine). Requests
    may ask for some ranges only (chunk_indexes) and say per file whether the whole digest is wanted."""
    specs = []
    for request in requests:
        wanted = request.get("get_checksum")
        spec = (request["path"], request.get("chunk_size"), whole if wanted is None else wanted)
        if request.get("chunk_indexes") is not None:
            spec += (request["chunk_indexes"],)
        specs.append(spec)
    answers = []
    for request, outcome in zip(requests, hash_many(specs, algorithm, return_exceptions=True)):
        if isinstance(outcome, Exception):
            answers.append({"path": request["path"], "exists": False})
            continue
        answers.append({"path": request["path"], "exists": True, "size": os.path.getsize(request["path"]),
                        "checksum": outcome[0], "chunk_checksums": outcome[1]})
    return answers
