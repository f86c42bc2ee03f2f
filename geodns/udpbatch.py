"""UDP with recvmmsg(2)/sendmmsg(2): many datagrams per system call and per wakeup.

The default asyncio (and uvloop) datagram transport makes one `recvmsg` and one
`sendmsg` per datagram and calls into Python once per datagram with a new `(host,
port)` tuple; sendto() parses that address again. Measured on the bench machine that
is ~2 µs of the ~2.5 µs of user CPU per cached answer (bench/README.md). gdnsd, Knot
and NSD receive and send in batches instead; this module does the same from Python
through ctypes (Linux only, no compiler needed):

- the socket's file descriptor is watched with `loop.add_reader`; when it is readable,
  one `recvmmsg` takes up to BATCH datagrams into preallocated buffers, each is
  answered by the handler, and one `sendmmsg` sends all replies, each to the address
  its query came from (the kernel wrote it into the receive headers; the send headers
  point at the same bytes, so no address is parsed to reply);
- the `(host, port)` the handler sees is built once per distinct source address and
  kept in a bounded dict keyed by the raw sockaddr read as integers (for IPv4 its first
  8 octets, family + port + address, are one word: no bytes object per datagram);
- with `[server] udp_thread` (the default) a thread per socket blocks in recvmmsg and
  answers each batch holding the catalog's lock (`BatchUdp.start`); otherwise the
  event loop's reader does, taking at most ROUNDS batches per wakeup before returning
  to the loop (TCP, the ops API and timers are never starved; the reader is
  level-triggered, so what is left is read on the next turn).

A receive slot holds the largest UDP payload, so no datagram is cut short.
`available()` says whether the platform has what this needs; the
server falls back to the asyncio transport otherwise (`[server] udp_batch = false`
forces that).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable

from .model import Transport

log = logging.getLogger(__name__)

BATCH = 32  # datagrams per system call
ROUNDS = 8  # batches per wakeup before yielding to the event loop
SLOT = 65536  # receive slot per datagram: the largest UDP payload
NAME = 32  # a sockaddr slot: sizeof(struct sockaddr_in6) = 28, rounded up to 8-octet words
MSG_DONTWAIT = 0x40
MSG_WAITFORONE = 0x10000  # recvmmsg: block for the first datagram only
MAX_ADDRS = 65536

HandleFn = Callable[[bytes, tuple[str, int], Transport], "bytes | None"]


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


_MSG_SIZE = ctypes.sizeof(_Mmsghdr)
_NAME_AT = _Mmsghdr.msg_hdr.offset + _Msghdr.msg_name.offset
_LEN_AT = _Mmsghdr.msg_len.offset
_IOV_SIZE = ctypes.sizeof(_Iovec)
_IOVLEN_AT = _Iovec.iov_len.offset

# indexes into the typed views of the header arrays
_MSG_WORDS = _MSG_SIZE // 4
_MSG_QWORDS = _MSG_SIZE // 8
_LEN_WORD = _LEN_AT // 4
_NAME_QWORD = _NAME_AT // 8
_IOV_WORDS = _IOV_SIZE // 8
_IOVLEN_WORD = _IOVLEN_AT // 8
_UDP = Transport.UDP

_libc: ctypes.CDLL | None = None


def _load() -> ctypes.CDLL | None:
    global _libc
    # 64-bit Linux: the typed views below write pointers and sizes as 8-octet words
    if _libc is None and sys.platform.startswith("linux") and ctypes.sizeof(ctypes.c_void_p) == 8:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            # no argtypes: every argument is an int, None or a ctypes array/pointer,
            # which ctypes passes as is (converting through argtypes costs ~0.3 µs)
            for fn in (libc.recvmmsg, libc.sendmmsg):
                fn.restype = ctypes.c_int
            _libc = libc
        except (OSError, AttributeError):
            return None
    return _libc


def available() -> bool:
    """True on 64-bit Linux with recvmmsg/sendmmsg in the C library."""
    return _load() is not None


def _address(name: bytes, family: int) -> tuple[str, int]:
    """A raw sockaddr as asyncio would give it: (host, port)."""
    port = int.from_bytes(name[2:4], "big")
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, name[4:8]), port
    host = socket.inet_ntop(socket.AF_INET6, name[8:24])
    scope = int.from_bytes(name[24:28], sys.byteorder)
    if scope:
        try:
            host += "%" + socket.if_indextoname(scope)
        except OSError:
            host += f"%{scope}"
    return host, port


class BatchUdp:
    """One UDP socket served with recvmmsg/sendmmsg from the event loop's reader."""

    def __init__(
        self,
        sock: socket.socket,
        handle: HandleFn,
        on_send_dropped: Callable[[int], None] | None = None,
        lock: threading.RLock | None = None,
        leader_fd: int | None = None,
    ) -> None:
        libc = _load()
        if libc is None:
            raise OSError("recvmmsg/sendmmsg are not available")
        if leader_fd is not None and lock is None:
            raise ValueError("a shared socket is received from by the thread: give a lock")
        self._libc = libc
        self.sock = sock
        self.fd = sock.fileno()
        self.family = sock.family
        # the kernel writes this sockaddr length into every receive header
        self.namelen = 16 if sock.family == socket.AF_INET else 28  # sockaddr_in(6)
        self.handle = handle
        self.loop: asyncio.AbstractEventLoop | None = None
        # source sockaddr (as words) -> (host, port) for the handler
        self.addrs: dict[int | tuple[int, ...], tuple[str, int]] = {}
        self.send_dropped = 0  # replies the kernel would not take (send buffer full)
        self.on_send_dropped = on_send_dropped  # told each time (the server's statistics)
        # with a lock: a thread of its own blocks in recvmmsg and answers each batch
        # holding the lock (see `start`); without: the event loop's reader
        self.lock = lock
        # with a leader lock (`--workers N`, `[server] worker_udp_shared`): the socket is
        # shared by several processes and only the holder of this flock receives; see
        # `_receive`. The descriptor is this object's own open file description.
        self.leader_fd = leader_fd
        self.handoffs = 0  # full batches after which the receive was handed on
        self.received = 0  # datagrams taken from the socket (the watchdog's progress)
        # time.monotonic() when the batch being answered was received; 0.0 when none is
        # (a batch that never ends would stop every worker sharing the socket: the main
        # process kills a worker that reports one stuck for too long)
        self.busy_since = 0.0
        self._thread: threading.Thread | None = None
        self._stopping = False
        n = BATCH
        # receive side: n slots of SLOT bytes, n sockaddr slots, n iovecs, n headers
        self._rbuf = bytearray(n * SLOT)
        self._rview = memoryview(self._rbuf)
        self._names = bytearray(n * NAME)
        self._nview = memoryview(self._names)
        self._rarr = (ctypes.c_char * len(self._rbuf)).from_buffer(self._rbuf)
        self._narr = (ctypes.c_char * len(self._names)).from_buffer(self._names)
        self._riov = (_Iovec * n)()
        self._rmsgs = (_Mmsghdr * n)()
        rbase = ctypes.addressof(self._rarr)
        nbase = ctypes.addressof(self._narr)
        self._name_ptrs = [nbase + i * NAME for i in range(n)]
        for i in range(n):
            self._riov[i].iov_base = rbase + i * SLOT
            self._riov[i].iov_len = SLOT
            hdr = self._rmsgs[i].msg_hdr
            hdr.msg_name = self._name_ptrs[i]
            hdr.msg_namelen = NAME
            hdr.msg_iov = ctypes.addressof(self._riov[i])
            hdr.msg_iovlen = 1
        # send side: n slots of SLOT bytes, n iovecs, n headers whose names are set to
        # the receive name of the query each reply answers
        self._sbuf = bytearray(n * SLOT)
        self._sview = memoryview(self._sbuf)
        self._sarr = (ctypes.c_char * len(self._sbuf)).from_buffer(self._sbuf)
        self._siov = (_Iovec * n)()
        self._smsgs = (_Mmsghdr * n)()
        sbase = ctypes.addressof(self._sarr)
        for j in range(n):
            self._siov[j].iov_base = sbase + j * SLOT
            hdr = self._smsgs[j].msg_hdr
            hdr.msg_iov = ctypes.addressof(self._siov[j])
            hdr.msg_iovlen = 1
            # reply j goes where query j came from (unless a query got no reply)
            hdr.msg_name = self._name_ptrs[j]
            hdr.msg_namelen = self.namelen
        # typed views over the headers: one index per field, no ctypes attribute access
        self._r32 = memoryview(self._rmsgs).cast("B").cast("I")
        self._s64 = memoryview(self._smsgs).cast("B").cast("Q")
        self._siov64 = memoryview(self._siov).cast("B").cast("Q")
        self._smsgs_p = ctypes.addressof(self._smsgs)
        self._n64 = self._nview.cast("Q")
        # per slot, precomputed: where datagram i starts in the receive buffer, where its
        # length is in the headers' words, where reply j goes and where its length goes
        self._rstart = [i * SLOT for i in range(n)]
        self._rlen = [i * _MSG_WORDS + _LEN_WORD for i in range(n)]
        self._sstart = [j * SLOT for j in range(n)]
        self._slen = [j * _IOV_WORDS + _IOVLEN_WORD for j in range(n)]

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve from the event loop's reader, or (with a lock) from a receive thread.

        The thread blocks in recvmmsg(MSG_WAITFORONE): a wakeup costs one system call
        instead of epoll_pwait, a turn of the event loop and a callback (~2 µs less per
        wakeup, measured in bench/README.md), and the event loop stays free for TCP, the
        API and the checker. Each batch is answered holding `lock` (the catalog's), so
        it never sees half a publish and never runs beside a TCP query."""
        self.loop = loop
        if self.lock is None:
            loop.add_reader(self.fd, self._readable)
            return
        self.sock.setblocking(True)
        self._thread = threading.Thread(target=self._receive, name="geodns-udp", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        try:
            self._receive_loop()
        finally:
            if self.leader_fd is not None:
                # the socket is shared: this thread owns its descriptors, closed only
                # once it is sure not to touch them again (see `close`)
                with contextlib.suppress(OSError):
                    fcntl.flock(self.leader_fd, fcntl.LOCK_UN)
                os.close(self.leader_fd)
                self.sock.close()

    def _receive_loop(self) -> None:
        recvmmsg, fd, msgs, lock = self._libc.recvmmsg, self.fd, self._rmsgs, self.lock
        assert lock is not None
        leader = self.leader_fd
        held = leader is None
        while not self._stopping:
            if not held:
                # Leader/follower over a socket shared by the workers: one process
                # receives at a time. A follower sleeps here (no wakeup per datagram,
                # which is what a second SO_REUSEPORT socket costs on a shared CPU); the
                # kernel drops the flock of a process that dies.
                assert leader is not None
                fcntl.flock(leader, fcntl.LOCK_EX)
                held = True
                if self._stopping:
                    return
            n = recvmmsg(fd, msgs, BATCH, MSG_WAITFORONE, None)
            if self._stopping and (leader is None or n <= 0):
                return  # close() shut the socket down: what it returned is not a query
            if n > 0:
                self.received += n
                if leader is not None and n == BATCH:
                    # a full batch: more may be queued, so another worker receives
                    # while this one answers (the workers' CPUs work in parallel)
                    fcntl.flock(leader, fcntl.LOCK_UN)
                    held = False
                    self.handoffs += 1
                self.busy_since = time.monotonic()
                try:
                    with lock:
                        self._answer(n)
                except Exception:  # a bug, not a bad query (_answer catches those)
                    log.exception("udp: a batch of %d datagrams failed", n)
                self.busy_since = 0.0
            elif n < 0:
                err = ctypes.get_errno()
                if err in (errno.EBADF, errno.ENOTSOCK):
                    log.error("udp: the socket is gone (%s): receive thread stops", err)
                    return
                if err not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                    # e.g. ECONNREFUSED queued by an ICMP error: nothing to answer
                    log.debug("recvmmsg: %s", errno.errorcode.get(err, err))
            else:
                return  # 0 messages: not a blocking receive any more; nothing to wait for

    def close(self) -> None:
        if self._thread is not None and self.leader_fd is not None:
            # A shared socket must not be shut down: that would stop every worker. The
            # leader is woken by an empty datagram (whoever receives it drops it: no
            # header); a follower waits for the flock and then sees _stopping. The
            # thread closes the descriptors itself (it may still be in flock now).
            self._stopping = True
            self._wake()
            self._thread.join(0.2)  # the leader wakes in ms; a follower waits in flock on
            self._thread = None
            self.loop = None
            return
        if self._thread is not None:
            self._stopping = True
            # wakes the thread blocked in recvmmsg; on an unconnected UDP socket Linux
            # reports ENOTCONN but shuts the receive side down all the same
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RD)
            self._thread.join(5)
            self._thread = None
        if self.loop is not None:
            if self.lock is None:
                self.loop.remove_reader(self.fd)
            self.loop = None
        self.sock.close()

    def _wake(self) -> None:
        """Send an empty datagram to the shared socket (to its own address, or loopback
        when it is bound to the wildcard)."""
        with contextlib.suppress(OSError):
            host, port = self.sock.getsockname()[:2]
            if host in ("0.0.0.0", "::"):
                host = "127.0.0.1" if self.family == socket.AF_INET else "::1"
            with socket.socket(self.family, socket.SOCK_DGRAM) as s:
                s.sendto(b"", (host, port))

    def get_extra_info(self, name: str) -> object:
        return self.sock if name == "socket" else None

    def _readable(self) -> None:
        recvmmsg, fd, msgs = self._libc.recvmmsg, self.fd, self._rmsgs
        for _ in range(ROUNDS):
            n = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, None)
            if n <= 0:
                if n < 0:
                    err = ctypes.get_errno()
                    if err not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                        # e.g. ECONNREFUSED queued by an ICMP error: nothing to answer
                        log.debug("recvmmsg: %s", errno.errorcode.get(err, err))
                        continue
                return
            self.received += n
            self._answer(n)
            if n < BATCH:
                return

    def _answer(self, n: int) -> None:
        r32, n64, s64, siov64 = self._r32, self._n64, self._s64, self._siov64
        rview, sview = self._rview, self._sview
        rstart, rlen, sstart, slen = self._rstart, self._rlen, self._sstart, self._slen
        addrs, handle, names = self.addrs, self.handle, self._name_ptrs
        v4 = self.family == socket.AF_INET
        udp = _UDP
        out = 0
        moved = False
        for i in range(n):
            at = rstart[i]
            # SLOT is more than the largest UDP payload: a datagram is never cut short
            data = rview[at : at + r32[rlen[i]]].tobytes()
            w = i * 4  # NAME / 8 words per sockaddr slot
            # IPv4: family, port and address are the slot's first word; IPv6: all four
            key = n64[w] if v4 else (n64[w], n64[w + 1], n64[w + 2], n64[w + 3])
            addr = addrs.get(key)
            if addr is None:
                if len(addrs) >= MAX_ADDRS:
                    addrs.clear()
                addr = addrs[key] = _address(
                    self._nview[i * NAME : i * NAME + self.namelen].tobytes(), self.family
                )
            try:
                reply = handle(data, addr, udp)
            except Exception as exc:
                from .server import _failed

                reply = _failed(data, exc)
            if not reply:
                continue
            size = len(reply)
            if size > SLOT:
                continue  # cannot happen: a UDP reply is at most the UDP limit
            at = sstart[out]
            sview[at : at + size] = reply
            siov64[slen[out]] = size
            if out != i:
                # an earlier query got no reply: this reply goes to query i's source
                s64[out * _MSG_QWORDS + _NAME_QWORD] = names[i]
                moved = True
            out += 1
        if out:
            self._send(out)
        if moved:
            for j in range(out):
                s64[j * _MSG_QWORDS + _NAME_QWORD] = names[j]

    def _send(self, out: int) -> None:
        sendmmsg, fd = self._libc.sendmmsg, self.fd
        sent = 0
        while sent < out:
            msgs = self._smsgs if not sent else ctypes.c_void_p(self._smsgs_p + sent * _MSG_SIZE)
            k = sendmmsg(fd, msgs, out - sent, MSG_DONTWAIT)  # never block
            if k > 0:
                sent += k
                continue
            err = ctypes.get_errno()
            if k < 0 and err == errno.EINTR:
                continue
            if k < 0 and err not in (errno.EAGAIN, errno.EWOULDBLOCK):
                # one reply the kernel refuses (e.g. an unroutable source): skip it
                log.debug("sendmmsg: %s", errno.errorcode.get(err, err))
                self._dropped(1)
                sent += 1
                continue
            # the send buffer is full: UDP may drop, and the client will ask again
            self._dropped(out - sent)
            return

    def _dropped(self, n: int) -> None:
        self.send_dropped += n
        if self.on_send_dropped is not None:
            self.on_send_dropped(n)
