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
            "options": self.options,
        }))

    def start(self, timeout: float = 15.0) -> "AsyncSshServer":
        self.prepare()
        self.launch([sys.executable, str(Path(__file__).resolve()), str(self.config_file)], timeout,
                    cwd=str(self.workdir))
        return self


# --- the server process ----------------------------------------------------------------------------


def _serve(config: dict) -> None:
    import asyncio
    import logging

    import asyncssh

    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    authorized = asyncssh.read_authorized_keys(config["authorized_keys"])

    class Server(asyncssh.SSHServer):
        def connection_made(self, conn):
            self.conn = conn

        def begin_auth(self, username: str) -> bool:
            # Only the configured user has keys; any other name can only fail to authenticate.
            if username == config["user"]:
                self.conn.set_authorized_keys(authorized)
            return True

        def password_auth_supported(self) -> bool:
            return False

    async def main() -> None:
        await asyncssh.listen(
            config["host"], config["port"], server_factory=Server, server_host_keys=[config["host_key"]],
            sftp_factory=True, allow_scp=False, **config.get("options", {}),
        )
        print(f"AsyncSSH {asyncssh.__version__} SFTP server listening on {config['host']}:{config['port']}",
              flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


if __name__ == "__main__":
    _serve(json.loads(Path(sys.argv[1]).read_text()))
