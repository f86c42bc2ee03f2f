"""asyncio transports: UDP and TCP (RFC 7766) around the query handler.

No thread per packet and no per-query logging: a datagram is answered inside
`datagram_received`; TCP connections are protocol objects with timers, bounded in
number overall and per client, so idle or stalled clients never block UDP or new TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from . import udpbatch
from .handler import QTYPE_NAMES
from .model import Transport

log = logging.getLogger(__name__)

HandleFn = Callable[[bytes, tuple[str, int], Transport], "bytes | None"]


@dataclass
class TcpLimits:
    """RFC 7766 §6.2.3 timeouts and connection bounds (see [server] in config.py)."""

    idle_timeout_s: float = 10.0
    query_timeout_s: float = 30.0
    max_connections: int = 1000
    max_per_client: int = 100
    max_queries: int = 0  # per connection; 0 = unlimited


class _ErrorLog:
    """Logs handler crashes at most once per 10 s, so a crafted packet cannot flood logs."""

    def __init__(self) -> None:
        self.last = 0.0
        self.suppressed = 0

    def report(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self.last >= 10:
            log.error("query handler failed (%d similar suppressed)", self.suppressed, exc_info=exc)
            self.last, self.suppressed = now, 0
        else:
            self.suppressed += 1


_errors = _ErrorLog()


def _failed(data: bytes, exc: Exception) -> bytes | None:
    """A bug must cost one answer, never the server: log (rate-limited), SERVFAIL."""
    _errors.report(exc)
    if len(data) >= 12 and not data[2] & 0x80:
        # SERVFAIL with the header copied; no question (it may be what broke us)
        return data[:2] + bytes([0x80 | (data[2] & 0x79), 0x02]) + bytes(8)
    return None


def _safe(handle: HandleFn, data: bytes, addr: tuple[str, int], tr: Transport) -> bytes | None:
    try:
        return handle(data, addr, tr)
    except Exception as exc:
        return _failed(data, exc)


_UDP = Transport.UDP  # a module global: enum attribute lookups are slow on the hot path

query_log = logging.getLogger("geodns.query")
_RCODES = ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED")


def _question_text(data: bytes) -> str:
    """'name TYPE' of a query's first question, as far as it can be read ('-' if not)."""
    labels: list[str] = []
    pos = 12
    if len(data) < 12 or data[4:6] == b"\x00\x00":
        return "-"
    while pos < len(data) and data[pos] and len(labels) < 128:
        n = data[pos]
        if n & 0xC0 or pos + 1 + n > len(data):
            return "-"
        labels.append(data[pos + 1 : pos + 1 + n].decode("ascii", "backslashreplace"))
        pos += 1 + n
    if pos + 3 > len(data):
        return "-"
    qtype = int.from_bytes(data[pos + 1 : pos + 3], "big")
    return (".".join(labels) + ".") + " " + QTYPE_NAMES.get(qtype, f"TYPE{qtype}")


def logging_handler(handle: HandleFn) -> HandleFn:
    """`[server] query_log`: one line per query on the `geodns.query` logger (INFO):
    transport, client, question, rcode and reply size, or "dropped" when nothing was
    sent (RRL, a response, junk). Costs a log record per query: for debugging."""

    def logged(data: bytes, addr: tuple[str, int], transport: Transport) -> bytes | None:
        reply = handle(data, addr, transport)
        if reply is None or len(reply) < 4:
            outcome = "dropped"
        else:
            rcode = reply[3] & 0x0F
            outcome = _RCODES[rcode] if rcode < len(_RCODES) else f"RCODE{rcode}"
            outcome += f"{' TC' if reply[2] & 0x02 else ''} {len(reply)}B"
        query_log.info(
            "%s %s#%d %s %s", transport.value, addr[0], addr[1], _question_text(data), outcome
        )
        return reply

    return logged


class UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, handle: HandleFn) -> None:
        self.handle = handle
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        # the hot path: no extra call layer (try costs nothing unless it raises)
        try:
            reply = self.handle(data, addr, _UDP)
        except Exception as exc:
            reply = _failed(data, exc)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a client that went away: nothing to do
        log.debug("udp error: %s", exc)


