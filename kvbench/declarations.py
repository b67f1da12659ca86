"""The built-in methods' parameters, read from their source files without importing them (importing a method imports
torch, seconds on a small machine), so a bad `-m name:key=value` is refused at once.

Each `@register` class in kvbench/methods/*.py becomes a stand-in: a frozen dataclass on `kvbench.api.Method` with the
same `name`, the same `param(...)` fields (their own and their bases') and the same `validate()`, compiled from the
file's own text. Building it runs the checks the real class runs (types, ranges, choices, validate). What the text
alone cannot settle (a name the file computes, a validate() that needs more than kvbench.api and pathlib) leaves that
method without a stand-in, and it is checked when imported, as before.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import pathlib
from pathlib import Path
from typing import Any

from kvbench import api

TYPES = {"int": int, "float": float, "str": str, "bool": bool}
unreadable: list[str] = []  # registered classes that got no stand-in (filled by declared())
PARAM_KEYS = ("ge", "gt", "le", "lt", "choices", "valid")


class Unreadable(Exception):
    """The text does not settle a declaration; that method is checked on import instead."""


def _value(node: ast.AST, names: dict[str, Any]) -> Any:
    """A literal, or a name bound to one at the top of the file or in kvbench.api."""
    if isinstance(node, ast.Name):
        if node.id in names:
            return names[node.id]
        if hasattr(api, node.id):
            return getattr(api, node.id)
        raise Unreadable(node.id)
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise Unreadable(ast.dump(node)) from None


def _constants(tree: ast.Module) -> dict[str, Any]:
    """The file's top-level NAME = literal assignments."""
    out: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = _value(node.value, out)
            except Unreadable:
                pass
    return out


def _class_parts(cls: ast.ClassDef, names: dict[str, Any]) -> tuple[str | None, list, ast.FunctionDef | None]:
    """(its `name`, its param fields as (name, type, dataclasses.field), its validate())."""
    name, fields, validate = None, [], None
    for node in cls.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["name"]:
            name = _value(node.value, names)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.value, ast.Call) and \
                getattr(node.value.func, "id", None) == "param":
            kind = TYPES.get(getattr(node.annotation, "id", None))
            if kind is None:
                raise Unreadable(ast.dump(node.annotation))
            call = node.value
            args = [_value(a, names) for a in call.args]
            kwargs = {k.arg: _value(k.value, names) for k in call.keywords if k.arg in PARAM_KEYS}
            fields.append((node.target.id, kind, api.param(*args, **kwargs)))
        elif isinstance(node, ast.FunctionDef) and node.name == "validate":
            validate = node
    return name, fields, validate


def _compile(fn: ast.FunctionDef, path: Path, names: dict[str, Any]):
    namespace = {**vars(api), **names, "Path": Path, "pathlib": pathlib}
    module = ast.Module(body=[fn], type_ignores=[])
    exec(compile(module, str(path), "exec"), namespace)  # the method's own validate(), from its own file
    return namespace[fn.name]


def _stand_in(cls: ast.ClassDef, classes: dict[str, tuple[ast.ClassDef, dict, Path]]) -> type:
    """The stand-in of one registered class; its bases (in any method file) down to Method give their fields too."""
    chain = [cls]
    while (base := getattr(chain[-1].bases[0], "id", None) if chain[-1].bases else None) != "Method":
        if base not in classes:
            raise Unreadable(f"base {base}")
        chain.append(classes[base][0])
    name, fields, validate = None, [], None
    for c in reversed(chain):  # base fields first, as dataclasses order them
        _, names, path = classes[c.name]
        own_name, own_fields, own_validate = _class_parts(c, names)
        name, fields = own_name or name, fields + own_fields
        validate = _compile(own_validate, path, names) if own_validate is not None else validate
    if not isinstance(name, str):
        raise Unreadable("name")
    body = {"name": name} if validate is None else {"name": name, "validate": validate}
    return dataclasses.make_dataclass(cls.name, fields, bases=(api.Method,), frozen=True, namespace=body)


@functools.cache
def declared() -> dict[str, type]:
    """name -> a stand-in class for every built-in method whose declaration its file settles."""
    spec = importlib.util.find_spec("kvbench.methods")  # finds the folder without importing the package
    classes: dict[str, tuple[ast.ClassDef, dict, Path]] = {}
    for folder in spec.submodule_search_locations or []:
        for path in sorted(Path(folder).glob("*.py")):
            tree = ast.parse(path.read_text())
            names = _constants(tree)
            classes.update({n.name: (n, names, path) for n in tree.body if isinstance(n, ast.ClassDef)})
    out: dict[str, type] = {}
    for cls, _, _ in classes.values():
        if any(getattr(d, "id", None) == "register" for d in cls.decorator_list):
            try:
                stand_in = _stand_in(cls, classes)
                out[stand_in.name] = stand_in
            except (Unreadable, SyntaxError, TypeError):
                unreadable.append(cls.name)
    return out
