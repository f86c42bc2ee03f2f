"""`geodns check` (every problem, policy tests, --changed) and `geodns diff`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from geodns.cli import main
from tests.serverutil import REPO


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the shipped config + zones in its own git repository."""
    shutil.copy(REPO / "geodns.toml", tmp_path / "geodns.toml")
    shutil.copytree(REPO / "zones", tmp_path / "zones")
    cfg = tmp_path / "geodns.toml"
    text = cfg.read_text().replace('"data/dbip-country.mmdb"', f'"{REPO}/data/dbip-country.mmdb"')
    cfg.write_text(
        text.replace('database_url = "sqlite:///data/', f'database_url = "sqlite:///{tmp_path}/')
    )
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "add", "."], check=True)
    subprocess.run(
        [
            "git",
            "-C",
            str(tmp_path),
            "-c",
            "user.email=t@t",
            "-c",
            "user.name=t",
            "commit",
            "-qm",
            "init",
        ],
        check=True,
    )
    return tmp_path


def run(tree: Path, *args: str) -> int:
    return main(["--config", str(tree / "geodns.toml"), *args])


def test_clean_tree_passes(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(tree, "check") == 0
    assert "ok: config, 1 zone file(s)" in capsys.readouterr().err


def test_every_problem_printed_with_file_and_line(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    z = tree / "zones" / "example.com.zone"
    z.write_text(z.read_text() + "api IN A 192.0.2.1\nbad IN A 999.1.1.1\n")
    (tree / "zones" / "other.test.zone").write_text("$ORIGIN other.test.\n@ 60 IN NS ns\n")
    assert run(tree, "check") == 1
    out = capsys.readouterr().out
    assert "example.com.zone:26: " in out or "example.com.zone:27: " in out
    assert "other.test.zone:1: no SOA record" in out


def test_check_refuses_what_serve_refuses_a_short_token(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tree / "geodns.toml"
    cfg.write_text(cfg.read_text() + '\n[api.tokens]\nops = "seven77"\n')
    assert run(tree, "check") != 0
    captured = capsys.readouterr()
    assert "api.tokens.ops: must be at least 16 characters" in captured.out + captured.err


def test_policy_tests_pass_and_fail(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tests = tree / "zones" / "example.com.tests.toml"
    tests.write_text(
        '[[case]]\nclient = "212.58.224.1"\nname = "www"\nexpect_site = "uk"\n'
        '[[case]]\ncountry = "DE"\nname = "www"\nexpect_site = "fra"\n'
        '[[case]]\nclient = "212.58.224.1"\nname = "www"\ndown = ["uk"]\nexpect_site = "fra"\n'
    )
    assert run(tree, "check") == 0
    assert "3 policy test case(s)" in capsys.readouterr().err
    # a routing mistake: a rule that sends Germany to the US
    cfg = tree / "geodns.toml"
    cfg.write_text(
        cfg.read_text().replace(
            'fallback = "nearest"',
            'fallback = "nearest"\nrules = [{country = "DE", sites = ["iad"]}]',
        )
    )
    assert run(tree, "check") == 1
    out = capsys.readouterr().out
    assert "example.com.tests.toml: case[1]: www.example.com. A: expected fra, got iad" in out


def test_changed_only_checks_changed_files(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(3):
        (tree / "zones" / f"z{i}.test.zone").write_text(
            f"$ORIGIN z{i}.test.\n@ 60 IN SOA ns h 1 2 3 4 5\n@ 60 IN NS ns\nns 60 IN A 192.0.2.1\n"
        )
    subprocess.run(["git", "-C", str(tree), "add", "."], check=True)
    subprocess.run(
        ["git", "-C", str(tree), "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "z"],
        check=True,
    )
    assert run(tree, "check", "--changed") == 0
    assert "0 zone file(s)" in capsys.readouterr().err
    (tree / "zones" / "z1.test.zone").write_text("$ORIGIN z1.test.\n")
    assert run(tree, "check", "--changed") == 1
    captured = capsys.readouterr()
    assert "z1.test.zone:1: empty zone file" in captured.out or "z1.test.zone" in captured.out
    assert "z0.test" not in captured.out


def test_diff_names_changed_records_and_moved_countries(
    tree: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    new = tmp_path_factory.mktemp("new")
    shutil.copytree(tree / "zones", new / "zones")
    shutil.copy(tree / "geodns.toml", new / "geodns.toml")
    z = new / "zones" / "example.com.zone"
    z.write_text(z.read_text().replace("192.0.2.25", "192.0.2.26"))
    cfg = new / "geodns.toml"
    cfg.write_text(
        cfg.read_text().replace(
            'fallback = "nearest"',
            'fallback = "nearest"\nrules = [{country = "DE", sites = ["uk"]}]',
        )
    )
    assert run(tree, "diff", str(tree), str(new)) == 0
    out = capsys.readouterr().out
    assert "~ mail.example.com. A: changed" in out
    assert "> www.example.com. A: fra -> uk for 1 countries: DE" in out