class TcpServerState:
    """Connection accounting shared by all TCP listeners."""

    def __init__(self, limits: TcpLimits) -> None:
        self.limits = limits
        self.connections: set[TcpProtocol] = set()
        self.per_client: dict[str, int] = {}
        self.rejected = 0

    def admit(self, conn: TcpProtocol, host: str) -> bool:
        lim = self.limits
        if len(self.connections) >= lim.max_connections:
            return False
        if lim.max_per_client and self.per_client.get(host, 0) >= lim.max_per_client:
            return False
        self.connections.add(conn)
        self.per_client[host] = self.per_client.get(host, 0) + 1
        return True

    def release(self, conn: TcpProtocol, host: str) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            n = self.per_client.get(host, 1) - 1
            if n:
                self.per_client[host] = n
            else:
                self.per_client.pop(host, None)


# Replies of one segment are joined and written at most this many octets at a time, so
# that a client that stops reading is noticed (pause_writing) within one such write.
FLUSH_OCTETS = 65536


class TcpProtocol(asyncio.Protocol):
    """One TCP client: 2-byte length framing across any segmentation (RFC 1035 §4.2.2)."""

    def __init__(self, handle: HandleFn, state: TcpServerState) -> None:
        self.handle = handle
        self.state = state
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.addr: tuple[str, int] = ("", 0)
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0  # loop time the armed timer fires at
        self.deadline = 0.0  # loop time the connection is closed at, unless data comes
        self.queries = 0
        self.admitted = False
        self.partial = False  # a message has begun and its deadline is running
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.addr = (peer[0], peer[1]) if peer else ("", 0)
        if not self.state.admit(self, self.addr[0]):
            self.state.rejected += 1
            self.transport.abort()
            return
        self.admitted = True
        self._arm(self.state.limits.idle_timeout_s)

    def _arm(self, seconds: float) -> None:
        """Move the deadline to `seconds` from now.

        A busy connection moves it on every segment, so the timer is lazy: one armed
        at or before the deadline stays, and when it fires it re-arms itself for the
        rest (`_timeout`). Only a deadline earlier than the armed timer (a partial
        message whose deadline is shorter than the idle timeout) replaces it. Cancelling
        and creating a timer per segment cost ~1 µs per query (bench/README.md, TCP)."""
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + seconds
        if self.timer is None or self.timer_at > self.deadline:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = loop.call_at(self.deadline, self._timeout)
            self.timer_at = self.deadline

    def _timeout(self) -> None:
        self.timer = None
        if self.transport is None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self.deadline:  # data came since it was armed: wait the rest
            self.timer = loop.call_at(self.deadline, self._timeout)
            self.timer_at = self.deadline
            return
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if not self.admitted or self.transport is None or self.transport.is_closing():
            return  # closing (abort, close, the query limit, shutdown): answer no more
        buf = self.buf
        lim = self.state.limits
        if buf:  # the rest of a message begun in an earlier segment
            buf += data
            if not self.paused and (len(buf) < 2 or 12 <= (buf[0] << 8 | buf[1]) > len(buf) - 2):
                # still incomplete: append only (no copy of what is already buffered)
                self._deadline(lim)
                return
            data = bytes(buf)
            buf.clear()
        # RFC 7766 §6.2.1.1: queries may be pipelined; the replies to all the messages
        # of one segment go out in one write (one system call, not one per reply)
        out: list[bytes] = []
        pending = 0
        at, n = 0, len(data)
        while n - at >= 2:
            if self.paused:
                # The client is not reading its answers (the transport's buffer is past
                # its high-water mark): answer nothing more until it does. What is left
                # of the segment waits in `buf` (resume_writing answers it), so one
                # segment of small queries for large answers cannot pile up megabytes.
                break
            size = (data[at] << 8) | data[at + 1]
            if size < 12:
                # Not a DNS message: close rather than guess where the next one starts.
                self._flush(out)
                self.transport.abort()
                return
            end = at + 2 + size
            if end > n:
                break
            msg = data[at + 2 : end]
            at = end
            self.partial = False
            reply = _safe(self.handle, msg, self.addr, Transport.TCP)
            if reply is None:
                self._flush(out)
                self.transport.abort()  # junk or a response on a query stream
                return
            out.append(len(reply).to_bytes(2, "big"))
            out.append(reply)
            pending += len(reply)
            self.queries += 1
            if lim.max_queries and self.queries >= lim.max_queries:
                self._flush(out)
                self.transport.close()
                return
            if pending >= FLUSH_OCTETS:
                self._flush(out)  # may pause writing (the loop's check above)
                out, pending = [], 0
        self._flush(out)
        if at < n:
            buf += data[at:]
        self._deadline(lim)

    def _deadline(self, lim: TcpLimits) -> None:
        """RFC 7766 §6.2.3: an idle connection gets the idle timeout; a partial message
        the per-message deadline, counted from its first octet. Re-arming it on every
        segment would let a client drip one octet at a time and hold the connection
        (and a slot of the connection limit) forever. Queries held back while the
        client does not read count as idle: it has all it asked for until it reads (and
        cannot finish a partial message while we do not read; when it reads again, a
        partial message's deadline starts again)."""
        if not self.buf or self.paused:
            self.partial = False
            self._arm(lim.idle_timeout_s)
        elif not self.partial:
            self.partial = True
            self._arm(lim.query_timeout_s)

    def _flush(self, out: list[bytes]) -> None:
        if out and self.transport is not None:
            self.transport.write(out[0] + out[1] if len(out) == 2 else b"".join(out))

    def pause_writing(self) -> None:
        # The client does not read its answers: stop reading its questions.
        if self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and self.paused:
            self.paused = False
            self.transport.resume_reading()
            if self.buf:
                # The queries held back while paused, on the next turn of the loop:
                # the transport calls this from inside its write handler, and a close or
                # abort there (junk, the query limit) would be torn down twice.
                asyncio.get_running_loop().call_soon(self.data_received, b"")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.admitted:
            self.state.release(self, self.addr[0])
        self.transport = None


