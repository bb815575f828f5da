"""Import ``package.module:attr`` paths named in a config (model and data factories)."""

from __future__ import annotations

import importlib
from typing import Any

from amc.errors import UserError


def import_object(path: str, label: str) -> Any:
    """The object at ``package.module:attr.sub``; a failure is a ``UserError`` starting with ``label``."""
    module_name, _, attr_path = path.partition(":")
    module_name, attr_path = module_name.strip(), attr_path.strip()
    if not module_name or not attr_path:
        raise UserError(f"{label}: an import path must look like 'package.module:factory'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raises while importing
        raise UserError(f"{label}: cannot import module {module_name!r}: {type(e).__name__}: {e}") from e
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise UserError(f"{label}: module {module_name!r} has no attribute {attr_path!r}") from e
    if not callable(obj):
        raise UserError(f"{label}: {attr_path!r} in {module_name!r} is not callable")
    return obj
