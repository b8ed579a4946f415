"""The fan-out ledger's policy (pure) and its shared file (real processes, real locks)."""

from __future__ import annotations

import multiprocessing
import os
from types import SimpleNamespace

import pytest

from ansible_collections.multipush.sftp.plugins.plugin_utils._fanout import Fanout, parse_peer_address
from ansible_collections.multipush.sftp.plugins.plugin_utils._fanout_ledger import (
    CONTROLLER, DONE, FAILED, HOLDING, RECEIVING, WAITING, Ledger, choose_source, read_copy_map,
)
from tests.support.waiting import wait_until

ME = os.getpid()


def entry(state, group="g", tree="t", feeding=0, done_at=0.0, can_send=None, pid=ME):
    return {"state": state, "group": group, "tree": tree, "feeding": feeding, "done_at": done_at,
            "can_send": can_send, "pid": pid}


def ledger_state(**hosts):
    return {"hosts": hosts, "failed_pairs": {}}


def test_the_first_host_of_a_group_is_seeded_by_the_controller():
    assert choose_source(ledger_state(), "a", "g", "t", 2).source == CONTROLLER


def test_hosts_wait_for_a_copy_on_its_way_instead_of_taking_the_uplink():
    state = ledger_state(a=entry(RECEIVING), b=entry(WAITING))
    choice = choose_source(state, "b", "g", "t", 2)
    assert choice.source is None and "a" in choice.why


def test_a_done_peer_with_a_free_slot_is_taken_least_busy_first():
    state = ledger_state(a=entry(DONE, feeding=1, done_at=1.0), b=entry(DONE, feeding=0, done_at=2.0))
    assert choose_source(state, "c", "g", "t", 2).source == "b"


def test_busy_peers_make_a_host_wait_and_no_wait_sends_it_to_the_controller():
    state = ledger_state(a=entry(DONE, feeding=2))
    assert choose_source(state, "c", "g", "t", 2).source is None
    assert choose_source(state, "c", "g", "t", 2, no_wait=True).source == CONTROLLER


def test_copies_stay_within_their_group_and_their_source_tree():
    state = ledger_state(a=entry(DONE, group="site1"), b=entry(DONE, tree="other"))
    assert choose_source(state, "c", "site2", "t", 2).source == CONTROLLER


def test_peers_that_cannot_send_or_failed_this_host_are_not_taken():
    state = ledger_state(a=entry(DONE, can_send=False), b=entry(DONE))
    state["failed_pairs"] = {"c": ["b"]}
    assert choose_source(state, "c", "g", "t", 2).source == CONTROLLER


def test_a_receiving_host_whose_worker_died_is_not_waited_for():
    dead = multiprocessing.get_context("fork").Process(target=lambda: None)
    dead.start()
    dead.join(10)
    state = ledger_state(a=entry(RECEIVING, pid=dead.pid))
    assert choose_source(state, "b", "g", "t", 2).source == CONTROLLER


def test_a_host_holding_a_copy_under_check_feeds_others_until_its_worker_dies():
    state = ledger_state(a=entry(HOLDING, done_at=2.0), b=entry(WAITING))
    assert choose_source(state, "b", "g", "t", 2).source == "a"
    dead = multiprocessing.get_context("fork").Process(target=lambda: None)
    dead.start()
    dead.join(10)
    state = ledger_state(a=entry(HOLDING, pid=dead.pid))
    assert choose_source(state, "b", "g", "t", 2).source == CONTROLLER


def test_only_a_receiving_host_becomes_holding_and_its_held_map_lists_temp_and_final_path(tmp_path):
    ledger = Ledger(f"{os.getpid()}-hold", directory=str(tmp_path))
    assert os.path.basename(ledger.path).startswith(f"fanout-{os.getpid()}-")  # pruned by its run's pid
    ledger.join("a", "g", "t")
    ledger.holding("a", "ignored")  # still waiting for a source: not a copy
    assert ledger.snapshot()["hosts"]["a"]["state"] == WAITING
    assert ledger.take("a", "g", "t", 2).source == CONTROLLER
    held = ledger.write_copy_map("a", {"/src/x": ["/d/.x.tmp", "/d/x"]}, kind="held")
    ledger.holding("a", held)
    entry_now = ledger.snapshot()["hosts"]["a"]
    assert entry_now["state"] == HOLDING and entry_now["copy_map"] == held
    final = ledger.write_copy_map("a", {"/src/x": "/d/x"})
    assert final != held
    ledger.finish("a", True, "g", "t", final)
    assert ledger.snapshot()["hosts"]["a"]["state"] == DONE


def streaming(source, feeding=0, since=0.0, **overrides):
    """A host receiving the tree from `source` that says in its stream file what it has."""
    return dict(entry(RECEIVING, feeding=feeding, **overrides), source=source, stream="/run/x.stream.json",
                since=since)


def test_a_receiving_host_passes_the_tree_on_as_it_comes_nearest_the_controller_first():
    # a <- controller, b <- a, c <- b: d takes a (one hop from the controller), not b or c
    state = ledger_state(a=streaming(CONTROLLER, feeding=1), b=streaming("a", since=1.0), c=streaming("b", since=2.0))
    choice = choose_source(state, "d", "g", "t", 2)
    assert choice.source == "a" and "passes it on" in choice.why
    state["hosts"]["a"]["feeding"] = 2  # full: the next nearest, the least busy
    assert choose_source(state, "d", "g", "t", 2).source == "b"


