# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The arguments of multipush.sftp.push, in one place: the argument spec, the ranges of the
numbers, the parsing of sizes, and the options of a push that come out of them.

The action plugin validates the task's arguments with Ansible's own validator against
ARGUMENT_SPEC (ActionBase.validate_argument_spec), then `check_values` checks what the spec
cannot say (ranges, sizes, empty paths) and `push_options` builds the PushOptions once, complete.
tests/integration/test_docs.py compares ARGUMENT_SPEC with the DOCUMENTATION of
plugins/modules/push.py, so the two cannot drift apart.

Controller only (plugin_utils): the verify module on the target has its own, smaller spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ansible_collections.multipush.sftp.plugins.module_utils._digest import ALGORITHMS
from ansible_collections.multipush.sftp.plugins.plugin_utils._bandwidth import parse_rate
from ansible_collections.multipush.sftp.plugins.plugin_utils._plan import PlanError, parse_size

MAX_CONNECTIONS = 128
AUTO = "auto"

ARGUMENT_SPEC = dict(
    src=dict(type="str", required=True),
    dest=dict(type="str", required=True),
    # "auto" or a whole number: raw, so that a number given as a number or as text (-e) both pass
    connections=dict(type="raw", default=AUTO),
    max_connections=dict(type="int", default=16),
    chunk_size=dict(type="str", default="auto"),
    max_concurrent_handshakes=dict(type="int", default=8),
    exclude=dict(type="list", elements="str", default=[]),
    follow=dict(type="bool", default=False),
    compare=dict(type="str", choices=["size_mtime", "checksum"], default="size_mtime"),
    force=dict(type="bool", default=True),
    verify=dict(type="str", choices=["none", "size", "checksum"], default="checksum"),
    checksum_algorithm=dict(type="str", choices=list(ALGORITHMS), default="crc32"),
    whole_checksum=dict(type="bool", default=False),
    retries=dict(type="int", default=5),
    retry_delay=dict(type="float", default=1.0),
    timeout=dict(type="int", default=30),
    request_size=dict(type="str"),
    temp_max_age=dict(type="int", default=86400),
    progress_interval=dict(type="float", default=5.0),
    owner=dict(type="str"),
    group=dict(type="str"),
    sftp_server=dict(type="str"),
    result_file=dict(type="path"),
    # text: "100M" (bytes per second) or "800Mbit"; parsed by _bandwidth.parse_rate
    bandwidth_limit=dict(type="str"),
    total_bandwidth_limit=dict(type="str"),
    fanout=dict(type="bool", default=False),
    fanout_per_source=dict(type="int", default=2),
    fanout_group=dict(type="str"),
)

# Whole numbers: name -> (lowest, highest) accepted.
RANGES = {
    "max_connections": (1, MAX_CONNECTIONS),
    "max_concurrent_handshakes": (1, MAX_CONNECTIONS),
    "retries": (0, 100),
    "timeout": (1, 3600),
    "temp_max_age": (0, 10**9),
    "fanout_per_source": (1, 64),
}
# Rates (parse_rate: 100M, 800Mbit or bytes per second): None or empty is no limit.
RATES = ("bandwidth_limit", "total_bandwidth_limit")
# Numbers of seconds that must not be negative: name -> what the message says of them.
NOT_NEGATIVE = {
    "progress_interval": "must be 0 (off) or a number of seconds",
    "retry_delay": "must not be negative",
}
# Sizes (parse_size: 64K, 16M, 1G or bytes): name -> the value left as it is ("auto": the push decides).
SIZES = {
    "chunk_size": "auto",
    "request_size": None,  # also when empty: the server's limit
}
# Paths that must not be empty: name -> what to give instead.
NOT_EMPTY = {
    "src": "give the local file or directory to push",
    "dest": "give the remote path to push to",
}


