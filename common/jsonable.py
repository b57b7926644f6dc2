"""Plain JSON values from what reports and UI payloads hold (the one conversion the pack uses)."""
from __future__ import annotations

import enum
from pathlib import PurePath


def jsonable(obj, depth: int = 0):
    """Tuples and sets become lists (sets sorted), tensors lists, NaN/inf and other objects strings
    (paths, dtypes), enums their value; nesting deeper than 20 levels is cut to its repr."""
    if depth > 20:
        return repr(obj)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else str(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (set, frozenset)):
        return [jsonable(v, depth + 1) for v in sorted(obj, key=str)]
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, depth + 1) for v in obj]
    if isinstance(obj, enum.Enum):
        return jsonable(obj.value, depth + 1)
    if isinstance(obj, PurePath):
        return str(obj)
    if hasattr(obj, "tolist"):
        return jsonable(obj.tolist(), depth + 1)
    return str(obj)
