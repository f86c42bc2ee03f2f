"""Port 53 as root: bind first, then run as [server] user (in a private network namespace)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests.serverutil import REPO

INSIDE = textwrap.dedent(
    """
    set -e
    ip link set lo up
    "$PY" -m geodns --config "$CFG" serve --listen 127.0.0.1:53 2>"$LOG" &
    pid=$!
    for i in $(seq 1 100); do
        if "$PY" -c "import dns.message,dns.query,sys
    q=dns.message.make_query('example.com','SOA')
    r=dns.query.udp(q,'127.0.0.1',port=53,timeout=0.2)
    sys.exit(0 if r.answer else 1)" 2>/dev/null; then break; fi
        sleep 0.1
    done
    ps -o user= -p $pid > "$OUT"
    "$PY" -c "import dns.message,dns.query
    q=dns.message.make_query('example.com','SOA')
    print(dns.query.udp(q,'127.0.0.1',port=53,timeout=2).answer[0])" >> "$OUT"
    kill -TERM $pid
    wait $pid
    echo "exit=$?" >> "$OUT"
    """
)


def test_binds_port_53_as_root_then_drops_to_user() -> None:
    # pytest's tmp_path lives under a 0700 directory the dropped user cannot enter
    tmp_path = Path(tempfile.mkdtemp(prefix="geodns-priv-"))
    try:
        _run(tmp_path)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _run(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (CI runs as root): binds port 53 then drops privileges")
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("unshare/ip missing: `make deb-tools` installs util-linux and iproute2")
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10)
    if probe.returncode != 0:
        pytest.skip("`unshare -n` does not work here")
    zones = tmp_path / "zones"
    zones.mkdir()
    shutil.copy(REPO / "zones" / "example.com.zone", zones)
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(state, 0o777)  # the dropped user writes its store here
    cfg = tmp_path / "geodns.toml"
    cfg.write_text(
        f'[server]\nuser = "nobody"\n[zones]\ndirectory = "{zones}"\n[api]\nlisten = ""\n'
        f'[store]\ndatabase_url = "sqlite:///{state}/s.sqlite3"\njournal_dir = "{state}/j"\n'
    )
    out, log = tmp_path / "out", tmp_path / "log"
    env = dict(os.environ, PY=sys.executable, CFG=str(cfg), OUT=str(out), LOG=str(log))
    subprocess.run(["unshare", "-n", "sh", "-c", INSIDE], env=env, timeout=60, check=True, cwd=REPO)
    lines = out.read_text().splitlines()
    assert lines[0].strip() == "nobody", log.read_text()
    assert "SOA" in lines[1]
    assert lines[-1] == "exit=0"
    assert "dropped privileges to nobody" in log.read_text()
