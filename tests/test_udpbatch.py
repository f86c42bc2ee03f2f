"""UDP through recvmmsg/sendmmsg (geodns/udpbatch.py): every query of a burst gets its
own reply at its own source, also when some get none, when the handler fails, over
IPv6, and for the largest datagrams; `udp_batch = false` uses asyncio's transport."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from geodns import udpbatch
from geodns.model import Transport
from geodns.server import DnsServer, UdpProtocol, bind_sockets

pytestmark = pytest.mark.skipif(not udpbatch.available(), reason="Linux recvmmsg/sendmmsg")

Handle = Callable[[bytes, tuple[str, int], Transport], "bytes | None"]


def echo(data: bytes, addr: tuple[str, int], transport: Transport) -> bytes | None:
    """Reply = the query with QR set, plus the source the handler was given."""
    assert transport is Transport.UDP
    return data[:2] + bytes([data[2] | 0x80]) + data[3:] + f"|{addr[0]}|{addr[1]}".encode()


def query(qid: int, size: int = 0) -> bytes:
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + b"\x00\x00\x01\x00\x01" + bytes(size)


def burst(host: str, port: int, clients: int, per_client: int) -> dict[int, list[bytes]]:
    """Send every query before reading any reply (so the server gets batches)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(clients)]
    try:
        for s in socks:
            s.bind((host, 0))
            s.settimeout(3)
        for k in range(per_client):
            for c, s in enumerate(socks):
                s.sendto(query(c * 1000 + k), (host, port))
        got: dict[int, list[bytes]] = {}
        for s in socks:
            port_c = s.getsockname()[1]
            got[port_c] = [s.recv(70000) for _ in range(per_client)]
        return got
    finally:
        for s in socks:
            s.close()


@pytest.fixture(params=[False, True], ids=["loop-reader", "receive-thread"])
def threaded(request: pytest.FixtureRequest) -> bool:
    """Every test runs with the event loop's reader and with `[server] udp_thread`."""
    return bool(request.param)


async def serve(
    host: str, handle: Handle, threaded: bool, lock: threading.RLock | None = None
) -> tuple[udpbatch.BatchUdp, int]:
    udp, tcp = bind_sockets(host, 0)
    tcp.close()
    if threaded and lock is None:
        lock = threading.RLock()
    batch = udpbatch.BatchUdp(udp, handle, lock=lock if threaded else None)
    batch.start(asyncio.get_running_loop())
    return batch, udp.getsockname()[1]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_every_query_of_a_burst_is_answered_at_its_source(host: str, threaded: bool) -> None:
    async def run() -> None:
        batch, port = await serve(host, echo, threaded)
        try:
            got = await asyncio.to_thread(burst, host, port, 6, 40)
        finally:
            batch.close()
        for client_port, replies in got.items():
            assert len(replies) == 40
            for r in replies:
                head, src, sport = r.rsplit(b"|", 2)
                assert head[2] & 0x80
                assert (src.decode(), int(sport)) == (host, client_port)
            ids = sorted(struct.unpack("!H", r[:2])[0] % 1000 for r in replies)
            assert ids == list(range(40))
        assert batch.send_dropped == 0
        # the (host, port) memo has one entry per client socket, not per datagram
        assert sorted(batch.addrs.values()) == sorted((host, p) for p in got)

    asyncio.run(run())


def test_queries_without_a_reply_do_not_shift_the_others(threaded: bool) -> None:
    """Dropped queries inside a batch: each reply still goes to its own client."""

    def some(data: bytes, addr: tuple[str, int], transport: Transport) -> bytes | None:
        return None if struct.unpack("!H", data[:2])[0] % 3 == 0 else echo(data, addr, transport)

    async def run() -> None:
        batch, port = await serve("127.0.0.1", some, threaded)
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(4)]
        try:

            def go() -> dict[int, set[int]]:
                for s in socks:
                    s.bind(("127.0.0.1", 0))
                    s.settimeout(0.5)
                for k in range(30):
                    for c, s in enumerate(socks):
                        s.sendto(query(k * 4 + c), ("127.0.0.1", port))
                got: dict[int, set[int]] = {}
                for c, s in enumerate(socks):
                    ids = got.setdefault(c, set())
                    while True:
                        try:
                            r = s.recv(2048)
                        except TimeoutError:
                            break
                        assert int(r.rsplit(b"|", 1)[1]) == s.getsockname()[1]
                        ids.add(struct.unpack("!H", r[:2])[0])
                return got

            got = await asyncio.to_thread(go)
        finally:
            batch.close()
            for s in socks:
                s.close()
        for c in range(4):
            assert got[c] == {k * 4 + c for k in range(30) if (k * 4 + c) % 3}

    asyncio.run(run())


