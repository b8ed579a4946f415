# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Action plugin for multipush.sftp.push: Ansible glue only.

Validates the arguments with Ansible's validator against the one spec in
plugin_utils/_arguments.py, reads the host's connection settings the way the ssh connection
plugin names them, and runs the push from plugin_utils. It also hands the push a way to hash
files on the target with the multipush.sftp.verify module over Ansible's own connection: the
fallback when the push's own hashing service cannot run there (become, no python3 it can start).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import contextlib
import dataclasses
import functools
import json
import os
import tempfile

from ansible import constants as C
from ansible.errors import AnsibleActionFail, AnsibleError
from ansible.module_utils.common.text.converters import to_text
from ansible.plugins.action import ActionBase
from ansible.plugins.loader import connection_loader
from ansible.utils.display import Display

from ansible_collections.multipush.sftp.plugins.plugin_utils._arguments import (
    ARGUMENT_SPEC, check_values, push_options,
)
from ansible_collections.multipush.sftp.plugins.plugin_utils._engine import EngineError
from ansible_collections.multipush.sftp.plugins.plugin_utils._fanout import Fanout, parse_peer_address
from ansible_collections.multipush.sftp.plugins.plugin_utils._fanout_ledger import Ledger
from ansible_collections.multipush.sftp.plugins.plugin_utils._plan import PlanError
from ansible_collections.multipush.sftp.plugins.plugin_utils._progress import Progress, human_bytes
from ansible_collections.multipush.sftp.plugins.plugin_utils._push import Push
from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import (
    BecomeSpec, ConnectionSpec, SessionError, require_paramiko,
)
from ansible_collections.multipush.sftp.plugins.plugin_utils._sshconfig import resolve_spec

