"""Response rate limiting (RRL), the BIND/Knot model, in a fixed-size shared table.

Why: a spoofed query makes us send a reply to the spoofed address. RRL bounds what one
victim network can receive from us, per kind of response, so we are a poor reflector.

Key: (client network of the packet's source address -- /24 IPv4, /56 IPv6 by default;
never the ECS address, which the sender writes -- , response kind). The kind is made by
`response_kind()`: an answer (or NODATA) for one QNAME, NXDOMAIN for one zone (random
subdomains of a zone share one bucket), a referral out of one zone, or an error.
Replies decided before the lookup (BADVERS, BADCOOKIE, FORMERR, NOTIMP, REFUSED for a
class or a zone transfer, the cookie-only reply to QDCOUNT 0) are not charged: none is
larger than the query plus an OPT record, so they amplify nothing.

Bucket: a token bucket of `responses_per_s` tokens per second holding at most
`responses_per_s * window_s` tokens (the burst), kept as one number, the GCRA
"theoretical arrival time" `tat`: a response passes if `max(tat, now) + 1/rate - now <=
window_s`. So over any D seconds one key gets at most burst + rate * D full responses, a
new key starts with a full bucket, and an idle key is full again after `window_s`.
Limited responses do not debit the bucket (no debt): a client behind a flooded network
keeps getting `rate` answers per second. Each limited response is dropped, except every
`slip`-th one per bucket, which is "slipped": TC=1, the question, no records (RFC 9103's
authors and BIND call it so), so a real client retries over TCP, which RRL never limits.

Table: `table_size` slots (rounded up to a power of two) of 16 bytes (tat f64, tag u32,
limited count u32) in one buffer, 2-way set associative: a key hashes (SipHash-2-4 with
a random key, so nobody can aim collisions) to a pair of slots. Eviction when neither slot holds the
key: an idle slot (its bucket is full again, so forgetting it loses nothing) first; else
the busy, not limited slot with the fuller bucket; a bucket that is being limited is
never evicted while limited (a random-source flood cannot reset a victim's bucket), and
when both slots of the pair are being limited the newcomer passes uncounted
(`collisions`). Memory is the fixed buffer whatever the number of sources: 1,000,000
spoofed sources churn the table, they do not grow it.

Workers: the buffer is an mmap. One process uses an anonymous mapping; with --workers N
the main process creates a memfd (`SharedTable.create`), passes its descriptor to every
worker (`GEODNS_RRL_FD`), and each worker maps the same pages (`SharedTable.attach`), so
the limit is one limit for the host, not one per worker. Workers update slots without
locks: two workers racing on one bucket may both pass a response the bucket had one
token for, or lose a count; the error is at most one response per racing worker, which
RRL can afford (it is an approximation in BIND and Knot too). Times are
`time.monotonic()` (CLOCK_MONOTONIC, the same clock in every process of a host).
"""

from __future__ import annotations

import ipaddress
import logging
import mmap
import os
import struct
from collections.abc import Iterable
from enum import IntEnum
from socket import AF_INET, AF_INET6, inet_pton

from siphashc import siphash

from .config import RrlConfig

log = logging.getLogger(__name__)


class Action(IntEnum):
    """What to do with a response: send it, drop it, or send it truncated (TC=1)."""

    PASS = 0
    DROP = 1
    SLIP = 2


PASS, DROP, SLIP = Action.PASS, Action.DROP, Action.SLIP
EXEMPT = 3  # index in `counts` only: passed because the source network is exempt
COOKIE = 4  # index in `counts` only: sent without a check, the client's server cookie is valid
COUNT_NAMES = ("pass", "drop", "slip", "exempt", "cookie")

# Response kinds, the first byte of a kind key.
KIND_ANSWER, KIND_NXDOMAIN, KIND_REFERRAL, KIND_ERROR = 1, 2, 3, 4
_KIND_NAMES = {
    KIND_ANSWER: "answers for",
    KIND_NXDOMAIN: "NXDOMAIN in",
    KIND_REFERRAL: "referrals from",
    KIND_ERROR: "errors",
}
_ERROR_KEY = bytes([KIND_ERROR])

FD_ENV = "GEODNS_RRL_FD"  # a worker maps the main process's table from this descriptor