@dataclass(frozen=True)
class PushOptions:
    """What one push is asked to do, complete before it starts (the action builds it once)."""

    src: str
    dest: str
    connections: int | str = AUTO  # a fixed count, or AUTO: grown while it pays (see _pool_growth)
    max_connections: int = 16  # the ceiling of AUTO
    chunk_size: object = "auto"
    max_concurrent_handshakes: int = 8
    exclude: list = field(default_factory=list)
    follow: bool = False
    compare: str = "size_mtime"
    force: bool = True
    verify: str = "checksum"
    checksum_algorithm: str = "crc32"
    whole_checksum: bool = False  # the standard digest of chunked files too (one more local pass)
    retries: int = 5
    retry_delay: float = 1.0
    request_size: int | None = None
    temp_max_age: int = 86400
    check_mode: bool = False
    # Hash on the target over a connection of the push's own (see _remote_hash); False: always the module.
    hash_over_ssh: bool = True
    python_interpreter: str | None = None
    bandwidth_limit: float | None = None  # bytes per second for this host's push, all its connections
    total_bandwidth_limit: float | None = None  # bytes per second the controller sends for the task, all hosts
    fanout: bool = False
    fanout_per_source: int = 2
    fanout_group: str | None = None
    # This task in this ansible-playbook run, the same for all its hosts: the key of what they share
    # on the controller (the total bandwidth budget, the fan-out ledger). Empty: nothing shared.
    run_key: str = ""


def check_values(args: dict) -> dict:
    """Check what the argument spec cannot express, in `args` as Ansible's validation left them.
    Returns a copy of `args` with the sizes parsed (chunk_size "auto" or bytes, request_size bytes
    or None). Raises PlanError with the message the user sees."""
    for name, remedy in NOT_EMPTY.items():
        if not args[name]:
            raise PlanError(f"{name} is empty; {remedy}")
    for name, (low, high) in RANGES.items():
        if not low <= args[name] <= high:
            raise PlanError(f"{name}={args[name]} is out of range; use a whole number from {low} to {high}")
    for name, rule in NOT_NEGATIVE.items():
        if args[name] < 0:
            raise PlanError(f"{name}={args[name]} {rule}")
    checked = dict(args)
    checked["connections"] = _connections(args["connections"])
    for name, kept in SIZES.items():
        value = args[name]
        if value != kept and not (kept is None and not value):
            checked[name] = parse_size(value, name)
        else:
            checked[name] = kept
    for name in RATES:
        checked[name] = parse_rate(args[name], name)
    return checked


def _connections(value) -> int | str:
    """connections: "auto", or a whole number in range (a number given with -e arrives as text)."""
    low, high = 1, MAX_CONNECTIONS
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        number = int(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise PlanError(f"connections={value!r} is neither 'auto' nor a whole number; use 'auto' (the push "
                        f"finds the count) or a whole number from {low} to {high}") from None
    if not low <= number <= high:
        raise PlanError(f"connections={value} is out of range; use 'auto' or a whole number from {low} to {high}")
    return number


def connection_ceiling(options: "PushOptions") -> int:
    """The most connections the push may open: the fixed count, or max_connections with auto."""
    return options.max_connections if options.connections == AUTO else options.connections


def push_options(checked: dict, *, src: str, check_mode: bool, hash_over_ssh: bool,
                 python_interpreter: str | None, run_key: str = "") -> PushOptions:
    """The options of the push from the arguments `check_values` returned, with what the action
    knows besides: src as found on the controller, check mode and how the target can hash."""
    return PushOptions(
        src=src, dest=checked["dest"], connections=checked["connections"],
        max_connections=checked["max_connections"], chunk_size=checked["chunk_size"],
        max_concurrent_handshakes=checked["max_concurrent_handshakes"], exclude=list(checked["exclude"]),
        follow=checked["follow"], compare=checked["compare"], force=checked["force"], verify=checked["verify"],
        checksum_algorithm=checked["checksum_algorithm"], whole_checksum=checked["whole_checksum"],
        retries=checked["retries"], retry_delay=checked["retry_delay"], request_size=checked["request_size"],
        temp_max_age=checked["temp_max_age"], check_mode=check_mode, hash_over_ssh=hash_over_ssh,
        python_interpreter=python_interpreter, bandwidth_limit=checked["bandwidth_limit"],
        total_bandwidth_limit=checked["total_bandwidth_limit"], fanout=checked["fanout"],
        fanout_per_source=checked["fanout_per_source"], fanout_group=checked["fanout_group"] or None,
        run_key=run_key,
    )
