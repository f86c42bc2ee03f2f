"""DNS over TCP (RFC 7766, RFC 1035 §4.2.2) against a real server on loopback.

Nothing here sleeps to wait for an event: closes are awaited with bounded `recv`s, and
the server's connection table is polled with a deadline. The only pauses are the ones
that shape the byte stream into separate segments.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geodns.server import TcpLimits, TcpProtocol, TcpServerState

from .serverutil import Running, make_zone_dir, run_process, serve_files, write_config

ZONE = (Path(__file__).parent / "zones" / "example.test.zone").read_text()
ZONES = {"example.test.zone": ZONE}

# No ops API: these servers run side by side, and only DNS is under test here.
NO_API = """
[api]
listen = ""
"""
FAST = (
    NO_API
    + """
[server]
tcp_query_timeout_s = 0.5
tcp_idle_timeout_s = 0.5
"""
)
LIMITS = (
    NO_API
    + """
[server]
tcp_max_connections = 5
"""
)
PER_CLIENT = (
    NO_API
    + """
[server]
tcp_max_connections_per_client = 2
"""
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """Default (long) timeouts: for framing tests whose pacing must not race a timer."""
    with serve_files(tmp_path_factory.mktemp("tcp"), ZONES, NO_API) as running:
        yield running


@pytest.fixture(scope="module")
def fast(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with serve_files(tmp_path_factory.mktemp("fast"), ZONES, FAST) as running:
        yield running


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[Running]:
    with serve_files(tmp_path, ZONES, LIMITS) as running:
        yield running


@pytest.fixture
def per_client(tmp_path: Path) -> Iterator[Running]:
    with serve_files(tmp_path, ZONES, PER_CLIENT) as running:
        yield running


# --------------------------------------------------------------------------------------
# helpers


def wire_query(qid: int, name: str = "www.example.test", rdtype: str = "A") -> bytes:
    q = dns.message.make_query(name, rdtype, use_edns=False)
    q.id = qid
    return q.to_wire()


def framed(msg: bytes) -> bytes:
    return struct.pack("!H", len(msg)) + msg


def connect(running: Running, source: str | None = None, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(timeout)
    if source is not None:
        s.bind((source, 0))
    s.connect(running.addr)
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} octets")
        buf += chunk
    return buf


def read_reply(s: socket.socket) -> dns.message.Message:
    (size,) = struct.unpack("!H", recv_exact(s, 2))
    return dns.message.from_wire(recv_exact(s, size))


def ask(s: socket.socket, qid: int, name: str = "www.example.test") -> dns.message.Message:
    s.sendall(framed(wire_query(qid, name)))
    m = read_reply(s)
    assert m.id == qid
    assert m.rcode() == dns.rcode.NOERROR
    return m


def wait_closed(s: socket.socket, timeout: float) -> float | None:
    """Seconds until the peer closed the connection (EOF or RST), None if it did not
    within `timeout`. Any data that arrives first is a failure."""
    start = time.monotonic()
    s.settimeout(timeout)
    try:
        data = s.recv(1)
    except (ConnectionResetError, BrokenPipeError):
        return time.monotonic() - start
    except TimeoutError:
        return None
    assert data == b"", f"unexpected data {data!r}"
    return time.monotonic() - start


def wait_until(cond: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Bounded polling of an in-process condition."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def connections(running: Running) -> int:
    assert running.app.dns is not None
    return len(running.app.dns.tcp_state.connections)


def udp_ok(running: Running) -> None:
    m = running.query("www.example.test", "A")
    assert m.rcode() == dns.rcode.NOERROR and m.answer


def tcp_ok(running: Running) -> None:
    with connect(running) as s:
        ask(s, 4242)


# --------------------------------------------------------------------------------------
# framing


def test_several_queries_on_one_connection(server: Running) -> None:
    with connect(server) as s:
        for i, name in enumerate(["www.example.test", "mail.example.test", "ns1.example.test"]):
            m = ask(s, 100 + i, name)
            assert str(m.answer[0].name) == name + "."
        # also after an error reply: FORMERR does not end the conversation
        bad = wire_query(7)[:-1]  # truncated question
        s.sendall(framed(bad))
        assert read_reply(s).rcode() == dns.rcode.FORMERR
        ask(s, 200)


def test_pipelined_queries_in_one_write(server: Running) -> None:
    names = ["www.example.test", "big.example.test", "nothere.example.test"]
    with connect(server) as s:
        s.sendall(b"".join(framed(wire_query(300 + i, n, "TXT")) for i, n in enumerate(names)))
        replies = {m.id: m for m in (read_reply(s) for _ in names)}  # any order (RFC 7766 §6.2.1.1)
        assert set(replies) == {300, 301, 302}
        assert len(replies[301].answer[0]) == 6  # TCP: the big RRset whole, no TC
        assert not replies[301].flags & dns.flags.TC
        assert replies[302].rcode() == dns.rcode.NXDOMAIN


def test_length_prefix_split_byte_by_byte(server: Running) -> None:
    """RFC 7766 §8: the 2-octet length and the message may arrive in any segmentation."""
    stream = framed(wire_query(400)) + framed(wire_query(401, "mail.example.test"))
    with connect(server) as s:
        for i in range(len(stream)):
            s.send(stream[i : i + 1])
            time.sleep(0.002)  # pacing: one segment per octet, not a wait for an event
        assert read_reply(s).id == 400
        assert read_reply(s).id == 401


def test_length_prefix_split_across_messages(server: Running) -> None:
    """A segment that ends one message and carries half of the next length prefix."""
    one, two = framed(wire_query(500)), framed(wire_query(501))
    with connect(server) as s:
        for chunk in (one[:1], one[1:-1], one[-1:] + two[:1], two[1:2], two[2:]):
            s.send(chunk)
            time.sleep(0.01)  # pacing
        assert {read_reply(s).id, read_reply(s).id} == {500, 501}


# --------------------------------------------------------------------------------------
# timeouts (server configured with 0.5 s idle and 0.5 s per message)


def test_half_written_message_closed_after_query_timeout(fast: Running) -> None:
    msg = framed(wire_query(600))
    with connect(fast) as s:
        s.sendall(msg[: len(msg) // 2])
        elapsed = wait_closed(s, 5)
    assert elapsed is not None, "server kept a half-written message open"
    assert 0.3 <= elapsed < 3


def test_half_length_prefix_closed_after_query_timeout(fast: Running) -> None:
    with connect(fast) as s:
        s.sendall(b"\x00")
        elapsed = wait_closed(s, 5)
    assert elapsed is not None
    assert 0.3 <= elapsed < 3


def test_idle_connection_closed_after_idle_timeout(fast: Running) -> None:
    with connect(fast) as s:
        elapsed = wait_closed(s, 5)
    assert elapsed is not None, "idle connection never closed"
    assert 0.3 <= elapsed < 3


def test_idle_after_answer_closed(fast: Running) -> None:
    with connect(fast) as s:
        ask(s, 700)
        elapsed = wait_closed(s, 5)
    assert elapsed is not None
    assert 0.3 <= elapsed < 3


def test_dripping_a_message_does_not_extend_its_deadline(fast: Running) -> None:
    """Slowloris: one octet every 0.1 s must not keep a message in flight forever; the
    per-message timeout counts from the message's first octet (RFC 7766 §6.2.3)."""
    msg = framed(wire_query(800, "a" * 60 + ".example.test"))
    with connect(fast) as s:
        start = time.monotonic()
        closed_after = None
        for i in range(len(msg) - 1):  # never complete the message
            try:
                s.send(msg[i : i + 1])
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - start
                break
            gone = wait_closed(s, 0.1)  # doubles as the pacing between octets
            if gone is not None:
                closed_after = time.monotonic() - start
                break
    assert closed_after is not None, "a dripped message kept the connection open"
    assert closed_after < 2.0


