"""One registry per kind of pluggable setting: token mixers, pretexts, transfer methods, analysis metrics,
evaluations.

A registry maps a config name to the thing it names (a class, a function) and to that entry's metadata
(its position in tables and figures, its colour, its family, ...). Everything that lists, orders, colours,
groups or validates names of a kind reads its registry; adding a setting is one class or function plus one
`register` call.

Registries and their metadata import no torch: the Snakemake parse, the config checks and the reports read
them. The registered object may therefore be given as a "module:attribute" string, imported on first use.

The registries themselves live next to what they register: `vitablate.models.registry.MIXERS`,
`vitablate.objectives.registry.PRETEXTS` and `TRANSFER_METHODS`, `vitablate.analysis.registry.METRICS`
and `EVALS`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Optional, TypeVar

T = TypeVar("T")
_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")
_DECORATE = object()  # register(name) without a target: used as a decorator


@dataclass
class Entry(Generic[T]):
    """One registered setting: its config name, the object (or its "module:attribute" path), metadata."""

    name: str
    target: Any  # the object, or "module:attribute" until first use
    colour: Optional[str] = None  # its colour in every figure (None: a fixed spare colour, see figures.color)
    label: Optional[str] = None  # a longer human-readable name (axis labels, legends)
    meta: dict[str, Any] = field(default_factory=dict)  # kind-specific: family, layered, needs_teacher, ...

    @property
    def obj(self) -> T:
        if isinstance(self.target, str):
            module, _, attr = self.target.partition(":")
            try:
                self.target = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                raise ImportError(f"registered {self.name!r} points at {module}:{attr}, which cannot be imported "
                                  f"({type(e).__name__}: {e}); fix the register() call") from e
        return self.target

    def __getattr__(self, key: str) -> Any:
        meta = self.__dict__.get("meta", {})
        if key in meta:
            return meta[key]
        raise AttributeError(f"{type(self).__name__} {self.__dict__.get('name')!r} has no {key!r}")


class Registry(Mapping[str, T]):
    """Names of one kind, in registration order (the order of tables and figures).

    As a mapping it is name -> registered object (so `REGISTRY[name](...)` builds one); `entry(name)`
    gives the metadata. `config_key` is the config key that takes these names: every "unknown name"
    error names it.
    """

    def __init__(self, kind: str, config_key: str, home: str, required_meta: tuple[str, ...] = ()):
        self.kind = kind
        self.config_key = config_key
        self.home = home  # the module whose register() calls add entries (named in errors)
        self.required_meta = required_meta
        self._entries: dict[str, Entry[T]] = {}

    # --- registering -------------------------------------------------------------------------
    def register(self, name: str, target: Any = _DECORATE, *, colour: Optional[str] = None, label: Optional[str] = None,
                 **meta: Any) -> Any:
        """Register `target` under `name` (None: a name with metadata only); without a target, a decorator.
        Returns the target."""
        if target is _DECORATE:
            def decorator(obj: Any) -> Any:
                return self.register(name, obj, colour=colour, label=label, **meta)
            return decorator
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"{self.kind} name {name!r}: use lower-case letters, digits and underscores, "
                             "starting with a letter (it is a config value and a path component)")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered; unregister it first or pick a new name")
        missing = [k for k in self.required_meta if k not in meta]
        if missing:
            raise ValueError(f"registering {self.kind} {name!r}: give {missing} (every {self.kind} says "
                             f"{list(self.required_meta)})")
        self._entries[name] = Entry(name, target, colour, label, dict(meta))
        return target

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    # --- reading -----------------------------------------------------------------------------
    def __getitem__(self, name: str) -> T:
        return self.entry(name).obj

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"

    def entry(self, name: str) -> Entry[T]:
        """The entry of `name`; an unknown name is an error naming the config key and the choices."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r} in {self.config_key}; choose one of "
                             f"{list(self._entries)} (a new one is registered in {self.home})")
        return self._entries[name]

    def entries(self) -> list[Entry[T]]:
        return list(self._entries.values())

    def names(self, where: Optional[Callable[[Entry[T]], bool]] = None) -> tuple[str, ...]:
        """Registered names in order; `where`: only the entries it accepts."""
        return tuple(e.name for e in self._entries.values() if where is None or where(e))

    def view(self, where: Callable[[Entry[T]], bool]) -> "NameView":
        """A live, tuple-like view of the names `where` accepts: it follows later register/unregister calls."""
        return NameView(self, where)

    def rank(self, name: str) -> int:
        """Position in tables and figures (registration order); unknown names last."""
        names = list(self._entries)
        return names.index(name) if name in names else len(names)

    def colours(self) -> dict[str, str]:
        return {e.name: e.colour for e in self._entries.values() if e.colour}

    def pattern(self) -> str:
        """A regular-expression alternation of the names (longest first, so no name shadows another)."""
        return "|".join(re.escape(n) for n in sorted(self._entries, key=lambda n: (-len(n), n)))


class NameView(Sequence[str]):
    """The names of a registry that a predicate accepts, read afresh on every use (see `Registry.view`)."""

    def __init__(self, registry: Registry, where: Callable[[Entry], bool]):
        self._registry, self._where = registry, where

    def _names(self) -> tuple[str, ...]:
        return self._registry.names(self._where)

    def __getitem__(self, i):  # type: ignore[override]
        return self._names()[i]

    def __len__(self) -> int:
        return len(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __eq__(self, other: object) -> bool:
        return tuple(self) == tuple(other) if isinstance(other, (tuple, list, NameView)) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._names())

    def __repr__(self) -> str:
        return repr(self._names())


def wildcard_constraints() -> dict[str, str]:
    """Snakemake's wildcard patterns of the registered names (rules/common.smk): `mixer`, `pretext` (a
    registered pretext, with an optional _<lambda> suffix: hybrid_0.2), `eval`, `method`."""
    from .analysis.registry import EVALS
    from .methods import TRANSFER_METHODS
    from .models.registry import MIXERS
    from .objectives.registry import PRETEXTS

    return {
        "mixer": f"(?:{MIXERS.pattern()})",
        "pretext": f"(?:{PRETEXTS.pattern()})(?:_[0-9.]+)?",
        "eval": f"(?:{EVALS.pattern()})",
        "method": f"(?:{TRANSFER_METHODS.pattern()})",
    }


def lazy_exports(module: str, exports: dict[str, str], namespace: dict) -> tuple:
    """PEP 562 `__getattr__` and `__dir__` for a package whose names load on first use: `exports` maps each name
    to the (relative) module that defines it. So a package's registry imports without torch; its other names
    import their module when first read. Use: `__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())`."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], module), name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
