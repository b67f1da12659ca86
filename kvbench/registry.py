"""Methods register by name with @register; other packages add theirs through the entry-point group
`kvbench.methods` (an entry point names a Method subclass, or a module that registers some on import)."""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import typing
from typing import TYPE_CHECKING

from kvbench.errors import KVBenchError, ParamError, UnknownMethodError

if TYPE_CHECKING:  # kvbench.api is light, but the methods import torch: they load on first use, not here
    from kvbench.api import Method

ENTRY_POINT_GROUP = "kvbench.methods"

_REGISTRY: dict[str, type[Method]] = {}
_loaded = False
# entry points that failed to load: name -> "module:attr: ErrorType: message", shown by `kvbench methods` and by
# get_method() when that name is asked for
plugin_errors: dict[str, str] = {}
log = logging.getLogger("kvbench")


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a Method subclass available under its `name`."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} needs a class attribute `name`")
    other = _REGISTRY.get(cls.name)
    if other is not None and other is not cls and other.__qualname__ != cls.__qualname__:
        raise TypeError(f"method name '{cls.name}' is taken by {other.__module__}.{other.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load(quiet: bool = False) -> None:
    """Import the built-in methods and the plugins, once. A plugin that fails is logged once (one plain line on
    stderr), unless `quiet` (`kvbench methods` lists the failures itself)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from kvbench.api import Method

    importlib.import_module("kvbench.methods")  # the built-in methods register themselves on import
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin must not take the built-in methods down with it
            plugin_errors[ep.name] = f"{ep.value}: {type(e).__name__}: {e}"
            if not quiet:  # one plain line per process (not a warning with this file's path): the others still work
                log.warning(f"kvbench: method plugin '{ep.name}' failed to load ({plugin_errors[ep.name]}); the "
                            "other methods work; `kvbench methods` lists it")
            continue
        if isinstance(obj, type) and issubclass(obj, Method) and obj.name not in _REGISTRY:
            register(obj)


def available_methods() -> dict[str, type[Method]]:
    """Every registered method class by name, built-ins and plugins."""
    _load()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> type[Method]:
    all_methods = available_methods()
    if name not in all_methods and name in plugin_errors:
        raise KVBenchError(f"method '{name}' is a plugin that failed to load: {plugin_errors[name]}; fix or reinstall "
                           "the package that provides it (`kvbench methods` lists the plugins that failed)")
    if name not in all_methods:
        raise UnknownMethodError(name, list(all_methods))
    return all_methods[name]


def _convert(method: str, name: str, text: str, kind: typing.Any):
    try:
        if kind is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        return text
    except ValueError:
        raise ParamError(method, name, text, f"a {getattr(kind, '__name__', kind)}") from None


def check_spec(spec: str) -> None:
    """Refuse a bad 'name:key=value,...' for a built-in method without importing it (nor torch): the same errors
    parse_method raises, read from the methods' declarations (kvbench/declarations.py). A spec the declarations cannot
    settle passes; parse_method then checks it against the real class."""
    from kvbench import declarations

    name = spec.strip().partition(":")[0].strip()
    stand_in = declarations.declared().get(name)
    if stand_in is None:
        plugins = {ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
        if not declarations.unreadable and name not in plugins and name not in _REGISTRY:
            raise UnknownMethodError(name, sorted({*declarations.declared(), *plugins, *_REGISTRY}))
        return
    try:
        _build(spec, stand_in)
    except KVBenchError:
        raise
    except Exception:  # noqa: BLE001 - whatever the stand-in cannot settle, the real class will
        return


def check_specs(specs, *, allow_unknown: bool = False) -> None:
    """check_spec on every text spec of a list (others, and 'all', pass), so that the first bad one fails before a
    good one imports the methods; with allow_unknown an unknown name passes too (the caller records it)."""
    for spec in specs:
        if isinstance(spec, str) and spec.strip() != "all":
            try:
                check_spec(spec)
            except UnknownMethodError:
                if not allow_unknown:
                    raise


def parse_method(spec: str | Method, **overrides) -> Method:
    """Build a method from 'name' or 'name:key=value,key=value' (the CLI's form), plus keyword overrides."""
    from kvbench.api import Method

    if isinstance(spec, Method):
        return type(spec)(**{**spec.params(), **overrides}) if overrides else spec
    if not overrides:
        check_spec(spec)  # a bad spec fails here, before the methods (and torch) are imported
    return _build(spec, get_method(spec.strip().partition(":")[0].strip()), **overrides)


def _build(spec: str, cls: type[Method], **overrides) -> Method:
    """cls built from the key=value items of `spec`, converted to the parameters' types, plus overrides."""
    name, _, rest = spec.strip().partition(":")
    hints = typing.get_type_hints(cls)
    fields = {p.name for p in cls.describe()}
    kwargs: dict[str, typing.Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise KVBenchError(f"method spec '{spec}': '{item}' is not key=value")
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise KVBenchError(f"method '{name}' has no parameter '{key}'; its parameters: {known}")
        kwargs[key] = _convert(name, key, value.strip(), hints.get(key))
    kwargs.update(overrides)
    return cls(**kwargs)
