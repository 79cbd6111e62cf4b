"""YAML files that keep the line and column of every key and value, for error messages."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from gateway.config.yamlerrors import explain
from gateway.errors import ConfigError, Problem

# Keys whose values are identifiers: YAML would read `12345678` as a number and drop leading
# zeros of `0000000000001234`, so for these the text as written in the file is kept instead.
_IDENTIFIER_KEYS = frozenset({"dev_eui", "osm_id", "sensor_id", "id", "tenant_id", "site_id"})


@dataclass(frozen=True)
class YamlDocument:
    """A parsed YAML file: plain data plus where each node stands in the file."""

    path: Path
    root: Any

    def locate(self, loc: Sequence[str | int]) -> tuple[int, int]:
        """Return the 1-based (line, col) of the deepest node on `loc` present in the file.

        A key that exists points at its value, except for the last element of `loc`, where
        `at_key` decides; elements that are not in the file (a discriminator tag, a missing
        key) are skipped so the message points at the nearest enclosing node.
        """
        return self._locate(loc, at_key=False)

    def locate_key(self, loc: Sequence[str | int]) -> tuple[int, int]:
        """Like `locate`, but the last element's position is that of its key."""
        return self._locate(loc, at_key=True)

    def _locate(self, loc: Sequence[str | int], at_key: bool) -> tuple[int, int]:
        node = self.root
        line, col = 0, 0
        for i, part in enumerate(loc):
            last = i == len(loc) - 1
            if isinstance(node, CommentedMap) and part in node:
                pos = node.lc.key(part) if (last and at_key) else node.lc.value(part)
                line, col = pos
                node = node[part]
            elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
                line, col = node.lc.item(part)
                node = node[part]
            elif isinstance(node, CommentedMap | CommentedSeq) and i == 0 and not line:
                line, col = node.lc.line, node.lc.col
        return line + 1, col + 1


def _keep_identifier_text(node: Any, lines: list[str]) -> None:
    """Replace numbers under identifier keys by their text as written."""
    if isinstance(node, CommentedMap):
        for key in list(node):
            value = node[key]
            if key in _IDENTIFIER_KEYS and isinstance(value, int | float) and not isinstance(value, bool):
                line, col = node.lc.value(key)
                text = lines[line][col:].split("#", 1)[0].strip()
                node[key] = text.strip("'\"")
            else:
                _keep_identifier_text(value, lines)
    elif isinstance(node, CommentedSeq):
        for item in node:
            _keep_identifier_text(item, lines)


#: Bounds on what a config or device-map file may be, so that `check`, `run` and a SIGHUP reload
#: can never be held for long by a file: /dev/zero, or a few lines of nested aliases that expand
#: to billions of values ("billion laughs").
MAX_FILE_BYTES = 4 * 1024**2
MAX_VALUES = 50_000  # a map of 1,000 devices holds about 15,000
MAX_DEPTH = 32  # a device map nests 5 levels deep


def _too_big(root: Any) -> str | None:
    """Why the document is too big once its aliases are expanded (values, nesting), or None."""
    count = 0
    stack = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            return (
                f"its values, with anchors and aliases expanded, are more than {MAX_VALUES:,}; "
                "write the entries out (or use fewer nested aliases)"
            )
        if depth > MAX_DEPTH:
            return f"it nests deeper than {MAX_DEPTH} levels"
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.values())
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)
    return None


def load_yaml(path: Path, display: str | None = None) -> YamlDocument:
    """Parse one YAML file; a syntax error or duplicate key is a `ConfigError` with position."""
    name = display or str(path)
    try:
        if path.exists() and not path.is_file():
            raise ConfigError([Problem(name, 1, 1, "not a regular file")])
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            too_big = f"file is larger than {MAX_FILE_BYTES // 1024**2} MiB: not a config or device map"
            raise ConfigError([Problem(name, 1, 1, too_big)])
        text = data.decode("utf-8")
    except OSError as exc:
        raise ConfigError([Problem(name, 1, 1, f"cannot read file: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem(name, 1, 1, f"not UTF-8 text: {exc.reason}")]) from None
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    try:
        root = yaml.load(text)
    except MarkedYAMLError as exc:
        line, col, what = explain(text, exc)
        raise ConfigError([Problem(name, line, col, f"YAML: {what}")]) from None
    except YAMLError as exc:
        raise ConfigError([Problem(name, 1, 1, f"YAML: {exc}")]) from None
    except RecursionError:  # ruamel parses nesting recursively: [[[[...]]]] hundreds deep
        raise ConfigError([Problem(name, 1, 1, f"YAML: it nests deeper than {MAX_DEPTH} levels")]) from None
    if root is None:
        root = CommentedMap()
    unwieldy = _too_big(root)
    if unwieldy is not None:
        raise ConfigError([Problem(name, 1, 1, f"YAML: {unwieldy}")])
    _keep_identifier_text(root, text.splitlines())
    return YamlDocument(path=path, root=root)
