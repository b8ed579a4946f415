"""Unit tests for plugins/plugin_utils/_arguments.py: the checks beyond the argument spec and the
options built from them. (The messages are asserted through real playbook runs in test_bad_input.)"""

import dataclasses

import pytest
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator

from ansible_collections.multipush.sftp.plugins.plugin_utils._arguments import (
    ARGUMENT_SPEC, RANGES, PushOptions, check_values, connection_ceiling, push_options,
)
from ansible_collections.multipush.sftp.plugins.plugin_utils._plan import PlanError


def validated(**args) -> dict:
    """The arguments as ActionBase.validate_argument_spec leaves them (defaults filled in, types converted)."""
    result = ArgumentSpecValidator(ARGUMENT_SPEC).validate(dict(dict(src="/src/", dest="/dest"), **args))
    assert not result.error_messages, result.error_messages
    return result.validated_parameters


def test_defaults_pass_and_sizes_are_parsed():
    checked = check_values(validated(chunk_size="16M", request_size="32K"))
    assert (checked["chunk_size"], checked["request_size"]) == (16 * 1024 * 1024, 32 * 1024)
    checked = check_values(validated())
    assert (checked["chunk_size"], checked["request_size"]) == ("auto", None)
    assert check_values(validated(request_size=""))["request_size"] is None


@pytest.mark.parametrize("name", sorted(RANGES))
def test_every_range_has_its_message(name):
    low, high = RANGES[name]
    check_values(validated(**{name: low}))
    check_values(validated(**{name: high}))
    for wrong in (low - 1, high + 1):
        with pytest.raises(PlanError) as failure:
            check_values(validated(**{name: wrong}))
        assert str(failure.value) == f"{name}={wrong} is out of range; use a whole number from {low} to {high}"


@pytest.mark.parametrize("args, message", [
    ({"connections": 0}, "connections=0 is out of range; use 'auto' or a whole number from 1 to 128"),
    ({"connections": "129"}, "connections=129 is out of range; use 'auto' or a whole number from 1 to 128"),
    ({"connections": "many"}, "connections='many' is neither 'auto' nor a whole number; use 'auto'"),
    ({"connections": 2.5}, "connections=2.5 is neither 'auto' nor a whole number"),
    ({"connections": True}, "connections=True is neither 'auto' nor a whole number"),
    ({"progress_interval": -1}, "progress_interval=-1.0 must be 0 (off) or a number of seconds"),
    ({"retry_delay": -0.5}, "retry_delay=-0.5 must not be negative"),
    ({"src": ""}, "src is empty; give the local file or directory to push"),
    ({"dest": ""}, "dest is empty; give the remote path to push to"),
    ({"chunk_size": "lots"}, "chunk_size='lots' is not a size"),
    ({"request_size": "0"}, "request_size='0' must be larger than zero"),
])
def test_refusals(args, message):
    with pytest.raises(PlanError) as failure:
        check_values(validated(**args))
    assert str(failure.value).startswith(message)


@pytest.mark.parametrize("given, expected", [
    ("auto", "auto"), (" AUTO ", "auto"), (8, 8), ("8", 8), (" 16 ", 16), (4.0, 4), (1, 1), (128, 128),
], ids=["auto", "auto-spaced", "int", "text", "text-spaced", "float-whole", "lowest", "highest"])
def test_connections_is_auto_or_a_whole_number(given, expected):
    assert check_values(validated(connections=given))["connections"] == expected


def test_connections_default_to_auto_up_to_max_connections():
    options = push_options(check_values(validated()), src="/abs/src/", check_mode=False, hash_over_ssh=True,
                           python_interpreter=None)
    assert (options.connections, options.max_connections, connection_ceiling(options)) == ("auto", 16, 16)
    fixed = dataclasses.replace(options, connections=3)
    assert connection_ceiling(fixed) == 3  # a number fixes the count, max_connections aside


def test_options_are_built_once_complete_and_frozen():
    options = push_options(check_values(validated(connections=4, exclude=["*.swp"])), src="/abs/src/",
                           check_mode=True, hash_over_ssh=False, python_interpreter="/usr/bin/python3")
    assert (options.src, options.connections, options.exclude) == ("/abs/src/", 4, ["*.swp"])
    assert (options.check_mode, options.hash_over_ssh, options.python_interpreter) == (True, False, "/usr/bin/python3")
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.hash_over_ssh = True
    variant = dataclasses.replace(options, check_mode=False)
    assert variant.check_mode is False and options.check_mode is True


def test_every_option_of_the_spec_reaches_the_options_or_the_connection():
    fields = {field.name for field in dataclasses.fields(PushOptions)}
    # The action gives these to the connection (ConnectionSpec, BecomeSpec), the progress lines or the result file.
    elsewhere = {"timeout", "owner", "group", "sftp_server", "progress_interval", "result_file"}
    assert set(ARGUMENT_SPEC) - elsewhere == fields & set(ARGUMENT_SPEC)
    assert set(ARGUMENT_SPEC) - elsewhere <= fields
    assert fields - set(ARGUMENT_SPEC) == {"check_mode", "hash_over_ssh", "python_interpreter", "run_key"}
