"""The registry of recurrent cells: one file per built-in cell, or a user's class.

A cell name is either a built-in name, the name of a module in this package
(``rnn``, ``irnn``, ``gru``, ``mgu``, ``lstm``: each file defines one
:class:`~charrnn.cells.base.Cell` subclass and names it ``CELL``), or an
import path ``package.module:Class`` to a Cell subclass in the user's own
code. :func:`names` lists the built-in names without importing JAX (config
validation runs before JAX starts); :func:`get` imports and checks a cell.
Adding a built-in cell is adding one file here (and its test).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from charrnn.errors import UserError

_NOT_CELLS = ("base",)  # modules of this package that define no cell


class CellError(UserError, ValueError):
    """A model.cell name that does not resolve to a usable cell; one line."""


def names() -> tuple[str, ...]:
    """The built-in cell names, sorted: the module names of this package."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__)
                        if m.name not in _NOT_CELLS and not m.name.startswith("_")))


def is_user_name(name) -> bool:
    """Whether ``name`` has the form ``package.module:Class``."""
    return isinstance(name, str) and ":" in name


def validate(name) -> None:
    """Raise :class:`CellError` unless ``name`` names a usable cell.

    A built-in name is only looked up (no JAX import); a user's name is
    imported and its class checked, as :func:`get` does.
    """
    if is_user_name(name):
        get(name)
    elif name not in names():
        raise CellError(f"unknown model.cell {name!r}; choose from {', '.join(names())} "
                        "or name your own cell as package.module:Class")


def get(name: str):
    """The cell named ``name``, an instance of a checked Cell subclass (one per name).

    Raises :class:`CellError` when the name is unknown, its module does not
    import, or the class lacks what a cell must provide.
    """
    if not isinstance(name, str):
        raise CellError(f"model.cell must be a cell name, got {name!r}")
    return _get(name)


@functools.cache
def _get(name: str):
    from charrnn.cells import base
    cls = _resolve(name)
    cell = cls()
    base.check(cell, name, CellError)
    return cell


def _resolve(name: str):
    from charrnn.cells import base
    if not is_user_name(name):
        validate(name)
        return importlib.import_module(f"{__name__}.{name}").CELL
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise CellError(f"model.cell {name!r}: a user cell is named package.module:Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise CellError(f"model.cell {name!r}: cannot import module {module_name!r} "
                        f"({error})") from None
    except Exception as error:  # noqa: BLE001 - the user's module failed while importing
        raise CellError(f"model.cell {name!r}: importing {module_name!r} failed: "
                        f"{type(error).__name__}: {error}") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise CellError(f"model.cell {name!r}: module {module_name!r} has no {attr!r}")
    if not (isinstance(cls, type) and issubclass(cls, base.Cell)):
        raise CellError(f"model.cell {name!r}: {attr} is not a subclass of charrnn.cells.Cell")
    return cls


def __getattr__(attr):
    """``charrnn.cells.Cell`` without importing JAX when only :func:`names` is used."""
    if attr == "Cell":
        from charrnn.cells.base import Cell
        return Cell
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
