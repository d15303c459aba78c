"""The node registry: every node type and data type a process knows, checked when registered."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .codecs import PRIMITIVE_CODECS, Codec
from .spec import ANY, PRIMITIVE_TYPES, NodeDef, NodeDefinitionError, check_definition


@dataclass(frozen=True)
class TypeInfo:
    """A data type that flows along links. `adapt` turns a foreign representation (e.g. the plain dict a
    ComfyUI custom node returns for LATENT) into the project's typed object; it runs on every output of the
    type and must return its argument unchanged when it already is the typed object. `codec` writes values of
    the type to the disk cache and reads them back (`engine.codecs`); without one they are never stored."""

    name: str
    description: str = ""
    adapt: Callable[[Any], Any] | None = None
    source: str = ""
    codec: Codec | None = None


@dataclass(frozen=True)
class LoadError:
    """A node pack (or one definition in it) that could not be loaded."""

    pack: str
    file: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"pack": self.pack, "file": self.file, "reason": self.reason}


class NodeRegistry:
    """Node definitions by name (aliases included), data types, and the errors met while loading packs."""

    def __init__(self) -> None:
        self._nodes: dict[str, NodeDef] = {}
        self._aliases: dict[str, str] = {}
        self._types: dict[str, TypeInfo] = {name: TypeInfo(name, "primitive", codec=PRIMITIVE_CODECS.get(name))
                                            for name in PRIMITIVE_TYPES}
        self._types[ANY] = TypeInfo(ANY, "any type")
        self.load_errors: list[LoadError] = []
        self.web_directories: dict[str, Path] = {}  # pack name -> its WEB_DIRECTORY (served under /extensions/)

    # -- types -------------------------------------------------------------------------------------
    def register_type(self, name: str, *, description: str = "", adapt: Callable[[Any], Any] | None = None,
                      source: str = "", codec: Codec | None = None) -> None:
        existing = self._types.get(name)
        if existing is not None and existing.adapt is not None and adapt is not None and existing.adapt is not adapt:
            raise NodeDefinitionError(f"type {name!r} is registered twice with different adapters "
                                      f"({existing.source or '?'} and {source or '?'})")
        if existing is None or adapt is not None or codec is not None:
            self._types[name] = TypeInfo(name, description or (existing.description if existing else ""),
                                         adapt or (existing.adapt if existing else None), source,
                                         codec or (existing.codec if existing else None))

    def type_info(self, name: str) -> TypeInfo | None:
        return self._types.get(name)

    def codec(self, name: str) -> Codec | None:
        """How values of type `name` are stored on disk; None: they are not."""
        info = self._types.get(name)
        return info.codec if info is not None else None

    @property
    def known_types(self) -> frozenset[str]:
        return frozenset(self._types)

    # -- nodes -------------------------------------------------------------------------------------
    def register(self, definition: NodeDef, *, declare_types: bool = False) -> None:
        """Add a definition. `declare_types` registers the types it uses (ComfyUI semantics, for V1 packs);
        otherwise every type must already be known."""
        if declare_types:
            for type_name in _types_used(definition):
                for part in type_name.split(","):
                    self.register_type(part.strip(), source=definition.source)
        check_definition(definition, self.known_types)
        for name in (definition.name, *definition.aliases):
            other = self._nodes.get(name) or self._nodes.get(self._aliases.get(name, ""))
            if other is not None:
                raise NodeDefinitionError(
                    f"node name {name!r} is defined twice: by {other.source or '?'} and by "
                    f"{definition.source or '?'}; rename one of them (or remove the duplicate pack)")
        self._nodes[definition.name] = definition
        for alias in definition.aliases:
            self._aliases[alias] = definition.name

    def get(self, name: str) -> NodeDef | None:
        found = self._nodes.get(name)
        if found is None and name in self._aliases:
            found = self._nodes[self._aliases[name]]
        return found

    def canonical_name(self, name: str) -> str:
        return self._aliases.get(name, name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[NodeDef]:
        return iter(self._nodes.values())

    def __len__(self) -> int:
        return len(self._nodes)

    @property
    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def register_all(self, definitions: Iterable[NodeDef], *, pack: str, file: str,
                     declare_types: bool = False) -> int:
        """Register each definition; a bad one is recorded in `load_errors` and skipped. Returns how many
        were added."""
        added = 0
        for definition in definitions:
            try:
                self.register(definition, declare_types=declare_types)
                added += 1
            except NodeDefinitionError as error:
                self.load_errors.append(LoadError(pack, file, str(error)))
            except Exception as error:  # a malformed declaration must not stop the other definitions
                self.load_errors.append(LoadError(pack, file, f"{definition!r} could not be registered: "
                                                  f"{type(error).__name__}: {error}"))
        return added


def _types_used(definition: NodeDef) -> Iterator[str]:
    for spec in definition.inputs:
        yield spec.type
    for out in definition.outputs:
        yield out.type
