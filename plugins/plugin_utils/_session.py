# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Opening one authenticated SSH connection with an SFTP session, the way `ssh` would.

`open_session` connects with a ConnectionSpec (built by `resolve_spec` in _sshconfig): directly
(every address of the name in turn), through ProxyCommand (a socketpair to a shell command) or
ProxyJump (direct-tcpip channels of hop connections), checks the host key against known_hosts
(_hostkeys), authenticates (_auth: ssh-agent keys, identity files with passphrases, password,
keyboard-interactive) and starts SFTP (_sftp_start), either as the subsystem or, with become, as
`sudo -u USER <sftp-server>` on an exec channel.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import threading
from typing import Callable

from ansible_collections.multipush.sftp.plugins.plugin_utils._auth import authenticate
from ansible_collections.multipush.sftp.plugins.plugin_utils._hostkeys import (
    check_host_key, load_known_hosts, security_preferences,
)
from ansible_collections.multipush.sftp.plugins.plugin_utils._negotiation import (
    explain, paramiko_supported, read_server_kexinit,
)
from ansible_collections.multipush.sftp.plugins.plugin_utils._sftp_start import open_sftp_channel, start_sftp
from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import (
    ConnectionSpec, SessionError, paramiko, require_paramiko,
)


# ---------------------------------------------------------------------------------------------
# Sockets: direct (every address in turn), ProxyCommand, ProxyJump
# ---------------------------------------------------------------------------------------------


