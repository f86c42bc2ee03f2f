"""geodns.toml: every problem reported with file and key path; defaults documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from geodns.config import ConfigError, load_config, parse_listen


def load(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    p = tmp_path / "geodns.toml"
    p.write_text(text)
    return load_config(p)


BAD = [
    ("unknown-section", "[sever]\n", "sever: unknown section"),
    ("unknown-key", "[server]\nlisten_on = []\n", "server.listen_on: unknown key"),
    (
        "wrong-type",
        "[server]\nmax_udp_payload = '1232'\n",
        "server.max_udp_payload: must be an integer",
    ),
    ("bad-listen", "[server]\nlisten = ['localhost:53']\n", "server.listen[0]"),
    ("v6-without-brackets", "[server]\nlisten = ['::1:53']\n", "server.listen[0]"),
    ("payload-range", "[server]\nmax_udp_payload = 100\n", "max_udp_payload: must be within"),
    (
        "misspelt-lat",
        "[sites.uk]\nipv4 = ['192.0.2.1']\nlattitude = 51.5\nlon = 0.1\n",
        "sites.uk.lattitude: unknown key",
    ),
    (
        "lat-range",
        "[sites.uk]\nipv4 = ['192.0.2.1']\nlat = 91.0\nlon = 0.1\n",
        "sites.uk.lat: must be within -90..90",
    ),
    ("no-address", "[sites.uk]\nlat = 1.0\nlon = 1.0\n", "sites.uk: needs at least one address"),
    (
        "bad-ipv4",
        "[sites.uk]\nipv4 = ['2001:db8::1']\nlat = 1.0\nlon = 1.0\n",
        "sites.uk.ipv4[0]: '2001:db8::1' is not an IPv4 address",
    ),
    (
        "unknown-city",
        "[sites.uk]\nipv4 = ['192.0.2.1']\ncity = 'Atlantis'\ncountry = 'GB'\n",
        "sites.uk.city: 'Atlantis', 'GB' is not in the city table",
    ),
    (
        "pool-unknown-site",
        "[pools.web]\nmembers = ['nope']\n",
        "pools.web.members: unknown site 'nope'",
    ),
    (
        "rule-two-kinds",
        "[sites.uk]\nipv4 = ['192.0.2.1']\nlat = 1.0\nlon = 1.0\n"
        "[pools.web]\nmembers = ['uk']\n"
        "rules = [{country = 'GB', continent = 'EU', sites = ['uk']}]\n",
        "pools.web.rules[0]: needs exactly one of cidr, country, continent",
    ),
    (
        "rule-bad-cidr",
        "[sites.uk]\nipv4 = ['192.0.2.1']\nlat = 1.0\nlon = 1.0\n"
        "[pools.web]\nmembers = ['uk']\nrules = [{cidr = '10.0.0.1/8', sites = ['uk']}]\n",
        "pools.web.rules[0].cidr: 10.0.0.1/8 has host bits set",
    ),
    (
        "check-kind",
        "[sites.uk]\nipv4 = ['192.0.2.1']\nlat = 1.0\nlon = 1.0\n[sites.uk.check]\nkind = 'icmp'\n",
        "sites.uk.check.kind: 'icmp'",
    ),
    ("cookie-secret", "[cookies]\nsecret = 'abc'\n", "cookies.secret: must be 32 hex digits"),
    ("toml-syntax", "[server\n", "geodns.toml: "),
]


@pytest.mark.parametrize(
    ("text", "expect"), [(t, e) for _, t, e in BAD], ids=[i for i, _, _ in BAD]
)
def test_bad_config_names_file_and_key(tmp_path: Path, text: str, expect: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text)
    problems = err.value.problems
    assert any(expect in p for p in problems), problems
    assert all(str(tmp_path / "geodns.toml") in p for p in problems)


def test_all_problems_reported_together(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, "[server]\nfoo = 1\nbar = 2\n[zones]\nbaz = 3\n")
    assert len(err.value.problems) == 3


def test_defaults_and_city_location(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        "[sites.fra]\nipv4 = ['192.0.2.2']\ncity = 'Frankfurt am Main'\ncountry = 'DE'\n"
        "[pools.web]\nmembers = ['fra']\n",
    )
    assert cfg.server.listen == ("127.0.0.1:1053",)
    assert cfg.server.max_udp_payload == 1232
    assert cfg.server.tcp_max_connections == 1000
    site = cfg.sites["fra"]
    assert 49.5 < site.lat < 50.5 and 8.0 < site.lon < 9.0
    assert cfg.pools["web"].fallback == "nearest"
    assert cfg.resolve("zones") == tmp_path / "zones"


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("text", "expect"),
    [("127.0.0.1:53", ("127.0.0.1", 53)), ("[::1]:1053", ("::1", 1053))],
)
def test_parse_listen(text: str, expect: tuple[str, int]) -> None:
    assert parse_listen(text) == expect


def test_shipped_config_loads() -> None:
    cfg = load_config(Path(__file__).resolve().parent.parent / "geodns.toml")
    assert set(cfg.sites) == {"uk", "fra", "iad"}


def test_zone_cache_dir_is_a_key_relative_to_the_config(tmp_path: Path) -> None:
    """[zones] cache_dir: state/zonecache beside the config by default; absolute paths
    kept (a read-only /etc/geodns with state in /var/lib/geodns, contrib/geodns.service)."""
    from geodns.app import App
    from tests.serverutil import write_config

    (tmp_path / "zones").mkdir()
    path = write_config(tmp_path, '[api]\nlisten = ""\n')
    app = App(load_config(path), listen=["127.0.0.1:0"])
    assert app.reloader.cache is not None
    assert app.reloader.cache.directory == tmp_path / "state" / "zonecache"
    elsewhere = tmp_path / "var" / "zc"
    path.write_text(path.read_text().replace("[zones]", f'[zones]\ncache_dir = "{elsewhere}"'))
    app = App(load_config(path), listen=["127.0.0.1:0"])
    assert app.reloader.cache is not None
    assert app.reloader.cache.directory == elsewhere
