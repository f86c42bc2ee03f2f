"""A fast reader for the common shape of zone files, checked against dnspython's.

Hosting zone files are overwhelmingly simple: `$ORIGIN`/`$TTL`, one record per line,
owner/TTL/class/type in the usual places, A AAAA NS CNAME MX TXT PTR SRV SOA, comments,
and parentheses around the SOA. `read_fast()` handles exactly that, about ten times
faster than dnspython's character-at-a-time tokenizer, and produces the same records
(`Rec`: owner wire name, TTL, type, rdata wire, ... and the file:line each record
started on). It never reports an error itself: anything it does not handle, or anything
that is wrong (an escape, `$INCLUDE`, `$GENERATE`, an unknown type, a bad address, an
unbalanced parenthesis, a name too long, a missing TTL), raises `Fallback`, and the
caller reads the whole file again with dnspython, whose records and `file:line`
messages are the reference. tests/test_zonefast.py asserts both paths give identical
records and Zones (hypothesis-generated files, the shipped zones, broken zones).

The rules copied from dnspython 2.x (`dns.zonefile.Reader`, `dns.tokenizer`):
- a line starting with a blank inherits the previous owner (initially the origin);
- after the owner: an optional TTL and an optional class (IN), in either order;
- a record without TTL takes `_implicit_ttl()` (RFC 2308 mode): the last explicit TTL
  unless `$TTL` was given, else `$TTL`, else (from the SOA on) the SOA MINIMUM;
- names are relative to the current `$ORIGIN` unless they end in a dot; `@` is it;
- duplicate detection compares the canonical form (names lower-cased for NS, CNAME,
  PTR, MX, SRV and SOA, RFC 4034 §6.2), which `canon` carries when it differs.
"""

from __future__ import annotations

import re
import socket
import struct

import dns.exception
import dns.ipv6
import dns.ttl

A, NS, CNAME, SOA, PTR, MX, TXT, AAAA, SRV = 1, 2, 5, 6, 12, 15, 16, 28, 33

# (prefix bytes before the names, names in wire form, suffix bytes after them)
Parts = tuple[bytes, tuple[bytes, ...], bytes]
# One record: owner wire (zone file case), TTL, type, rdata wire, canonical rdata when
# it differs (else None), compression parts (NS CNAME PTR MX SOA, else None), the
# lower-case target for additional processing (NS CNAME MX SRV, else None), file, line.
Rec = tuple[bytes, int, int, bytes, bytes | None, Parts | None, bytes | None, str, int]

TYPES = {
    "A": A,
    "NS": NS,
    "CNAME": CNAME,
    "SOA": SOA,
    "PTR": PTR,
    "MX": MX,
    "TXT": TXT,
    "AAAA": AAAA,
    "SRV": SRV,
}

# Anything here sends the whole file to dnspython: escapes (also `\#` generic rdata),
# non-ASCII (IDNA), CR and other control characters the tokenizer treats differently.
_UNUSUAL = re.compile(r"[^\t\n\x20-\x7e]|\\")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}")
_MAX_TTL = dns.ttl.MAX_TTL
_pack_h = struct.Struct("!H").pack
_pack_hhh = struct.Struct("!HHH").pack
_pack_5i = struct.Struct("!IIIII").pack


_NONE: set[int] = set()  # shared, never modified


class Fallback(Exception):
    """The fast reader cannot vouch for this file: read it with dnspython instead."""


def _ttl(text: str) -> int:
    if text.isdigit():
        value = int(text)
        if value > _MAX_TTL:
            raise Fallback("TTL out of range")
        return value
    try:
        return dns.ttl.from_text(text)
    except dns.exception.DNSException:
        raise Fallback(f"bad TTL {text!r}") from None


_HEX4 = "[0-9A-Fa-f]{1,4}"
_IPV6_PLAIN = re.compile(rf"(?:{_HEX4}(?::{_HEX4})*)?::(?:{_HEX4}(?::{_HEX4})*)?")
_IPV6_FULL = re.compile(rf"{_HEX4}(?::{_HEX4}){{7}}")