def test_a_failing_handler_costs_one_servfail(threaded: bool) -> None:
    def broken(data: bytes, addr: tuple[str, int], transport: Transport) -> bytes | None:
        if data[1] == 7:
            raise RuntimeError("bug")
        return echo(data, addr, transport)

    async def run() -> None:
        batch, port = await serve("127.0.0.1", broken, threaded)
        try:
            got = await asyncio.to_thread(burst, "127.0.0.1", port, 1, 10)
        finally:
            batch.close()
        (replies,) = got.values()
        by_id = {struct.unpack("!H", r[:2])[0]: r for r in replies}
        assert by_id[7][3] & 0x0F == 2  # SERVFAIL, header copied
        assert len(by_id[7]) == 12
        assert len(by_id) == 10
        assert all(b"|127.0.0.1|" in r for k, r in by_id.items() if k != 7)

    asyncio.run(run())


def test_the_largest_datagram_arrives_whole(threaded: bool) -> None:
    sizes: list[int] = []

    def size(data: bytes, addr: tuple[str, int], transport: Transport) -> bytes | None:
        sizes.append(len(data))
        return data[:12]

    async def run() -> None:
        batch, port = await serve("127.0.0.1", size, threaded)
        try:

            def go() -> bytes:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.settimeout(3)
                    s.sendto(query(1, 65507 - 17), ("127.0.0.1", port))
                    return s.recv(2048)

            reply = await asyncio.to_thread(go)
        finally:
            batch.close()
        assert reply[:2] == b"\x00\x01"
        assert sizes == [65507]

    asyncio.run(run())


def test_udp_batch_off_uses_the_asyncio_transport() -> None:
    async def run() -> None:
        for flag in (False, True):
            server = DnsServer(echo, udp_batch=flag)
            await server.start([bind_sockets("127.0.0.1", 0)])
            try:
                (t,) = server.udp_transports
                assert isinstance(t, udpbatch.BatchUdp) == flag
                if not flag:
                    assert isinstance(t.get_protocol(), UdpProtocol)  # type: ignore[union-attr]
                port = server.addresses[0][1]
                got = await asyncio.to_thread(burst, "127.0.0.1", port, 2, 5)
                assert sum(len(v) for v in got.values()) == 10
            finally:
                await server.stop(0.1)

    asyncio.run(run())


def test_a_reply_the_kernel_refuses_is_skipped_not_the_batch(threaded: bool) -> None:
    """sendmmsg stops at a message it cannot send (here: to port 0, EINVAL); that reply
    is counted as dropped and the rest of the batch still goes out."""
    udp, tcp = bind_sockets("127.0.0.1", 0)
    tcp.close()
    port = udp.getsockname()[1]
    batch: udpbatch.BatchUdp | None = None
    told: list[int] = []

    def spoiled(data: bytes, addr: tuple[str, int], transport: Transport) -> bytes | None:
        if data[1] == 1:
            assert batch is not None
            batch._nview[2:4] = b"\x00\x00"  # the first query's source port -> 0
        return echo(data, addr, transport)

    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    try:
        for qid, c in enumerate(clients, start=1):
            c.bind(("127.0.0.1", 0))
            c.settimeout(0.5)
            c.sendto(query(qid), ("127.0.0.1", port))  # queued before anything reads

        async def run() -> None:
            nonlocal batch
            lock = threading.RLock() if threaded else None
            batch = udpbatch.BatchUdp(udp, spoiled, told.append, lock)
            batch.start(asyncio.get_running_loop())
            try:
                got = await asyncio.to_thread(clients[1].recv, 2048)
                assert struct.unpack("!H", got[:2])[0] == 2
                with pytest.raises(TimeoutError):
                    await asyncio.to_thread(clients[0].recv, 2048)
                assert batch.send_dropped == 1
                assert told == [1]  # the server's statistics hear of it
            finally:
                batch.close()

        asyncio.run(run())
    finally:
        for c in clients:
            c.close()


