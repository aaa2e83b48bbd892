"""The CLI's human-readable output: any document (Struct, dict, list, nested) as aligned
``name  value`` lines, with no Python reprs. ``--json`` is the machine-readable form.

A record is one line per field; a list of records is records separated by blank lines; a
list of plain values is one value per line. Inside a record: nothing (None) is ``-``, a
flag is ``yes``/``no``, a list of plain values is a comma list, and a nested record or list
of records is indented under its name.
"""

from __future__ import annotations

from typing import Any

from .limits import flatten

_INDENT = "  "
NOTHING = "-"


def render(document: Any) -> str:
    """``document`` as text, ending in a newline unless there is nothing to show."""
    lines = _document_lines(flatten(document))
    return "".join(line + "\n" for line in lines)


def _document_lines(data: Any) -> list[str]:
    if isinstance(data, dict):
        return _record_lines(data)
    if isinstance(data, list | tuple):
        if all(not isinstance(item, dict | list | tuple) for item in data):
            return [_scalar(item) for item in data]
        return _records_lines(data)
    return [_scalar(data)]


def _records_lines(items: list[Any] | tuple[Any, ...]) -> list[str]:
    lines: list[str] = []
    for i, item in enumerate(items):
        if i:
            lines.append("")
        lines.extend(_document_lines(item))
    return lines


def _record_lines(record: dict[str, Any]) -> list[str]:
    width = max((len(str(name)) for name in record), default=0)
    lines: list[str] = []
    for name, value in record.items():
        if _is_nested(value):
            lines.append(str(name))
            lines.extend(_INDENT + line if line else line for line in _document_lines(value))
        else:
            lines.append(f"{name!s:<{width}}  {_inline(value) or NOTHING}")
    return lines


def _is_nested(value: Any) -> bool:
    if isinstance(value, dict):
        return bool(value)
    return isinstance(value, list | tuple) and any(
        isinstance(item, dict | list | tuple) for item in value
    )


def _inline(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(_scalar(item) for item in value) or NOTHING
    if isinstance(value, dict):  # only an empty one gets here
        return NOTHING
    return _scalar(value)


def _scalar(value: Any) -> str:
    if value is None:
        return NOTHING
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)
