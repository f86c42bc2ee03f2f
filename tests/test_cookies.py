"""DNS Cookies (RFC 7873) with RFC 9018 server cookies, over the wire.

The server's secrets are configured, so the tests mint server cookies themselves with
`CookieJar` (as another node sharing the secret would) at any timestamp they need.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest

from geodns.cookies import CookieJar

from .serverutil import Running, serve_files
from .test_rrl import StepClock, ask_or_none, is_full, udp_socket

ZONE = (Path(__file__).parent / "zones" / "example.test.zone").read_text()
OLD = bytes.fromhex("00112233445566778899aabbccddeeff")
NEW = bytes.fromhex("ffeeddccbbaa99887766554433221100")
OTHER = bytes.fromhex("0123456789abcdef0123456789abcdef")
CLIENT = b"clientck"
LOCAL = ipaddress.ip_address("127.0.0.1").packed
RATE = 10  # [rrl] for the bypass tests: burst 10, nothing exempt
BADCOOKIE = 23


def config(secret: bytes = NEW, previous: bytes | None = None, require: bool = False) -> str:
    lines = ["[cookies]", f'secret = "{secret.hex()}"']
    if previous is not None:
        lines.append(f'previous_secret = "{previous.hex()}"')
    lines.append(f"require = {'true' if require else 'false'}")
    lines += ["[rrl]", f"responses_per_s = {RATE}", "window_s = 1", "exempt = []"]
    return "\n".join(lines) + "\n"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Running]:
    with serve_files(tmp_path, {"example.test.zone": ZONE}, config()) as srv:
        yield srv


@pytest.fixture
def strict(tmp_path: Path) -> Iterator[Running]:
    """require = true, mid-rotation: NEW current, OLD still accepted."""
    with serve_files(tmp_path, {"example.test.zone": ZONE}, config(NEW, OLD, True)) as srv:
        yield srv


def mint(secret: bytes, age_s: float = 0.0, client: bytes = CLIENT, ip: bytes = LOCAL) -> bytes:
    """client cookie + an RFC 9018 server cookie minted `age_s` ago (negative: future)."""
    return client + CookieJar(secret).mint(client, ip, int(time.time() - age_s))


def ask(
    srv: Running, cookie: bytes | None, tcp: bool = False, name: str = "www.example.test."
) -> dns.message.Message:
    q = dns.message.make_query(name, "A", use_edns=0)
    if cookie is not None:
        q.use_edns(0, options=[dns.edns.GenericOption(dns.edns.OptionType.COOKIE, cookie)])
    if tcp:
        return dns.query.tcp(q, srv.host, port=srv.port, timeout=5)
    return dns.query.udp(q, srv.host, port=srv.port, timeout=5)


def cookie_of(r: dns.message.Message) -> bytes:
    (opt,) = [o for o in r.options if o.otype == dns.edns.OptionType.COOKIE]
    assert isinstance(opt, dns.edns.CookieOption)
    return opt.client + opt.server


def check_fresh(cookie: bytes, secret: bytes = NEW) -> None:
    """An RFC 9018 server cookie for CLIENT from 127.0.0.1, minted just now with secret."""
    assert cookie[:8] == CLIENT
    assert len(cookie) == 24
    version, ts = struct.unpack("!B3xI", cookie[8:16])
    assert version == 1
    assert abs(ts - time.time()) <= 5
    assert cookie[8:] == CookieJar(secret).mint(CLIENT, LOCAL, ts)


# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_client_cookie_only_gets_a_server_cookie(server: Running, tcp: bool) -> None:
    r = ask(server, CLIENT, tcp)
    assert r.rcode() == dns.rcode.NOERROR and r.answer
    check_fresh(cookie_of(r))


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_valid_server_cookie_is_accepted_and_echoed(server: Running, tcp: bool) -> None:
    cookie = cookie_of(ask(server, CLIENT))
    r = ask(server, cookie, tcp)
    assert r.rcode() == dns.rcode.NOERROR and r.answer
    assert cookie_of(r) == cookie  # valid and young: echoed as it is (RFC 9018 §4.3)


def test_a_cookie_older_than_half_an_hour_is_renewed(server: Running) -> None:
    r = ask(server, mint(NEW, age_s=40 * 60))
    assert r.rcode() == dns.rcode.NOERROR and r.answer
    check_fresh(cookie_of(r))  # RFC 9018 §4.3: accepted, and a fresh one sent back


BAD_COOKIES = {
    "expired-61min": lambda: mint(NEW, age_s=61 * 60),
    "future-6min": lambda: mint(NEW, age_s=-6 * 60),
    "unknown-secret": lambda: mint(OTHER),
    "other-client-ip": lambda: mint(NEW, ip=ipaddress.ip_address("192.0.2.1").packed),
    "other-client-cookie": lambda: CLIENT + mint(NEW, client=b"another!")[8:],
    "version-2": lambda: CLIENT + b"\x02" + mint(NEW)[9:],
    "short-server-cookie": lambda: CLIENT + b"12345678",
    "long-server-cookie": lambda: CLIENT + bytes(32),
}


@pytest.mark.parametrize("make", BAD_COOKIES.values(), ids=BAD_COOKIES.keys())
def test_bad_server_cookie_is_answered_normally_with_a_fresh_one(server: Running, make) -> None:  # type: ignore[no-untyped-def]
    """RFC 7873 §5.2.3: without `require`, an invalid server cookie costs nothing."""
    r = ask(server, make())
    assert r.rcode() == dns.rcode.NOERROR and r.answer
    check_fresh(cookie_of(r))


@pytest.mark.parametrize("make", BAD_COOKIES.values(), ids=BAD_COOKIES.keys())
def test_require_mode_answers_badcookie_over_udp_only(strict: Running, make) -> None:  # type: ignore[no-untyped-def]
    r = ask(strict, make())
    assert r.rcode() == BADCOOKIE  # RFC 7873 §5.2.3, opt-in
    assert not r.answer
    check_fresh(cookie_of(r))  # the cookie to retry with
    # the retry with that cookie is answered
    retry = ask(strict, cookie_of(r))
    assert retry.rcode() == dns.rcode.NOERROR and retry.answer
    # TCP proves the source address: never BADCOOKIE
    over_tcp = ask(strict, make(), tcp=True)
    assert over_tcp.rcode() == dns.rcode.NOERROR and over_tcp.answer


def test_require_mode_client_cookie_only_gets_badcookie_then_an_answer(strict: Running) -> None:
    r = ask(strict, CLIENT)
    assert r.rcode() == BADCOOKIE
    retry = ask(strict, cookie_of(r))
    assert retry.rcode() == dns.rcode.NOERROR and retry.answer


def test_without_cookie_require_mode_answers_normally(strict: Running) -> None:
    """`require` is about invalid cookies; a query without COOKIE is not refused."""
    r = ask(strict, None)
    assert r.rcode() == dns.rcode.NOERROR and r.answer


def test_badcookie_only_in_require_mode(server: Running) -> None:
    for make in BAD_COOKIES.values():
        assert ask(server, make()).rcode() == dns.rcode.NOERROR


@pytest.mark.parametrize("length", [0, 1, 7, 9, 15, 41, 48], ids=lambda n: f"cookie-length-{n}")
@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_bad_cookie_lengths_are_formerr(server: Running, length: int, tcp: bool) -> None:
    """RFC 7873 §5.2.2: client cookie 8 octets, server cookie 8 to 32: else FORMERR."""
    r = ask(server, bytes(range(length)), tcp)
    assert r.rcode() == dns.rcode.FORMERR
    assert r.edns == 0  # the OPT is kept in the FORMERR reply
    assert not r.answer


@pytest.mark.parametrize("length", [8, 16, 24, 40], ids=lambda n: f"cookie-length-{n}")
def test_good_cookie_lengths_are_answered(server: Running, length: int) -> None:
    r = ask(server, CLIENT + bytes(length - 8))
    assert r.rcode() == dns.rcode.NOERROR and r.answer


def test_secret_rotation_accepts_the_previous_secret_during_the_overlap(
    strict: Running, tmp_path: Path
) -> None:
    """secret = NEW, previous_secret = OLD: cookies minted by nodes still on OLD pass
    (and are re-minted with NEW); once previous_secret is removed they no longer do."""
    old_cookie = mint(OLD, age_s=10 * 60)
    r = ask(strict, old_cookie)
    assert r.rcode() == dns.rcode.NOERROR and r.answer
    check_fresh(cookie_of(r), NEW)  # moved to the current secret
    assert ask(strict, mint(NEW)).rcode() == dns.rcode.NOERROR
    assert ask(strict, mint(OTHER)).rcode() == BADCOOKIE
    # even with the previous secret, the 1-hour lifetime holds
    assert ask(strict, mint(OLD, age_s=61 * 60)).rcode() == BADCOOKIE
    # the overlap ends: previous_secret removed, reloaded without a restart
    (tmp_path / "geodns.toml").write_text(
        (tmp_path / "geodns.toml").read_text().replace(f'previous_secret = "{OLD.hex()}"\n', "")
    )
    result = strict.call(strict.app.reload())
    assert result["config_errors"] == []
    assert ask(strict, old_cookie).rcode() == BADCOOKIE
    assert ask(strict, mint(NEW)).rcode() == dns.rcode.NOERROR


def test_rotation_by_reload_starts_minting_with_the_new_secret(
    server: Running, tmp_path: Path
) -> None:
    before = ask(server, CLIENT)
    check_fresh(cookie_of(before), NEW)
    cfg = tmp_path / "geodns.toml"
    cfg.write_text(
        cfg.read_text().replace(
            f'secret = "{NEW.hex()}"', f'secret = "{OTHER.hex()}"\nprevious_secret = "{NEW.hex()}"'
        )
    )
    assert server.call(server.app.reload())["config_errors"] == []
    check_fresh(cookie_of(ask(server, CLIENT)), OTHER)
    # a client holding the NEW cookie is still valid: re-minted with OTHER
    check_fresh(cookie_of(ask(server, cookie_of(before))), OTHER)


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_qdcount_0_with_a_cookie_gets_a_cookie_only_answer(server: Running, tcp: bool) -> None:
    """RFC 7873 §5.4: no question, just the cookie exchange: NOERROR, cookie back."""
    q = dns.message.Message()
    q.use_edns(0, options=[dns.edns.GenericOption(dns.edns.OptionType.COOKIE, CLIENT)])
    if tcp:
        r = dns.query.tcp(q, server.host, port=server.port, timeout=5)
    else:
        r = dns.query.udp(q, server.host, port=server.port, timeout=5)
    assert r.rcode() == dns.rcode.NOERROR
    assert not r.question and not r.answer and not r.authority
    check_fresh(cookie_of(r))
    assert r.flags & dns.flags.QR and not r.flags & dns.flags.TC


def test_valid_server_cookie_is_exempt_from_rrl(server: Running) -> None:
    """The cookie proves the source address is not spoofed: no reflection to limit."""
    server.app.handler.clock = StepClock(0.0)
    cookie = cookie_of(ask(server, CLIENT))
    q = dns.message.make_query("www.example.test.", "A", use_edns=0)
    q.use_edns(0, options=[dns.edns.GenericOption(dns.edns.OptionType.COOKIE, cookie)])
    with udp_socket("127.0.0.1") as s:
        for _ in range(5 * RATE):
            s.sendto(q.to_wire(), server.addr)
            r = dns.message.from_wire(s.recvfrom(65535)[0])
            assert is_full(r)
            assert cookie_of(r) == cookie
    # the same flood with a bad server cookie, or with none, is limited
    bad = dns.message.make_query("www.example.test.", "A", use_edns=0)
    bad.use_edns(0, options=[dns.edns.GenericOption(10, mint(OTHER))])
    with udp_socket("127.0.0.1") as s:
        got = [ask_or_none(s, server, bad) for _ in range(2 * RATE)]
    full = [r for r in got if r is not None and is_full(r)]
    assert len(full) <= RATE
    slipped = [r for r in got if r is not None and not is_full(r)]
    assert slipped and all(r.flags & dns.flags.TC for r in slipped)
    # a slipped reply carries a fresh cookie: the client's retry can then bypass RRL
    for r in slipped:
        check_fresh(cookie_of(r))


def test_cookie_queries_from_another_address_are_not_valid(server: Running) -> None:
    """A server cookie is bound to the client address (RFC 9018 §4.2)."""
    cookie = cookie_of(ask(server, CLIENT))
    q = dns.message.make_query("www.example.test.", "A", use_edns=0)
    q.use_edns(0, options=[dns.edns.GenericOption(dns.edns.OptionType.COOKIE, cookie)])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.9.9", 0))
        s.settimeout(5)
        s.sendto(q.to_wire(), server.addr)
        r = dns.message.from_wire(s.recvfrom(65535)[0])
    assert r.rcode() == dns.rcode.NOERROR
    new = cookie_of(r)
    assert new != cookie and new[:8] == CLIENT
    assert new[8:] == CookieJar(NEW).mint(CLIENT, bytes([127, 0, 9, 9]), int.from_bytes(new[12:16]))
