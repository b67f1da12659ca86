"""Methods register by name with @register; other packages add theirs through the entry-point group
`kvbench.methods` (an entry point names a Method subclass, or a module that registers some on import)."""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import typing

from kvbench.api import KVBenchError, Method, ParamError, UnknownMethodError

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


def parse_method(spec: str | Method, **overrides) -> Method:
    """Build a method from 'name' or 'name:key=value,key=value' (the CLI's form), plus keyword overrides."""
    if isinstance(spec, Method):
        return type(spec)(**{**spec.params(), **overrides}) if overrides else spec
    name, _, rest = spec.strip().partition(":")
    cls = get_method(name.strip())
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