def test_active_connection_outlives_idle_timeout(fast: Running) -> None:
    """The idle timeout counts from the last message: a connection that asks every
    0.3 s (idle timeout 0.5 s) stays open for 6 queries, then closes when idle."""
    with connect(fast) as s:
        start = time.monotonic()
        for i in range(6):
            ask(s, 900 + i)
            assert wait_closed(s, 0.3) is None, f"closed after query {i + 1}"
        assert time.monotonic() - start > 3 * 0.5
        elapsed = wait_closed(s, 5)
    assert elapsed is not None
    assert 0.1 <= elapsed < 3


class _Recording:
    """The part of a transport TcpProtocol uses (in process), recording an abort; a
    write fills it at once (pause_writing)."""

    def __init__(self) -> None:
        self.proto: TcpProtocol | None = None
        self.aborted = asyncio.Event()

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        assert self.proto is not None
        self.proto.pause_writing()

    def pause_reading(self) -> None:
        pass

    def abort(self) -> None:
        self.aborted.set()

    def is_closing(self) -> bool:
        return self.aborted.is_set()


def _seconds_to_abort(
    limits: TcpLimits,
    handle: Callable[[bytes, tuple[str, int], object], bytes | None],
    data: bytes,
    check: Callable[[TcpProtocol], None] = lambda proto: None,
) -> float:
    """Feed `data` to a TcpProtocol at once, run `check` on it, and time the abort."""

    async def run() -> float:
        loop = asyncio.get_running_loop()
        proto = TcpProtocol(handle, TcpServerState(limits))
        tr = _Recording()
        tr.proto = proto
        proto.connection_made(tr)  # type: ignore[arg-type]
        start = loop.time()
        proto.data_received(data)
        check(proto)
        await asyncio.wait_for(tr.aborted.wait(), 5)
        return loop.time() - start

    return asyncio.run(run())