def test_close_stops_the_receive_thread_blocked_in_recvmmsg() -> None:
    """The receive thread sleeps in recvmmsg; close() wakes it (shutdown of the receive
    side), it exits without answering anything, and the socket is closed."""

    async def run() -> None:
        batch, port = await serve("127.0.0.1", echo, True)
        thread = batch._thread
        assert thread is not None and thread.is_alive()
        got = await asyncio.to_thread(burst, "127.0.0.1", port, 1, 3)
        assert sum(len(v) for v in got.values()) == 3
        t0 = time.monotonic()
        batch.close()
        assert not thread.is_alive()
        assert time.monotonic() - t0 < 2
        assert batch.sock.fileno() == -1

    asyncio.run(run())


def test_a_batch_waits_for_whoever_holds_the_lock() -> None:
    """The receive thread answers holding the lock (the catalog's, also taken by every
    publish and every TCP query): while another thread holds it, no reply goes out, and
    every query is answered once it is released."""
    lock = threading.RLock()
    seen: list[str] = []

    def record(data: bytes, addr: tuple[str, int], transport: Transport) -> bytes | None:
        seen.append(threading.current_thread().name)
        return echo(data, addr, transport)

    async def run() -> None:
        batch, port = await serve("127.0.0.1", record, True, lock)
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.bind(("127.0.0.1", 0))
        client.settimeout(0.3)
        try:
            with lock:  # e.g. a zone being published
                for qid in range(5):
                    client.sendto(query(qid), ("127.0.0.1", port))
                with pytest.raises(TimeoutError):
                    await asyncio.to_thread(client.recv, 2048)
                assert seen == []
            client.settimeout(3)
            ids = sorted(struct.unpack("!H", client.recv(2048)[:2])[0] for _ in range(5))
            assert ids == [0, 1, 2, 3, 4]
            assert set(seen) == {"geodns-udp"}
        finally:
            client.close()
            batch.close()

    asyncio.run(run())


