"""YAML syntax errors in a field engineer's words, at the line that is wrong.

The parser says "found character '\\t' that cannot start any token" or "expected <block end>,
but found '?'", often at the line after the mistake. When a file does not parse, `explain`
looks at the lines the parser names for the mistakes made on the shop floor (tab indentation,
a key indented one space off, no space after ':' or '-', an unclosed quote or bracket) and says
what is wrong where; anything else keeps the parser's own words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ruamel.yaml.error import MarkedYAMLError
from ruamel.yaml.parser import ParserError
from ruamel.yaml.scanner import ScannerError

# `key:value`: a plain key, then ':' and no space (`sensor_id:press-03`), optionally as a list item.
_NO_SPACE_AFTER_COLON = re.compile(r"(\s*(?:-\s+)?)([A-Za-z_][A-Za-z0-9_.-]*):([^\s:/].*)")
# `-dev_eui: ...`: a list item with no space after its dash (not `---`, not a negative number).
_NO_SPACE_AFTER_DASH = re.compile(r"(\s*)-([^\s\-0-9.].*)")
# `key:` or `key: value`; quoted keys too. The colon must be followed by a space or the line's end.
_KEY = re.compile(r"""(?:"[^"]*"|'[^']*'|[^\s#'"\[\]{},|>][^#]*?)\s*:(?:\s+(.*))?""")
_BLOCK_SCALAR = re.compile(r"[|>][0-9+-]*\s*(?:#.*)?")
_CLOSERS = {"{": "}", "[": "]"}


@dataclass
class _Block:
    """An open block mapping or sequence: its indentation and the last line seen in it (0-based)."""

    indent: int
    kind: str  # "map" or "seq"
    line: int


def explain(text: str, exc: MarkedYAMLError) -> tuple[int, int, str]:
    """The 1-based (line, col) of the mistake behind a parser error, and what it is."""
    lines = text.splitlines() or [""]
    mark = exc.problem_mark or exc.context_mark
    at = (mark.line, mark.column) if mark else (0, 0)
    problem = exc.problem or ""
    context = exc.context or ""
    last = min(at[0], len(lines) - 1)
    first = exc.context_mark.line if exc.context_mark else _previous_content(lines, last)
    first = min(first, last)

    if not isinstance(exc, ScannerError | ParserError):
        # The text is well-formed YAML; what the loader refused is its meaning.
        key = re.match(r'found duplicate key "(.*?)"', problem)
        if key:
            return at[0] + 1, at[1] + 1, f"key {key.group(1)!r} appears twice in the same mapping; keep one"
        words = " ".join(p for p in (context, problem) if p) or "invalid YAML"
        return at[0] + 1, at[1] + 1, words
    found = _tab(lines, problem, at) or _in_window(lines, first, last)
    if found is None and context.startswith("while scanning a quoted scalar") and exc.context_mark:
        quote = exc.context_mark
        char = _char(lines, quote.line, quote.column) or '"'
        found = (quote.line, quote.column, f"this quoted value is never closed: add the closing {char} at its end")
    if found is None and context.startswith("while parsing a flow") and exc.context_mark:
        found = _flow(lines, exc.context_mark.line, exc.context_mark.column, at)
    if found is None and problem == "mapping values are not allowed here":
        found = _colon_in_value(lines, at)
    if found is None:
        found = _stray(lines, problem, at, exc)
    if found is None:
        found = _indentation(lines, first, last)
    if found is None:
        words = " ".join(p for p in (context, problem) if p) or "invalid YAML"
        found = (at[0], at[1], words)
    line, col, message = found
    return line + 1, col + 1, message


def _char(lines: list[str], line: int, col: int) -> str:
    return lines[line][col] if line < len(lines) and col < len(lines[line]) else ""


def _previous_content(lines: list[str], line: int) -> int:
    """The content line before `line` (0-based), or `line` itself when there is none."""
    for i in range(line - 1, -1, -1):
        stripped = lines[i].strip()
        if stripped and not stripped.startswith("#"):
            return i
    return line


def _tab(lines: list[str], problem: str, at: tuple[int, int]) -> tuple[int, int, str] | None:
    if "'\\t'" not in problem:
        return None
    line, col = at
    text = lines[line] if line < len(lines) else ""
    if not text[:col].strip(" \t"):
        return line, col, "tabs are not allowed for indentation in YAML; use spaces"
    return line, col, "a tab is not allowed here in YAML; use spaces"


def _in_window(lines: list[str], first: int, last: int) -> tuple[int, int, str] | None:
    """A list item without a space after '-', a key without a space after ':', or a quote left
    open, on a line the parser's error spans."""
    for i in range(first, last + 1):
        text = _without_comment(lines[i])
        dash = _NO_SPACE_AFTER_DASH.fullmatch(text)
        if dash:
            item = dash.group(2).strip()
            return i, len(dash.group(1)), f"a list item needs a space after '-': write '- {item}'"
        colon = _NO_SPACE_AFTER_COLON.fullmatch(text)
        if colon:
            key, value = colon.group(2), colon.group(3).strip()
            col = len(colon.group(1)) + len(key)
            return i, col, f"missing space after ':' in '{key}:{value}': write '{key}: {value}'"
        quote = _open_quote(text)
        if quote is not None and i < last:
            char = text[quote]
            return i, quote, f"this quoted value is not closed on its line: add the closing {char} at its end"
    return None


def _without_comment(text: str) -> str:
    """The line without a trailing `# comment` (a '#' after a space, outside quotes)."""
    quote = ""
    for i, char in enumerate(text):
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"" and (i == 0 or text[i - 1] in " \t:-[{,"):
            quote = char
        elif char == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].rstrip()
    return text.rstrip()


