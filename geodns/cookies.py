"""DNS Cookies (RFC 7873) with interoperable server cookies (RFC 9018).

Server cookie = Version (1) | Reserved (3) | Timestamp (4) | Hash (8), where
Hash = SipHash-2-4(secret, Client Cookie | Version | Reserved | Timestamp | Client-IP).
SipHash comes from `siphashc` (C): the standard library has no SipHash-2-4 with a key.

RFC 9018's timestamp window assumes the clocks of all nodes sharing the secret are
synchronised (NTP): a cookie minted by one node is accepted by another for one hour,
and up to five minutes "from the future".
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable

from siphashc import siphash

VERSION = 1
# RFC 9018 §4.3: accept cookies up to 1 hour old and 5 minutes in the future; re-mint
# them when older than half an hour.
MAX_AGE_S = 3600
MAX_FUTURE_S = 300
REFRESH_AFTER_S = 1800


class CookieJar:
    """Mints and checks server cookies with a current and an optional previous secret."""

    def __init__(
        self,
        secret: bytes | None = None,
        previous: bytes | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.secret = secret or os.urandom(16)
        self.previous = previous
        self.clock = clock

    def _hash(self, secret: bytes, client: bytes, head: bytes, ip: bytes) -> bytes:
        value = siphash(secret, client + head + ip)
        return struct.pack("<Q", value)

    def mint(self, client_cookie: bytes, ip: bytes, now: int | None = None) -> bytes:
        """A fresh server cookie for this client cookie and client address (packed)."""
        ts = int(self.clock()) if now is None else now
        head = struct.pack("!B3xI", VERSION, ts & 0xFFFFFFFF)
        return head + self._hash(self.secret, client_cookie, head, ip)

    def check(self, client_cookie: bytes, server_cookie: bytes, ip: bytes) -> tuple[bool, bool]:
        """(valid, needs_refresh) for a server cookie the client sent back."""
        if len(server_cookie) != 16 or server_cookie[0] != VERSION:
            return False, True
        head = server_cookie[:8]
        (ts,) = struct.unpack_from("!I", head, 4)
        now = int(self.clock()) & 0xFFFFFFFF
        # serial-number arithmetic (RFC 1982) so the 2106 wrap does not matter
        age = (now - ts) & 0xFFFFFFFF
        if age >= 0x80000000:
            age -= 0x100000000
        if age > MAX_AGE_S or age < -MAX_FUTURE_S:
            return False, True
        for secret in (self.secret, self.previous):
            if secret and self._hash(secret, client_cookie, head, ip) == server_cookie[8:]:
                return True, age > REFRESH_AFTER_S or secret is not self.secret
        return False, True
