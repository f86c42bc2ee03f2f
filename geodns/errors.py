"""Exception hierarchy. Loaders collect every problem and raise once."""

from __future__ import annotations


class GeoDNSError(Exception):
    """Root of every error geodns raises on purpose."""


class ConfigError(GeoDNSError):
    """A configuration file is wrong; `problems` holds every `file: key.path: what` line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class ZoneError(GeoDNSError):
    """A zone file (or its geo overlay) is wrong; `problems` holds `file:line: what` lines."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class FormError(GeoDNSError):
    """A DNS message is malformed (the reply is FORMERR, or silence)."""


class StoreError(GeoDNSError):
    """The state store is unreachable or refused a write."""