def _ipv6(text: str) -> bytes:
    """dns.ipv6.inet_aton(), through the C parser for the forms where both agree
    (eight groups, or '::' standing for at least two groups); dnspython otherwise."""
    if _IPV6_FULL.fullmatch(text) or (_IPV6_PLAIN.fullmatch(text) and text.count(":") <= 7):
        return socket.inet_pton(socket.AF_INET6, text)
    try:
        return dns.ipv6.inet_aton(text)
    except dns.exception.DNSException:
        raise Fallback("AAAA") from None


def _uint(text: str, limit: int) -> int:
    if not text.isdigit():
        raise Fallback(f"not an integer: {text!r}")
    value = int(text)
    if value > limit:
        raise Fallback(f"integer out of range: {text!r}")
    return value


class _Names:
    """Text -> wire names relative to the current origin, memoised per origin."""

    __slots__ = ("cache", "origin")

    def __init__(self, origin: bytes) -> None:
        self.origin = origin
        self.cache: dict[str, bytes] = {}

    def wire(self, text: str) -> bytes:
        w = self.cache.get(text)
        if w is not None:
            return w
        if text == "@":
            w = self.origin
        elif text == ".":
            w = b"\x00"
        else:
            absolute = text[-1] == "."
            labels = (text[:-1] if absolute else text).split(".")
            out = bytearray()
            for label in labels:
                n = len(label)
                if n == 0 or n > 63:
                    raise Fallback(f"empty or long label in {text!r}")
                out.append(n)
                out += label.encode("ascii")
            out += b"\x00" if absolute else self.origin
            if len(out) > 255:
                raise Fallback(f"name too long: {text!r}")
            w = bytes(out)
        self.cache[text] = w
        return w


_NOT_PAREN = re.compile(r"[^()]+")


def _paren_lines(lines: list[str], i: int) -> tuple[list[str], set[int], int, bool] | None:
    """Tokens of a record with parentheses and no quotes, starting at lines[i]
    (as `_tokens()`); None if a line of it has quotes."""
    depth = 0
    chunks = []
    n = len(lines)
    start = i
    while True:
        if i >= n:
            raise Fallback("unbalanced parentheses at end of file")
        line = lines[i]
        i += 1
        if '"' in line:
            return None
        sc = line.find(";")
        if sc >= 0:
            line = line[:sc]
        if "(" in line or ")" in line:
            for c in _NOT_PAREN.sub("", line):
                depth += 1 if c == "(" else -1
                if depth < 0:
                    raise Fallback("unbalanced ')'")
            line = line.replace("(", " ").replace(")", " ")
        chunks.append(line)
        if depth == 0:
            break
    first = chunks[0].split()
    # a lone token on the first line: dnspython would give the next line's number
    first_at_eol = len(first) == 1 and i - start > 1
    return " ".join(chunks).split(), _NONE, i, first_at_eol


def _quoted_line(line: str) -> tuple[list[str], set[int], int, bool] | None:
    """Tokens of a one-line record with quotes (as `_tokens()`, without the line
    index); None if it has parentheses too."""
    parts = line.split('"')
    if len(parts) % 2 == 0:
        raise Fallback("unbalanced quotes")
    tokens: list[str] = []
    quoted: set[int] = set()
    last = len(parts) - 1
    for j, part in enumerate(parts):
        if j % 2:
            quoted.add(len(tokens))
            tokens.append(part)
            continue
        sc = part.find(";")
        if sc >= 0:
            part = part[:sc]
        if "(" in part or ")" in part:
            return None
        # a quoted string must stand alone: blanks (or the line's ends) around it
        if j > 0 and (part[0] not in " \t" if part else sc < 0 and j < last):
            raise Fallback("token right after a quoted string")
        if sc < 0 and j < last and part and part[-1] not in " \t":
            raise Fallback("quote inside a token")
        tokens.extend(part.split())
        if sc >= 0:
            break
    return tokens, quoted, 0, False