def test_partial_message_deadline_earlier_than_idle_timer() -> None:
    """The idle timer is armed lazily; a per-message deadline shorter than the idle
    timeout still closes the connection on time (half a length prefix)."""
    limits = TcpLimits(idle_timeout_s=30.0, query_timeout_s=0.2)
    assert 0.15 <= _seconds_to_abort(limits, lambda data, addr, tr: None, b"\x00") < 2


def test_client_not_reading_holds_back_the_rest_of_a_segment() -> None:
    """One segment of many small queries for large answers: once the transport's buffer
    passes its high-water mark (pause_writing), the rest of the segment waits until the
    client reads (resume_writing); every query is answered once, in order (in process,
    a transport that buffers like asyncio's)."""
    queries = 1000
    high = 64 * 1024

    class Transport:
        def __init__(self) -> None:
            self.proto: TcpProtocol | None = None
            self.buffered = 0
            self.peak = 0
            self.replies: list[int] = []
            self.reading = True

        def get_extra_info(self, name: str, default: object = None) -> object:
            return ("127.0.0.1", 40001) if name == "peername" else default

        def write(self, data: bytes) -> None:
            at = 0
            while at < len(data):  # the stream: 2-octet length, then the reply (ID first)
                size = int.from_bytes(data[at : at + 2], "big")
                self.replies.append(int.from_bytes(data[at + 2 : at + 4], "big"))
                at += 2 + size
            self.buffered += len(data)
            self.peak = max(self.peak, self.buffered)
            if self.buffered > high and self.proto is not None:
                self.proto.pause_writing()

        def pause_reading(self) -> None:
            self.reading = False

        def resume_reading(self) -> None:
            self.reading = True

        def drain(self) -> None:  # the client read everything
            self.buffered = 0
            assert self.proto is not None
            self.proto.resume_writing()

        def abort(self) -> None:
            raise AssertionError("aborted")

        def is_closing(self) -> bool:
            return False

    def handle(data: bytes, addr: tuple[str, int], tr: object) -> bytes:
        return data[:2] + bytes(2000)  # the query's ID, then a large answer

    async def run() -> Transport:
        proto = TcpProtocol(handle, TcpServerState(TcpLimits()))
        tr = Transport()
        tr.proto = proto
        proto.connection_made(tr)  # type: ignore[arg-type]
        segment = b"".join(framed(struct.pack("!H", i) + bytes(14)) for i in range(queries))
        proto.data_received(segment)
        assert not tr.reading, "kept reading from a client that does not read"
        assert len(tr.replies) < queries
        assert tr.peak < high + 2 * 65536, f"{tr.peak} octets buffered"
        for _ in range(queries):
            if len(tr.replies) == queries:
                break
            before = len(tr.replies)
            tr.drain()
            assert len(tr.replies) == before, "answered inside resume_writing"
            await asyncio.sleep(0)  # resume_writing answers on the next turn of the loop
        assert tr.reading
        return tr

    tr = asyncio.run(run())
    assert tr.replies == list(range(queries))


