"""Response rate limiting (geodns/rrl.py): the limiter alone, then over the wire.

Wire tests empty the exempt list and use loopback addresses as distinct sources (on
Linux all of 127.0.0.0/8 is local): 127.0.1.0/24 floods, 127.0.2.0/24 is an innocent
bystander. The server's RRL clock is replaced by one that advances a fixed step per
call, so "15x the limit" and "after the window" are exact, not sleeps.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import socket
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest

from geodns.config import RrlConfig, load_config
from geodns.errors import ConfigError
from geodns.metrics import make_registry, render
from geodns.rrl import (
    DROP,
    PASS,
    SLIP,
    Action,
    RateLimiter,
    SharedTable,
    response_kind,
)
from geodns.zones import name_to_wire

from .serverutil import REPO, Running, run_server, serve_files, write_config
from .test_workers import wait_for

ZONE = (Path(__file__).parent / "zones" / "example.test.zone").read_text()
WWW = response_kind(0, True, name_to_wire("www.example.test."), b"")
V4 = bytes([192, 0, 2, 1])


def flood(limiter: RateLimiter, src: bytes | str, n: int, step: float, kind: bytes = WWW):
    """n checks, `step` seconds apart from t=0: the actions, in order."""
    return [limiter.check(src, kind, i * step) for i in range(n)]


# --------------------------------------------------------------------------------------
# the limiter


def test_new_key_gets_the_burst_then_the_rate() -> None:
    rl = RateLimiter(responses_per_s=10, window_s=2, exempt=())
    # burst = rate * window = 20 at one instant, then nothing until a token drips in
    assert [rl.check(V4, WWW, 0.0) for _ in range(21)].count(PASS) == 20
    assert rl.check(V4, WWW, 0.05) is not PASS
    assert rl.check(V4, WWW, 0.1) is PASS  # 1/rate later: one more
    assert rl.check(V4, WWW, 0.1) is not PASS


@pytest.mark.parametrize(
    ("rate", "window", "times", "duration"),
    [(20, 1.0, 15, 1.0), (20, 1.0, 15, 3.0), (200, 2.0, 15, 2.0), (5, 4.0, 100, 1.0)],
    ids=["20ps-1s", "20ps-1s-long", "default-200ps-2s", "5ps-4s-100x"],
)
def test_flood_gets_no_more_than_burst_plus_rate(
    rate: float, window: float, times: int, duration: float
) -> None:
    rl = RateLimiter(responses_per_s=rate, window_s=window, slip=2, exempt=())
    n = int(rate * times * duration)
    acts = flood(rl, V4, n, duration / n)
    passed = acts.count(PASS)
    limited = n - passed
    # a full bucket (burst = rate * window) plus what drips in during the flood
    assert passed <= rate * window + rate * duration + 1
    assert passed >= rate * window + rate * duration - 2  # and no less: it is a rate
    assert abs(acts.count(SLIP) - limited / 2) <= 1
    assert rl.counts[:3] == [passed, acts.count(DROP), acts.count(SLIP)]


@pytest.mark.parametrize(
    ("slip", "expected"),
    [(0, 0), (1, 100), (2, 50), (3, 33), (10, 10)],
    ids=["never", "all", "every-2nd", "every-3rd", "every-10th"],
)
def test_every_slip_th_limited_response_slips(slip: int, expected: int) -> None:
    rl = RateLimiter(responses_per_s=1, window_s=1, slip=slip, exempt=())
    rl.check(V4, WWW, 0.0)  # the only token
    acts = [rl.check(V4, WWW, 0.0) for _ in range(100)]
    assert acts.count(SLIP) == expected
    assert acts.count(DROP) == 100 - expected


def test_limit_recovers_after_the_window() -> None:
    rl = RateLimiter(responses_per_s=10, window_s=2, exempt=())
    acts = flood(rl, V4, 300, 1 / 150)  # 2 s at 15x the limit
    assert acts[-1] is not PASS
    end = 299 / 150
    # limited responses leave no debt: window_s after the flood the bucket is full again
    again = [rl.check(V4, WWW, end + 2.0) for _ in range(21)]
    assert again.count(PASS) == 20


def test_networks_are_grouped_by_prefix() -> None:
    rl = RateLimiter(responses_per_s=1, window_s=1, ipv4_prefix=24, ipv6_prefix=56, exempt=())
    assert rl.check("192.0.2.1", WWW, 0.0) is PASS
    assert rl.check("192.0.2.200", WWW, 0.0) is not PASS  # same /24
    assert rl.check("192.0.3.1", WWW, 0.0) is PASS  # the next /24 has its own bucket
    assert rl.check("2001:db8:0:100::1", WWW, 0.0) is PASS
    assert rl.check("2001:db8:0:1ff:ffff::9", WWW, 0.0) is not PASS  # same /56
    assert rl.check("2001:db8:0:200::1", WWW, 0.0) is PASS  # the next /56
    assert rl.check("::ffff:192.0.2.9", WWW, 0.0) is not PASS  # IPv4-mapped = IPv4
    assert rl.check("fe80::1%lo", WWW, 0.0) is PASS  # a zone index is not the address


def test_prefix_lengths_off_octet_boundaries() -> None:
    rl = RateLimiter(responses_per_s=1, window_s=1, ipv4_prefix=22, ipv6_prefix=50, exempt=())
    assert rl.check("198.51.100.1", WWW, 0.0) is PASS
    assert rl.check("198.51.103.254", WWW, 0.0) is not PASS  # inside 198.51.100.0/22
    assert rl.check("198.51.104.1", WWW, 0.0) is PASS
    assert rl.check("2001:db8:0:3fff::1", WWW, 0.0) is PASS
    assert rl.check("2001:db8:0:0::1", WWW, 0.0) is not PASS  # same /50
    assert rl.check("2001:db8:0:4000::1", WWW, 0.0) is PASS


def test_kinds_are_separate_buckets() -> None:
    rl = RateLimiter(responses_per_s=1, window_s=1, exempt=())
    zone = name_to_wire("example.test.")
    kinds = {
        "answer www": response_kind(0, True, name_to_wire("www.example.test."), zone),
        "answer mail": response_kind(0, True, name_to_wire("mail.example.test."), zone),
        "nxdomain": response_kind(3, True, name_to_wire("nx1.example.test."), zone),
        "referral": response_kind(0, False, name_to_wire("a.sub.example.test."), zone),
        "error": response_kind(5, False, name_to_wire("not.ours."), b""),
    }
    assert len(set(kinds.values())) == len(kinds)
    for kind in kinds.values():
        assert rl.check(V4, kind, 0.0) is PASS
    # NXDOMAIN is per zone: a random name is the same bucket as any other
    other_nx = response_kind(3, True, name_to_wire("random-9f3a.example.test."), zone)
    assert other_nx == kinds["nxdomain"]
    assert rl.check(V4, other_nx, 0.0) is not PASS
    # errors are per network only
    assert response_kind(2, False, b"\x01x\x00", b"") == kinds["error"]


def test_exempt_networks_pass_and_are_counted() -> None:
    rl = RateLimiter(responses_per_s=1, window_s=1, exempt=("192.0.2.0/24", "2001:db8::/32"))
    assert all(a is PASS for a in flood(rl, "192.0.2.7", 100, 0.0))
    assert all(a is PASS for a in flood(rl, "2001:db8:1::1", 100, 0.0))
    assert rl.counts == [0, 0, 0, 200, 0]
    assert flood(rl, "192.0.3.7", 3, 0.0).count(PASS) == 1  # next door is not exempt


def test_default_exempt_is_loopback() -> None:
    rl = RateLimiter(responses_per_s=1, window_s=1)
    assert all(a is PASS for a in flood(rl, "127.0.0.1", 50, 0.0))
    assert all(a is PASS for a in flood(rl, "127.9.8.7", 50, 0.0))
    assert all(a is PASS for a in flood(rl, "::1", 50, 0.0))
    assert flood(rl, "::2", 3, 0.0).count(PASS) == 1


def test_million_spoofed_sources_keep_the_table_bounded() -> None:
    """1,000,000 random sources in one second: the table neither grows nor forgets the
    victim of a reflection attack that is being limited meanwhile."""
    slots = 65536
    rate = 5
    rl = RateLimiter(responses_per_s=rate, window_s=1, exempt=(), table_size=slots)
    size = len(rl.table.buf)
    victim = bytes([203, 0, 113, 9])
    assert flood(rl, victim, 20, 0.0).count(PASS) == rate  # limited from here on
    # seeded: the same million sources every run (none of them in the victim's /24,
    # which would be limited like the victim)
    raw = random.Random(1_000_000).randbytes(4 * 1_000_000)
    assert not any(raw[i : i + 3] == victim[:3] for i in range(0, len(raw), 4))
    check = rl.check
    now = 0.0
    victim_passed = victim_checks = 0
    started = time.perf_counter()
    for i in range(0, len(raw), 4):
        now += 1e-6
        check(raw[i : i + 4], WWW, now)
        if i % 4000 == 0:  # the victim's spoofed queries, 1,000 per second
            victim_checks += 1
            victim_passed += check(victim, WWW, now) is PASS
    elapsed = time.perf_counter() - started
    assert elapsed < 5.0, elapsed
    assert len(rl.table.buf) == size == 64 + 16 * slots  # 1 MiB, fixed
    assert slots * 0.9 < rl.table.occupied() <= slots  # filled by the flood, not grown
    # evicting the victim's bucket would have given it a fresh burst each time
    assert victim_passed <= rate * now + 1
    assert sum(rl.counts) == 20 + 1_000_000 + victim_checks
    # each spoofed source asked about once: none was limited, none collided
    assert rl.counts[PASS] == rate + 1_000_000 + victim_passed
    assert rl.collisions == 0
    # and no Python object is kept per source
    more = random.Random(20_000).randbytes(4 * 20_000)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(0, len(more), 4):
        check(more[i : i + 4], WWW, now)
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert grown < 10_000, grown


def test_table_size_is_rounded_to_a_power_of_two() -> None:
    assert RateLimiter(table_size=1000).table.slots == 1024
    assert RateLimiter(table_size=1).table.slots == 2


def test_shared_table_is_one_limit_across_processes() -> None:
    """A memfd table mapped by another process (as --workers does): one set of buckets."""
    table = SharedTable.create(1024)
    assert table.fd is not None
    mine = RateLimiter(responses_per_s=10, window_s=1, exempt=(), table=table)
    child = (
        "import os, sys, time\n"
        "from geodns.rrl import RateLimiter, SharedTable, response_kind\n"
        "from geodns.zones import name_to_wire\n"
        "t = SharedTable.attach(int(os.environ['GEODNS_RRL_FD']))\n"
        "rl = RateLimiter(responses_per_s=10, window_s=1, exempt=(), table=t)\n"
        "k = response_kind(0, True, name_to_wire('www.example.test.'), b'')\n"
        "now = float(sys.argv[1])\n"
        "print(sum(rl.check('192.0.2.1', k, now) == 0 for _ in range(8)))\n"
    )
    now = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", child, repr(now)],
        env=dict(os.environ, GEODNS_RRL_FD=str(table.fd)),
        pass_fds=(table.fd,),
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "8"  # the other process took 8 of the 10 tokens
    assert [mine.check("192.0.2.77", WWW, now) for _ in range(4)] == [PASS, PASS, DROP, SLIP]
    table.close()


def test_attach_rejects_what_is_not_a_table() -> None:
    fd = os.memfd_create("not-rrl")
    os.ftruncate(fd, 4096)
    with pytest.raises(ValueError, match="not an RRL table"):
        SharedTable.attach(fd)
    os.close(fd)


def test_start_and_stop_are_logged_and_the_log_is_rate_limited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="geodns.rrl")
    rl = RateLimiter(responses_per_s=1, window_s=1, exempt=())
    flood(rl, "192.0.2.1", 10, 0.0)
    assert [r.getMessage() for r in caplog.records] == [
        "rrl: limiting 192.0.2.0/24, answers for www.example.test., to 1 responses/s "
        "(0 similar lines suppressed)"
    ]
    caplog.clear()
    # 100 more networks start being limited within the same second: one line at most
    for n in range(100):
        src = bytes([198, 51, n, 1])
        rl.check(src, WWW, 0.5)
        rl.check(src, WWW, 0.5)
    assert len(caplog.records) == 0
    assert rl.check("192.0.2.1", WWW, 5.0) is PASS  # full again: the episode is over
    assert [r.getMessage() for r in caplog.records] == [
        "rrl: no longer limiting 192.0.2.0/24, answers for www.example.test. "
        "(9 responses limited) (100 similar lines suppressed)"
    ]


def test_limited_network_is_not_reported_again_while_tokens_drip_in(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="geodns.rrl")
    rl = RateLimiter(responses_per_s=10, window_s=1, exempt=())
    acts = flood(rl, "192.0.2.1", 3000, 1 / 150)  # 20 s at 15x: passes interleave
    assert 200 < acts.count(PASS) < 230
    assert len(caplog.records) == 1  # one start line for the whole episode


# --------------------------------------------------------------------------------------
# configuration


def test_rrl_defaults() -> None:
    cfg = RrlConfig()
    assert cfg.enabled
    assert (cfg.responses_per_s, cfg.window_s, cfg.slip) == (200.0, 2.0, 2)
    assert (cfg.ipv4_prefix, cfg.ipv6_prefix) == (24, 56)
    assert cfg.exempt == ("127.0.0.0/8", "::1/128")


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("responses_per_s = 0", "rrl.responses_per_s: must be > 0"),
        ("window_s = -1", "rrl.window_s: must be > 0"),
        ("responses_per_s = 0.5\nwindow_s = 1", "responses_per_s * window_s must be >= 1"),
        ("slip = 11", "rrl.slip: must be within 0..10"),
        ("ipv4_prefix = 33", "rrl.ipv4_prefix: must be within 1..32"),
        ("ipv6_prefix = 0", "rrl.ipv6_prefix: must be within 1..128"),
        ("exempt = ['10.0.0.1/8']", "rrl.exempt[0]: 10.0.0.1/8 has host bits set"),
        ("exempt = ['nonsense']", "rrl.exempt[0]:"),
        ("table_size = 1", "rrl.table_size: must be within"),
        ("rate = 5", "rrl.rate: unknown key"),
    ],
    ids=[
        "zero-rate",
        "negative-window",
        "no-burst",
        "slip-too-big",
        "v4-prefix",
        "v6-prefix",
        "exempt-host-bits",
        "exempt-garbage",
        "table-too-small",
        "unknown-key",
    ],
)
def test_rrl_config_errors(tmp_path: Path, body: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, f"[rrl]\n{body}\n"))
    assert any(problem in p for p in err.value.problems), err.value.problems


# --------------------------------------------------------------------------------------
# over the wire

RATE, WINDOW = 20, 1.0
BURST = int(RATE * WINDOW)
RRL_BODY = f"""
[rrl]
responses_per_s = {RATE}
window_s = {WINDOW}
slip = 2
exempt = []
"""


class StepClock:
    """The handler's RRL clock: each reading is `step` seconds after the previous one."""

    def __init__(self, step: float) -> None:
        self.step = step
        self.now = 1000.0
        self.calls = 0

    def __call__(self) -> float:
        self.now += self.step
        self.calls += 1
        return self.now


