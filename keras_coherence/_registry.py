"""The one registration mechanism of the package's extension points: layer rules,
aggregators, quantizers and model builders each live in a :class:`Registry`.

A registry maps names to things of one kind. Registering a name that another thing
already has raises ``ValueError`` unless ``replace=True`` (a silent replacement would
change results far from its cause); looking up an unknown name raises ``ValueError``
listing the known names, in one style for every kind.
"""
from __future__ import annotations

import difflib
from collections.abc import MutableMapping
from typing import Callable, Iterator

TAKEN = ("The {kind} name {key!r} is taken by {existing}; pick another name, or pass replace=True "
         "to override it.")


def _describe(obj) -> str:
    return getattr(obj, "__name__", None) or type(obj).__name__


def _same_key(key):
    return key


def lowercase_name(name):
    """A name as a user may type it (``" MLP "``): stripped and lowercased."""
    return name.strip().lower() if isinstance(name, str) else name


class Registry(MutableMapping):
    """Things of one ``kind`` ("aggregator", "model", ...) by name.

    Each entry has one or more names, listed in errors and in iteration (in the order
    registered), and any number of *aliases*: other spellings of the same entry that
    lookups accept but lists leave out (``"small_cnn"`` for ``"cnn"``). Replacing an
    entry replaces it under its aliases too. ``normalize`` maps what a user writes to a
    key (e.g. :func:`lowercase_name`). ``taken`` is the duplicate error's format, with
    the fields ``kind``, ``key``, ``key_name``, ``existing`` and ``new``.

    >>> colors = Registry("color", normalize=lowercase_name)
    >>> @colors.register("red", aliases=("rouge",))
    ... def red():
    ...     return "#f00"
    >>> colors.lookup("Rouge")()
    '#f00'
    >>> colors.lookup("blue")
    Traceback (most recent call last):
    ...
    ValueError: Unknown color 'blue'. Known colors: red.
    """

    def __init__(self, kind: str, *, normalize: Callable = _same_key, taken: str = TAKEN):
        self.kind = kind
        self._normalize = normalize
        self._taken = taken
        self._values = {}   # name -> thing
        self._aliases = {}  # alias -> name

    def _key(self, key):
        key = self._normalize(key)
        return self._aliases.get(key, key)

    def __getitem__(self, key):
        return self._values[self._key(key)]

    def __setitem__(self, key, value):
        self._values[self._key(key)] = value

    def __delitem__(self, key):
        key = self._key(key)
        del self._values[key]
        self._aliases = {alias: name for alias, name in self._aliases.items() if name != key}

    def __iter__(self) -> Iterator:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key) -> bool:
        try:
            return self._key(key) in self._values
        except TypeError:  # an unhashable key is no name
            return False

    def __repr__(self):
        return f"Registry({self.kind!r}: {', '.join(map(str, self)) or 'empty'})"

    def check(self, value, *names, aliases=(), replace: bool = False):
        """The ``ValueError`` of :meth:`add`, without registering anything: a registration
        that spans registries checks each before it changes any."""
        if not names:
            raise ValueError(f"A {self.kind} needs at least one name to be registered under.")
        for key in map(self._normalize, (*names, *aliases)):
            if key in self and not replace:
                existing = self[key]
                if existing is not value and existing != value:
                    key_name = key if isinstance(key, str) else _describe(key)  # a type or a dotted type name
                    raise ValueError(self._taken.format(kind=self.kind, key=key, key_name=key_name,
                                                        existing=_describe(existing), new=_describe(value)))

    def add(self, value, *names, aliases=(), replace: bool = False):
        """Register ``value`` under ``names`` and ``aliases``; returns ``value``. Every
        name is checked before any is taken, so a refused registration changes nothing."""
        self.check(value, *names, aliases=aliases, replace=replace)
        names, aliases = [self._normalize(n) for n in names], [self._normalize(a) for a in aliases]
        for name in names:
            self._aliases.pop(name, None)
            self._values[name] = value
        for alias in aliases:
            self._values.pop(alias, None)
            self._aliases[alias] = names[0]
        return value

    def register(self, *names, aliases=(), replace: bool = False):
        """Decorator form of :meth:`add`: registers the decorated thing, returns it unchanged."""
        return lambda value: self.add(value, *names, aliases=aliases, replace=replace)

    def lookup(self, name):
        """The thing registered under ``name``, or ``ValueError`` saying which names exist."""
        if name in self:
            return self[name]
        raise ValueError(self.unknown(name))

    def unknown(self, name) -> str:
        """The error for an unknown ``name``: the known names, and close matches among
        names and aliases."""
        spellings = [str(key) for key in (*self._values, *self._aliases)]
        close = difflib.get_close_matches(str(self._normalize(name)), spellings, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        return f"Unknown {self.kind} {name!r}. Known {self.kind}s: {', '.join(map(str, self))}.{hint}"
