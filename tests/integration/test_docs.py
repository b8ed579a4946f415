"""The documentation users read with ansible-doc: it renders, it is complete, and it matches the code.

Runs ansible-doc against the collection the tests use (the installed one under ./dev test). The
push action's options are documented in plugins/modules/push.py but validated (by the action, with
Ansible's validator) against ARGUMENT_SPEC in plugins/plugin_utils/_arguments.py, the one spec of the
push, which ansible-test's validate-modules cannot compare: this file does, so the two cannot drift
apart. The verify module's argument spec is captured the way validate-modules does
it (AnsibleModule replaced by a recorder), and the role's argument_specs are compared with its
defaults/main.yml.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent
MODULES = ("multipush.sftp.push", "multipush.sftp.verify")
ROLE = "multipush.sftp.sshd_tuning"


def ansible_doc(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ansible-doc"), *args], env=env, capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL, check=False,
    )


def doc_json(env: dict, *args: str) -> dict:
    completed = ansible_doc(env, "--json", *args)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


@pytest.fixture
def doc_env(ansible_env: dict) -> dict:
    return dict(ansible_env, ANSIBLE_NOCOLOR="1", COLUMNS="200", ANSIBLE_DEPRECATION_WARNINGS="1")


# -- what a user sees -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODULES)
def test_module_page_renders_options_examples_and_return_values(doc_env, name):
    completed = ansible_doc(doc_env, name)
    assert completed.returncode == 0, completed.stderr
    assert "WARNING" not in completed.stderr and "ERROR" not in completed.stderr, completed.stderr
    page = completed.stdout
    for heading in ("OPTIONS", "ATTRIBUTES", "EXAMPLES", "RETURN VALUES"):
        assert f"\n{heading}" in page, f"{name}: no {heading} section in ansible-doc's page"
    doc = doc_json(doc_env, name)[name]["doc"]
    for option in doc["options"]:
        assert f" {option} " in page or f" {option}\n" in page, f"{name}: option {option} not rendered"


def test_collection_lists_its_modules_and_role(doc_env):
    listed = doc_json(doc_env, "--list", "multipush.sftp")
    assert set(MODULES) <= set(listed), listed
    roles = ansible_doc(doc_env, "-t", "role", "--list", "multipush.sftp")
    assert roles.returncode == 0, roles.stderr
    assert ROLE in roles.stdout


def test_role_page_renders_every_variable(doc_env):
    completed = ansible_doc(doc_env, "-t", "role", ROLE)
    assert completed.returncode == 0, completed.stderr
    assert "WARNING" not in completed.stderr and "ERROR" not in completed.stderr, completed.stderr
    options = role_options(doc_env)
    assert options, "the role documents no variables"
    for option in options:
        assert option in completed.stdout, f"{ROLE}: variable {option} not rendered"


# -- completeness -----------------------------------------------------------------------------------


def walk_options(options: dict, prefix: str = ""):
    for name, spec in options.items():
        yield prefix + name, spec
        yield from walk_options(spec.get("suboptions") or {}, f"{prefix}{name}.")


def assert_complete_options(options: dict, where: str) -> None:
    problems = []
    for name, spec in walk_options(options):
        if not spec.get("type"):
            problems.append(f"{where}: option {name} has no type")
        description = spec.get("description")
        if isinstance(description, str):
            description = [description]
        if not description or not all(isinstance(line, str) and line.strip() for line in description):
            problems.append(f"{where}: option {name} has no description")
        if spec.get("type") == "list" and not spec.get("elements"):
            problems.append(f"{where}: list option {name} has no elements")
        if "default" in spec and spec.get("required"):
            problems.append(f"{where}: option {name} is required and has a default")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", MODULES)
def test_every_option_and_return_value_is_complete(doc_env, name):
    entry = doc_json(doc_env, name)[name]
    doc = entry["doc"]
    assert doc["short_description"] and doc["description"] and doc["version_added"] == "0.1.0"
    assert_complete_options(doc["options"], name)
    returns = entry["return"]
    assert returns, f"{name}: no RETURN documentation"
    problems = []
    for key, spec in returns.items():
        for field in ("description", "type", "returned"):
            if not spec.get(field):
                problems.append(f"{name}: return value {key} has no {field}")
        for sub, subspec in (spec.get("contains") or {}).items():
            for field in ("description", "type"):
                if not subspec.get(field):
                    problems.append(f"{name}: return value {key}.{sub} has no {field}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", MODULES)
def test_examples_are_named_fqcn_tasks(doc_env, name):
    examples = yaml.safe_load(doc_json(doc_env, name)[name]["examples"])
    assert isinstance(examples, list) and examples, f"{name}: EXAMPLES is not a list of tasks"
    uses = 0
    for task in examples:
        assert task.get("name"), f"{name}: an example task has no name: {task}"
        modules = [key for key in task if "." in key]
        assert len(modules) == 1, f"{name}: example {task['name']!r} does not use one FQCN module: {list(task)}"
        uses += modules[0] == name
    assert uses, f"{name}: no example uses {name}"


def role_options(env: dict) -> dict:
    entry = doc_json(env, "-t", "role", ROLE)[ROLE]
    return entry["entry_points"]["main"]["options"]


def test_role_variables_are_complete(doc_env):
    assert_complete_options(role_options(doc_env), ROLE)


# -- docs and code agree ----------------------------------------------------------------------------


def normalized(spec: dict) -> dict:
    """The parts of an option that the argument spec and the documentation must agree on."""
    choices = spec.get("choices")
    return {
        "type": spec.get("type", "str"),
        "required": bool(spec.get("required", False)),
        "default": spec.get("default"),
        "choices": sorted(choices) if choices is not None else None,
        "elements": spec.get("elements"),
    }


def drift(documented: dict, argument_spec: dict, where: str) -> list[str]:
    problems = []
    for name in sorted(set(documented) - set(argument_spec)):
        problems.append(f"{where}: option {name} is documented but the code does not accept it")
    for name in sorted(set(argument_spec) - set(documented)):
        problems.append(f"{where}: option {name} is accepted by the code but not documented")
    for name in sorted(set(documented) & set(argument_spec)):
        doc, code = normalized(documented[name]), normalized(argument_spec[name])
        for field in ("type", "required", "default", "choices", "elements"):
            if doc[field] != code[field]:
                problems.append(f"{where}: option {name}: documented {field} {doc[field]!r}, code {code[field]!r}")
        suboptions = documented[name].get("suboptions") or {}, argument_spec[name].get("options") or {}
        if any(suboptions):
            problems.extend(drift(*suboptions, f"{where} {name}"))
    return problems


def test_push_documentation_matches_the_action_argument_spec(doc_env):
    from ansible_collections.multipush.sftp.plugins.action import push
    from ansible_collections.multipush.sftp.plugins.plugin_utils._arguments import (
        ARGUMENT_SPEC, NOT_EMPTY, NOT_NEGATIVE, RANGES, SIZES,
    )

    documented = doc_json(doc_env, "multipush.sftp.push")["multipush.sftp.push"]["doc"]["options"]
    problems = drift(documented, ARGUMENT_SPEC, "multipush.sftp.push")
    assert not problems, "\n".join(problems)
    # The action validates with that spec and accepts nothing else.
    assert push.ARGUMENT_SPEC is ARGUMENT_SPEC
    assert push.ActionModule._VALID_ARGS == frozenset(documented)
    # The checks beyond the spec name options of the spec, of the types they check.
    for name in RANGES:
        assert ARGUMENT_SPEC[name]["type"] == "int", name
    for name in NOT_NEGATIVE:
        assert ARGUMENT_SPEC[name]["type"] == "float", name
    for name in (*SIZES, *NOT_EMPTY):
        assert ARGUMENT_SPEC[name]["type"] == "str", name


class _Captured(Exception):
    def __init__(self, kwargs: dict):
        super().__init__("argument spec captured")
        self.kwargs = kwargs


def test_verify_documentation_matches_the_module_argument_spec(doc_env, monkeypatch):
    from ansible_collections.multipush.sftp.plugins.modules import verify

    def recorder(*args, **kwargs):
        raise _Captured(kwargs)

    monkeypatch.setattr(verify, "AnsibleModule", recorder)
    with pytest.raises(_Captured) as captured:
        verify.main()
    argument_spec = captured.value.kwargs["argument_spec"]
    documented = doc_json(doc_env, "multipush.sftp.verify")["multipush.sftp.verify"]["doc"]["options"]
    problems = drift(documented, argument_spec, "multipush.sftp.verify")
    assert not problems, "\n".join(problems)
    assert captured.value.kwargs.get("supports_check_mode") is True


def test_role_documentation_matches_its_defaults(doc_env, collections_root):
    role = collections_root / "ansible_collections" / "multipush" / "sftp" / "roles" / "sshd_tuning"
    defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text()) or {}
    options = role_options(doc_env)
    problems = []
    for name in sorted(set(defaults) - set(options)):
        problems.append(f"{ROLE}: defaults/main.yml sets {name}, which meta/argument_specs.yml does not document")
    for name in sorted(set(options) & set(defaults)):
        documented = options[name].get("default")
        if documented != defaults[name]:
            problems.append(f"{ROLE}: {name}: documented default {documented!r}, defaults/main.yml {defaults[name]!r}")
    for name in sorted(set(options) - set(defaults)):
        if not options[name].get("required") and options[name].get("default") is not None:
            problems.append(f"{ROLE}: {name} has a documented default but no value in defaults/main.yml")
    assert not problems, "\n".join(problems)


def test_drift_check_notices_a_difference():
    """The comparison itself: a changed default, an extra option and a missing one are all reported."""
    code = {"a": {"type": "int", "default": 8}, "b": {"type": "str"}}
    docs = {"a": {"type": "int", "default": 4, "description": "x"}, "c": {"type": "str", "description": "y"}}
    problems = drift(docs, code, "m")
    assert problems == [
        "m: option c is documented but the code does not accept it",
        "m: option b is accepted by the code but not documented",
        "m: option a: documented default 4, code 8",
    ]
    assert drift({"a": {"type": "int", "default": 8}}, {"a": {"type": "int", "default": 8}}, "m") == []


# -- docs/troubleshooting.md quotes messages the code still writes -----------------------------------

# Texts in the quoted messages that come from the operating system or from Ansible, not from our code.
EXTERNAL_TEXTS = ("Permission denied", "The module interpreter '/usr/bin/python3' was not found.")


def code_strings(collection: Path) -> list[str]:
    """Every string literal of the plugins; the placeholders of f-strings become NUL."""
    texts = []
    for path in (collection / "plugins").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr):
                texts.append("".join(v.value if isinstance(v, ast.Constant) else "\0" for v in node.values))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                texts.append(node.value)
    return texts


def quoted_messages(markdown: str) -> list[str]:
    """The code spans of the message column (the second) of the tables."""
    spans = []
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and len(cells) == 3 and cells[1] != "message":
            spans.extend(re.findall(r"`([^`]+)`", cells[1]))
    return spans


def missing_pieces(spans: list[str], texts: list[str]) -> list[str]:
    missing = []
    for span in spans:
        for external in EXTERNAL_TEXTS:
            span = span.replace(external, "…")
        for piece in span.split("…"):
            piece = piece.strip(" '\":;,.()")
            if len(piece) >= 10 and not any(piece in text for text in texts):
                missing.append(piece)
    return missing


def test_troubleshooting_quotes_messages_the_code_still_writes(collections_root):
    collection = collections_root / "ansible_collections" / "multipush" / "sftp"
    spans = quoted_messages((collection / "docs" / "troubleshooting.md").read_text())
    assert len(spans) >= 20, spans
    missing = missing_pieces(spans, code_strings(collection))
    assert not missing, "docs/troubleshooting.md quotes text no plugin writes any more:\n" + "\n".join(missing)


def test_message_check_notices_a_reworded_message():
    texts = ["host key for \0 is not known (\0); nothing was written."]
    assert missing_pieces(["host key for … is not known (…); nothing was written."], texts) == []
    assert missing_pieces(["host key for … has changed, nothing was written"], texts) == [
        "has changed, nothing was written"]