def udp_socket(source: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((source, 0))
    s.settimeout(5)
    return s


def ask_udp(s: socket.socket, srv: Running, msg: dns.message.Message) -> dns.message.Message:
    s.sendto(msg.to_wire(), srv.addr)
    data, _ = s.recvfrom(65535)
    return dns.message.from_wire(data)


def drain(s: socket.socket) -> list[dns.message.Message]:
    """Every reply already waiting on the socket."""
    out = []
    s.setblocking(False)
    while True:
        try:
            data, _ = s.recvfrom(65535)
        except BlockingIOError:
            break
        out.append(dns.message.from_wire(data))
    s.settimeout(5)
    return out


def query(name: str = "www.example.test.", qtype: str = "A") -> dns.message.Message:
    return dns.message.make_query(name, qtype, use_edns=0, payload=1232)


def cookie_of(r: dns.message.Message) -> bytes:
    (opt,) = [o for o in r.options if o.otype == dns.edns.OptionType.COOKIE]
    assert isinstance(opt, dns.edns.CookieOption)
    return opt.client + opt.server


def is_full(r: dns.message.Message) -> bool:
    return not r.flags & dns.flags.TC and bool(r.answer or r.authority)


def is_slipped(r: dns.message.Message, q: dns.message.Message) -> bool:
    return (
        bool(r.flags & dns.flags.TC)
        and r.rcode() == dns.rcode.NOERROR
        and not r.answer
        and not r.authority
        and not r.additional
        and r.question == q.question
        and r.edns == 0  # the OPT record is kept for an EDNS query
    )


@pytest.fixture(params=[True, False], ids=["packet-cache", "no-packet-cache"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Running]:
    body = RRL_BODY + ("" if request.param else "[server]\npacket_cache = false\n")
    with serve_files(tmp_path, {"example.test.zone": ZONE}, body) as srv:
        yield srv


def test_flood_from_one_network_is_limited_and_others_are_not(server: Running) -> None:
    """15x the limit from 127.0.1.0/24; 127.0.2.0/24 over UDP and 127.0.1.1 over TCP
    keep getting full answers during the flood."""
    clock = StepClock(1 / (15 * RATE))
    server.app.handler.clock = clock
    flooders = [udp_socket(f"127.0.1.{i}") for i in range(1, 6)]  # one /24, five hosts
    bystander = udp_socket("127.0.2.1")
    q = query()
    sent = 0
    for i in range(15 * RATE):  # one second of flood at 15x
        flooders[i % len(flooders)].sendto(q.to_wire(), server.addr)
        sent += 1
        if i % 10 == 9:
            assert is_full(ask_udp(bystander, server, query("mail.example.test.")))
        if i % 60 == 59:
            r = dns.query.tcp(q, server.host, port=server.port, source="127.0.1.1", timeout=5)
            assert is_full(r)  # TCP from the flooded network itself: never limited
    # the bystander's answer comes after every flood packet was handled
    assert is_full(ask_udp(bystander, server, query("mail.example.test.")))
    replies = [r for s in flooders for r in drain(s)]
    full = [r for r in replies if is_full(r)]
    slipped = [r for r in replies if not is_full(r)]
    assert all(is_slipped(r, q) for r in slipped)
    limited = sent - len(full)
    duration = clock.calls * clock.step  # bystander checks advance the clock too
    assert len(full) <= RATE * WINDOW + RATE * duration + 1
    assert len(full) >= BURST
    assert abs(len(slipped) - limited / 2) <= 1
    rrl = server.app.stats.rrl
    assert rrl[SLIP] == len(slipped) and rrl[DROP] == limited - len(slipped)
    for s in [*flooders, bystander]:
        s.close()


def test_wire_limit_recovers_after_the_window(server: Running) -> None:
    clock = StepClock(0.0)
    server.app.handler.clock = clock
    s = udp_socket("127.0.1.9")
    q = query()
    replies = [ask_or_none(s, server, q) for _ in range(BURST + 4)]
    assert sum(1 for r in replies if r is not None and is_full(r)) == BURST
    clock.now += WINDOW  # the flood stopped a window ago
    assert all(is_full(ask_udp(s, server, q)) for _ in range(BURST))
    s.close()


_PROBE_NETS = itertools.count()


def ask_or_none(
    s: socket.socket, srv: Running, msg: dns.message.Message
) -> dns.message.Message | None:
    """A query that may be dropped: a bystander's answer proves it was handled."""
    s.sendto(msg.to_wire(), srv.addr)
    # a probe from a network of its own each time, so probes are never limited
    with udp_socket(f"127.2.{next(_PROBE_NETS) % 256}.1") as probe:
        ask_udp(probe, srv, query("mail.example.test."))
    got = drain(s)
    return got[0] if got else None


def test_random_nxdomain_names_share_the_zone_bucket(server: Running) -> None:
    server.app.handler.clock = StepClock(0.0)
    s = udp_socket("127.0.1.10")
    qs = [query(f"nx-{i}.example.test.") for i in range(BURST + 10)]
    replies = [ask_or_none(s, server, q) for q in qs]
    full = [r for r in replies if r is not None and is_full(r)]
    assert len(full) == BURST
    assert all(r.rcode() == dns.rcode.NXDOMAIN for r in full)
    # answers for an existing name are another bucket: still served
    assert is_full(ask_udp(s, server, query()))
    s.close()


def test_ecs_does_not_choose_the_network(server: Running) -> None:
    """The packet's source is limited, whatever ECS subnet the query claims."""
    server.app.handler.clock = StepClock(0.0)
    s = udp_socket("127.0.1.11")
    replies = []
    for i in range(BURST + 6):
        q = query()
        q.use_edns(0, options=[dns.edns.ECSOption(f"198.51.{i}.0", 24)])
        replies.append(ask_or_none(s, server, q))
    assert sum(1 for r in replies if r is not None and is_full(r)) == BURST
    slipped = [r for r in replies if r is not None and not is_full(r)]
    assert slipped and all(r.flags & dns.flags.TC for r in slipped)
    # RFC 7871 §7.2.1: the ECS option is echoed, SCOPE 0 (the reply says nothing)
    assert all(o.scopelen == 0 for r in slipped for o in r.options if o.otype == 8)
    s.close()


def test_exempt_network_is_never_limited(tmp_path: Path) -> None:
    body = RRL_BODY.replace("exempt = []", 'exempt = ["127.0.3.0/24"]')
    with serve_files(tmp_path, {"example.test.zone": ZONE}, body) as srv:
        srv.app.handler.clock = StepClock(0.0)
        s = udp_socket("127.0.3.7")
        assert all(is_full(ask_udp(s, srv, query())) for _ in range(3 * BURST))
        assert srv.app.stats.rrl[3] == 3 * BURST  # counted as exempt
        t = udp_socket("127.0.4.7")
        replies = [ask_or_none(t, srv, query()) for _ in range(BURST + 2)]
        assert sum(1 for r in replies if r is not None and is_full(r)) == BURST
        s.close()
        t.close()


def test_default_config_exempts_loopback_and_tests_run_unlimited(tmp_path: Path) -> None:
    with serve_files(tmp_path, {"example.test.zone": ZONE}) as srv:
        assert srv.app.handler.rrl is not None  # on by default
        srv.app.handler.clock = StepClock(0.0)
        s = udp_socket("127.0.1.1")
        assert all(is_full(ask_udp(s, srv, query())) for _ in range(500))
        s.close()


def test_rrl_can_be_turned_off(tmp_path: Path) -> None:
    body = "[rrl]\nenabled = false\n"
    with serve_files(tmp_path, {"example.test.zone": ZONE}, body) as srv:
        assert srv.app.handler.rrl is None


def test_metrics_show_rrl_actions(tmp_path: Path) -> None:
    with serve_files(tmp_path, {"example.test.zone": ZONE}, RRL_BODY) as srv:
        srv.app.handler.clock = StepClock(0.0)
        s = udp_socket("127.0.1.12")
        for _ in range(BURST + 4):
            ask_or_none(s, srv, query())
        # a client with a valid server cookie is not limited, and counted as such (its
        # network's burst is spent, so the cookie is minted here as a reply would)
        jar = srv.app.handler.cookies
        assert jar is not None
        server = jar.mint(b"clientck", socket.inet_aton("127.0.1.12"), int(time.time()))
        cq = query()
        cq.use_edns(0, options=[dns.edns.CookieOption(b"clientck", server)])
        for _ in range(3):  # the full path, then the fast path
            assert is_full(ask_udp(s, srv, cq))
        s.close()
        text = render(make_registry(srv.app)).decode()
    assert 'geodns_rrl_responses_total{action="drop"} 2.0' in text
    assert 'geodns_rrl_responses_total{action="slip"} 2.0' in text
    assert 'geodns_rrl_responses_total{action="exempt"} 0.0' in text
    assert 'geodns_rrl_responses_total{action="cookie"} 3.0' in text


def test_workers_share_one_limit_and_one_cookie_secret(tmp_path: Path) -> None:
    """--workers 2 with a SO_REUSEPORT socket each: the kernel spreads sources over both
    workers, yet one /24 gets one limit (per-worker tables would allow twice the burst),
    and a server cookie minted by one worker is valid at the other. (With the default
    shared socket the workers take turns, and the same table serves both.)"""
    (tmp_path / "zones").mkdir()
    (tmp_path / "zones" / "example.test.zone").write_text(ZONE)
    rate, window = 5, 2.0  # burst 10
    # slip = 1: every limited query gets a TC=1 reply, so nothing waits for a timeout
    body = f"[rrl]\nresponses_per_s = {rate}\nwindow_s = {window}\nslip = 1\nexempt = []\n"
    body += "[server]\nworker_udp_shared = false\n"
    cfg = load_config(write_config(tmp_path, body))
    with run_server(cfg, workers=2) as srv:
        assert srv.app.pool is not None
        socks = [udp_socket(f"127.0.1.{i}") for i in range(1, 61)]
        q = query()
        started = time.monotonic()
        for s in socks:
            s.sendto(q.to_wire(), srv.addr)
        replies = [dns.message.from_wire(s.recvfrom(65535)[0]) for s in socks]
        elapsed = time.monotonic() - started
        full = sum(1 for r in replies if is_full(r))
        assert all(is_full(r) or is_slipped(r, q) for r in replies)
        assert rate * window <= full <= rate * window + rate * elapsed + 2, (full, elapsed)
        # both workers took part (their counters reach the main process once a second)
        wait_for(lambda: sum(srv.app.stats.rrl[:3]) == len(socks))
        per_worker = [sum(w.last_stats["rrl"][:3]) for w in srv.app.pool.workers]
        assert all(n > 0 for n in per_worker), per_worker

        # cookies: minted by whichever worker, echoed unchanged by every worker (a
        # worker with another secret would answer with a fresh cookie of its own)
        first = udp_socket("127.0.5.1")
        cq = query()
        cq.use_edns(0, options=[dns.edns.CookieOption(b"clientck", b"")])
        cookie = cookie_of(ask_udp(first, srv, cq))
        assert len(cookie) == 24
        cq.use_edns(0, options=[dns.edns.CookieOption(cookie[:8], cookie[8:])])
        for _ in range(40):  # new source ports: spread over the workers; > the burst
            with udp_socket("127.0.5.1") as s:
                r = ask_udp(s, srv, cq)
            assert is_full(r)  # a valid server cookie bypasses RRL
            assert cookie_of(r) == cookie
        wait_for(lambda: srv.app.stats.rrl[4] == 40)  # counted as "cookie", all workers
        first.close()
        for s in socks:
            s.close()


def test_slipped_reply_wire_format(server: Running) -> None:
    """TC=1, QR=1, the question echoed byte for byte (0x20 case kept), no records but
    the OPT, RD copied; with NSID asked and none configured, no NSID option."""
    server.app.handler.clock = StepClock(0.0)
    s = udp_socket("127.0.1.13")
    q = dns.message.make_query("WwW.ExAmPlE.tEsT.", "A", use_edns=0, payload=1232)
    replies = [ask_or_none(s, server, q) for _ in range(BURST + 2)]
    slipped = [r for r in replies if r is not None and not is_full(r)]
    assert len(slipped) == 1
    r = slipped[0]
    assert r.flags & dns.flags.QR and r.flags & dns.flags.TC and r.flags & dns.flags.RD
    assert not r.flags & dns.flags.AA
    assert str(r.question[0].name) == "WwW.ExAmPlE.tEsT."
    assert r.id == q.id
    assert is_slipped(r, q)
    s.close()


def test_response_kind_matches_the_wire_answer_classes() -> None:
    assert response_kind(0, True, b"\x03www\x00", b"\x00") == b"\x01\x03www\x00"
    assert response_kind(3, True, b"\x03www\x00", b"\x00") == b"\x02\x00"
    assert response_kind(0, False, b"\x03www\x00", b"\x00") == b"\x03\x00"
    assert response_kind(5, False, b"\x03www\x00", b"") == b"\x04"
    assert Action.PASS == 0 and not Action.PASS  # `if act:` means "not PASS"
