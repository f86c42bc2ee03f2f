"""Zonemaster (`zonemaster-cli`, Debian) against geodns: an undelegated test with --ns.

Zonemaster only talks to name servers on port 53, so the test runs geodns on port 53 of
127.0.0.1, 127.0.0.2, ::1 and ::2 inside a private network namespace (`unshare -n`, which
needs root) where nothing else listens and nothing outside is reachable. This file is
also the driver that runs inside the namespace (`python test_zonemaster.py --inside`):
it brings up `lo`, starts `python -m geodns serve` there, waits until every address
answers, runs zonemaster-cli and stops geodns by its PID.

The zone is tests/zones/zm/example.test.zone: the main test zone with ns1/ns2 on the
loopback addresses above, so that the --ns "glue" matches the zone's own data.

tests/zonemaster-profile.json disables only the test cases that need the internet or
public addresses; tests/zonemaster-profile.md says why for each. The rest must report no
ERROR or CRITICAL.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import dns.message
import dns.query
import dns.rcode
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROFILE = HERE / "zonemaster-profile.json"
ZONE_FILE = HERE / "zones" / "zm" / "example.test.zone"
DOMAIN = "example.test"
# (name server, address): the zone's NS set and the addresses geodns listens on
NAME_SERVERS = [
    ("ns1.example.test", "127.0.0.1"),
    ("ns2.example.test", "127.0.0.2"),
    ("ns1.example.test", "::1"),
    ("ns2.example.test", "::2"),
]
ZONEMASTER_TIMEOUT_S = 90  # a normal run takes about 1 s
OUTER_TIMEOUT_S = ZONEMASTER_TIMEOUT_S + 40
READY_TIMEOUT_S = 20

# Zonemaster messages caused by geodns bugs, expected until fixed: (testcase, tag).
KNOWN_GEODNS_ERRORS: dict[tuple[str, str], str] = {}

# Test cases whose absence from the output would mean the run tested nothing useful.
MUST_RUN = [
    "BASIC02",
    "CONNECTIVITY01",
    "CONNECTIVITY02",
    "CONSISTENCY01",
    "CONSISTENCY04",
    "CONSISTENCY05",
    "DELEGATION01",
    "DELEGATION03",
    "DELEGATION04",
    "NAMESERVER01",
    "NAMESERVER02",
    "NAMESERVER03",
    "NAMESERVER05",
    "NAMESERVER07",
    "NAMESERVER08",
    "NAMESERVER09",
    "NAMESERVER10",
    "NAMESERVER11",
    "NAMESERVER12",
    "NAMESERVER13",
    "ZONE10",
]
DISABLED = ["ADDRESS01", "ADDRESS02", "ADDRESS03", "CONNECTIVITY03"]


# --------------------------------------------------------------------------- inside


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=10)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _answers(addr: str) -> bool:
    q = dns.message.make_query(DOMAIN + ".", "SOA")
    try:
        r = dns.query.udp(q, addr, port=53, timeout=0.5)
    except Exception:
        return False
    return r.rcode() == dns.rcode.NOERROR and bool(r.answer)


def inside(config: Path, out: Path) -> int:
    """Runs in the fresh network namespace: geodns on port 53, then zonemaster-cli."""
    result: dict[str, object] = {}
    _sh("ip", "link", "set", "lo", "up")
    ipv6 = _ipv6_loopback()
    if ipv6:
        _sh("ip", "-6", "addr", "add", "::2/128", "dev", "lo", "nodad")
    servers = [(n, a) for n, a in NAME_SERVERS if ipv6 or ":" not in a]
    listen = [f"[{a}]:53" if ":" in a else f"{a}:53" for _, a in servers]
    log_path = out.with_suffix(".geodns.log")
    cmd = [sys.executable, "-m", "geodns", "--config", str(config), "serve"]
    for addr in listen:
        cmd += ["--listen", addr]
    with open(log_path, "w") as log:
        geodns = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        waiting = [a for _, a in servers]
        while waiting and time.monotonic() < deadline and geodns.poll() is None:
            waiting = [a for a in waiting if not _answers(a)]
            if waiting:
                time.sleep(0.1)
        result.update(ipv6=ipv6, geodns_cmd=cmd, not_answering=waiting)
        if waiting or geodns.poll() is not None:
            result["error"] = "geodns did not answer on " + ", ".join(waiting or ["?"])
            return 0
        zm = [
            shutil.which("zonemaster-cli") or "zonemaster-cli",
            "--no-progress",
            "--level=DEBUG",
            "--json-stream",
            "--json-translate",
            f"--profile={PROFILE}",
        ]
        if not ipv6:
            zm.append("--no-ipv6")
        for name, addr in servers:
            zm.append(f"--ns={name}/{addr}")
        zm.append(DOMAIN)
        result["zonemaster_cmd"] = zm
        try:
            proc = subprocess.run(
                zm, capture_output=True, text=True, timeout=ZONEMASTER_TIMEOUT_S, cwd=REPO
            )
            result.update(rc=proc.returncode, stdout=proc.stdout, stderr=proc.stderr)
        except subprocess.TimeoutExpired as exc:
            result["error"] = f"zonemaster-cli did not finish within {ZONEMASTER_TIMEOUT_S} s"
            partial = exc.stdout or b""
            text = partial.decode(errors="replace") if isinstance(partial, bytes) else partial
            result["stdout"] = text
    finally:
        geodns.terminate()
        try:
            geodns.wait(10)
        except subprocess.TimeoutExpired:
            geodns.kill()
            geodns.wait()
        result["geodns_rc"] = geodns.returncode
        result["geodns_log"] = log_path.read_text(errors="replace")
        out.write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------- outside


@dataclass
class Message:
    level: str
    module: str
    testcase: str
    tag: str
    text: str

    def __str__(self) -> str:
        return f"{self.level:8} {self.module:12} {self.testcase:14} {self.tag}: {self.text}"


@dataclass
class Run:
    messages: list[Message]
    raw: dict[str, object]

    def report(self, min_level: str = "INFO") -> str:
        shown = [str(m) for m in self.messages if LEVELS[m.level] >= LEVELS[min_level]]
        return (
            f"$ {' '.join(cast(list[str], self.raw.get('zonemaster_cmd', [])))}\n"
            + "\n".join(shown)
            + f"\n--- zonemaster stderr:\n{self.raw.get('stderr', '')}"
            + f"\n--- geodns log:\n{self.raw.get('geodns_log', '')}"
        )


LEVELS = {"DEBUG3": 0, "DEBUG2": 0, "DEBUG": 0, "INFO": 1, "NOTICE": 2, "WARNING": 3}
LEVELS |= {"ERROR": 4, "CRITICAL": 5}


def _skip_reason() -> str | None:
    if shutil.which("zonemaster-cli") is None:
        return "zonemaster-cli not installed: `make deb-tools` installs Debian's package"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare/ip missing: `make deb-tools` installs util-linux and iproute2"
    if os.geteuid() != 0:
        return "needs root: `unshare -n` (a private network namespace for port 53)"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True, timeout=10)
    if probe.returncode != 0:
        return f"`unshare -n` does not work here: {probe.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def zonemaster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from tests.serverutil import write_config

    tmp = tmp_path_factory.mktemp("zonemaster")
    (tmp / "zones").mkdir()
    shutil.copy(ZONE_FILE, tmp / "zones" / "example.test.zone")
    config = write_config(tmp)
    out = tmp / "result.json"
    cmd = ["unshare", "-n", sys.executable, str(Path(__file__).resolve())]
    cmd += ["--inside", str(config), str(out)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=OUTER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this test started: driver + geodns
        output, _ = proc.communicate()
        pytest.fail(f"zonemaster run did not finish in {OUTER_TIMEOUT_S} s:\n{output}")
    assert proc.returncode == 0 and out.exists(), f"namespace driver failed:\n{output}"
    raw = json.loads(out.read_text())
    assert "error" not in raw, f"{raw['error']}\n{output}\n--- geodns log:\n{raw['geodns_log']}"
    messages = []
    for line in str(raw.get("stdout", "")).splitlines():
        if not line.startswith("{"):
            continue  # "Loading profile from ..."
        m = json.loads(line)
        messages.append(
            Message(m["level"], m["module"], m["testcase"], m["tag"], m.get("message", ""))
        )
    run = Run(messages, raw)
    print(run.report("DEBUG"))  # shown by pytest when a test fails
    assert messages, f"zonemaster printed nothing:\n{run.report()}"
    yield run


pytestmark = pytest.mark.timeout(OUTER_TIMEOUT_S + 30)


def test_no_error_or_critical(zonemaster: Run) -> None:
    bad = [
        m
        for m in zonemaster.messages
        if LEVELS[m.level] >= LEVELS["ERROR"] and (m.testcase, m.tag) not in KNOWN_GEODNS_ERRORS
    ]
    assert not bad, (
        "Zonemaster found ERROR/CRITICAL problems:\n"
        + "\n".join(map(str, bad))
        + "\n\n--- full output:\n"
        + zonemaster.report()
    )


def test_zonemaster_exit_status(zonemaster: Run) -> None:
    assert zonemaster.raw.get("rc") == 0, zonemaster.report()
    assert zonemaster.raw.get("geodns_rc") == 0, zonemaster.report()


def test_enabled_test_cases_ran_and_disabled_did_not(zonemaster: Run) -> None:
    """Guards against a vacuous pass: the profile loaded and the real tests reached geodns."""
    ended = {m.testcase.upper() for m in zonemaster.messages if m.tag == "TEST_CASE_END"}
    missing = [t for t in MUST_RUN if t not in ended]
    assert not missing, f"test cases that did not run: {missing}\n{zonemaster.report()}"
    ran_disabled = [t for t in DISABLED if t in ended]
    assert not ran_disabled, f"disabled test cases ran: {ran_disabled} (profile not loaded?)"
    seen = {(m.tag, m.testcase) for m in zonemaster.messages}
    for tag, testcase in [
        ("HAS_NAMESERVERS", "BASIC02"),
        ("NO_RECURSOR", "NAMESERVER01"),
        ("EDNS0_SUPPORT", "NAMESERVER02"),
        ("CASE_QUERIES_RESULTS_OK", "NAMESERVER09"),
        ("ONE_SOA", "ZONE10"),
    ]:
        assert (tag, testcase) in seen, f"expected {testcase} {tag}\n{zonemaster.report()}"


def test_profile_disables_only_the_documented_test_cases() -> None:
    """Every test case left out of the profile has its reason in zonemaster-profile.md."""
    enabled = {t.upper() for t in json.loads(PROFILE.read_text())["test_cases"]}
    assert not enabled & set(DISABLED)
    doc = (HERE / "zonemaster-profile.md").read_text()
    for testcase in DISABLED:
        assert f"`{testcase.lower()}`" in doc, f"{testcase} disabled without a reason"


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--inside":
        sys.exit(inside(Path(sys.argv[2]), Path(sys.argv[3])))
    sys.exit("usage: unshare -n python test_zonemaster.py --inside CONFIG RESULT_JSON")