def test_tcp_queries_take_the_lock_when_udp_has_a_thread() -> None:
    """With `[server] udp_thread` the DnsServer runs TCP queries holding the same lock
    as the UDP batches; without it TCP calls the handler as it is."""
    lock = threading.RLock()
    held: list[bool] = []

    def check(data: bytes, addr: tuple[str, int], transport: Transport) -> bytes | None:
        # an RLock is held by this thread iff a non-blocking acquire from another
        # thread fails
        box: list[bool] = []

        def probe() -> None:
            got = lock.acquire(blocking=False)
            if got:
                lock.release()
            box.append(got)

        t = threading.Thread(target=probe)
        t.start()
        t.join()
        held.append(not box[0])
        return data[:2] + bytes([data[2] | 0x80]) + data[3:]

    async def ask_tcp(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        q = query(7)
        writer.write(len(q).to_bytes(2, "big") + q)
        await writer.drain()
        size = int.from_bytes(await reader.readexactly(2), "big")
        reply = await reader.readexactly(size)
        writer.close()
        return reply

    async def run(with_lock: bool) -> None:
        server = DnsServer(check, lock=lock if with_lock else None)
        await server.start([bind_sockets("127.0.0.1", 0)])
        try:
            reply = await ask_tcp(server.addresses[0][1])
            assert struct.unpack("!H", reply[:2])[0] == 7
        finally:
            await server.stop(0.1)

    asyncio.run(run(True))
    asyncio.run(run(False))
    assert held == [True, False]


def test_answers_stay_whole_while_health_flips_under_udp_load(tmp_path: Path) -> None:
    """A real server (receive thread on): one client streams UDP queries while the
    event loop drains and restores a site 40 times. Every reply is a whole answer for
    one of the two states, none is lost, and the last state is the one served."""
    import dns.edns
    import dns.message
    import dns.query

    from geodns.model import Override
    from tests.serverutil import run_server, wait_for
    from tests.test_workers import config_with_zones

    cfg = config_with_zones(tmp_path)
    assert cfg.server.udp_thread
    with run_server(cfg) as s:
        assert s.app.dns is not None and s.app.dns.lock is s.app.catalog.lock
        stop = threading.Event()
        seen: list[frozenset[str]] = []
        errors: list[BaseException] = []

        def stream() -> None:
            q = dns.message.make_query(
                "www.example.com", "A", use_edns=0, options=[dns.edns.ECSOption("212.58.224.0", 24)]
            )
            try:
                while not stop.is_set():
                    r = dns.query.udp(q, s.host, port=s.port, timeout=3)
                    seen.append(frozenset(rd.address for rr in r.answer for rd in rr))
            except BaseException as exc:
                errors.append(exc)

        client = threading.Thread(target=stream)
        client.start()
        try:
            for _ in range(20):
                s.call(s.app.health.set_override("uk", Override.DOWN, "flip", "test", None))
                s.call(s.app.health.clear_override("uk", "test", "flop"))
            s.call(s.app.health.set_override("uk", Override.DOWN, "last", "test", None))
            wait_for(lambda: len(seen) > 10 and seen[-1] == {"198.51.100.20"})
        finally:
            stop.set()
            client.join(10)
        assert not errors, errors
        assert set(seen) <= {frozenset({"198.51.100.10"}), frozenset({"198.51.100.20"})}
        assert len(seen) > 40


def shared(host: str, handles: list[Handle]) -> tuple[list[udpbatch.BatchUdp], int]:
    """One UDP socket served by several BatchUdp, as `--workers N` share one: each has a
    descriptor of the socket and its own open file description of one flock file."""
    udp, tcp = bind_sockets(host, 0)
    tcp.close()
    lock_file = os.memfd_create("test-leader", os.MFD_CLOEXEC)
    batches = []
    for h in handles:
        sock = socket.socket(fileno=os.dup(udp.fileno()))
        own = os.open(f"/proc/self/fd/{lock_file}", os.O_RDWR | os.O_CLOEXEC)
        batches.append(udpbatch.BatchUdp(sock, h, lock=threading.RLock(), leader_fd=own))
    port = udp.getsockname()[1]
    udp.close()
    os.close(lock_file)
    return batches, port


def tagged(tag: str, seen: dict[str, list[int]], gate: Callable[[int], None]) -> Handle:
    def handle(data: bytes, addr: tuple[str, int], transport: Transport) -> bytes | None:
        if len(data) < 12:
            return None  # the empty datagram close() wakes the leader with
        qid = struct.unpack("!H", data[:2])[0]
        seen.setdefault(tag, []).append(qid)
        gate(qid)
        return echo(data, addr, transport)

    return handle


def test_a_shared_socket_wakes_only_the_leader_while_it_keeps_up() -> None:
    """Two receivers on one socket (`--workers 2`): batches smaller than 32 are all
    received by whichever took the flock first; the other never wakes."""
    seen: dict[str, list[int]] = {}

    async def run() -> None:
        batches, port = shared("127.0.0.1", [tagged(t, seen, lambda qid: None) for t in ("a", "b")])
        for b in batches:
            b.start(asyncio.get_running_loop())
        try:
            for _ in range(10):
                got = await asyncio.to_thread(burst, "127.0.0.1", port, 2, 5)
                assert sum(len(v) for v in got.values()) == 10
        finally:
            for b in batches:
                b.close()
        assert len(seen) == 1 and len(next(iter(seen.values()))) == 100
        assert [b.handoffs for b in batches] == [0, 0]

    asyncio.run(run())


def test_a_full_batch_hands_the_shared_socket_to_the_other_receiver() -> None:
    """While the leader answers a full batch of 32, the other receiver takes the next
    one: both answer at once. Each handler of the burst waits until the other has
    received too, which only a hand-over makes possible (else it times out)."""
    seen: dict[str, list[int]] = {}
    release = threading.Event()
    both = threading.Event()

    def gate(qid: int) -> None:
        if qid == 1:
            release.wait(5)  # the leader holds the socket, busy: the burst queues up
        elif qid >= 100:
            if len(seen) == 2:
                both.set()
            both.wait(5)

    async def run() -> None:
        batches, port = shared("127.0.0.1", [tagged(t, seen, gate) for t in ("a", "b")])
        for b in batches:
            b.start(asyncio.get_running_loop())
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.bind(("127.0.0.1", 0))
        client.settimeout(5)
        try:
            client.sendto(query(1), ("127.0.0.1", port))
            await asyncio.to_thread(wait_until, lambda: len(seen) == 1)
            for qid in range(100, 164):
                client.sendto(query(qid), ("127.0.0.1", port))
            release.set()
            replies = [await asyncio.to_thread(client.recv, 2048) for _ in range(65)]
        finally:
            client.close()
            for b in batches:
                b.close()
        ids = sorted(struct.unpack("!H", r[:2])[0] for r in replies)
        assert ids == [1, *range(100, 164)]
        assert both.is_set()
        burst_sizes = sorted(len([q for q in v if q >= 100]) for v in seen.values())
        assert burst_sizes == [32, 32]
        assert sum(b.handoffs for b in batches) >= 1

    asyncio.run(run())


def test_closing_one_receiver_of_a_shared_socket_leaves_the_other_serving() -> None:
    """close() must not shut a shared socket down (that would stop every worker): the
    leader is woken by an empty datagram, which nobody answers, and hands on."""
    seen: dict[str, list[int]] = {}

    async def run() -> None:
        batches, port = shared("127.0.0.1", [tagged(t, seen, lambda qid: None) for t in ("a", "b")])
        for b in batches:
            b.start(asyncio.get_running_loop())
        await asyncio.to_thread(burst, "127.0.0.1", port, 1, 3)
        leader = next(iter(seen))
        first, second = batches if leader == "a" else batches[::-1]
        thread = first._thread
        assert thread is not None
        first.close()
        assert not thread.is_alive()
        try:
            got = await asyncio.to_thread(burst, "127.0.0.1", port, 2, 5)
            assert sum(len(v) for v in got.values()) == 10
        finally:
            other = second._thread
            second.close()
        assert other is not None and not other.is_alive()
        assert second.sock.fileno() == -1  # the last one closed its descriptor
        assert len(seen["a"]) + len(seen["b"]) == 13 and len(seen) == 2

    asyncio.run(run())


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.002)


