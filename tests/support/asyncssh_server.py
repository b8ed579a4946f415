"""A throwaway SFTP-only server that is not OpenSSH: AsyncSSH, on loopback, in a subprocess.

It serves the real file system over SFTP (files are written as the user running the tests) and
nothing else: no shell, no exec (AsyncSSH refuses those requests when only an sftp_factory is
given), public-key authentication of one user with a generated client key, its own ed25519 host
key and a known_hosts line for it. The interface is the one SshServer offers to the fixtures and
inventories (host, port, user, client_key, known_hosts, write_inventory, ssh_common_args, start,
stop), so a test can use either.

The server runs in its own process (`python asyncssh_server.py CONFIG.json`): it does not share
the pytest process's event loop, and stop() can always end it.

`options` are extra keyword arguments of asyncssh.listen (JSON values), for example
{"encryption_algs": ["chacha20-poly1305@openssh.com"]}.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__:
    from tests.support.sshd import LoopbackServer
else:  # run as a script: the server process, which needs none of it
    LoopbackServer = object


@dataclass
class AsyncSshServer(LoopbackServer):
    """One running AsyncSSH SFTP server (see the module's docstring)."""

    name = "the AsyncSSH server"
    # How its SFTP differs from the real file system's, to stand for servers seen in the field:
    # "no_posix_rename": posix-rename@openssh.com is refused as unsupported, and a plain rename
    # fails when the new name exists (SFTP version 3's rename, as most servers other than
    # OpenSSH's implement it). "no_fsetstat": FSETSTAT is refused as unsupported. "sequential_writes":
    # a write anywhere but at the file's end fails, as object-storage gateways do. "no_symlink": SYMLINK
    # is refused as unsupported. "mtime_ignored": SETSTAT answers OK and changes nothing. "no_permissions":
    # attributes carry no permissions, so no file type.
    quirks: tuple = ()
    # At most this many connections at once: the next ones are closed as soon as they are made (a
    # per-client limit such as ProFTPD's MaxClientsPerHost, or a firewall's).
    max_connections: int | None = None

    @property
    def config_file(self) -> Path:
        return self.workdir / "asyncssh.json"

    @property
    def log_file(self) -> Path:
        return self.workdir / "asyncssh.log"

    def prepare(self) -> None:
        self.prepare_keys()
        self.config_file.write_text(json.dumps({
            "host": self.host, "port": self.port, "user": self.user, "host_key": str(self.host_key),
            "authorized_keys": str(self.authorized_keys), "log_file": str(self.log_file),
            "options": self.options, "quirks": list(self.quirks),
            "max_connections": self.max_connections,
        }))

    def start(self, timeout: float = 15.0) -> "AsyncSshServer":
        self.prepare()
        self.launch([sys.executable, str(Path(__file__).resolve()), str(self.config_file)], timeout,
                    cwd=str(self.workdir))
        return self


# --- the server process ----------------------------------------------------------------------------


def _login_server(asyncssh, config: dict):
    """The SSHServer class: public-key logins of the configured user, at most max_connections at once."""
    import logging

    authorized = asyncssh.read_authorized_keys(config["authorized_keys"])
    limit = config.get("max_connections")
    active = set()

    class Server(asyncssh.SSHServer):
        def connection_made(self, conn):
            self.conn = conn
            if limit is not None and len(active) >= limit:
                # as a server with a per-client connection limit does: the connection is dropped at once
                logging.info("quirk: closed a connection beyond %d", limit)
                conn.close()
                return
            active.add(self)

        def connection_lost(self, exc):
            active.discard(self)

        def begin_auth(self, username: str) -> bool:
            # Only the configured user has keys; any other name can only fail to authenticate.
            if username == config["user"]:
                self.conn.set_authorized_keys(authorized)
            return True

        def password_auth_supported(self) -> bool:
            return False

    return Server


def _refuse_if(quirks: set, quirk: str, what: str, error: Exception) -> None:
    """Raise `error` (logged as refusing `what`) when `quirk` is asked for."""
    import logging

    if quirk in quirks:
        logging.info("quirk: refused %s", what)
        raise error


def _file_server(asyncssh, quirks: set):
    """The SFTPServer class: the real file system, with the quirks asked for (see AsyncSshServer.quirks);
    each refusal a quirk makes is logged."""
    import logging
    import os

    class FileServer(asyncssh.SFTPServer):
        def posix_rename(self, oldpath, newpath):
            _refuse_if(quirks, "no_posix_rename", "posix-rename",
                       asyncssh.SFTPOpUnsupported("posix-rename not supported"))
            return super().posix_rename(oldpath, newpath)

        def rename(self, oldpath, newpath):
            if os.path.lexists(self.map_path(newpath)):
                _refuse_if(quirks, "no_posix_rename", "a rename over an existing file",
                           asyncssh.SFTPFailure("target exists"))
            return super().rename(oldpath, newpath)

        def fsetstat(self, file_obj, attrs):
            _refuse_if(quirks, "no_fsetstat", "fsetstat", asyncssh.SFTPOpUnsupported("fsetstat not supported"))
            return super().fsetstat(file_obj, attrs)

        def write(self, file_obj, offset, data):
            if "sequential_writes" in quirks and offset != os.fstat(file_obj.fileno()).st_size:
                _refuse_if(quirks, "sequential_writes", f"a write at {offset}",
                           asyncssh.SFTPFailure("random access writes are not supported"))
            return super().write(file_obj, offset, data)

        def symlink(self, oldpath, newpath):
            _refuse_if(quirks, "no_symlink", "symlink", asyncssh.SFTPOpUnsupported("symlinks not supported"))
            return super().symlink(oldpath, newpath)

        def setstat(self, path, attrs):
            if "mtime_ignored" in quirks:
                logging.info("quirk: ignored a setstat")
                return None
            return super().setstat(path, attrs)

        def lstat(self, path):
            return self._without_permissions(super().lstat(path))

        def stat(self, path):
            return self._without_permissions(super().stat(path))

        def _without_permissions(self, result):
            if "no_permissions" not in quirks:
                return result
            attrs = result if isinstance(result, asyncssh.SFTPAttrs) else asyncssh.SFTPAttrs.from_local(result)
            attrs.permissions = None
            return attrs

    return FileServer


def _serve(config: dict) -> None:
    import asyncio
    import logging

    import asyncssh

    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    async def main() -> None:
        await asyncssh.listen(
            config["host"], config["port"], server_factory=_login_server(asyncssh, config),
            server_host_keys=[config["host_key"]], sftp_factory=_file_server(asyncssh, set(config.get("quirks", ()))),
            allow_scp=False, **config.get("options", {}),
        )
        print(f"AsyncSSH {asyncssh.__version__} SFTP server listening on {config['host']}:{config['port']}",
              flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


if __name__ == "__main__":
    _serve(json.loads(Path(sys.argv[1]).read_text()))