def test_client_that_never_reads_is_closed_after_idle_timeout() -> None:
    """Queries held back from a client that does not read count as idle: the idle
    timeout closes the connection (the transport never drains)."""

    def held_back(proto: TcpProtocol) -> None:
        assert proto.buf, "nothing held back"

    limits = TcpLimits(idle_timeout_s=0.2, query_timeout_s=30.0)
    seconds = _seconds_to_abort(
        limits, lambda data, addr, tr: data[:2] + bytes(4000), framed(bytes(16)) * 50, held_back
    )
    assert 0.15 <= seconds < 2


LOOPS = ["asyncio"] + (["uvloop"] if importlib.util.find_spec("uvloop") else [])


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("mode", ["junk", "limit", "shutdown"])
def test_connection_ending_while_answers_are_held_back(loop_name: str, mode: str) -> None:
    """A client sends 100 queries for 60 KB answers at once and reads nothing until the
    server has paused with queries held back. Then the connection ends: junk after the
    queries (abort), the query limit (close after 80), or the server closing it (as at
    shutdown). The connection is torn down once, the loop reports no error, and after a
    close the client gets whole replies only (the limit: exactly 80)."""
    nq, limit = 100, 80
    errors: list[str] = []
    lost: list[Exception | None] = []
    got: list[bytes] = []

    class Proto(TcpProtocol):
        def connection_lost(self, exc: Exception | None) -> None:
            lost.append(exc)
            super().connection_lost(exc)

    def handle(msg: bytes, addr: tuple[str, int], tr: object) -> bytes:
        return msg[:2] + b"\x80" + bytes(60_000)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, ctx: errors.append(str(ctx.get("message"))))
        state = TcpServerState(TcpLimits(max_queries=limit if mode == "limit" else 0))
        srv = await loop.create_server(lambda: Proto(handle, state), "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        read_now = threading.Event()

        def client() -> None:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.connect(("127.0.0.1", port))
                s.sendall(
                    framed(b"\x12\x34" + bytes(10)) * nq
                    + (b"\x00\x05junk!" if mode == "junk" else b"")
                )
                read_now.wait(5)
                s.settimeout(5)
                data = b""
                try:
                    while chunk := s.recv(1 << 20):
                        data += chunk
                except ConnectionResetError:
                    pass
                got.append(data)

        t = threading.Thread(target=client)
        t.start()
        deadline = loop.time() + 5
        while not any(c.paused and c.buf for c in state.connections):
            assert loop.time() < deadline, "the server never held answers back"
            await asyncio.sleep(0.01)
        if mode == "shutdown":
            for c in list(state.connections):
                assert c.transport is not None
                c.transport.close()
        read_now.set()
        while t.is_alive() or not lost:
            assert loop.time() < deadline + 10, "the connection did not end"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # a second teardown would be scheduled by now
        srv.close()
        await srv.wait_closed()

    if loop_name == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())
    assert errors == []
    assert len(lost) == 1
    if mode == "junk":
        return  # abort drops what the transport still buffers: the tail may be cut
    data, at, replies = got[0], 0, 0
    while at < len(data):
        size = int.from_bytes(data[at : at + 2], "big")
        assert at + 2 + size <= len(data), f"reply {replies + 1} cut short"
        assert data[at + 2 : at + 4] == b"\x12\x34"
        at += 2 + size
        replies += 1
    if mode == "limit":
        assert replies == limit