def _open_quote(text: str) -> int | None:
    """The column of a quoted value that starts on this line and does not end on it."""
    match = _KEY.fullmatch(text.strip().removeprefix("- ").strip())
    value = (match.group(1) or "") if match else text.strip().removeprefix("- ").strip()
    if not value or value[0] not in "'\"":
        return None
    start = text.rindex(value)
    char, i = value[0], 1
    while i < len(value):
        if value[i] == "\\" and char == '"':
            i += 2
            continue
        if value[i] == char:
            if char == "'" and value[i + 1 : i + 2] == "'":
                i += 2  # '' is a quote inside a single-quoted value
                continue
            return None
        i += 1
    return start


def _flow(lines: list[str], line: int, col: int, at: tuple[int, int]) -> tuple[int, int, str] | None:
    """An unclosed `{`/`[`, or a missing comma between the items of one."""
    opener = _char(lines, line, col)
    if opener not in _CLOSERS:
        return None
    closer = _CLOSERS[opener]
    depth = 0
    for char in lines[line][col:]:
        depth += {opener: 1, closer: -1}.get(char, 0)
        if depth == 0:
            break
    else:
        return line, col, f"this '{opener}' is never closed: add '{closer}' after its last item"
    # Closed on its line: the item before the mark is `key: value more` (a comma missing before
    # `more`) or `key: val: ue` (a ': ' inside a value).
    text = lines[at[0]] if at[0] < len(lines) else ""
    item = re.split(r"[,{\[]", text[: at[1]])[-1]
    value = item.partition(": ")[2].strip()
    if value and " " not in value:
        return at[0], at[1], f"a value inside this {opener}...{closer} contains ': '; put it in quotes"
    return at[0], at[1], f"a ',' is missing between the items of this {opener}...{closer}"


def _stray(lines: list[str], problem: str, at: tuple[int, int], exc: MarkedYAMLError) -> tuple[int, int, str] | None:
    """A closing bracket that closes nothing, text after a closing quote, or a line that is
    neither `key: value` nor a list item."""
    text = lines[at[0]] if at[0] < len(lines) else ""
    closer = re.fullmatch(r"expected <block end>, but found '([}\]])'", problem)
    if closer:
        return at[0], at[1], f"this '{closer.group(1)}' closes nothing: remove it or add the bracket it closes"
    before = text[at[1] - 1] if 0 < at[1] <= len(text) else ""
    if problem == "expected <block end>, but found '<scalar>'" and before in "'\"":
        return at[0], at[1], f"text after the closing {before} of a quoted value: quote the whole value"
    neither = "this line is neither 'key: value' nor a list item ('- ...')"
    if problem == "could not find expected ':'" and exc.context_mark:
        return exc.context_mark.line, exc.context_mark.column, neither
    if problem.startswith("expected '<document start>'"):
        # The file's first value ended before this line: it was not the start of a mapping.
        first = next((i for i, t in enumerate(lines) if _without_comment(t).strip()), None)
        if first is not None:
            body = _without_comment(lines[first]).strip()
            if not body.startswith("- ") and not _KEY.fullmatch(body):
                return first, len(lines[first]) - len(lines[first].lstrip()), neither
    if problem == "sequence entries are not allowed here":
        return at[0], at[1], "a list item ('- ') cannot start here: put each item on a line of its own below its key"
    return None