def test_a_host_that_holds_the_tree_goes_before_one_still_receiving_it():
    state = ledger_state(a=streaming(CONTROLLER), b=entry(DONE, feeding=1))
    assert choose_source(state, "c", "g", "t", 2).source == "b"
    state["hosts"]["b"]["feeding"] = 2
    assert choose_source(state, "c", "g", "t", 2).source == "a"


def test_no_host_streams_from_a_host_below_itself_or_without_a_stream_file():
    # b gets its copy from a, c from b; should a look for another source, b and c are below it
    state = ledger_state(a=dict(streaming(CONTROLLER), state=RECEIVING), b=streaming("a"), c=streaming("b"))
    assert choose_source(state, "a", "g", "t", 2, no_wait=True).source == CONTROLLER
    plain = ledger_state(a=dict(entry(RECEIVING), source=CONTROLLER))  # receiving, but says nothing of its spans
    assert choose_source(plain, "b", "g", "t", 2).source is None


def test_a_streaming_host_whose_worker_died_or_that_cannot_send_is_not_taken():
    dead = multiprocessing.get_context("fork").Process(target=lambda: None)
    dead.start()
    dead.join(10)
    state = ledger_state(a=streaming(CONTROLLER, pid=dead.pid), b=streaming(CONTROLLER, can_send=False))
    assert choose_source(state, "c", "g", "t", 2).source == CONTROLLER


def test_take_records_the_hosts_stream_file(tmp_path):
    ledger = Ledger(f"{os.getpid()}-stream", directory=str(tmp_path))
    ledger.join("a", "g", "t")
    assert ledger.take("a", "g", "t", 2, stream="/run/a.stream.json").source == CONTROLLER
    ledger.join("b", "g", "t")
    assert ledger.take("b", "g", "t", 2, stream="/run/b.stream.json").source == "a"
    hosts = ledger.snapshot()["hosts"]
    assert hosts["a"]["stream"] == "/run/a.stream.json" and hosts["a"]["feeding"] == 1
    assert hosts["b"]["source"] == "a" and hosts["b"]["state"] == RECEIVING


def test_a_failed_host_is_no_source():
    assert choose_source(ledger_state(a=entry(FAILED)), "b", "g", "t", 2).source == CONTROLLER


def _take(path, key, name, queue):
    ledger = Ledger(key, directory=path)
    ledger.join(name, "g", "t")
    queue.put(ledger.take(name, "g", "t", 1).source)


def test_processes_share_one_ledger_and_one_peer_slot(tmp_path):
    key = f"{os.getpid()}-test"
    ledger = Ledger(key, directory=str(tmp_path))
    ledger.finish("seed", True, "g", "t", ledger.write_copy_map("seed", {"/src/a": "/dest/a"}))
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_take, args=(str(tmp_path), key, f"h{index}", queue)) for index in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    sources = sorted((queue.get(timeout=10) for _worker in workers), key=str)
    # one slot on the peer; the others wait (the seed's copy exists), none took the uplink
    assert sources.count("seed") == 1 and sources.count(None) == 3
    ledger.release("h0", "seed")
    assert ledger.snapshot()["hosts"]["seed"]["feeding"] == 0


@pytest.mark.parametrize("value, expected", [
    (None, ("10.0.0.1", 2222)), ("", ("10.0.0.1", 2222)), ("peer1", ("peer1", 22)),
    ("peer1:2200", ("peer1", 2200)), ("[fd00::5]:2200", ("fd00::5", 2200)), ("fd00::5", ("fd00::5", 22)),
])
def test_peer_addresses(value, expected):
    assert parse_peer_address(value, "10.0.0.1", 2222) == expected


@pytest.mark.parametrize("value", ["host:port", "host:0", ":22", "host:70000"])
def test_bad_peer_addresses_are_refused(value):
    with pytest.raises(ValueError, match="multipush_peer_address"):
        parse_peer_address(value, "10.0.0.1", 22)


def _plan(local, temp, dest, size, action="send"):
    return SimpleNamespace(action=action, temp=temp, dest=dest, local=SimpleNamespace(path=local, size=size))


def test_a_receiving_host_says_in_its_stream_file_what_has_arrived_and_catches_up_what_waited(tmp_path):
    ledger = Ledger(f"{os.getpid()}-published", directory=str(tmp_path))
    fanout = Fanout(ledger, "a", None, 2, peer_spec=None, spec=None, peer_address=("a", 22), warn=print, say=print)
    fanout.plans = [_plan("/src/img", "/d/.img.tmp", "/d/img", 100), _plan("/src/cfg", "/d/.cfg.tmp", "/d/cfg", 5,
                                                                           action="skip")]
    fanout._start_stream()
    stream = read_copy_map(fanout.stream_path)
    assert stream["files"] == {"/src/img": ["/d/.img.tmp", "/d/img"], "/src/cfg": ["/d/cfg", None]}
    assert stream["spans"] == {"/src/img": [], "/src/cfg": [[0, 5]]}  # a file already in place: whole

    fanout.published([("/d/.img.tmp", 0, 40), ("/elsewhere", 0, 9)])
    assert read_copy_map(fanout.stream_path)["spans"]["/src/img"] == [[0, 40]]
    fanout.published([("/d/.img.tmp", 60, 100)])  # right after the last rewrite: it waits for the timer
    fanout.published([("/d/.img.tmp", 40, 60)])
    wait_until(lambda: read_copy_map(fanout.stream_path)["spans"]["/src/img"] == [[0, 100]], timeout=10,
               what="the spans that waited written")
    fanout.finish(False)  # from now on the ledger's state speaks for the host: no more rewrites
    assert fanout.stream_path is None
    fanout.published([("/d/.img.tmp", 0, 100)])
    assert fanout.catch_up is None
