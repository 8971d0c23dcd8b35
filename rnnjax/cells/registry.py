"""The cell registry: every cell registers itself by name in its own file.

Anything that builds a cell from a name — :func:`rnnjax.models.build_model`, :class:`rnnjax.train.RunConfig`,
:class:`rnnjax.seq2seq.EncoderDecoder`, checkpoint restore, the command line's ``--cell``, the experiments and
the conformance tests — reads this registry. ``import rnnjax`` imports every shipped cell, so the registry is
complete as soon as ``rnnjax`` is imported. A cell defined in your own module registers itself the same way::

    @rnnjax.register_cell("mycell")
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class MyCell(rnnjax.Cell):
        ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

CellFactory = Callable[..., Any]
T = TypeVar("T")

CELLS: dict[str, CellFactory] = {}
"""Registered cells: name -> class (or factory called as ``factory(hidden_size=..., **options)``)."""

ALIASES: dict[str, str] = {}
"""Other names for registered cells: alias -> name (``"elman"`` -> ``"simple"``)."""


def register_cell(name: str, *aliases: str) -> Callable[[T], T]:
    """Class decorator registering a cell under ``name`` (and ``aliases``).

    Args:
        name: lower-case name used by ``make_cell``, ``build_model``, ``--cell``, ...
        *aliases: further names for the same cell.

    Raises:
        ValueError: ``name`` or an alias is already taken by a different cell.
    """

    def decorate(factory: T) -> T:
        add_cell(name, factory, *aliases)
        return factory

    return decorate


def add_cell(name: str, factory: CellFactory, *aliases: str) -> None:
    """Registers ``factory`` (a cell class, or a callable taking ``hidden_size=`` and options) as ``name``."""
    for key in (name, *aliases):
        if not isinstance(key, str) or not key:
            raise ValueError(f"cell names must be non-empty strings, got {key!r}")
        taken = CELLS.get(key) or CELLS.get(ALIASES.get(key, ""))
        if taken is not None and taken is not factory:
            raise ValueError(f"cell name {key!r} is already registered for {getattr(taken, '__name__', taken)!r}")
    CELLS[name] = factory
    for alias in aliases:
        ALIASES[alias] = name


def remove_cell(name: str) -> None:
    """Removes ``name`` and its aliases from the registry (for tests and notebooks that register throwaways)."""
    CELLS.pop(name, None)
    for alias in [a for a, target in ALIASES.items() if target == name]:
        del ALIASES[alias]


def cell_names(*, aliases: bool = False) -> list[str]:
    """Registered names, sorted; with ``aliases=True`` the aliases too."""
    return sorted({*CELLS, *(ALIASES if aliases else ())})


def cell_factory(name: str) -> CellFactory:
    """The class or factory registered as ``name`` (or an alias of it).

    Raises:
        ValueError: no cell of that name, listing the known names.
    """
    factory = CELLS.get(ALIASES.get(name, name)) if isinstance(name, str) else None
    if factory is None:
        raise ValueError(f"unknown cell {name!r}; known cells: {cell_names(aliases=True)}")
    return factory


def make_cell(name: str, hidden_size: int, **options):
    """Builds the cell registered as ``name`` with ``hidden_size`` and ``options`` (e.g. ``forget_bias=1.0``)."""
    return cell_factory(name)(hidden_size=hidden_size, **options)
