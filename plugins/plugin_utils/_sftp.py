# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The SFTP operations one worker needs, on top of Paramiko's SFTPClient: `RemoteFiles`.

RemoteFiles is assembled from rooms of its own:

- _sftp_pipeline: `Pipeline`, requests in flight with every reply checked, and write framing;
- _sftp_tree: `TreeOperations`, paths and directories (survey, stat, mkdir_many, setstat_many,
  finalize_many, rename_many...);
- _sftp_data: `DataOperations`, file contents (allocate_many, write_range, write_small_files), and
  `ReadBack` (read_digests, hash_local);
- _sftp_errors: `RemoteError` (deterministic, never retried), `ConnectionLost` (the connection is
  gone; a fresh one may succeed), status codes, and `classified`, which turns every other failure
  into one of the two.

This module adds what they share: the session, the server's limits (limits@openssh.com), the
owner and group added to every setstat that sets a mode or an mtime, and quiet closes.
"""

from __future__ import annotations

from ansible_collections.multipush.sftp.plugins.plugin_utils._ownership import with_owner
from ansible_collections.multipush.sftp.plugins.plugin_utils._sftp_data import DataOperations, ReadBack
from ansible_collections.multipush.sftp.plugins.plugin_utils._sftp_errors import (
    SFTP_FAILURE, SFTP_NO_SUCH_FILE, SFTP_OP_UNSUPPORTED, SFTP_PERMISSION_DENIED, UNEXPLAINED_CODES, ConnectionLost,
    RemoteError, classified,
)
from ansible_collections.multipush.sftp.plugins.plugin_utils._sftp_pipeline import (
    BATCH_OUTSTANDING_REQUESTS, MAX_OUTSTANDING_BYTES, Pipeline, new_attributes,
)
from ansible_collections.multipush.sftp.plugins.plugin_utils._sftp_tree import TreeOperations
from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import paramiko

if paramiko is not None:
    from paramiko.sftp import (
        CMD_CLOSE, CMD_EXTENDED, CMD_EXTENDED_REPLY, CMD_FSTAT, CMD_OPEN, SFTP_FLAG_READ,
    )
    from paramiko.sftp_attr import SFTPAttributes

# What other modules take from here: RemoteFiles and its errors (the engine, _jobs, _remote_hash), the
# status codes the engine tests refusals with, and names tests use.
__all__ = [
    "BATCH_OUTSTANDING_REQUESTS", "CMD_FSTAT", "CMD_OPEN", "ConnectionLost", "DEFAULT_WRITE_SIZE",
    "MAX_OUTSTANDING_BYTES", "Pipeline", "RemoteError", "RemoteFiles", "SFTPAttributes", "SFTP_FAILURE",
    "SFTP_FLAG_READ", "SFTP_NO_SUCH_FILE", "SFTP_OP_UNSUPPORTED", "SFTP_PERMISSION_DENIED", "UNEXPLAINED_CODES",
]

# Paramiko's own request size; safe with every server. Anything larger only after the server
# said so through limits@openssh.com: a request over its limit kills the session.
DEFAULT_WRITE_SIZE = 32768


class RemoteFiles(TreeOperations, DataOperations, ReadBack):
    """The operations of one worker's SFTP session."""

    def __init__(self, transport, sftp, write_size: int | None = None, budget=None):
        """budget: the push's bandwidth budget (_bandwidth.Budget) or None; every Pipeline of the
        session takes from it, and it caps the write size (see Budget.largest_request)."""
        self.transport = transport
        self.sftp = sftp
        self.requested_write_size = write_size
        self.budget = budget
        sftp.multipush_budget = budget  # where the session's Pipelines find it (as multipush_uid)
        # Asked now, read later: the server answers in order, so the reply is in before the
        # replies of the first job, and login does not wait a round trip for it.
        self._limits = Pipeline(sftp, "limits@openssh.com", tolerant=True)
        self._limits_request = self._limits.send(CMD_EXTENDED, "limits@openssh.com")
        self._write_size: int | None = None
        self._read_size: int | None = None

    # -- what the rooms share ------------------------------------------------------------------

    def _classified(self, context: str, acked_by=None, sent_by=None):
        """A block whose failures leave as RemoteError or ConnectionLost (see _sftp_errors.classified)."""
        return classified(self.transport, context, acked_by, sent_by)

    def _owned_attributes(self, mode: int | None, mtime: float | None):
        """Attributes for a setstat of mode and/or mtime, with the owner and group the push was asked
        for (start_sftp keeps them on the session as multipush_uid and multipush_gid)."""
        return with_owner(new_attributes(mode, mtime), getattr(self.sftp, "multipush_uid", None),
                          getattr(self.sftp, "multipush_gid", None))

    def _close_quietly(self, handles) -> None:
        """After a refusal: close what is still open (the refusal is the error that matters)."""
        if not handles or not self.transport.is_active():
            return
        closing = Pipeline(self.sftp, "close", BATCH_OUTSTANDING_REQUESTS)
        try:
            for handle in list(handles):
                closing.send(CMD_CLOSE, handle)
            while closing.outstanding:
                closing.wait_one()
        except Exception:
            pass

    # -- the server's limits -------------------------------------------------------------------

    @property
    def write_size_known(self) -> bool:
        """Whether the write size can be had without waiting (the limits reply is in)."""
        return self._write_size is not None or not self._limits.outstanding

    @property
    def write_size(self) -> int:
        """Bytes per write request: the user's request_size, never above the server's limit."""
        if self._write_size is None:
            self._read_limits()
        return self._write_size

    @property
    def read_size(self) -> int:
        """Bytes per read request: the server's limit (more would come back short)."""
        if self._read_size is None:
            self._read_limits()
        return self._read_size

    def _read_limits(self) -> None:
        self._limits.drain()
        reply_type, msg = self._limits.replies.pop(self._limits_request, (None, None))
        max_read = max_write = 0
        if reply_type == CMD_EXTENDED_REPLY:  # else a status: the server does not know the extension
            msg.get_int64()  # max packet length
            max_read = msg.get_int64()
            max_write = msg.get_int64()
        write_limit = max_write if max_write > 0 else DEFAULT_WRITE_SIZE
        self._write_size = min(self.requested_write_size or write_limit, write_limit)
        if self.budget is not None:
            self._write_size = min(self._write_size, self.budget.largest_request)
        self._read_size = max_read if max_read > 0 else DEFAULT_WRITE_SIZE
