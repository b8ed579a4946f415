"""The bad input catalogue (docs/reliability.md): one row, one case, through ansible-playbook.

Every row runs the real `ansible-playbook` (no ignore_errors) against a real sshd on loopback and
checks three things: the exit status a user sees, a message that names the thing and the fix, and
that nothing was written on the target (same entries before and after, no temp file left).
Rows already proven elsewhere are listed in the doc with the test that covers them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.faults import (
    PlayRunner, ansible_env, connection_failure_rc, engine_loads_encrypted_keys, inventory_line, snapshot,
    temp_files,
)
from tests.support.files import MIB, random_file, sha256
from tests.support.sshd import SshServer, free_port, generate_key

ROOT = os.geteuid() == 0
# A host that cannot be connected to or refuses us: UNREACHABLE (4), as Ansible's ssh plugin reports it.
UNREACHABLE = connection_failure_rc()
# Root reads every file; without these two capabilities it is held to the file modes like anyone else.
DROP_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]


@pytest.fixture(scope="module")
def shared_dir():
    """A world-traversable directory: the home of what the unprivileged login (nobody) must reach."""
    path = Path(tempfile.mkdtemp(prefix="multipush-bad-input-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory, shared_dir):
    """sshd accepting keys and passwords, with sftp in-process (so nologin accounts can use SFTP)."""
    keys = shared_dir / "authorized_keys"
    sshd = SshServer(workdir=tmp_path_factory.mktemp("bad-input-sshd"), options={
        "PasswordAuthentication": "yes",
        "PermitRootLogin": "yes",
        "Subsystem": "sftp internal-sftp",
        "AuthorizedKeysFile": str(keys),
    })
    sshd.prepare()
    keys.write_text(sshd.client_key.with_suffix(".pub").read_text())
    os.chmod(keys, 0o644)
    sshd.start()
    yield sshd
    sshd.stop()


@dataclass
class Case:
    args: dict
    messages: list[str]  # each must appear in the failure message
    rc: int = 2
    hostvars: dict = field(default_factory=dict)
    prefix: list[str] = field(default_factory=list)
    watch: Path | None = None  # target directory that must stay untouched (default: the test's remote dir)
    forbidden: list[str] = field(default_factory=list)  # must NOT appear in the message


@dataclass
class Ctx:
    tmp: Path
    server: SshServer
    shared: Path

    @property
    def remote(self) -> Path:
        path = self.tmp / "remote"
        path.mkdir(exist_ok=True)
        return path

    def small_src(self) -> Path:
        source = self.tmp / "src" / "file.txt"
        source.parent.mkdir(exist_ok=True)
        source.write_text("payload\n")
        return source

    def tree(self) -> Path:
        root = self.tmp / "tree"
        (root / "sub").mkdir(parents=True, exist_ok=True)
        (root / "a.txt").write_text("a\n")
        (root / "sub" / "b.txt").write_text("b\n")
        return root


def _needs_root(what: str) -> None:
    if not ROOT:
        pytest.skip(f"{what} needs root")


# --- src -------------------------------------------------------------------------------------------


def src_unreadable_file(ctx: Ctx) -> Case:
    source = ctx.small_src()
    os.chmod(source, 0)
    return Case({"src": str(source), "dest": f"{ctx.remote}/out.txt"},
                ["cannot be read on the controller (permission denied)", str(source)],
                prefix=DROP_DAC if ROOT else [])


def src_unreadable_dir(ctx: Ctx) -> Case:
    root = ctx.tree()
    os.chmod(root / "sub", 0)
    return Case({"src": f"{root}/", "dest": f"{ctx.remote}/out"},
                ["cannot be listed on the controller (permission denied)", str(root / "sub")],
                prefix=DROP_DAC if ROOT else [])


def src_socket(ctx: Ctx) -> Case:
    short = Path(tempfile.mkdtemp(prefix="mp-"))  # AF_UNIX paths are limited to 108 bytes
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(short / "s"))
    finally:
        listener.close()
    target = ctx.tmp / "src.sock"
    os.rename(short / "s", target)
    short.rmdir()
    return Case({"src": str(target), "dest": f"{ctx.remote}/out"},
                ["is not a regular file or directory", "socket", str(target)])


def src_fifo(ctx: Ctx) -> Case:
    target = ctx.tmp / "src.fifo"
    os.mkfifo(target)  # opening it for reading would block: the push must never try
    return Case({"src": str(target), "dest": f"{ctx.remote}/out"},
                ["is not a regular file or directory", "FIFO", str(target)])


def src_trailing_slash_on_file(ctx: Ctx) -> Case:
    source = ctx.small_src()
    return Case({"src": f"{source}/", "dest": f"{ctx.remote}/out.txt"}, ["is a file", "drop the trailing slash"])


def src_invalid_utf8_name(ctx: Ctx) -> Case:
    root = ctx.tree()
    with open(os.path.join(os.fsencode(root), b"caf\xe9-latin1.txt"), "wb") as handle:
        handle.write(b"latin-1 name\n")
    return Case({"src": f"{root}/", "dest": f"{ctx.remote}/out"},
                ["not valid UTF-8", "caf\\xe9-latin1.txt", "exclude"])


def src_symlink_loop_dir(ctx: Ctx) -> Case:
    root = ctx.tree()
    os.symlink("..", root / "sub" / "up")
    return Case({"src": f"{root}/", "dest": f"{ctx.remote}/out", "follow": True},
                ["symlink loop", str(root / "sub" / "up"), "follow: false"])


def src_symlink_loop_self(ctx: Ctx) -> Case:
    root = ctx.tree()
    os.symlink("me", root / "me")
    return Case({"src": f"{root}/", "dest": f"{ctx.remote}/out", "follow": True},
                [str(root / "me"), "loop"])


def src_dangling_symlink_followed(ctx: Ctx) -> Case:
    root = ctx.tree()
    os.symlink("gone.txt", root / "dangling")
    return Case({"src": f"{root}/", "dest": f"{ctx.remote}/out", "follow": True},
                [str(root / "dangling"), "does not exist"])


# --- dest ------------------------------------------------------------------------------------------


def dest_empty(ctx: Ctx) -> Case:
    return Case({"src": str(ctx.small_src()), "dest": ""}, ["dest is empty"])


def dest_parent_not_writable(ctx: Ctx) -> Case:
    _needs_root("logging in as the unprivileged user nobody")
    parent = ctx.shared / "root-only"
    parent.mkdir(mode=0o755)
    (parent / "keep.txt").write_text("untouched\n")
    return Case({"src": str(ctx.small_src()), "dest": f"{parent}/out.txt", "verify": "size"},
                ["permission denied", str(parent)], watch=parent,
                hostvars={"ansible_user": "nobody"})


def dest_parent_missing_not_creatable(ctx: Ctx) -> Case:
    _needs_root("logging in as the unprivileged user nobody")
    parent = ctx.shared / "root-only-2"
    parent.mkdir(mode=0o755)
    return Case({"src": str(ctx.small_src()), "dest": f"{parent}/new/deeper/out.txt", "verify": "size"},
                ["permission denied", f"{parent}/new"], watch=parent,
                hostvars={"ansible_user": "nobody"})


def dest_read_only_filesystem(ctx: Ctx) -> Case:
    _needs_root("mounting a read-only tmpfs")
    mountpoint = ctx.tmp / "ro"
    mountpoint.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)], capture_output=True,
                          check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {done.stderr.decode().strip()}")
    (mountpoint / "keep.txt").write_text("untouched\n")
    subprocess.run(["mount", "-o", "remount,ro", str(mountpoint)], check=True)
    ctx.tmp.joinpath(".umount").write_text(str(mountpoint))
    return Case({"src": str(ctx.small_src()), "dest": f"{mountpoint}/out.txt", "verify": "size"},
                [str(mountpoint), "read-only"], watch=mountpoint, forbidden=["bytes free"])


def dest_directory_where_file_expected(ctx: Ctx) -> Case:
    root = ctx.tree()
    (ctx.remote / "out" / "a.txt").mkdir(parents=True)
    return Case({"src": f"{root}/", "dest": f"{ctx.remote}/out"}, ["directory where file 'a.txt' should go"])


def dest_directory_where_file_expected_single(ctx: Ctx) -> Case:
    source = ctx.small_src()
    (ctx.remote / "into" / "file.txt").mkdir(parents=True)  # dest is a directory: the file goes inside it...
    return Case({"src": str(source), "dest": f"{ctx.remote}/into"},  # ...where a directory is in the way
                ["directory where file 'file.txt' should go"])


def dest_file_where_directory_expected(ctx: Ctx) -> Case:
    root = ctx.tree()
    (ctx.remote / "out").write_text("a file, not a directory\n")
    return Case({"src": f"{root}/", "dest": f"{ctx.remote}/out"},
                ["exists on the target as a file", "src is a directory"])


def dest_file_where_subdirectory_expected(ctx: Ctx) -> Case:
    root = ctx.tree()
    (ctx.remote / "out").mkdir()
    (ctx.remote / "out" / "sub").write_text("a file where sub/ should go\n")
    return Case({"src": f"{root}/", "dest": f"{ctx.remote}/out"},
                ["file at", f"{ctx.remote}/out/sub", "where a directory should go"])


def dest_parent_is_a_file(ctx: Ctx) -> Case:
    (ctx.remote / "plain").write_text("a file\n")
    return Case({"src": str(ctx.small_src()), "dest": f"{ctx.remote}/plain/out.txt"},
                [f"{ctx.remote}/plain", "not a directory"])


# --- options ---------------------------------------------------------------------------------------


def _option(name, value, *messages):
    def make(ctx: Ctx) -> Case:
        return Case({"src": str(ctx.small_src()), "dest": f"{ctx.remote}/out.txt", name: value}, list(messages))
    make.__name__ = f"{name}={value!r}"
    return make


OPTION_ROWS = [
    _option("connections", 0, "connections=0 is out of range", "1 to 128"),
    _option("connections", -3, "connections=-3 is out of range", "1 to 128"),
    _option("connections", 100000, "connections=100000 is out of range", "1 to 128"),
    _option("connections", "many", "connections='many' is neither 'auto' nor a whole number", "1 to 128"),
    _option("max_connections", 0, "max_connections=0 is out of range", "1 to 128"),
    _option("max_concurrent_handshakes", 0, "max_concurrent_handshakes=0 is out of range"),
    _option("retries", -1, "retries=-1 is out of range"),
    _option("timeout", 0, "timeout=0 is out of range"),
    _option("retry_delay", -1.0, "retry_delay=-1.0 must not be negative"),
    _option("chunk_size", "abc", "chunk_size='abc' is not a size", "64M"),
    _option("chunk_size", "12Q", "chunk_size='12Q' is not a size"),
    _option("chunk_size", "-5M", "chunk_size='-5M' is not a size"),
    _option("chunk_size", "1.5.2M", "chunk_size='1.5.2M' is not a size"),
    _option("chunk_size", "", "chunk_size='' is not a size"),
    _option("chunk_size", "0", "chunk_size='0' must be larger than zero"),
    _option("chunk_size", "1K", "is below the minimum of 64K"),
    _option("chunk_size", "64M64M", "chunk_size='64M64M' is not a size"),
    _option("request_size", "huge", "request_size='huge' is not a size"),
    _option("checksum_algorithm", "crc32c", "checksum_algorithm", "crc32, md5"),
    _option("checksum_algorithm", "SHA-256", "checksum_algorithm", "sha256"),
    _option("compare", "content", "compare", "size_mtime"),
    _option("verify", "yes", "verify", "checksum"),
    _option("conections", 4, "Invalid options", "conections"),
]


# --- connection ------------------------------------------------------------------------------------


def _no_link(*args, **kwargs) -> Case:
    """A connection that cannot be made or is refused: the host is UNREACHABLE for Ansible."""
    return Case(*args, rc=UNREACHABLE, **kwargs)


def host_unreachable(ctx: Ctx) -> Case:
    _needs_root("a private network namespace (unshare -n)")
    # A fresh network namespace whose loopback is down: every address is unreachable, no packet leaves.
    return _no_link({"src": str(ctx.small_src()), "dest": f"{ctx.remote}/out.txt", "retries": 1, "retry_delay": 0.05},
                    ["cannot connect to 127.0.0.1", "unreachable", "gave up after 1 retries"],
                    prefix=["unshare", "--net", "--"])


def wrong_port(ctx: Ctx) -> Case:
    port = free_port()
    return _no_link({"src": str(ctx.small_src()), "dest": f"{ctx.remote}/out.txt", "retries": 1, "retry_delay": 0.05},
                    [f"cannot connect to 127.0.0.1:{port}", "Connection refused", "gave up after 1 retries"],
                    hostvars={"ansible_port": str(port)})


def wrong_user(ctx: Ctx) -> Case:
    return _no_link({"src": str(ctx.small_src()), "dest": f"{ctx.remote}/out.txt"},
                    ["authentication to mp-no-such-user@127.0.0.1", "failed", "ansible_user"],
                    hostvars={"ansible_user": "mp-no-such-user"})


def wrong_key(ctx: Ctx) -> Case:
    stranger = generate_key(ctx.tmp / "stranger_key")
    return _no_link({"src": str(ctx.small_src()), "dest": f"{ctx.remote}/out.txt"},
                    ["authentication to", "failed", f"key {stranger}", "ansible_ssh_private_key_file"],
                    hostvars={"ansible_ssh_private_key_file": str(stranger)})


def missing_key_file(ctx: Ctx) -> Case:
    return _no_link({"src": str(ctx.small_src()), "dest": f"{ctx.remote}/out.txt"},
                    ["cannot load private key", str(ctx.tmp / "no_such_key")],
                    hostvars={"ansible_ssh_private_key_file": str(ctx.tmp / "no_such_key")})


def wrong_password(ctx: Ctx) -> Case:
    return _no_link({"src": str(ctx.small_src()), "dest": f"{ctx.remote}/out.txt", "verify": "size"},
                    ["authentication to", "failed", "tried: password", "ansible_password"],
                    hostvars={"ansible_ssh_private_key_file": "", "ansible_password": "Wr0ng-Pa55word-Sentinel"},
                    forbidden=["Wr0ng-Pa55word-Sentinel"])


def encrypted_key_without_passphrase(ctx: Ctx) -> Case:
    locked = generate_key(ctx.tmp / "locked_key", passphrase="Key-Pa55phrase-Sentinel")
    return _no_link({"src": str(ctx.small_src()), "dest": f"{ctx.remote}/out.txt"},
                    [f"private key {locked} is encrypted and no passphrase was given",
                     "ansible_private_key_passphrase"],
                    hostvars={"ansible_ssh_private_key_file": str(locked)})


def encrypted_key_wrong_passphrase(ctx: Ctx) -> Case:
    locked = generate_key(ctx.tmp / "locked_key", passphrase="Key-Pa55phrase-Sentinel")
    return _no_link({"src": str(ctx.small_src()), "dest": f"{ctx.remote}/out.txt"},
                    ["cannot load private key", str(locked)],
                    hostvars={"ansible_ssh_private_key_file": str(locked),
                              "ansible_private_key_passphrase": "Wr0ng-Phrase-Sentinel"},
                    forbidden=["Wr0ng-Phrase-Sentinel", "Key-Pa55phrase-Sentinel"])


# Rows whose expected behaviour the engine does not have yet (see docs/reliability.md, "engine gaps").
# strict: the marker has to go as soon as the engine is fixed.
ENGINE_GAPS = {}
if not engine_loads_encrypted_keys():
    ENGINE_GAPS[encrypted_key_without_passphrase] = ("engine: paramiko 5 raises TypeError for an encrypted key without "
                                                     "passphrase; it is not caught and each worker crashes")
    ENGINE_GAPS[encrypted_key_wrong_passphrase] = ("engine: the passphrase is passed to PKey.from_path as str (needs "
                                                   "bytes): TypeError 'password must be bytes', worker crash")

ROWS = [
    src_unreadable_file, src_unreadable_dir, src_socket, src_fifo, src_trailing_slash_on_file, src_invalid_utf8_name,
    src_symlink_loop_dir, src_symlink_loop_self, src_dangling_symlink_followed,
    dest_empty, dest_parent_not_writable, dest_parent_missing_not_creatable, dest_read_only_filesystem,
    dest_directory_where_file_expected, dest_directory_where_file_expected_single, dest_file_where_directory_expected,
    dest_file_where_subdirectory_expected, dest_parent_is_a_file,
    *OPTION_ROWS,
    host_unreachable, wrong_port, wrong_user, wrong_key, missing_key_file, wrong_password,
    encrypted_key_without_passphrase, encrypted_key_wrong_passphrase,
]


@pytest.fixture
def runner(tmp_path, server, collections_root):
    def make(hostvars: dict) -> PlayRunner:
        key = hostvars.pop("ansible_ssh_private_key_file", str(server.client_key))
        line = inventory_line(server.host, server.port, server.user, server.known_hosts,
                              Path(key) if key else None, **hostvars)
        return PlayRunner(tmp_path / "plays", ansible_env(tmp_path, collections_root), line)
    return make


def _unmount(tmp_path: Path) -> None:
    marker = tmp_path / ".umount"
    if marker.exists():
        subprocess.run(["umount", "-l", marker.read_text()], check=False)


def _row(make):
    marks = [pytest.mark.xfail(reason=ENGINE_GAPS[make], strict=True)] if make in ENGINE_GAPS else []
    return pytest.param(make, marks=marks, id=make.__name__.replace("_", "-"))


@pytest.mark.parametrize("make_case", [_row(make) for make in ROWS])
def test_bad_input_fails_clearly_and_writes_nothing(make_case, tmp_path, server, shared_dir, runner):
    case = make_case(Ctx(tmp_path, server, shared_dir))
    try:
        watched = case.watch or tmp_path / "remote"
        before = snapshot(watched)
        outcome = runner(dict(case.hostvars)).run(case.args, prefix=case.prefix, timeout=180)
        assert outcome.rc == case.rc, outcome
        assert outcome.failure is not None, outcome
        for expected in case.messages:
            assert expected.lower() in outcome.msg.lower(), f"{expected!r} missing from the message: {outcome.msg!r}"
        for secret in case.forbidden:
            assert secret not in outcome.stdout + outcome.stderr, f"{secret!r} leaked"
        assert "Traceback" not in outcome.stdout + outcome.stderr, outcome
        assert snapshot(watched) == before
        assert temp_files(watched) == []
    finally:
        _unmount(tmp_path)


# --- inputs that are not errors: exact transfer, never execution ----------------------------------------


HOSTILE_NAMES = [
    "new\nline.txt", "trailing-newline\n", "tab\there", "single'quote", 'double"quote', "both'\"mix",
    "$(cd;touch mp-pwned-dollar)", "`cd;touch mp-pwned-backtick`", "semi;cd;touch mp-pwned-semi", "pipe|cat",
    "amp&&cd&&touch mp-pwned-amp", "-rf", "--help", "-", "--", "*", "?", "[a-z]", "back\\slash", "~tilde",
    "{a,b}", "<in>out", "#hash", "!bang", "%p%n", " leading space", "trailing space ", "...",
    "ünïcödé ファイル", "\u202eevil-rtl.txt", "a" * 200,
]


def _pwned_markers(*places: Path) -> list[str]:
    names = ("mp-pwned-dollar", "mp-pwned-backtick", "mp-pwned-semi", "mp-pwned-amp")
    return [str(place / name) for place in places for name in names if (place / name).exists()]


@pytest.mark.parametrize("verify", ["checksum", "size"])
def test_hostile_names_transfer_exactly_and_nothing_is_executed(tmp_path, server, runner, verify):
    home = Path(os.path.expanduser(f"~{server.user}"))
    places = (home, tmp_path, Path.cwd(), tmp_path / "home")
    assert _pwned_markers(*places) == [], "markers left over from an earlier run: remove them first"
    root = tmp_path / "hostile src $(cd;touch mp-pwned-dollar)"
    for index, name in enumerate(HOSTILE_NAMES):
        (root / "d").mkdir(parents=True, exist_ok=True)
        (root / "d" / name).write_bytes(f"{index}:{name}\n".encode())
    (root / "-dash dir" / "$(x)").mkdir(parents=True)
    random_file(root / "-dash dir" / "$(x)" / "big\n'$(y)'.img", 3 * MIB + 7)
    os.symlink("$(cd;touch mp-pwned-dollar)\n", root / "d" / "link;`x`")
    dest = tmp_path / "remote" / "dest with $(cd;touch mp-pwned-dollar) and 'quotes'\nand newline"
    outcome = runner({}).run({"src": f"{root}/", "dest": str(dest), "chunk_size": "1M", "connections": 3,
                              "verify": verify, "compare": "checksum"})
    assert outcome.rc == 0, outcome
    assert snapshot(dest) == snapshot(root)
    big = dest / "-dash dir" / "$(x)" / "big\n'$(y)'.img"
    assert sha256(big) == sha256(root / "-dash dir" / "$(x)" / "big\n'$(y)'.img")
    assert os.readlink(dest / "d" / "link;`x`") == "$(cd;touch mp-pwned-dollar)\n"
    assert outcome.result["files_sent"] == len(HOSTILE_NAMES) + 1
    again = runner({}).run({"src": f"{root}/", "dest": str(dest), "verify": verify, "compare": "checksum"})
    assert again.rc == 0 and again.result["changed"] is False, again
    assert _pwned_markers(*places) == []
    assert temp_files(dest) == []


def test_special_files_inside_a_tree_are_skipped_with_a_warning(tmp_path, runner):
    root = tmp_path / "tree"
    root.mkdir()
    (root / "a.txt").write_text("a\n")
    os.mkfifo(root / "pipe")
    dest = tmp_path / "remote" / "out"
    outcome = runner({}).run({"src": f"{root}/", "dest": str(dest)})
    assert outcome.rc == 0, outcome
    assert (dest / "a.txt").read_text() == "a\n"
    assert not (dest / "pipe").exists()
    assert any("pipe" in warning and "FIFO" in warning for warning in outcome.result.get("warnings", [])), outcome


def test_symlink_pointing_outside_src_is_copied_as_a_link_or_followed_on_request(tmp_path, runner):
    outside = tmp_path / "outside" / "secret.txt"
    outside.parent.mkdir()
    outside.write_text("outside of src\n")
    root = tmp_path / "tree"
    root.mkdir()
    (root / "a.txt").write_text("a\n")
    os.symlink(str(outside), root / "abs-link")
    os.symlink("../outside/secret.txt", root / "rel-link")

    as_links = tmp_path / "remote" / "links"
    outcome = runner({}).run({"src": f"{root}/", "dest": str(as_links)})
    assert outcome.rc == 0, outcome
    # follow: false (the default) recreates each link with its exact target text; nothing outside src travels.
    assert os.readlink(as_links / "abs-link") == str(outside)
    assert os.readlink(as_links / "rel-link") == "../outside/secret.txt"
    assert outcome.result["files_sent"] == 1 and outcome.result["links_changed"] == 2

    followed = tmp_path / "remote" / "followed"
    outcome = runner({}).run({"src": f"{root}/", "dest": str(followed), "follow": True})
    assert outcome.rc == 0, outcome
    # follow: true pushes what the links point to, as regular files inside dest.
    for name in ("abs-link", "rel-link"):
        assert not (followed / name).is_symlink()
        assert (followed / name).read_text() == "outside of src\n"
    assert outside.read_text() == "outside of src\n"