class _Stream:
    """A transport that records the reply stream, for TcpProtocol in process."""

    def __init__(self) -> None:
        self.out = b""
        self.ended = ""

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40003) if name == "peername" else default

    def write(self, data: bytes) -> None:
        assert not self.ended, "wrote after the end"
        self.out += data

    def abort(self) -> None:
        self.ended = "abort"

    def close(self) -> None:
        self.ended = "close"

    def is_closing(self) -> bool:
        return bool(self.ended)


def _feed(messages: list[bytes], cuts: list[int], max_queries: int) -> tuple[bytes, str]:
    """Frame `messages`, cut the stream at `cuts` and feed the pieces to a TcpProtocol
    whose handler echoes the ID (None for a message whose third octet is 0xff)."""
    stream = b"".join(len(m).to_bytes(2, "big") + m for m in messages)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})

    def handle(data: bytes, addr: tuple[str, int], tr: object) -> bytes | None:
        return None if data[2] == 0xFF else data[:2] + bytes(len(data))

    async def run() -> tuple[bytes, str]:
        limits = TcpLimits(max_queries=max_queries)
        proto = TcpProtocol(handle, TcpServerState(limits))
        tr = _Stream()
        proto.connection_made(tr)  # type: ignore[arg-type]
        for a, b in itertools.pairwise(points):
            proto.data_received(stream[a:b])
            if tr.ended:
                break
        proto.connection_lost(None)
        return tr.out, tr.ended

    return asyncio.run(run())


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 700), min_size=1, max_size=12),
    bad=st.sets(st.integers(0, 11), max_size=2),
    cuts=st.lists(st.integers(0, 10_000), max_size=25),
    max_queries=st.sampled_from([0, 3]),
)
def test_replies_do_not_depend_on_segmentation(
    sizes: list[int], bad: set[int], cuts: list[int], max_queries: int
) -> None:
    """RFC 7766 §8: a message may arrive in any number of segments. However the stream is
    cut, the replies (in order), and where a short message, a message the handler
    refuses or the query limit ends the connection, are those of the stream in one
    piece, and those of the messages taken one by one."""
    messages = []
    for i, size in enumerate(sizes):
        third = b"\xff" if i in bad else b"\x00"
        messages.append((i.to_bytes(2, "big") + third + bytes(size))[: max(size, 3)])
    whole = _feed(messages, [], max_queries)
    assert _feed(messages, cuts, max_queries) == whole
    expected, ended = b"", ""
    for n, m in enumerate(messages):
        if len(m) < 12 or m[2] == 0xFF:
            ended = "abort"
            break
        expected += (2 + len(m)).to_bytes(2, "big") + m[:2] + bytes(len(m))
        if max_queries and n + 1 >= max_queries:
            ended = "close"
            break
    assert whole == (expected, ended)


def test_timeouts_do_not_affect_others(fast: Running) -> None:
    """While a stalled connection waits for its timeout, UDP and new TCP are served."""
    with connect(fast) as stalled:
        stalled.sendall(b"\x00\x40abc")
        udp_ok(fast)
        tcp_ok(fast)
        assert wait_closed(stalled, 5) is not None


# --------------------------------------------------------------------------------------
# connection limits


def test_connection_limit(limited: Running) -> None:
    idle = [connect(limited) for _ in range(5)]
    try:
        wait_until(lambda: connections(limited) == 5, what="5 connections admitted")
        with connect(limited) as sixth:
            elapsed = wait_closed(sixth, 3)
        assert elapsed is not None, "the 6th connection was not closed"
        assert connections(limited) == 5
        udp_ok(limited)  # UDP does not care about the TCP limit
        ask(idle[0], 900)  # the admitted connections still work
        idle.pop().close()
        wait_until(lambda: connections(limited) == 4, what="the closed connection released")
        tcp_ok(limited)  # a new client fits again
    finally:
        for s in idle:
            s.close()


