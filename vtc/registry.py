"""A small name → class registry (timm `_registry.py` style), shared by reducers and tokenizers.

Names are lowercase snake case; registering a name twice raises. `list` takes fnmatch wildcards and
returns sorted names; an unknown name raises `ValueError` with close matches.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable
from typing import Any

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class Registry:
    """Maps names to classes for one kind of component (e.g. "reducer")."""

    def __init__(self, kind: str, list_hint: str) -> None:
        self.kind = kind
        self.list_hint = list_hint  # e.g. "vtc.list_reducers()"
        self._entries: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[type], type]:
        """Class decorator: `@REDUCERS.register("fastv")`."""
        if not _NAME_RE.match(name):
            raise ValueError(f"{self.kind} name {name!r} must be lowercase snake case, e.g. 'my_method'")

        def wrap(cls: type) -> type:
            if name in self._entries:
                other = self._entries[name]
                raise KeyError(
                    f"{self.kind} {name!r} is already registered by {other.__module__}.{other.__qualname__}; "
                    "pick another name"
                )
            cls.name = name
            self._entries[name] = cls
            return cls

        return wrap

    def get(self, name: str) -> Any:
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a str, got {type(name).__name__}")
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"unknown {self.kind} {name!r}.{hint} See {self.list_hint} for all names.") from None

    def list(self, pattern: str | Iterable[str] = "*", exclude: str | Iterable[str] = ()) -> list[str]:
        """Sorted names matching any of `pattern` (fnmatch wildcards) and none of `exclude`."""
        pats = [pattern] if isinstance(pattern, str) else list(pattern)
        excl = [exclude] if isinstance(exclude, str) else list(exclude)
        names = [n for n in self._entries if any(fnmatch.fnmatchcase(n, p) for p in pats)]
        names = [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in excl)]
        return sorted(names)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)