def _tokens(lines: list[str], i: int) -> tuple[list[str], set[int], int, bool]:
    """Tokens of the record starting at lines[i] with quotes and/or parentheses.

    Returns (tokens, indexes of quoted tokens, index of the next line, whether the first
    token was followed by a line end). Raises Fallback on anything ambiguous.
    """
    tokens: list[str] = []
    quoted: set[int] = set()
    depth = 0
    first_at_eol = False
    first_line = True
    n = len(lines)
    while True:
        if i >= n:
            raise Fallback("unbalanced parentheses at end of file")
        line = lines[i]
        i += 1
        pos = 0
        size = len(line)
        cur_start = -1
        while pos < size:
            c = line[pos]
            if c in ' \t()";':
                if cur_start >= 0:
                    tokens.append(line[cur_start:pos])
                    cur_start = -1
                if c == "(":
                    depth += 1
                elif c == ")":
                    depth -= 1
                    if depth < 0:
                        raise Fallback("unbalanced ')'")
                elif c == '"':
                    if pos and line[pos - 1] not in " \t()":
                        raise Fallback("quote inside a token")
                    end = line.find('"', pos + 1)
                    if end < 0:
                        raise Fallback("newline in quoted string")
                    if end + 1 < size and line[end + 1] not in " \t();":
                        raise Fallback("token right after a quoted string")
                    quoted.add(len(tokens))
                    tokens.append(line[pos + 1 : end])
                    pos = end
                elif c == ";":
                    break
            elif cur_start < 0:
                cur_start = pos
            pos += 1
        if cur_start >= 0:
            tokens.append(line[cur_start:])
            if len(tokens) == 1 and first_line:
                # the first token's delimiter is the newline
                first_at_eol = True
        first_line = False
        if depth == 0:
            return tokens, quoted, i, first_at_eol


# A big zone is scanned and split a slice at a time: one C call over a 28 MB file holds
# the GIL throughout (the unusual-character search 0.19 s, the split 0.05 s), and the UDP
# receive thread answers nothing meanwhile. Between slices a waiting thread can run.
SLICE = 1 << 18


def _unusual(text: str) -> bool:
    """_UNUSUAL.search(text), a slice at a time (the pattern matches one character)."""
    search = _UNUSUAL.search
    return any(search(text, at, at + SLICE) for at in range(0, len(text), SLICE))


def _split_lines(text: str) -> list[str]:
    """text.split("\n"), a slice at a time (cut at newlines, so the lines are the same)."""
    out: list[str] = []
    at = 0
    while True:
        cut = text.find("\n", at + SLICE)
        if cut < 0:
            out += text[at:].split("\n")
            return out
        out += text[at:cut].split("\n")
        at = cut + 1


