"""Every reducer, one method per module; importing this package registers them all."""

import importlib
import pkgutil

from .base import (
    REDUCERS,
    InLLMReducer,
    Reducer,
    ReducerConfig,
    create_reducer,
    get_reducer_class,
    identity_selection,
    list_reducers,
    register_reducer,
)

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base" and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = [
    "REDUCERS",
    "InLLMReducer",
    "Reducer",
    "ReducerConfig",
    "create_reducer",
    "get_reducer_class",
    "identity_selection",
    "list_reducers",
    "register_reducer",
]