UDP_BUFFER_BYTES = 4 * 1024 * 1024


def _grow_buffers(sock: socket.socket) -> None:
    """Room for bursts: a full receive buffer drops queries before we ever see them.

    SO_RCVBUFFORCE (root or CAP_NET_ADMIN) goes past net.core.rmem_max; otherwise the
    kernel caps SO_RCVBUF at rmem_max.
    """
    for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):
        # 33 = SO_RCVBUFFORCE, 32 = SO_SNDBUFFORCE on Linux
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, UDP_BUFFER_BYTES)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, UDP_BUFFER_BYTES)


def bind_sockets(
    host: str, port: int, reuse_port: bool = False, udp_reuse_port: bool | None = None
) -> tuple[socket.socket, socket.socket]:
    """Bind the UDP and TCP sockets of one listen address (same port for both).

    With port 0 the OS picks a UDP port and TCP binds the same number (retried if that
    number happens to be taken for TCP). `udp_reuse_port` (default: `reuse_port`) sets
    SO_REUSEPORT on the UDP socket alone.
    """
    udp_reuse = reuse_port if udp_reuse_port is None else udp_reuse_port
    for attempt in range(20):
        udp = bind_udp(host, port, udp_reuse)
        try:
            return udp, bind_tcp(host, udp.getsockname()[1], reuse_port)
        except OSError:
            udp.close()
            if port != 0 or attempt == 19:
                raise
    raise AssertionError("unreachable")


def bind_udp(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """The UDP socket of one listen address, with large buffers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    udp = socket.socket(family, socket.SOCK_DGRAM)
    try:
        _options(udp, reuse_port)
        _grow_buffers(udp)
        udp.bind((host, port))
        udp.setblocking(False)
    except OSError:
        udp.close()
        raise
    return udp


def bind_tcp(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """The listening TCP socket of one listen address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    tcp = socket.socket(family, socket.SOCK_STREAM)
    try:
        _options(tcp, reuse_port)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((host, port))
        tcp.listen(1024)
        tcp.setblocking(False)
    except OSError:
        tcp.close()
        raise
    return tcp


def _options(sock: socket.socket, reuse_port: bool) -> None:
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)