def _tcp_connect(spec: ConnectionSpec) -> socket.socket:
    family = {"inet": socket.AF_INET, "inet6": socket.AF_INET6}.get(spec.address_family, socket.AF_UNSPEC)
    try:
        infos = socket.getaddrinfo(spec.host, spec.port, family, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        retry = exc.errno in (socket.EAI_AGAIN,)
        raise SessionError(f"cannot resolve host {spec.host!r}: {exc.strerror}; check ansible_host", retry) from None
    timeout = spec.connect_timeout or spec.timeout
    errors, seen = [], set()
    for af, kind, proto, _canon, address in infos:
        if address in seen:
            continue
        seen.add(address)
        sock = socket.socket(af, kind, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            reason = "timed out" if isinstance(exc, socket.timeout) else exc.strerror or str(exc)
            errors.append(f"{address[0]} port {address[1]}: {reason}")
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    where = f"[{spec.host}]:{spec.port}" if ":" in spec.host else f"{spec.host}:{spec.port}"
    raise SessionError(f"cannot connect to {where} ({'; '.join(errors) or 'no address'})", retryable=True)


class _ProxyProcess:
    """A ProxyCommand run by the shell with one end of a socketpair as its stdin and stdout.

    Not paramiko.ProxyCommand: that one splits the command without a shell, never reaps the
    process, and spins instead of reporting EOF when the command exits. A real socket gives
    the transport ordinary EOF and timeout behaviour.
    """

    def __init__(self, command: str):
        self.command = command
        ours, theirs = socket.socketpair()
        self.stderr = tempfile.TemporaryFile()
        try:
            self.process = subprocess.Popen(  # pylint: disable=consider-using-with
                ["/bin/sh", "-c", "exec " + command], stdin=theirs, stdout=theirs, stderr=self.stderr,
                close_fds=True, start_new_session=True)
        except OSError as exc:
            ours.close()
            self.stderr.close()
            raise SessionError(f"cannot run ProxyCommand {command!r}: {exc}", retryable=False) from None
        finally:
            theirs.close()
        self.sock = ours

    def error_text(self) -> str:
        try:
            self.stderr.seek(0)
            return self.stderr.read()[-2000:].decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""

    def close(self) -> None:
        stop_process(self.process)
        self.stderr.close()


def stop_process(process: subprocess.Popen, grace: float = 5.0) -> None:
    """End a helper process of ours (a ProxyCommand, a temporary ssh-agent): terminate, then kill
    after `grace` seconds; reaped either way."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=grace)


if paramiko is not None:

    class _Transport(paramiko.Transport):
        """A transport that also closes what carries it (hop connections, a ProxyCommand)."""

        def __init__(self, sock, carriers=()):
            super().__init__(sock)
            self.multipush_carriers = list(carriers)

        def close(self):
            try:
                super().close()
            finally:
                for carrier in self.multipush_carriers:
                    try:
                        carrier.close()
                    except Exception:  # closing is best effort; the connection is gone anyway
                        pass
                self.multipush_carriers = []

else:  # pragma: no cover
    _Transport = None


def _carrier_socket(spec: ConnectionSpec):
    """(socket for the transport, things to close after it)."""
    if spec.proxy_command:
        proxy = _ProxyProcess(spec.proxy_command)
        return proxy.sock, [proxy]
    if spec.jump is not None:
        hop = _connect(spec.jump)
        try:
            channel = hop.open_channel("direct-tcpip", (spec.host, spec.port), ("127.0.0.1", 0),
                                       timeout=spec.connect_timeout or spec.timeout)
        except paramiko.ChannelException as exc:
            hop.close()
            # 1: administratively prohibited (AllowTcpForwarding no): fixing needs the admin.
            raise SessionError(f"jump host {spec.jump.describe()} could not reach {spec.host} port {spec.port}: "
                               f"{exc.text} (code {exc.code})", retryable=exc.code != 1) from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            hop.close()
            raise SessionError(f"jump host {spec.jump.describe()} failed while opening a channel to "
                               f"{spec.host}:{spec.port}: {exc}", retryable=True) from None
        return channel, [hop]
    return _tcp_connect(spec), []


def _negotiation_failure(spec: ConnectionSpec, transport: "paramiko.Transport", exc: Exception) -> str:
    """The message for a handshake that found no algorithm in common: what the server offers (its
    KEXINIT, read on a carrier socket of its own), what Paramiko supports, and what to change."""
    supported = paramiko_supported(transport)
    server_version, explanation = "", ""
    sock, carriers = None, []
    try:
        sock, carriers = _carrier_socket(spec)
        server_version, offered = read_server_kexinit(sock, timeout=min(spec.timeout, 10))
        explanation = explain(offered, supported, paramiko.__version__)
    except Exception as probe:  # the message still says what Paramiko found
        explanation = f"{exc}; Paramiko {paramiko.__version__} supports: " + "; ".join(
            f"{category} {', '.join(names)}" for category, names in supported.items()
        ) + f" (what the server offers could not be read: {probe})"
    finally:
        for closable in ([sock] if sock is not None else []) + carriers:
            with contextlib.suppress(Exception):
                closable.close()
    server = f" (server {server_version})" if server_version else ""
    reason = (explanation or str(exc)).rstrip(".")
    return (f"SSH negotiation with {spec.describe()}{server} failed: {reason}. "
            "Nothing was written; not retried, as it cannot succeed until one side changes.")


def _connect(spec: ConnectionSpec) -> "paramiko.Transport":
    """An authenticated transport to spec's host, through whatever carries it."""
    known = load_known_hosts(spec.known_hosts_files) if spec.host_key_checking else paramiko.HostKeys()
    known_types = list((known.lookup(spec.host_key_name) or {}).keys())
    sock, carriers = _carrier_socket(spec)
    transport = _Transport(sock, carriers)
    try:
        security_preferences(transport, known_types)
        try:
            transport.start_client(timeout=spec.timeout)
        except paramiko.ssh_exception.IncompatiblePeer as exc:
            # No algorithm in common: every retry would fail the same way.
            raise SessionError(_negotiation_failure(spec, transport, exc), retryable=False) from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            # sshd drops handshakes beyond MaxStartups; that is worth another try after a pause.
            detail = str(exc) or type(exc).__name__
            for carrier in carriers:
                if isinstance(carrier, _ProxyProcess) and carrier.error_text():
                    detail += f"; ProxyCommand said: {carrier.error_text()}"
            raise SessionError(f"SSH handshake with {spec.describe()} failed: {detail}", retryable=True) from None
        check_host_key(spec, known, transport)
        authenticate(spec, transport)
        if spec.keepalive:
            transport.set_keepalive(spec.keepalive)
        return transport
    except BaseException:
        transport.close()
        raise


def open_connection(spec: ConnectionSpec, throttle=None) -> "paramiko.Transport":
    """Connect, verify the host key and authenticate: a connection for exec channels, no SFTP.
    throttle: a semaphore held until the login is done (the push's handshake slots, which keep its
    unauthenticated connections within sshd's MaxStartups)."""
    require_paramiko()
    with throttle if throttle is not None else contextlib.nullcontext():
        return _connect(spec)


def open_session(spec: ConnectionSpec, throttle=None, session_turn: Callable | None = None,
                 ) -> tuple["paramiko.Transport", "paramiko.SFTPClient"]:
    """Connect, verify the host key, authenticate and start the SFTP session.

    throttle (as for open_connection) is held until the session has started: sshd's listener learns
    of a finished login from the session's process a moment after it, and a slot handed on at
    authentication let the next handshake be counted, and dropped, alongside it. The start waits
    for session_turn(throttle) (see _engine.SessionGate), which may let go of the slot meanwhile.
    """
    require_paramiko()
    throttle = throttle if throttle is not None else threading.BoundedSemaphore()
    with throttle:
        transport = _connect(spec)
        try:
            channel = open_sftp_channel(spec, transport) if session_turn is not None else None
            with session_turn(throttle) if session_turn is not None else contextlib.nullcontext():
                sftp = start_sftp(spec, transport, channel)
            sftp.get_channel().settimeout(spec.timeout)
            return transport, sftp
        except BaseException:
            transport.close()
            raise
