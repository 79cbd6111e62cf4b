"""Did-you-mean: the known name that a mistyped one was probably meant to be."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

# Characters that look alike in many fonts and on a device's label: `CCl` for `CC1`, `PMIO`
# for `PM10`. Folded (with case) before comparing, so such a name matches exactly.
_LOOKALIKES = str.maketrans({"l": "1", "I": "1", "i": "1", "O": "0", "o": "0"})
#: Beyond this many equally close names a suggestion is a guess: none is given.
_MAX_SUGGESTIONS = 3


def _folded(name: str) -> str:
    return name.translate(_LOOKALIKES).casefold()


def close_names(word: str, known: Iterable[str]) -> list[str]:
    """The known names `word` was most likely meant to be: those equal to it but for case and
    look-alike characters, else the closest by difflib's ratio; [] when none is close or too
    many are equally close."""
    candidates = sorted(set(known) - {word})
    folded = _folded(word)
    same = [name for name in candidates if _folded(name) == folded]
    if same:
        return same[:_MAX_SUGGESTIONS]
    close = difflib.get_close_matches(word, candidates, n=len(candidates) or 1, cutoff=0.6)
    if not close:
        return []
    ratio = {name: difflib.SequenceMatcher(None, word, name).ratio() for name in close}
    best = max(ratio.values())
    tied = sorted(name for name in close if ratio[name] == best)
    return tied if len(tied) <= _MAX_SUGGESTIONS else []


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """`did you mean 'a'?` (or `'a', 'b' or 'c'`) for the closest known names, or ""."""
    names = [repr(name) for name in close_names(word, known)]
    if not names:
        return ""
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    return f"did you mean {listed}?"