def _locked(handle: HandleFn, lock: threading.RLock) -> HandleFn:
    """`handle` holding `lock`: a TCP query never runs beside a UDP batch."""

    def locked(data: bytes, addr: tuple[str, int], transport: Transport) -> bytes | None:
        with lock:
            return handle(data, addr, transport)

    return locked


class DnsServer:
    """All listeners of one process."""

    def __init__(
        self,
        handle: HandleFn,
        limits: TcpLimits | None = None,
        udp_batch: bool = True,
        on_send_dropped: Callable[[int], None] | None = None,
        lock: threading.RLock | None = None,
    ) -> None:
        self.handle = handle
        self.on_send_dropped = on_send_dropped  # UDP replies the kernel would not take
        self.tcp_state = TcpServerState(limits or TcpLimits())
        # recvmmsg/sendmmsg where the platform has them (udpbatch.py), else asyncio's
        # datagram transport
        self.udp_batch = udp_batch and udpbatch.available()
        # `[server] udp_thread`: UDP answered on a receive thread per socket, holding
        # `lock` per batch; TCP (on the event loop) then takes the lock per query too
        self.lock = lock if self.udp_batch else None
        self.tcp_handle = handle if self.lock is None else _locked(handle, self.lock)
        self.udp_transports: list[asyncio.DatagramTransport | udpbatch.BatchUdp] = []
        self.tcp_servers: list[asyncio.Server] = []
        self.addresses: list[tuple[str, int]] = []

    async def start(
        self,
        sockets: list[tuple[socket.socket, socket.socket]],
        leaders: dict[int, int] | None = None,
    ) -> None:
        """Serve each (UDP, TCP) pair. `leaders` maps a UDP socket's descriptor to the
        flock descriptor of a socket shared with other workers (udpbatch.BatchUdp)."""
        loop = asyncio.get_running_loop()
        leaders = leaders or {}
        for udp, tcp in sockets:
            leader = leaders.get(udp.fileno())
            if leader is not None and (not self.udp_batch or self.lock is None):
                raise ValueError("a shared UDP socket needs udp_batch and udp_thread")
            if self.udp_batch:
                batch = udpbatch.BatchUdp(
                    udp, self.handle, self.on_send_dropped, self.lock, leader_fd=leader
                )
                batch.start(loop)
                self.udp_transports.append(batch)
            else:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: UdpProtocol(self.handle), sock=udp
                )
                self.udp_transports.append(transport)
            server = await loop.create_server(
                lambda: TcpProtocol(self.tcp_handle, self.tcp_state), sock=tcp
            )
            self.tcp_servers.append(server)
            name = udp.getsockname()
            self.addresses.append((name[0], name[1]))
            log.info("serving DNS on %s port %d (udp+tcp)", name[0], name[1])

    def udp_busy_s(self) -> float:
        """How long the longest UDP batch in progress has been answered (0: none)."""
        now = time.monotonic()
        return max(
            (
                now - t.busy_since
                for t in self.udp_transports
                if isinstance(t, udpbatch.BatchUdp) and t.busy_since
            ),
            default=0.0,
        )

    def udp_received(self) -> list[int]:
        """Datagrams taken from each UDP socket so far, in the order they were started
        (0 for a socket served by the asyncio transport)."""
        return [t.received if isinstance(t, udpbatch.BatchUdp) else 0 for t in self.udp_transports]

    def udp_handoffs(self) -> int:
        """Full batches after which a shared UDP socket was handed on (udpbatch)."""
        return sum(t.handoffs for t in self.udp_transports if isinstance(t, udpbatch.BatchUdp))

    async def stop(self, grace_s: float = 3.0) -> None:
        """Stop accepting, let in-flight TCP answers drain, then close everything."""
        for server in self.tcp_servers:
            server.close()
        for t in self.udp_transports:
            t.close()
        deadline = time.monotonic() + grace_s
        for conn in list(self.tcp_state.connections):
            tr = conn.transport
            if tr is None:
                continue
            while tr.get_write_buffer_size() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            tr.close()
        for server in self.tcp_servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), max(0.1, deadline - time.monotonic()))
