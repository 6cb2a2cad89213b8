"""`Registry`: names to classes (or builders), one style for strategies, objectives and evaluators.

Registering a name twice raises, as PEFT's `register_peft_method` does: a second class under a name would silently
replace the first one for every later lookup. Unknown names fail with the valid ones and the closest match.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """An insertion-ordered, read-mostly mapping `name -> entry` for one `kind` of thing ("strategy", ...).

    `register(entry, name)` adds an entry and refuses a name that is taken; `pop(name)` takes one back (tests that
    register a stand-in); `lookup(name)` is `self[name]` with an error naming the valid entries.
    """

    def __init__(self, kind: str, plural: str | None = None) -> None:
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self._entries: dict[str, T] = {}

    @property
    def _a(self) -> str:
        return f"{'An' if self.kind[0] in 'aeiou' else 'A'} {self.kind}"

    def register(self, entry: T, name: str) -> T:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self._a} needs a non-empty string name to be registered, got {name!r}.")
        if name in self._entries:
            raise ValueError(
                f"{self._a} named {name!r} is already registered ({_describe(self._entries[name])}); pick another "
                f"name for {_describe(entry)}."
            )
        self._entries[name] = entry
        return entry

    def pop(self, name: str) -> T:
        return self._entries.pop(name)

    def lookup(self, name: str) -> T:
        if name in self._entries:
            return self._entries[name]
        close = difflib.get_close_matches(str(name), self._entries, n=1)
        hint = f" did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown {self.kind} {name!r};{hint} valid {self.plural}: {', '.join(sorted(self))}")

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"


def _describe(entry: object) -> str:
    return f"{getattr(entry, '__module__', '?')}.{getattr(entry, '__qualname__', type(entry).__name__)}"
