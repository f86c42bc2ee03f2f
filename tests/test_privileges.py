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
    # --workers: the workers are started as the user, so the interpreter must be
    # reachable by it. A directory on the way it cannot enter (e.g. /root holding pyenv)
    # is covered, in this mount namespace only, by an open one showing the same entries.
    for d in $CLOSED_DIRS; do
        stage=$(mktemp -d)
        mount --bind "$d" "$stage"
        mount -t tmpfs -o mode=0755 tmpfs "$d"
        for entry in "$stage"/* "$stage"/.[!.]*; do
            [ -e "$entry" ] || continue
            target="$d/${entry##*/}"
            if [ -d "$entry" ]; then mkdir "$target"; else touch "$target"; fi
            mount --bind "$entry" "$target"
        done
    done
    "$PY" -m geodns --config "$CFG" serve --listen 127.0.0.1:53 --workers $WORKERS 2>"$LOG" &
    pid=$!
    for i in $(seq 1 100); do
        if "$PY" -c "import dns.message,dns.query,sys
    q=dns.message.make_query('example.com','SOA')
    r=dns.query.udp(q,'127.0.0.1',port=53,timeout=0.2)
    sys.exit(0 if r.answer else 1)" 2>/dev/null; then break; fi
        sleep 0.1
    done
    ps -o user= --ppid $pid >> "$OUT" || true  # the workers, if any
    ps -o user= -p $pid >> "$OUT"
    "$PY" -c "import dns.message,dns.query
    q=dns.message.make_query('example.com','SOA')
    print(dns.query.udp(q,'127.0.0.1',port=53,timeout=2).answer[0])
    print(dns.query.tcp(q,'127.0.0.1',port=53,timeout=2).answer[0])" >> "$OUT"
    kill -TERM $pid
    wait $pid
    echo "exit=$?" >> "$OUT"
    """
)


@pytest.mark.parametrize("workers", [1, 2])
def test_binds_port_53_as_root_then_drops_to_user(workers: int) -> None:
    """With --workers 2 the main process binds every socket before dropping privileges
    and the workers (started as the user) inherit them: UDP and TCP on port 53."""
    # pytest's tmp_path lives under a 0700 directory the dropped user cannot enter
    tmp_path = Path(tempfile.mkdtemp(prefix="geodns-priv-"))
    try:
        _run(tmp_path, workers)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def closed_dirs() -> list[str]:
    """Directories on the way to the interpreter, the standard library, the venv or
    the repository that others may not enter (mode without o+x)."""
    out: list[str] = []
    targets = [Path(sys.executable).resolve(), Path(sys.base_prefix), Path(sys.prefix), REPO]
    for target in targets:
        for d in reversed(target.resolve().parents):
            if d != Path("/") and not d.stat().st_mode & 0o001 and str(d) not in out:
                out.append(str(d))
    return out


def _run(tmp_path: Path, workers: int) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (CI runs as root): binds port 53 then drops privileges")
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("unshare/ip missing: `make deb-tools` installs util-linux and iproute2")
    probe = subprocess.run(["unshare", "-n", "-m", "true"], capture_output=True, timeout=10)
    if probe.returncode != 0:
        pytest.skip("`unshare -n -m` does not work here")
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
    env["WORKERS"] = str(workers)
    env["CLOSED_DIRS"] = " ".join(closed_dirs()) if workers > 1 else ""
    cmd = ["unshare", "-n", "-m", "sh", "-c", INSIDE]
    subprocess.run(cmd, env=env, timeout=60, check=True, cwd=REPO)
    lines = out.read_text().splitlines()
    # the workers (if any), then the main process: all run as the user
    users = [x.strip() for x in lines[:-3]]
    assert users == ["nobody"] * (workers + 1 if workers > 1 else 1), log.read_text()
    assert "SOA" in lines[-3] and "SOA" in lines[-2], log.read_text()  # UDP, TCP
    assert lines[-1] == "exit=0"
    assert "dropped privileges to nobody" in log.read_text()
