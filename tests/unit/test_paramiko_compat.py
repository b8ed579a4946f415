"""The one door to Paramiko's private API (_paramiko_compat): its import-time check names what a
Paramiko lacks, and its switch (MULTIPUSH_PARAMIKO_PUBLIC=1, or anything missing) sends the write
path and the SFTP start through Paramiko's public API."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from ansible_collections.multipush.sftp.plugins.plugin_utils import _paramiko_compat, _wire

paramiko = pytest.importorskip("paramiko")

PLUGINS = Path(_paramiko_compat.__file__).resolve().parents[1]


def fake_paramiko(version: str = "5.1.0", without: tuple[str, str] | None = None):
    """A stand-in for the paramiko module: the real classes, one private name taken away."""
    module = types.SimpleNamespace(__version__=version)
    classes: dict[str, dict] = {}
    for needs in (_paramiko_compat.FAST_PATH_NEEDS, _paramiko_compat.PIPELINING_NEEDS):
        for class_name, names in needs.items():
            classes.setdefault(class_name, {}).update(
                {name: getattr(getattr(paramiko, class_name), name) for name in names})
    if without is not None:
        del classes[without[0]][without[1]]
    for class_name, attributes in classes.items():
        setattr(module, class_name, type(class_name, (), attributes))
    return module


def test_this_paramiko_passes_the_check():
    use_private, why_public, pipelining_missing = _paramiko_compat.check(paramiko, {})
    assert (use_private, why_public, pipelining_missing) == (True, [], [])


@pytest.mark.parametrize("class_name, name", [("Channel", "_wait_for_send_window"), ("Transport", "_send_message"),
                                              ("Packetizer", "_trigger_rekey"), ("SFTPClient", "_send_version")])
def test_a_missing_fast_path_name_is_reported_by_name_and_switches_to_public(class_name, name):
    use_private, why_public, pipelining_missing = _paramiko_compat.check(fake_paramiko(without=(class_name, name)), {})
    assert use_private is False
    assert why_public == [f"Paramiko lacks {class_name}.{name}"]
    assert pipelining_missing == []


def test_a_missing_pipelining_name_is_reported_by_name():
    _use, _why, pipelining_missing = _paramiko_compat.check(fake_paramiko(without=("SFTPClient", "_request")), {})
    assert pipelining_missing == ["SFTPClient._request"]


def test_pipelining_without_its_private_names_refuses_the_session_naming_them(monkeypatch):
    monkeypatch.setattr(_paramiko_compat, "PIPELINING_MISSING", ["SFTPAttributes._from_msg"])
    with pytest.raises(_paramiko_compat.SessionError, match=r"SFTPAttributes\._from_msg"):
        _paramiko_compat.require_pipelining(types.SimpleNamespace(_lock=None, _expecting={}, request_number=0))
    monkeypatch.setattr(_paramiko_compat, "PIPELINING_MISSING", [])
    with pytest.raises(_paramiko_compat.SessionError, match=r"SFTPClient\._expecting"):
        _paramiko_compat.require_pipelining(types.SimpleNamespace(_lock=None, request_number=0))


@pytest.mark.parametrize("version, supported", [("3.5.1", False), ("4.0.0", True), ("5.1.0", True), ("6.0", False)])
def test_a_paramiko_outside_the_checked_versions_takes_the_public_paths(version, supported):
    use_private, why_public, _missing = _paramiko_compat.check(fake_paramiko(version), {})
    assert use_private is supported
    assert supported or f"Paramiko {version} is outside the range checked" in why_public[0]


@pytest.mark.parametrize("value, public", [("1", True), ("yes", True), ("0", False), ("", False)])
def test_the_environment_switch(value, public):
    use_private, why_public, _missing = _paramiko_compat.check(paramiko, {"MULTIPUSH_PARAMIKO_PUBLIC": value})
    assert use_private is not public
    assert why_public == ([f"MULTIPUSH_PARAMIKO_PUBLIC={value} is set"] if public else [])


def test_the_switch_is_read_at_import():
    code = ("from ansible_collections.multipush.sftp.plugins.plugin_utils import _paramiko_compat as c; "
            "print(c.USE_PRIVATE, c.WHY_PUBLIC)")
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), MULTIPUSH_PARAMIKO_PUBLIC="1")
    out = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False ['MULTIPUSH_PARAMIKO_PUBLIC=1 is set']"


class _RecordingChannel:
    def __init__(self):
        self.sent = []

    def sendall(self, data):
        self.sent.append(bytes(data))

    def __getattr__(self, name):  # anything else (the private paths) must not be reached
        raise AssertionError(f"the public path touched channel.{name}")


def test_switched_off_the_write_path_is_channel_sendall(monkeypatch):
    monkeypatch.setattr(_paramiko_compat, "USE_PRIVATE", False)
    channel = _RecordingChannel()
    _wire.send_channel_data(channel, memoryview(b"a write request"))
    assert channel.sent == [b"a write request"]


def test_switched_off_sftp_starts_with_invoke_subsystem(monkeypatch):
    from ansible_collections.multipush.sftp.plugins.plugin_utils import _sftp_start

    monkeypatch.setattr(_paramiko_compat, "USE_PRIVATE", False)
    calls = []
    channel = types.SimpleNamespace(invoke_subsystem=calls.append)
    assert _sftp_start._sftp_subsystem_channel(None, channel) == (channel, False)
    assert calls == ["sftp"] and not hasattr(channel, "multipush_init_sent")


def _private_paramiko_names() -> set[str]:
    """Every underscore name Paramiko's own source defines or sets on self (methods, attributes)."""
    names = set()
    for path in Path(paramiko.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("_"):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if isinstance(node.value, ast.Name) and node.value.id == "self":
                    names.add(node.attr)
    return {name for name in names if not (name.startswith("__") and name.endswith("__"))}


def test_paramikos_private_names_appear_in_the_door_only():
    """No module of the collection but _paramiko_compat reads or calls a private name of Paramiko on
    an object other than its own (self; os._exit is the standard library's), defines one of
    Paramiko's private callbacks, or names a name-mangled Packetizer attribute."""
    private = _private_paramiko_names()
    found = []
    for path in sorted(PLUGINS.rglob("*.py")):
        if path.name == "_paramiko_compat.py":
            continue
        text = path.read_text(encoding="utf-8")
        if "_Packetizer__" in text:
            found.append(f"{path.name}: _Packetizer__")
        for node in ast.walk(ast.parse(text)):
            if (isinstance(node, ast.Attribute) and node.attr in private
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls", "os", "sys"))):
                found.append(f"{path.name}:{node.lineno}: .{node.attr}")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in private \
                    and node.name in {"_async_response", "_send_version", "_async_request", "_read_packet"}:
                found.append(f"{path.name}:{node.lineno}: def {node.name}")
    assert found == []