display = Display()


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _VALID_ARGS = frozenset(ARGUMENT_SPEC)

    def run(self, tmp=None, task_vars=None):
        task_vars = task_vars or {}
        result = super().run(tmp, task_vars)
        del tmp
        # Kept outside the push's result: a failed push keeps the warnings it gave on the way.
        warnings: list[str] = []
        # The raw value first: a pipeline needs its result file also when the arguments are wrong
        # (the only value read before validation; everything else comes from the validated args).
        result_file = self._task.args.get("result_file")
        try:
            _validation, args = self.validate_argument_spec(argument_spec=ARGUMENT_SPEC)
            result_file = args["result_file"]
            result.update(self._push(args, task_vars, warnings))
        except AnsibleActionFail as exc:  # an argument Ansible's validation refused
            result.update(exc.result)
            result.update(failed=True, changed=False, msg=f"{self._host_label(task_vars)}: {to_text(exc.message)}")
        except EngineError as exc:
            if exc.unreachable:  # as the ssh connection plugin reports a host it cannot log in to
                result.update(unreachable=True, changed=False, msg=f"{self._host_label(task_vars)}: {exc}")
            else:
                result.update(failed=True, changed=False, msg=f"{self._host_label(task_vars)}: {exc}")
        except (PlanError, SessionError) as exc:
            result.update(failed=True, changed=False, msg=f"{self._host_label(task_vars)}: {exc}")
        except AnsibleError as exc:  # a src Ansible cannot find, a value that does not template
            result.update(failed=True, changed=False, msg=f"{self._host_label(task_vars)}: {to_text(exc.message)}")
        finally:
            self._remove_tmp_path(self._connection._shell.tmpdir)
        if warnings:
            result["warnings"] = list(result.get("warnings") or []) + warnings
        if isinstance(result_file, str) and result_file:
            self._write_result_file(os.path.expanduser(result_file), result)
        return result

    def _push(self, args: dict, task_vars: dict, warnings: list) -> dict:
        checked = check_values(args)
        src = self._find_src(checked["src"])
        spec = self._connection_spec(task_vars, checked)
        require_paramiko()
        options = push_options(
            checked, src=src, check_mode=bool(self._task.check_mode),
            # With become, files may be readable only by the become user: the module's become handles that.
            hash_over_ssh=spec.become is None,
            python_interpreter=self._python_interpreter(task_vars),
            run_key=self._run_key(),
        )
        progress = Progress(task_vars.get("inventory_hostname", spec.host), checked["progress_interval"],
                            self._emit_progress)
        feed = self._fanout(options, spec, task_vars, warnings, progress) if options.fanout and not options.check_mode \
            else None
        push = Push(options, spec, self._remote_digests_runner(task_vars), warnings.append, progress, feed=feed)
        try:
            outcome = push.run()
        except BaseException:
            if feed is not None:
                feed.finish(False)
            raise
        if feed is not None:
            feed.finish(True)
        if options.check_mode:  # a real push ends with the same line, from the push itself
            progress.finish(outcome)
        if self._task.diff:
            outcome["diff"] = self._diff(outcome)
        return outcome

    def _run_key(self) -> str:
        """This task in this ansible-playbook run: the same for every host's worker (forked from one
        ansible-playbook process, which is their parent), different in the next run."""
        return f"{os.getppid()}-{self._task._uuid}"

    @staticmethod
    def _write_result_file(path: str, result: dict) -> None:
        """The task's result as JSON on the controller, put in place atomically: a pipeline reading
        it never sees half a file. A failure to write it fails the task, naming the path."""
        path = os.path.abspath(path)
        directory = os.path.dirname(path)
        try:
            os.makedirs(directory, exist_ok=True)
            handle, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
            try:
                with os.fdopen(handle, "w") as stream:
                    json.dump(result, stream, indent=2, sort_keys=True, default=str)
                    stream.write("\n")
                os.chmod(temp, 0o644)
                os.replace(temp, path)
            except BaseException:
                os.unlink(temp)
                raise
        except OSError as exc:
            result.update(failed=True, msg=f"{result.get('msg') + '; ' if result.get('msg') else ''}could not write "
                                           f"result_file {path!r} on the controller: {exc.strerror or exc}; "
                                           "choose a writable path")

    @staticmethod
    def _emit_progress(text: str, verbosity: int) -> None:
        # Display calls from the action reach the terminal while the task still runs: the
        # worker forwards them to the main process.
        if verbosity == 0:
            display.display(text)
        else:
            display.v(text)

    # -- arguments -----------------------------------------------------------------------------

    def _find_src(self, src: str) -> str:
        """src as the push reads it: a relative path is looked up in the role's or playbook's files/,
        like ansible.builtin.copy, keeping rsync's trailing slash. (The collection's playbook
        multipush.sftp.push passes a relative -e src as an absolute path under the directory
        ansible-playbook runs in: a command-line user means that one.)"""
        if os.path.isabs(os.path.expanduser(src)):
            return src
        trailing = src.endswith("/")
        try:
            found = self._find_needle("files", src.rstrip("/") or src)
        except AnsibleError as exc:
            searched = list(dict.fromkeys(str(path) for path in getattr(exc, "paths", None) or []))
            raise PlanError(
                f"src {src!r} was not found on the controller: a relative src is looked up in the files/ "
                "directory of the role and of the playbook, as with ansible.builtin.copy"
                + (f" (searched {', '.join(searched)})" if searched else "")
                + "; give an absolute path, or put it in files/") from None
        return found.rstrip("/") + "/" if trailing else found

    # -- connection settings -------------------------------------------------------------------

    @staticmethod
    def _option(connection, name: str, default=None):
        """A connection plugin's option, `default` when it has none or it is unset."""
        try:
            value = connection.get_option(name)
        except KeyError:
            return default
        return default if value is None else value

    def _spec_through(self, connection, address: str, user: str | None, timeout: float,
                      become: BecomeSpec | None) -> ConnectionSpec:
        """The connection as Ansible's ssh connection plugin `connection` would make it: its options
        first (they come first on ssh's command line), then ssh_args/ssh_common_args/ssh_extra_args,
        then the ssh config files (`-F file`, else ~/.ssh/config and /etc/ssh/ssh_config)."""
        option = functools.partial(self._option, connection)
        return resolve_spec(
            to_text(address),
            ssh_args=tuple(option(name, "") for name in ("ssh_args", "ssh_common_args", "ssh_extra_args")),
            port=option("port"),
            user=user,
            password=option("password"),
            private_key_file=option("private_key_file"),
            private_key=option("private_key"),
            key_passphrase=option("private_key_passphrase"),
            host_key_checking=bool(option("host_key_checking", True)),
            timeout=timeout,
            become=become,
        )

    def _connection_spec(self, task_vars: dict, args: dict) -> ConnectionSpec:
        """This host's connection, as Ansible's ssh connection plugin would make it (_spec_through)."""
        if self._connection.transport == "local":
            raise PlanError("this host uses the local connection; multipush.sftp.push pushes over SSH. Give the "
                            "host an ansible_host reachable by SSH (ansible_connection=ssh)")
        spec = self._spec_through(self._connection, self._get_remote_addr(task_vars), self._get_remote_user(),
                                  float(args["timeout"]), self._become_spec(args["sftp_server"]))
        return dataclasses.replace(spec, owner=args["owner"] or None, group=args["group"] or None)

    def _become_spec(self, sftp_server: str | None) -> BecomeSpec | None:
        """become: sftp-server runs as the become user through sudo, so files are theirs."""
        become = getattr(self._connection, "become", None)
        if become is None or not self._play_context.become:
            return None
        if become.name not in ("sudo", "ansible.builtin.sudo"):
            raise PlanError(f"become_method {become.name} is not supported by multipush.sftp.push: files are written "
                            "by sftp-server started through sudo. Use become_method: sudo, or push without become "
                            "and fix ownership afterwards")
        return BecomeSpec(
            user=self.get_become_option("become_user") or "root",
            password=self.get_become_option("become_pass"),
            exe=self.get_become_option("become_exe") or "sudo",
            sftp_server=sftp_server or None,
        )

    def _python_interpreter(self, task_vars: dict) -> str | None:
        """The host's Python for hashing on the target: ansible_python_interpreter when it names a
        program (not auto discovery), else what discovery found earlier, else None (try the usual ones)."""
        for value in (task_vars.get("ansible_python_interpreter"),
                      task_vars.get("ansible_facts", {}).get("discovered_interpreter_python")):
            if isinstance(value, str) and value and not value.startswith("auto") and "{" not in value:
                try:
                    return to_text(self._templar.template(value))
                except Exception:  # a value that does not render is left to the module path
                    return None
        return None

    @staticmethod
    def _host_label(task_vars: dict) -> str:
        return f"push to {task_vars.get('inventory_hostname', 'host')}"

    # -- fan-out ---------------------------------------------------------------------------------

    def _fanout(self, options, spec: ConnectionSpec, task_vars: dict, warnings: list, progress: Progress) -> Fanout:
        host = task_vars.get("inventory_hostname", spec.host)
        try:
            peer_address = parse_peer_address(task_vars.get("multipush_peer_address"), spec.host, spec.port)
        except ValueError as exc:
            raise PlanError(f"{exc}; set the host variable multipush_peer_address of {host} to the address other "
                            "hosts reach it at, or leave it unset for its ansible_host") from None
        try:
            ledger = Ledger(options.run_key)
        except OSError as exc:
            raise PlanError(f"fanout: cannot keep the fan-out's ledger on the controller: {exc}") from None
        return Fanout(ledger, host, options.fanout_group, options.fanout_per_source,
                      lambda name: self._peer_spec(name, task_vars, spec.timeout), spec, peer_address,
                      warnings.append, lambda text: progress.emit(f"{host}: {text}", 0),
                      bandwidth_limit=options.bandwidth_limit, timeout=spec.timeout,
                      progress_interval=progress.interval)

    def _peer_spec(self, name: str, task_vars: dict, timeout: float) -> ConnectionSpec:
        """How the controller logs in to another host of the play (a source of a fan-out): that host's
        variables through a connection plugin of the same kind, as Ansible would connect to it."""
        hostvars = task_vars.get("hostvars") or {}
        if name not in hostvars:
            raise ValueError(f"{name} is not a host of this play")
        variables = hostvars[name]
        connection = connection_loader.get(self._connection._load_name, self._play_context)
        var_options = {"inventory_hostname": name}
        for variable in C.config.get_plugin_vars("connection", self._connection._load_name):
            if variable in variables:
                var_options[variable] = variables[variable]
        connection.set_options(task_keys=self._task.dump_attrs(), var_options=var_options)
        address = variables.get("ansible_host") or variables.get("ansible_ssh_host") or name
        spec = self._spec_through(connection, address, self._option(connection, "remote_user"), timeout, None)
        return dataclasses.replace(spec, alias=name)  # messages name the peer as the inventory does

    # -- remote hashing ------------------------------------------------------------------------

    def _remote_digests_runner(self, task_vars: dict):
        def remote_digests(requests: list, algorithm: str, whole: bool = True) -> list:
            try:
                with self._pipelined():
                    outcome = self._execute_module(
                        module_name="multipush.sftp.verify",
                        module_args={"files": requests, "checksum_algorithm": algorithm, "get_checksum": whole},
                        task_vars=task_vars,
                    )
            except AnsibleError as exc:
                # Ansible's connection could not run it (an SFTP-only account, no Python): the push,
                # which did reach the host, checks over SFTP instead. Never an unreachable host.
                raise EngineError(f"running multipush.sftp.verify on the target failed: {to_text(exc.message)}",
                                  ) from None
            if outcome.get("unreachable") or outcome.get("failed"):
                raise EngineError(f"hashing on the target with multipush.sftp.verify failed: "
                                  f"{outcome.get('msg') or outcome.get('module_stderr') or outcome}")
            return outcome["files"]

        return remote_digests

    @contextlib.contextmanager
    def _pipelined(self):
        """Run our hashing calls with pipelining: one SSH exec instead of five per call.

        The verify module is a plain new-style module, the case pipelining was made for; the
        become plugin still vetoes it where it cannot work (sudo with requiretty).
        """
        try:
            before = self._connection.get_option("pipelining")
        except KeyError:
            yield
            return
        self._connection.set_option("pipelining", True)
        try:
            yield
        finally:
            self._connection.set_option("pipelining", before)

    @staticmethod
    def _diff(outcome: dict) -> dict:
        # + added, ~ changed; files with why and their size, symlinks with their target
        lines = [f"{'+' if item['reason'] == 'new' else '~'} {item['dest']} "
                 f"({item['reason']}, {human_bytes(item['size'])})"
                 for item in outcome["files"] if item["status"] != "skipped"]
        for link in outcome.get("links") or []:
            if link["status"] != "unchanged":
                new = link["status"] in ("created", "would_create")
                lines.append(f"{'+' if new else '~'} {link['dest']} -> {link['target']} "
                             f"({'new link' if new else 'link target'})")
        return {"prepared": "\n".join(lines) + ("\n" if lines else "")}
