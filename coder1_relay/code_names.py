"""
The names a crash report may keep: those in the relay's own copy of the bridge's code.

A bridge writes its crash report itself, so every string in it is one the
bridge chose.  The relay keeps none of them as written: it keeps a name only
if the same name is in the code of its own copy of C{coder1_bridge} and
C{coder1_wire} (the packages ship together), or is one of Python's built-in
exception classes; any other name becomes L{UNKNOWN}.  So a crash row holds
nothing but names from that fixed vocabulary, line numbers, a version made of
digits and a hash of those: no text a bridge can choose
(docs/security.md, "What a crash row can hold").

The vocabulary is read from the packages' code objects (their compiled
bytecode, through the import system's loaders), without importing or
running a module.
"""

from __future__ import annotations

import builtins
import hashlib
import importlib.util
import json
import pkgutil
from collections.abc import Iterable, Mapping
from types import CodeType
from typing import TypedDict

from coder1_wire.crash import OUR_PACKAGES, CrashReport

#: What a name the relay does not know is kept as.
UNKNOWN = "?"

BUILTIN_EXCEPTIONS = frozenset(
    name
    for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException)
)


class KeptFrame(TypedDict):
    """A frame as the relay keeps it."""

    module: str
    function: str
    line: int


class KeptReport(TypedDict):
    """A crash report as the relay keeps it: names from the vocabulary only."""

    type: str
    version: str
    frames: list[KeptFrame]
    #: 16 hex digits of SHA-256 over the type and frames: equal crashes, equal signature.
    signature: str


class CodeNames:
    """
    For each module of our packages, the names of the functions, methods,
    classes and comprehensions its code defines (C{co_name} of every code
    object in it, recursively).
    """

    def __init__(self, names: Mapping[str, frozenset[str]]) -> None:
        self._names = dict(names)

    @classmethod
    def of_packages(cls, packages: Iterable[str] = OUR_PACKAGES) -> CodeNames:
        """The vocabulary of the installed C{packages}."""
        names: dict[str, frozenset[str]] = {}
        for package in packages:
            for module in _modules(package):
                code = _code(module)
                if code is not None:
                    names[module] = frozenset(_code_names(code))
        return cls(names)

    @property
    def modules(self) -> frozenset[str]:
        """The modules known."""
        return frozenset(self._names)

    def keep(self, report: CrashReport) -> KeptReport:
        """What the relay keeps of a well-formed C{report}: unknown names become L{UNKNOWN}."""
        frames: list[KeptFrame] = []
        for frame in report["frames"]:
            module = frame["module"] if frame["module"] in self._names else UNKNOWN
            known = self._names.get(module, frozenset())
            function = frame["function"] if frame["function"] in known else UNKNOWN
            frames.append({"module": module, "function": function, "line": frame["line"]})
        type_name = self._type_name(report["type"])
        canonical = json.dumps([type_name, frames], separators=(",", ":"), sort_keys=True)
        return {
            "type": type_name,
            "version": report["version"],
            "frames": frames,
            "signature": hashlib.sha256(canonical.encode()).hexdigest()[:16],
        }

    def _type_name(self, name: str) -> str:
        if name in BUILTIN_EXCEPTIONS:
            return name
        # module.Qual.Name: the longest known module that prefixes it, then
        # each part of the qualified name defined in that module.
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:cut])
            known = self._names.get(module)
            if known is not None:
                return name if all(part in known for part in parts[cut:]) else UNKNOWN
        return UNKNOWN


def _modules(package: str) -> list[str]:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.submodule_search_locations is None:
        return []
    found = [package]
    for info in pkgutil.iter_modules(spec.submodule_search_locations, package + "."):
        found.extend(_modules(info.name) if info.ispkg else [info.name])
    return found


def _code(module: str) -> CodeType | None:
    spec = importlib.util.find_spec(module)
    loader = spec.loader if spec is not None else None
    get_code = getattr(loader, "get_code", None)
    return get_code(module) if get_code is not None else None


def _code_names(code: CodeType) -> Iterable[str]:
    yield code.co_name
    for constant in code.co_consts:
        if isinstance(constant, CodeType):
            yield from _code_names(constant)