def _colon_in_value(lines: list[str], at: tuple[int, int]) -> tuple[int, int, str] | None:
    """`topic: a: b`: a value holding ': ' must be quoted (not a key's own colon, which is an
    indentation mistake)."""
    line, col = at
    text = lines[line] if line < len(lines) else ""
    own = text.find(": ") if ": " in text else text.find(":")
    if own < 0 or col <= own:
        return None
    key = text[:own].strip().removeprefix("- ")
    value = text[own + 1 :].strip()
    return line, col, f"the value of {key!r} contains ': '; put it in quotes: {key}: '{value}'"


def _indentation(lines: list[str], first: int, last: int) -> tuple[int, int, str] | None:
    """The first line in first..last (0-based) whose indentation matches none of the open blocks
    before it: a key one space off, or deeper than a key that already has its value."""
    blocks: list[_Block] = []
    opens = False  # the line before opened a block: the next may be deeper
    skip_deeper_than: int | None = None  # inside a block scalar (| or >)
    for i in range(last + 1):
        raw = lines[i]
        text = _without_comment(raw)
        if not text.strip() or text.startswith(("---", "...", "%")):
            if text.startswith("---"):
                blocks, opens = [], False
            continue
        indent = len(text) - len(text.lstrip(" "))
        if skip_deeper_than is not None:
            if indent > skip_deeper_than:
                continue
            skip_deeper_than = None
        body = text[indent:]
        kind = "seq" if body == "-" or body.startswith("- ") else "map"
        inner = body[1:].lstrip(" ") if kind == "seq" else body
        key = _KEY.fullmatch(inner)
        value = (key.group(1) or "") if key else inner
        mistake = _place(blocks, indent, kind, i, opens)
        if mistake is not None:
            if i >= first:
                sibling = mistake
                return (
                    i,
                    indent,
                    f"this line's indentation ({_spaces(indent)}) does not match its siblings at line "
                    f"{sibling.line + 1} ({_spaces(sibling.indent)})",
                )
            blocks.append(_Block(indent, kind, i))  # carry on as if it were right
        if kind == "seq" and key is not None:
            # `- key: value`: the item is a mapping whose keys stand where this key stands.
            blocks.append(_Block(indent + len(body) - len(inner), "map", i))
        opens = (kind == "seq" and not inner) or (key is not None and not value)
        if _BLOCK_SCALAR.fullmatch(value):
            skip_deeper_than = indent
    return None


def _place(blocks: list[_Block], indent: int, kind: str, line: int, opens: bool) -> _Block | None:
    """Fit a line into the open blocks (closing the deeper ones); the block it should have
    lined up with when it fits none."""
    top = blocks[-1] if blocks else None
    if top is None or (opens and indent > top.indent):
        blocks.append(_Block(indent, kind, line))
        return None
    if opens and indent == top.indent and kind == "seq" and top.kind == "map":
        blocks.append(_Block(indent, kind, line))  # a list as a key's value needs no indentation
        return None
    closed: list[_Block] = []
    while blocks and blocks[-1].indent > indent:
        closed.append(blocks.pop())
    if blocks and blocks[-1].indent == indent:
        if blocks[-1].kind != kind and len(blocks) > 1 and blocks[-2].indent == indent:
            closed.append(blocks.pop())  # a list at its key's indentation ends with the next key
        if blocks[-1].kind == kind:
            blocks[-1].line = line
            return None
    candidates = closed + blocks[-1:]
    if not candidates:
        return None
    # The block the line was most likely meant for: one of its kind (a key at the dashes'
    # indentation belongs with the item's keys), then the nearest indentation, the deeper on a tie.
    return min(candidates, key=lambda b: (b.kind != kind, abs(b.indent - indent), -b.indent))


def _spaces(n: int) -> str:
    return f"{n} space{'s' if n != 1 else ''}"