_MAGIC = b"GDNSRRL2"
_HEADER = struct.Struct("<8sI16s")  # magic, slots, SipHash key
_HEADER_SIZE = 64
_SLOT_SIZE = 16  # tat f64, tag u32 (0 = empty), limited count u32 | _LIMITED
_LIMITED = 0x80000000  # the bucket has limited since it was last full
_COUNT_MASK = 0x7FFFFFFF
_V4_MAPPED = b"\0\0\0\0\0\0\0\0\0\0\xff\xff"
_EPS = 1e-9  # float slack so that exactly `burst` responses fit


def response_kind(rcode: int, aa: bool, qname_lower: bytes, zone_origin: bytes) -> bytes:
    """The kind key of a response (BIND's classes): which bucket it is charged to.

    NOERROR authoritative (answer or NODATA): per QNAME. NXDOMAIN: per zone, so random
    subdomains share a bucket. NOERROR not authoritative (a referral): per zone. Any
    other rcode (REFUSED, SERVFAIL, ...): one "error" bucket per network.
    """
    if rcode == 0:
        if aa:
            return b"\x01" + qname_lower
        return b"\x03" + zone_origin
    if rcode == 3:
        return b"\x02" + zone_origin
    return _ERROR_KEY


class SharedTable:
    """The bucket array in one mapping: a header (magic, slots, SipHash key), then the
    `tat` of every slot (f64), then their tags (u32, 0 = empty), then their limited
    counts (u32). Slot 2k and 2k+1 form the pair a key hashes to."""

    def __init__(self, buf: mmap.mmap, fd: int | None = None) -> None:
        magic, slots, key = _HEADER.unpack_from(buf, 0)
        if magic != _MAGIC or len(buf) != _HEADER_SIZE + slots * _SLOT_SIZE:
            raise ValueError("not an RRL table")
        self.buf = buf
        self.slots = slots
        self.key = key
        self.fd = fd  # the memfd a shared table lives in (None: anonymous, this process)
        # typed views: one index per read or write, no struct packing on the hot path
        view = memoryview(buf)
        a, b, c = _HEADER_SIZE, _HEADER_SIZE + 8 * slots, _HEADER_SIZE + 12 * slots
        self.tats = view[a:b].cast("d")
        self.tags = view[b:c].cast("I")
        self.limited = view[c:].cast("I")
        view.release()

    def views(self) -> tuple[memoryview[float], memoryview[int], memoryview[int]]:
        """(tats, tags, limited counts), each indexed by slot."""
        return self.tats, self.tags, self.limited

    @staticmethod
    def _init(buf: mmap.mmap, slots: int) -> None:
        _HEADER.pack_into(buf, 0, _MAGIC, slots, os.urandom(16))

    @classmethod
    def anonymous(cls, slots: int) -> SharedTable:
        """A table for this process only."""
        slots = _pow2(slots)
        buf = mmap.mmap(-1, _HEADER_SIZE + slots * _SLOT_SIZE)
        cls._init(buf, slots)
        return cls(buf)

    @classmethod
    def create(cls, slots: int) -> SharedTable:
        """A table in a memfd, for worker processes to map (pass `fd` to them)."""
        slots = _pow2(slots)
        size = _HEADER_SIZE + slots * _SLOT_SIZE
        fd = os.memfd_create("geodns-rrl", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        buf = mmap.mmap(fd, size)
        cls._init(buf, slots)
        return cls(buf, fd)

    @classmethod
    def attach(cls, fd: int) -> SharedTable:
        """Map the table another process created (its memfd, inherited as `fd`)."""
        size = os.fstat(fd).st_size
        return cls(mmap.mmap(fd, size))

    def occupied(self) -> int:
        """Slots holding a bucket (tests and debugging; walks the whole table)."""
        return self.slots - self.tags.tolist().count(0)

    def close(self) -> None:
        for v in self.views():
            v.release()
        self.buf.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _pow2(slots: int) -> int:
    """table_size rounded up to a power of two (at least one pair)."""
    return max(2, 1 << (slots - 1).bit_length())


class _LogLimit:
    """At most one RRL log line per `interval_s`; the next line says how many were not."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.last = float("-inf")
        self.suppressed = 0

    def allow(self, now: float) -> int | None:
        """None: stay quiet; else the number of lines suppressed since the last one."""
        if now - self.last < self.interval_s:
            self.suppressed += 1
            return None
        n, self.suppressed, self.last = self.suppressed, 0, now
        return n


def _first_octets(networks: tuple[tuple[int, int], ...], width: int) -> bytes:
    """256 flags: may an address starting with this octet be in one of the networks?"""
    flags = bytearray(256)
    for net, mask in networks:
        top, top_mask = net >> (width - 8), mask >> (width - 8)
        for octet in range(256):
            if octet & top_mask == top:
                flags[octet] = 1
    return bytes(flags)


def _prefix(bits: int, width: int) -> tuple[int, int | None]:
    """(whole bytes, mask of the partial byte or None) of a prefix length."""
    if not 0 < bits <= width:
        raise ValueError(f"prefix length {bits} outside 1..{width}")
    whole, rest = divmod(bits, 8)
    return whole, ((0xFF << (8 - rest)) & 0xFF) if rest else None


_MEMO_MAX = 65536


def _packed(src: str) -> bytes:
    """'192.0.2.1' / 'fe80::1%eth0' -> packed; IPv4-mapped IPv6 -> the IPv4 address."""
    if ":" not in src:
        return inet_pton(AF_INET, src)
    packed = inet_pton(AF_INET6, src.partition("%")[0])
    if packed[:12] == _V4_MAPPED:
        packed = packed[12:]  # IPv4-mapped: the client's network is the IPv4 one
    return packed


class RateLimiter:
    """`check()` says PASS, DROP or SLIP for one UDP response; see the module docstring."""

    def __init__(
        self,
        responses_per_s: float = 200.0,
        window_s: float = 2.0,
        slip: int = 2,
        ipv4_prefix: int = 24,
        ipv6_prefix: int = 56,
        exempt: Iterable[str] = ("127.0.0.0/8", "::1/128"),
        table_size: int = 262144,
        table: SharedTable | None = None,
    ) -> None:
        if responses_per_s <= 0 or window_s <= 0 or responses_per_s * window_s < 1:
            raise ValueError("responses_per_s * window_s must allow at least one response")
        self.rate = responses_per_s
        self.window_s = window_s
        self.slip = slip
        self.ipv4_prefix, self.ipv6_prefix = ipv4_prefix, ipv6_prefix
        self._interval = 1.0 / responses_per_s
        self._tau = window_s + _EPS
        self._v4 = _prefix(ipv4_prefix, 32)
        self._v6 = _prefix(ipv6_prefix, 128)
        ex4: list[tuple[int, int]] = []
        ex6: list[tuple[int, int]] = []
        for text in exempt:
            net = ipaddress.ip_network(text, strict=False)
            (ex4 if net.version == 4 else ex6).append((int(net.network_address), int(net.netmask)))
        self._exempt4, self._exempt6 = tuple(ex4), tuple(ex6)
        self._exempt4_first = _first_octets(self._exempt4, 32)
        self._exempt6_first = _first_octets(self._exempt6, 128)
        self.table = table if table is not None else SharedTable.anonymous(table_size)
        self._key = self.table.key
        self._pair_mask = self.table.slots // 2 - 1
        self._tats, self._tags, self._limited = self.table.views()
        self.counts = [0] * len(COUNT_NAMES)  # by Action, then EXEMPT, COOKIE
        self.collisions = 0  # passed uncounted: both slots of the pair were limiting
        self._log = _LogLimit()
        self._memo: dict[str, bytes] = {}  # source string -> network key (b"": exempt)

    # -- the hot path -----------------------------------------------------------------
    def check(self, src: bytes | str, kind: bytes, now: float) -> Action:
        """Charge one response of `kind` to the network of `src` at `now`.

        `src` is the packet's source address, packed (4 or 16 octets) or as asyncio
        gives it ('192.0.2.1', 'fe80::1%eth0'); `now` is time.monotonic() or a test's.
        """
        if isinstance(src, str):
            # the source string as the transport gives it -> its network key, memoized
            # (bounded; a spoofed flood only empties the memo now and then)
            key = self._memo.get(src)
            if key is None:
                key = self._network_key(_packed(src))
                if len(self._memo) >= _MEMO_MAX:
                    self._memo.clear()
                self._memo[src] = key
        else:
            key = self._network_key(src)
        if not key:
            self.counts[EXEMPT] += 1
            return PASS
        h = siphash(self._key, key + kind)
        # tag 0 marks an empty slot; a key whose tag is 0 "finds" an empty slot, whose
        # tat of 0 is a full bucket: exactly what a new bucket is
        tag = h >> 32
        i = (h & self._pair_mask) << 1
        tats, tags, lim = self._tats, self._tags, self._limited
        if tags[i] != tag:
            if tags[i + 1] == tag:
                i += 1
            else:
                # Neither slot holds the key: take one (see "Eviction" above).
                tat, tat2 = tats[i], tats[i + 1]
                if tat > now and lim[i] & _LIMITED:
                    if tat2 > now and lim[i + 1] & _LIMITED:
                        self.collisions += 1
                        self.counts[PASS] += 1
                        return PASS
                    i += 1
                elif tat2 <= now or (tat > now and not lim[i + 1] & _LIMITED and tat2 < tat):
                    i += 1
                # a new bucket is full: its first response always passes (burst >= 1)
                tags[i] = tag
                lim[i] = 0
                tats[i] = now + self._interval
                self.counts[PASS] += 1
                return PASS
        tat = tats[i]
        new_tat = (tat if tat > now else now) + self._interval
        if new_tat - now <= self._tau:
            tats[i] = new_tat
            if lim[i] and tat <= now:
                # full again since the last limited response: the episode is over
                self._report(False, key, kind, now, lim[i] & _COUNT_MASK)
                lim[i] = 0
            self.counts[PASS] += 1
            return PASS
        count = lim[i]
        n = ((count & _COUNT_MASK) + 1) & _COUNT_MASK
        lim[i] = n | _LIMITED
        if not count & _LIMITED:
            self._report(True, key, kind, now, n)
        if self.slip and n % self.slip == 0:
            self.counts[SLIP] += 1
            return SLIP
        self.counts[DROP] += 1
        return DROP

    def _network_key(self, src: bytes) -> bytes:
        """The bucket key's network part for a packed source; b"" when it is exempt."""
        if len(src) == 4:
            # a 256-entry table of first octets keeps the exempt test off most queries
            if self._exempt4_first[src[0]] and self._exempt(src, self._exempt4):
                return b""
            whole, partial = self._v4
            key = b"\x04" + src[:whole]
        else:
            if self._exempt6_first[src[0]] and self._exempt(src, self._exempt6):
                return b""
            whole, partial = self._v6
            key = b"\x06" + src[:whole]
        if partial is not None:
            key += bytes((src[whole] & partial,))
        return key

    @staticmethod
    def _exempt(src: bytes, networks: tuple[tuple[int, int], ...]) -> bool:
        ip = int.from_bytes(src, "big")
        # a loop, not any(): no generator on the hot path
        for net, mask in networks:  # noqa: SIM110
            if ip & mask == net:
                return True
        return False

    # -- reporting ----------------------------------------------------------------------
    def _report(self, start: bool, key: bytes, kind: bytes, now: float, n: int) -> None:
        suppressed = self._log.allow(now)
        if suppressed is None:
            return
        what = _describe(kind)
        if start:
            log.warning(
                "rrl: limiting %s, %s, to %g responses/s (%d similar lines suppressed)",
                self._network(key),
                what,
                self.rate,
                suppressed,
            )
        else:
            log.warning(
                "rrl: no longer limiting %s, %s (%d responses limited) "
                "(%d similar lines suppressed)",
                self._network(key),
                what,
                n,
                suppressed,
            )

    def _network(self, key: bytes) -> str:
        if key[0] == 4:
            raw, bits = key[1:].ljust(4, b"\0"), self.ipv4_prefix
        else:
            raw, bits = key[1:].ljust(16, b"\0"), self.ipv6_prefix
        return str(ipaddress.ip_network((raw, bits)))


def _describe(kind: bytes) -> str:
    what = _KIND_NAMES.get(kind[0], "responses")
    if len(kind) > 1:
        return f"{what} {_wire_to_text(kind[1:])}"
    return what


def _wire_to_text(wire: bytes) -> str:
    labels: list[str] = []
    i = 0
    while i < len(wire) and wire[i]:
        n = wire[i]
        labels.append(wire[i + 1 : i + 1 + n].decode("ascii", "backslashreplace"))
        i += 1 + n
    return ".".join(labels) + "."


def from_config(cfg: RrlConfig, table: SharedTable | None = None) -> RateLimiter | None:
    """The limiter an [rrl] section asks for (None when disabled), on `table` if given
    (a worker passes the main process's shared table), else on a table of its own."""
    if not cfg.enabled:
        return None
    return RateLimiter(
        responses_per_s=cfg.responses_per_s,
        window_s=cfg.window_s,
        slip=cfg.slip,
        ipv4_prefix=cfg.ipv4_prefix,
        ipv6_prefix=cfg.ipv6_prefix,
        exempt=cfg.exempt,
        table_size=cfg.table_size,
        table=table,
    )
