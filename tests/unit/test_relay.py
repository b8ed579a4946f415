"""The loopback relay (tests/support/relay.py): data integrity, the delay model, and its fault hooks.

Real sockets on 127.0.0.1; every wait has a deadline. The only timing check is a lower bound (a round
trip through a 200 ms relay cannot take less than 200 ms), which a slow machine cannot break.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time

import pytest

from tests.support.relay import Faults, Link, Relay
from tests.support.waiting import wait_until

DEADLINE = 20.0


class Server:
    """A threaded TCP server on loopback: echo (default), or sink with a banner; records what it got."""

    def __init__(self, mode: str = "echo", banner: bytes = b""):
        self.mode = mode
        self.banner = banner
        self.received: list[bytearray] = []  # per accepted connection
        self.closed: list[threading.Event] = []
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                conn, _peer = self.sock.accept()
            except OSError:
                return
            got, done = bytearray(), threading.Event()
            with self.lock:
                self.received.append(got)
                self.closed.append(done)
                self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn, got, done), daemon=True).start()

    def _serve(self, conn, got, done):
        try:
            if self.banner:
                conn.sendall(self.banner)
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                got.extend(data)
                if self.mode == "echo":
                    conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            done.set()
            conn.close()

    def close(self):
        self.sock.close()
        with self.lock:
            for conn in self.conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def server():
    made = []

    def make(**kwargs):
        made.append(Server(**kwargs))
        return made[-1]

    yield make
    for item in made:
        item.close()


def connect(relay: Relay) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=DEADLINE)
    return sock


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        piece = sock.recv(size - len(data))
        if not piece:
            break
        data.extend(piece)
    return bytes(data)


def recv_all(sock: socket.socket) -> tuple[bytes, str]:
    """Everything until the stream ends; and how it ended ('eof' or 'reset')."""
    data = bytearray()
    try:
        while True:
            piece = sock.recv(65536)
            if not piece:
                return bytes(data), "eof"
            data.extend(piece)
    except ConnectionResetError:
        return bytes(data), "reset"


def send_ignoring_cut(sock: socket.socket, payload: bytes) -> int:
    """Send until done or the relay cuts us off; returns bytes accepted by the kernel."""
    sent = 0
    try:
        while sent < len(payload):
            sent += sock.send(payload[sent:sent + 65536])
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


# --- the delay model, without I/O -------------------------------------------------------------------------


def test_link_releases_each_chunk_one_way_delay_after_it_was_read():
    link = Link(0.025)
    # many chunks read close together are all in flight at once: none waits for the one before
    assert [link.release(t, 262144) for t in (10.0, 10.001, 10.002)] == pytest.approx([10.025, 10.026, 10.027])


def test_link_rate_cap_serialises_chunks_on_the_shared_link():
    link = Link(0.010, rate_bytes_per_s=1_000_000)
    first = link.release(5.0, 100_000)  # on the link 5.0-5.1, then 10 ms of delay
    second = link.release(5.0, 100_000)  # read at the same instant: waits for the link, 5.1-5.2
    late = link.release(9.0, 50_000)  # link idle again by then
    assert first == pytest.approx(5.11)
    assert second == pytest.approx(5.21)
    assert late == pytest.approx(9.06)


def test_link_rate_changes_for_chunks_read_after_the_change():
    link = Link(0.0, rate_bytes_per_s=1_000_000)
    assert link.release(1.0, 100_000) == pytest.approx(1.1)
    link.set_rate(10_000_000)
    assert link.release(2.0, 100_000) == pytest.approx(2.01)
    link.set_rate(None)
    assert link.release(3.0, 100_000) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        link.set_rate(-1)


def test_link_and_faults_reject_bad_settings():
    with pytest.raises(ValueError):
        Link(-1)
    with pytest.raises(ValueError):
        Link(0, rate_bytes_per_s=0)
    with pytest.raises(ValueError):
        Faults(refuse_every=0)
    with pytest.raises(ValueError):
        Faults(cut_after_bytes=-5)
    with pytest.raises(TypeError):
        Faults().update(cut_after=3)


# --- data through the relay ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rtt_ms, rate", [(0, None), (20, None), (4, 40_000_000)])
def test_relay_carries_data_intact_both_ways(server, rtt_ms, rate):
    echo = server()
    payload = os.urandom(3 * 1024 * 1024 + 17)
    with Relay(("127.0.0.1", echo.port), rtt_ms=rtt_ms, rate_bytes_per_s=rate) as relay:
        sock = connect(relay)
        sender = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
        sender.start()
        echoed, how = recv_all(sock)
        sender.join(DEADLINE)
        sock.close()
        assert how == "eof"
        assert echoed == payload
        stats = wait_until(lambda: relay.stats() if relay.stats()["active"] == 0 else None,
                           DEADLINE, what="the connection to close")
    assert stats["accepted"] == 1
    assert stats["bytes_up"] == len(payload)
    assert stats["bytes_down"] == len(payload)


def test_relay_carries_many_concurrent_connections(server):
    echo = server()
    payloads = [os.urandom(256 * 1024 + number) for number in range(16)]
    results: dict[int, bytes] = {}

    def client(number):
        sock = connect(relay)
        sock.sendall(payloads[number])
        sock.shutdown(socket.SHUT_WR)
        results[number] = recv_all(sock)[0]
        sock.close()

    with Relay(("127.0.0.1", echo.port), rtt_ms=10) as relay:
        threads = [threading.Thread(target=client, args=(number,)) for number in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DEADLINE)
        assert relay.stats()["accepted"] == 16
    assert [results.get(number) == payloads[number] for number in range(16)] == [True] * 16


def test_relay_delays_a_round_trip_by_at_least_its_rtt(server):
    echo = server()
    with Relay(("127.0.0.1", echo.port), rtt_ms=200) as relay:
        sock = connect(relay)
        started = time.monotonic()
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
        elapsed = time.monotonic() - started
        sock.close()
    assert elapsed >= 0.199


# --- faults -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rtt_ms", [0, 10])
def test_cut_after_bytes_delivers_exactly_n_then_resets_only_the_first_connection(server, rtt_ms):
    sink = server(mode="sink")
    payload = os.urandom(2 * 1024 * 1024)
    with Relay(("127.0.0.1", sink.port), rtt_ms=rtt_ms, faults=Faults(cut_after_bytes=100_000, cut_connections=1)) \
            as relay:
        first = connect(relay)
        send_ignoring_cut(first, payload)
        wait_until(lambda: sink.closed and sink.closed[0].is_set(), DEADLINE, what="the server side to see the cut")
        assert bytes(sink.received[0]) == payload[:100_000]
        assert recv_all(first)[0] == b""  # the client's stream ended too (reset or eof)
        first.close()

        second = connect(relay)  # only the first connection was to be cut
        second.sendall(payload)
        second.shutdown(socket.SHUT_WR)
        wait_until(lambda: len(sink.closed) == 2 and sink.closed[1].is_set(),
                   DEADLINE, what="the second connection to finish")
        assert bytes(sink.received[1]) == payload
        second.close()
        assert relay.stats()["cut"] == 1


def test_cut_every_connection_and_cut_next_at_runtime(server):
    sink = server(mode="sink")
    with Relay(("127.0.0.1", sink.port), rtt_ms=0) as relay:
        relay.faults.update(cut_after_bytes=1000)  # every connection from now on
        for number in range(3):
            sock = connect(relay)
            send_ignoring_cut(sock, b"x" * 50_000)
            wait_until(lambda number=number: len(sink.closed) > number and sink.closed[number].is_set(),
                       DEADLINE, what="a cut")
            assert len(sink.received[number]) == 1000
            sock.close()
        relay.faults.clear()
        relay.cut_next(0)  # cut the next connection before it passes a byte
        try:
            sock = connect(relay)
        except (BrokenPipeError, ConnectionResetError):
            sock = None  # the reset came back while connect() was returning: the cut struck first
        if sock is not None:
            send_ignoring_cut(sock, b"y" * 50_000)
            sock.close()
        wait_until(lambda: len(sink.closed) > 3 and sink.closed[3].is_set(), DEADLINE, what="the zero-byte cut")
        assert len(sink.received[3]) == 0
        sock = connect(relay)  # and not the one after
        sock.sendall(b"z" * 5000)
        sock.shutdown(socket.SHUT_WR)
        wait_until(lambda: len(sink.closed) > 4 and sink.closed[4].is_set(), DEADLINE, what="a normal connection")
        assert len(sink.received[4]) == 5000
        sock.close()
        assert relay.stats()["cut"] == 4


def test_cut_all_resets_open_connections_at_a_chosen_moment(server):
    echo = server()
    with Relay(("127.0.0.1", echo.port), rtt_ms=0) as relay:
        socks = [connect(relay) for _number in range(3)]
        for sock in socks:
            sock.sendall(b"hello")
            assert recv_exactly(sock, 5) == b"hello"
        assert relay.cut_all() == 3
        for sock in socks:
            assert recv_all(sock)[0] == b""
            sock.close()
        wait_until(lambda: relay.stats()["active"] == 0, DEADLINE, what="no open connection")
        assert relay.stats()["cut"] == 3


def test_refuse_every_kth_connection_closes_it_before_any_byte(server):
    banner = server(mode="sink", banner=b"SSH-2.0-fake\r\n")
    with Relay(("127.0.0.1", banner.port), rtt_ms=0, faults=Faults(refuse_every=2)) as relay:
        outcomes = []
        for _attempt in range(6):
            sock = connect(relay)
            outcomes.append(recv_exactly(sock, 14))
            sock.close()
        stats = relay.stats()
    assert outcomes == [b"SSH-2.0-fake\r\n", b""] * 3
    assert stats["refused"] == 3
    assert stats["accepted"] == 3
    assert len(banner.received) == 3  # refused connections never reached the server


@pytest.mark.parametrize("rtt_ms", [0, 10])
def test_stall_after_bytes_stops_forwarding_but_keeps_the_connection_open(server, rtt_ms):
    echo = server()
    with Relay(("127.0.0.1", echo.port), rtt_ms=rtt_ms) as relay:
        relay.stall_next(10_000)
        sock = connect(relay)
        sock.settimeout(DEADLINE)
        sock.sendall(b"a" * 4000)
        assert recv_exactly(sock, 4000) == b"a" * 4000  # below the threshold everything passes
        sock.sendall(b"b" * 8000)  # crosses it: 6000 more reach the server, then nothing either way
        wait_until(lambda: relay.stats()["stalled"] == 1, DEADLINE, what="the stall")
        wait_until(lambda: len(echo.received[0]) == 10_000,
                   DEADLINE, what="the server to get the bytes up to the threshold")
        sock.sendall(b"c" * 5000)
        sock.settimeout(0.5)  # bounded: nothing may come back while stalled
        with pytest.raises(socket.timeout):
            sock.recv(1)
        assert bytes(echo.received[0]) == b"a" * 4000 + b"b" * 6000
        assert not echo.closed[0].is_set()  # the server's side is still open
        assert relay.stats()["active"] == 1
        sock.close()
        other = connect(relay)  # stall_next applied to one connection only
        other.settimeout(DEADLINE)
        other.sendall(b"c" * 100)
        assert recv_exactly(other, 100) == b"c" * 100
        assert relay.stall_all() == 1  # at a chosen moment: the open, not yet stalled connection
        other.sendall(b"d" * 100)
        other.settimeout(0.5)
        with pytest.raises(socket.timeout):
            other.recv(1)
        other.close()
        assert relay.stats()["stalled"] == 2
    assert relay.stats()["active"] == 0  # stop() closed the stalled connection too


def test_stop_closes_everything_and_refuses_new_connections(server):
    echo = server()
    relay = Relay(("127.0.0.1", echo.port), rtt_ms=50).start()
    sock = connect(relay)
    sock.sendall(b"x")
    assert recv_exactly(sock, 1) == b"x"
    relay.stop()
    assert recv_all(sock)[0] == b""
    sock.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", relay.port), timeout=2).close()
    assert not any(thread.is_alive() for thread in relay._all_threads)


def test_upstream_down_closes_the_client_and_counts_it():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    dead_port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    with Relay(("127.0.0.1", dead_port), rtt_ms=0) as relay:
        sock = connect(relay)
        assert recv_all(sock)[0] == b""
        sock.close()
        wait_until(lambda: relay.stats()["upstream_failed"] == 1, DEADLINE, what="the failed upstream to be counted")


def test_ssh_through_the_relay_with_a_known_hosts_entry_for_its_port(sshd, tmp_path):
    with Relay((sshd.host, sshd.port), rtt_ms=20) as relay:
        known = tmp_path / "known_hosts"
        known.write_text(relay.known_hosts_line(sshd.known_hosts_line()))
        completed = subprocess.run(
            ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={known}",
             "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes", "-i", str(sshd.client_key),
             "-p", str(relay.port), f"{sshd.user}@127.0.0.1", "echo through-the-relay"],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False,
        )
        assert completed.returncode == 0, completed.stderr
        assert completed.stdout.strip() == "through-the-relay"
        assert relay.stats()["accepted"] == 1
        assert relay.stats()["bytes_up"] > 0