def read_fast(text: str, filename: str, origin: bytes) -> list[Rec]:
    """Records of a zone file in file order, exactly as dnspython would read them.

    `origin` is the zone origin in wire form (the initial $ORIGIN and owner).
    Raises Fallback if the file uses anything this reader does not handle.
    """
    if _unusual(text):
        raise Fallback("escape or unusual character")
    out: list[Rec] = []
    append = out.append
    names = _Names(origin)
    name_wire = names.wire
    last_name = origin
    last_ttl = 0
    last_known = False
    default_ttl = 0
    default_known = False
    from_soa = False
    lines = _split_lines(text)
    nlines = len(lines)
    i = 0
    while i < nlines:
        line = lines[i]
        lineno = i + 1
        i += 1
        if not line or line[0] == ";":
            continue
        quoted: set[int] = _NONE
        has_quote = '"' in line
        complex_line = has_quote or "(" in line or ")" in line
        if complex_line:
            got = _quoted_line(line) if has_quote else _paren_lines(lines, i - 1)
            if got is None:  # quotes and parentheses: character by character
                tokens, quoted, i, first_at_eol = _tokens(lines, i - 1)
            else:
                tokens, quoted, i, first_at_eol = got[0], got[1], max(i, got[2]), got[3]
            if first_at_eol:
                # dnspython's file:line would then name the next line; not worth copying
                raise Fallback("record whose first token ends a line")
        else:
            sc = line.find(";")
            tokens = (line[:sc] if sc >= 0 else line).split()
        if not tokens:
            continue
        leading = line[0] in " \t"
        t0 = tokens[0]
        if not leading and t0[0] == "$":
            d = t0.upper()
            if complex_line or len(tokens) != 2:
                raise Fallback(f"directive {d}")
            if d == "$TTL":
                default_ttl = _ttl(tokens[1])
                default_known = True
                from_soa = False
            elif d == "$ORIGIN":
                new = name_wire(tokens[1])
                names = _Names(new)
                name_wire = names.wire
            else:
                raise Fallback(f"directive {d}")
            continue
        if quoted and 0 in quoted and not leading:
            raise Fallback("quoted owner")
        try:
            if leading:
                k = 0
            else:
                last_name = name_wire(t0)
                k = 1
            owner = last_name
            t = tokens[k]
            ttl: int | None = None
            if t[0].isdigit():
                ttl = last_ttl = _ttl(t)
                last_known = True
                k += 1
                t = tokens[k]
            if t == "IN" or t.upper() == "IN":
                k += 1
                t = tokens[k]
            if ttl is None:
                if t[0].isdigit():
                    ttl = last_ttl = _ttl(t)
                    last_known = True
                    k += 1
                    t = tokens[k]
                elif last_known and (not default_known or from_soa):
                    ttl = last_ttl
                elif default_known:
                    ttl = default_ttl
            rtype = TYPES.get(t) or TYPES.get(t.upper())
            if rtype is None:
                raise Fallback(f"type {t}")
            k += 1
            args = tokens[k:]
        except IndexError:
            raise Fallback("short line") from None
        if quoted and rtype != TXT and any(j >= k for j in quoted):
            raise Fallback("quoted string outside TXT")
        if quoted and any(j < k for j in quoted):
            raise Fallback("quoted owner, TTL, class or type")
        nargs = len(args)
        canon: bytes | None = None
        parts: Parts | None = None
        target: bytes | None = None
        if rtype == A:
            if nargs != 1 or not _IPV4.fullmatch(args[0]):
                raise Fallback("A")
            rdata = socket.inet_aton(args[0])
        elif rtype == AAAA:
            if nargs != 1:
                raise Fallback("AAAA")
            rdata = _ipv6(args[0])
        elif rtype in (NS, CNAME, PTR):
            if nargs != 1:
                raise Fallback("name")
            rdata = name_wire(args[0])
            low = rdata.lower()
            if low != rdata:
                canon = low
            parts = (b"", (rdata,), b"")
            if rtype != PTR:
                target = low if canon is not None else rdata
        elif rtype == MX:
            if nargs != 2:
                raise Fallback("MX")
            pref = _pack_h(_uint(args[0], 65535))
            name = name_wire(args[1])
            rdata = pref + name
            low = name.lower()
            if low != name:
                canon = pref + low
                target = low
            else:
                target = name
            parts = (pref, (name,), b"")
        elif rtype == TXT:
            if not nargs:
                raise Fallback("TXT")
            chunks = []
            for s in args:
                b = s.encode("ascii")
                if len(b) > 255:
                    raise Fallback("TXT string too long")
                chunks.append(bytes((len(b),)) + b)
            rdata = b"".join(chunks)
        elif rtype == SRV:
            if nargs != 4:
                raise Fallback("SRV")
            head = _pack_hhh(_uint(args[0], 65535), _uint(args[1], 65535), _uint(args[2], 65535))
            name = name_wire(args[3])
            rdata = head + name
            low = name.lower()
            if low != name:
                canon = head + low
                target = low
            else:
                target = name
        else:  # SOA
            if nargs != 7:
                raise Fallback("SOA")
            mname = name_wire(args[0])
            rname = name_wire(args[1])
            minimum = _ttl(args[6])
            tail = _pack_5i(
                _uint(args[2], 0xFFFFFFFF), _ttl(args[3]), _ttl(args[4]), _ttl(args[5]), minimum
            )
            rdata = mname + rname + tail
            low = mname.lower() + rname.lower() + tail
            if low != rdata:
                canon = low
            parts = (b"", (mname, rname), tail)
            if not default_known:
                # pre-RFC 2308: the SOA MINIMUM is the default TTL when there is no $TTL
                default_ttl = minimum
                default_known = True
                from_soa = True
                if ttl is None:
                    ttl = last_ttl if last_known else default_ttl
        if len(rdata) > 65535:
            raise Fallback("rdata too long")
        if ttl is None:
            raise Fallback("missing default TTL")
        append((owner, ttl, rtype, rdata, canon, parts, target, filename, lineno))
    return out
