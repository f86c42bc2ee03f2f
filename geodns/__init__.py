"""geodns: a GeoDNS authoritative nameserver."""

__version__ = "0.1.0"
