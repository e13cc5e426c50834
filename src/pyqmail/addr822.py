r"""RFC 822 header tokens and address lists, with qmail-inject's rules for reading and writing them.

qmail-inject does not use a grammar-complete RFC 822 parser.  It splits a
field into tokens (words, quoted strings, domain literals, comments and the
special characters), groups them into addresses by reading the list from
right to left, lets a callback rewrite each address, and writes the tokens
back out in a canonical spacing with its own line folding.  The output of
pyqmail must match qmail's byte for byte, so this module reproduces those
rules rather than relying on the `email` package, whose formatting differs.

Text is handled as `str` whose code points are the original bytes (the
caller decodes with latin-1), so 8-bit header bytes pass through unchanged.

Two deliberate differences keep the output a valid header: a backslash just
before a line end does not make the line end part of a word (qmail's does,
and then writes a header line cut in two; an atom left empty by that is
dropped), and an atom with an escaped special (`a\,b`) is written back as a
quoted string (qmail writes the special bare).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "Kind",
    "Token",
    "ParseError",
    "tokenize",
    "address_list",
    "unparse",
    "unquote",
    "LINELEN",
]

LINELEN = 80


class Kind(Enum):
    ATOM = "atom"
    QUOTE = "quote"
    LITERAL = "literal"
    COMMENT = "comment"
    COMMA = ","
    AT = "@"
    DOT = "."
    LEFT = "<"
    RIGHT = ">"
    SEMI = ";"
    COLON = ":"


WORDS = frozenset({Kind.ATOM, Kind.QUOTE, Kind.LITERAL, Kind.COMMENT})

_SPECIAL_KINDS = {
    ",": Kind.COMMA,
    "@": Kind.AT,
    ".": Kind.DOT,
    "<": Kind.LEFT,
    ">": Kind.RIGHT,
    ";": Kind.SEMI,
    ":": Kind.COLON,
}
_SPACE = frozenset(" \t\r\n")
# characters that end an atom; `)` and `]` do not (they only make it a quoted string)
_ATOM_STOP = frozenset(' \t\r\n(["<>;:@,.')
_NOT_IN_ATOM = _ATOM_STOP | frozenset(")]\\")
# characters written with a backslash inside quoted strings, literals and comments
_ESCAPED = frozenset('"[]()\\\r\n')


class ParseError(ValueError):
    """The text does not tokenize, or the tokens do not form an address list."""


@dataclass(frozen=True, slots=True)
class Token:
    kind: Kind
    text: str = ""  # the unescaped content of a word-like token; empty for specials

    @classmethod
    def special(cls, kind: Kind) -> Token:
        return cls(kind)


COMMA = Token(Kind.COMMA)
AT = Token(Kind.AT)
DOT = Token(Kind.DOT)
LEFT = Token(Kind.LEFT)
RIGHT = Token(Kind.RIGHT)
COLON = Token(Kind.COLON)


def _bracketed(text: str, i: int, close: str, nests: str | None) -> tuple[str, int]:
    """Read a comment, quoted string or literal starting after its opener at text[i-1]."""
    level = 1
    out: list[str] = []
    n = len(text)
    while True:
        if i >= n:
            raise ParseError(
                "unterminated " + {")": "comment", '"': "quoted string"}.get(close, "literal")
            )
        c = text[i]
        if c == "\\":
            i += 1
            if i >= n:
                raise ParseError("backslash at end of text")
            out.append(text[i])
        elif c == close:
            # qmail keeps nested parentheses out of a comment's text
            level -= 1
            if level == 0:
                return "".join(out), i + 1
        elif nests is not None and c == nests:
            level += 1
        else:
            out.append(c)
        i += 1


def tokenize(text: str) -> list[Token]:
    """Split header text into tokens; a stray `)` or `]` or an unclosed bracket is an error."""
    tokens: list[Token] = []
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c in _SPACE:
            i += 1
        elif c in _SPECIAL_KINDS:
            tokens.append(Token(_SPECIAL_KINDS[c]))
            i += 1
        elif c == ")" or c == "]":
            raise ParseError(f"unbalanced {c!r}")
        elif c == "(":
            body, i = _bracketed(text, i + 1, ")", "(")
            tokens.append(Token(Kind.COMMENT, body))
        elif c == '"':
            body, i = _bracketed(text, i + 1, '"', None)
            tokens.append(Token(Kind.QUOTE, body))
        elif c == "[":
            body, i = _bracketed(text, i + 1, "]", None)
            tokens.append(Token(Kind.LITERAL, body))
        else:
            out: list[str] = []
            while True:
                if text[i] == "\\":
                    if i + 1 < n and text[i + 1] == "\n":
                        # qmail would put the line end into the word and write it back
                        # where it breaks the header; here it stays folding whitespace
                        i += 1
                        break
                    i += 1
                    if i >= n:
                        break
                out.append(text[i])
                i += 1
                if i >= n or text[i] in _ATOM_STOP:
                    break
            if not out:
                continue
            word = "".join(out)
            # an atom holding characters an atom may not contain (escaped, or 8-bit) is
            # written back quoted; qmail does not do this for escaped specials such as
            # `\:`, which then come out bare and no longer parse
            if any(ord(ch) < 32 or ord(ch) > 126 or ch in _NOT_IN_ATOM for ch in word):
                tokens.append(Token(Kind.QUOTE, word))
            else:
                tokens.append(Token(Kind.ATOM, word))
    return tokens


Rewriter = Callable[[list[Token]], list[Token]]


def address_list(tokens: list[Token], rewrite: Rewriter) -> list[Token]:
    """Regroup a whole field (`Name:` then an address list) with each address rewritten.

    `tokens` starts with the field name and its colon, which are kept as they
    are.  The list is read from right to left, as qmail does: that is what
    makes a phrase before `<...>` a name, turns two words with nothing between
    them into two addresses (with a comma added), and recognises groups
    (`name: ... ;`).  `rewrite` receives each address's tokens (possibly
    empty, for `<>`) in text order and returns the replacement; it is called
    for the rightmost address first.
    """
    out: list[Token] = []  # built right to left, reversed at the end
    addr: list[Token] = []  # the address being collected, right to left
    begin = 2
    in_group = False
    word_ok = True

    def got_address() -> None:
        out.extend(reversed(rewrite(addr[::-1])))
        addr.clear()

    def flush(with_comma: bool) -> None:
        if addr:
            got_address()
            if with_comma:
                out.append(COMMA)

    i = len(tokens) - 1
    while i >= begin:
        tok = tokens[i]
        kind = tok.kind
        if kind is Kind.SEMI:
            flush(True)
            if in_group:
                raise ParseError("group inside a group")
            in_group = True
            word_ok = True
            out.append(tok)
            i -= 1
        elif kind is Kind.COLON:
            flush(False)
            if not in_group:
                raise ParseError("':' outside a group")
            in_group = False
            while i >= begin and tokens[i].kind is not Kind.COMMA:
                out.append(tokens[i])
                i -= 1
            if i >= begin:
                out.append(tokens[i])
                i -= 1
            word_ok = True
        elif kind is Kind.RIGHT:
            flush(True)
            out.append(tok)
            i -= 1
            while i >= begin and tokens[i].kind is not Kind.LEFT:
                addr.append(tokens[i])
                i -= 1
            # `<>` is an address too: the empty one
            got_address()
            if i < begin:
                raise ParseError("'>' without '<'")
            out.append(tokens[i])
            i -= 1
            while i >= begin and tokens[i].kind in (
                Kind.COMMENT,
                Kind.ATOM,
                Kind.QUOTE,
                Kind.AT,
                Kind.DOT,
            ):
                out.append(tokens[i])
                i -= 1
            word_ok = False
        elif kind in (Kind.ATOM, Kind.QUOTE, Kind.LITERAL):
            if not word_ok:
                flush(True)
            word_ok = False
            addr.append(tok)
            i -= 1
        elif kind is Kind.COMMENT:
            # lexically a space: it neither starts nor ends an address
            out.append(tok)
            i -= 1
        elif kind is Kind.COMMA:
            flush(False)
            word_ok = True
            out.append(tok)
            i -= 1
        else:
            word_ok = True
            addr.append(tok)
            i -= 1
    flush(False)
    out.extend(reversed(tokens[: min(begin, len(tokens))]))
    out.reverse()
    return out


def _needs_space(before: Kind | None, after: Kind) -> bool:
    if before is None:
        return False
    if before is Kind.COLON or before is Kind.COMMA:
        return True
    if after is Kind.LEFT:
        return True
    return before in WORDS and after in WORDS


def _word(tok: Token) -> str:
    body = "".join("\\" + c if c in _ESCAPED else c for c in tok.text)
    if tok.kind is Kind.QUOTE:
        return '"' + body + '"'
    if tok.kind is Kind.LITERAL:
        return "[" + body + "]"
    if tok.kind is Kind.COMMENT:
        return "(" + body + ")"
    return body


def unparse(tokens: Iterable[Token], linelen: int = LINELEN) -> str:
    """Write tokens back as one header field ending in a newline, folded after commas.

    Every comma is a candidate line break.  A break is dropped again when the
    line it would end, joined with the next piece, stays within the limit as
    qmail measures it (the joined line, up to the next comma or the end,
    plus two); continuation lines start with two spaces.
    """
    buf: list[str] = []  # one entry per output character, so breaks can be removed by index
    line_start = 0
    pending: int | None = None  # index of the last tentative break's newline

    def candidate_break() -> None:
        nonlocal line_start, pending
        if pending is not None and (not linelen or len(buf) - line_start <= linelen):
            del buf[pending : pending + 2]
            pending = len(buf)
            buf.extend("\n ")
        else:
            if pending is not None:
                line_start = pending + 1
            pending = len(buf)
            buf.extend("\n ")

    last: Kind | None = None
    for tok in tokens:
        if _needs_space(last, tok.kind):
            buf.append(" ")
        last = tok.kind
        if tok.kind is Kind.COMMA:
            buf.append(",")
            candidate_break()
        elif tok.kind in WORDS:
            buf.extend(_word(tok))
        else:
            buf.append(tok.kind.value)
    candidate_break()
    buf.pop()  # the end keeps its newline but not the continuation space
    return "".join(buf)


def unquote(tokens: Iterable[Token]) -> str:
    """An address as the envelope sees it: quoting removed, comments dropped."""
    parts: list[str] = []
    for tok in tokens:
        if tok.kind is Kind.COMMENT:
            continue
        if tok.kind is Kind.LITERAL:
            parts.append("[" + tok.text + "]")
        elif tok.kind in (Kind.ATOM, Kind.QUOTE):
            parts.append(tok.text)
        else:
            parts.append(tok.kind.value)
    return "".join(parts)