def test_a_shared_socket_needs_the_receive_thread() -> None:
    """Only the receive thread takes the flock: the event loop's reader on a shared
    socket would be woken with every other worker, so it is refused."""
    udp, tcp = bind_sockets("127.0.0.1", 0)
    tcp.close()
    lock_file = os.memfd_create("test-leader", os.MFD_CLOEXEC)
    try:
        with pytest.raises(ValueError, match="give a lock"):
            udpbatch.BatchUdp(udp, echo, leader_fd=lock_file)
        with pytest.raises(ValueError, match="needs udp_batch and udp_thread"):
            asyncio.run(DnsServer(echo).start([(udp, tcp)], {udp.fileno(): lock_file}))
    finally:
        udp.close()
        os.close(lock_file)


def test_a_batch_in_progress_is_reported_busy_until_it_is_answered() -> None:
    """busy_since marks the batch being answered (what a worker reports, so that the
    main process can kill one whose receive thread is stuck while holding the socket)."""
    release = threading.Event()
    entered = threading.Event()

    def slow(data: bytes, addr: tuple[str, int], transport: Transport) -> bytes | None:
        entered.set()
        release.wait(5)
        return echo(data, addr, transport)

    async def run() -> None:
        batch, port = await serve("127.0.0.1", slow, True)
        server = DnsServer(echo)
        server.udp_transports.append(batch)
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.settimeout(5)
        try:
            assert batch.busy_since == 0.0 and server.udp_busy_s() == 0.0
            client.sendto(query(7), ("127.0.0.1", port))
            assert await asyncio.to_thread(entered.wait, 5)
            assert batch.busy_since > 0.0
            await asyncio.sleep(0.05)
            assert server.udp_busy_s() >= 0.05
            release.set()
            await asyncio.to_thread(client.recv, 2048)
            await asyncio.to_thread(wait_until, lambda: batch.busy_since == 0.0)
            assert server.udp_busy_s() == 0.0
        finally:
            release.set()
            client.close()
            batch.close()

    asyncio.run(run())