def test_connections_per_client(per_client: Running) -> None:
    mine = [connect(per_client, "127.0.0.1") for _ in range(2)]
    try:
        wait_until(lambda: connections(per_client) == 2, what="2 connections admitted")
        with connect(per_client, "127.0.0.1") as third:
            assert wait_closed(third, 3) is not None, "3rd connection from one client admitted"
        with connect(per_client, "127.0.0.2") as other:  # another client address
            ask(other, 901)
        ask(mine[1], 902)
        udp_ok(per_client)
    finally:
        for s in mine:
            s.close()


# --------------------------------------------------------------------------------------
# junk streams


@pytest.mark.parametrize(
    "junk",
    [
        b"\x00\x00",  # zero-length message
        b"\x00\x05hello",  # length below a DNS header
        b"\x00\x0b" + bytes(11),  # 11 octets: still no header
        framed(
            dns.message.make_response(dns.message.make_query("www.example.test", "A")).to_wire()
        ),
        framed(b"\x00\x01" + bytes(4)),  # 6 octets: no header
    ],
    ids=["zero-length", "length-5", "length-11", "response", "length-6"],
)
def test_junk_stream_closed_others_unaffected(server: Running, junk: bytes) -> None:
    with connect(server) as bystander, connect(server) as bad:
        ask(bystander, 1000)
        bad.sendall(junk)
        assert wait_closed(bad, 3) is not None, "junk stream kept open"
        ask(bystander, 1001)
    udp_ok(server)
    tcp_ok(server)


def test_junk_after_good_query_closes(server: Running) -> None:
    """A response message on a query stream ends it; the earlier answer was delivered."""
    with connect(server) as s:
        response = dns.message.make_response(dns.message.make_query("x.example.test", "A"))
        s.sendall(framed(wire_query(1100)) + framed(response.to_wire()))
        assert read_reply(s).id == 1100
        assert wait_closed(s, 3) is not None


def test_client_that_never_reads(server: Running) -> None:
    """A client pipelining queries without reading its answers fills its buffers; the
    server stops reading from it (back-pressure) and keeps serving UDP
    and other TCP clients."""
    hog = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    hog.connect(server.addr)
    hog.setblocking(False)
    query = framed(wire_query(1200, "big.example.test", "TXT"))  # ~700-octet answers
    batch = query * 100
    sent = 0
    blocked = False
    try:
        while sent < 4_000_000:
            try:
                n = hog.send(batch)
            except BlockingIOError:
                n = 0
            sent += n
            if n < len(batch):
                # the kernel buffers are full: the server has stopped reading from us
                # (stop here: sending the batch again would cut a message in two)
                blocked = True
                break
            # keep the rest of the world running while we push
            if sent % (len(batch) * 20) < len(batch):
                udp_ok(server)
        assert blocked, f"server kept reading {sent} octets from a client that never reads"
        for _ in range(3):
            udp_ok(server)
            tcp_ok(server)
    finally:
        hog.close()
    tcp_ok(server)


# --------------------------------------------------------------------------------------
# shutdown


def test_sigterm_finishes_inflight_answer_and_exits(tmp_path: Path) -> None:
    make_zone_dir(tmp_path, ZONES)
    config = write_config(tmp_path, NO_API)
    with run_process(config) as proc:
        with socket.create_connection((proc.host, proc.port), timeout=5) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(framed(wire_query(1300, "big.example.test", "TXT")))
            proc.proc.send_signal(signal.SIGTERM)
            m = read_reply(s)
            assert m.id == 1300 and len(m.answer[0]) == 6
        start = time.monotonic()
        code = proc.proc.wait(timeout=5)
        assert code == 0
        assert time.monotonic() - start < 5
