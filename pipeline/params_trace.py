"""Which params a process reads (``COP_PARAMS_TRACE``, read by ``stages/cli.py``).

The dotted key of every leaf that code reads from a traced ``Params``, or that a dump of a
section (a stored config) includes; a key that a stage replaces with ``model_copy(update=)``
is not read. The rerun test compares these with dvc.yaml's ``params``
(tests/test_pipeline_e2e.py), so a stage's params are exactly what its code reads.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

_READS: set[str] | None = None
_PATHS: dict[int, str] = {}  # id(section) -> its dotted key, while tracing
_SET: dict[int, set[str]] = {}  # id(copy) -> fields its model_copy(update=) set: not read


class TracedModel(BaseModel):
    """A pydantic model whose reads are recorded while :func:`trace_reads` is on (the params'
    ``Section`` base); costs one ``None`` check per attribute otherwise."""

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if _READS is not None and name in type(self).model_fields:
            path = _PATHS.get(id(self))
            if path is not None and name not in _SET.get(id(self), ()):
                key = _key(path, type(self), name)
                if isinstance(value, TracedModel):
                    _PATHS[id(value)] = key
                else:
                    _READS.add(key)
        return value

    def model_dump(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if _READS is not None and id(self) in _PATHS:
            skip = set(kwargs.get("exclude") or ()) | _SET.get(id(self), set())
            _READS.update(_leaves(self, _PATHS[id(self)], skip))
        return super().model_dump(*args, **kwargs)

    def model_copy(self, *args: Any, **kwargs: Any) -> Any:
        new = super().model_copy(*args, **kwargs)
        if _READS is not None and id(self) in _PATHS:
            _PATHS[id(new)] = _PATHS[id(self)]
            _SET[id(new)] = _SET.get(id(self), set()) | set(kwargs.get("update") or ())
        return new


def _key(path: str, cls: type[BaseModel], name: str) -> str:
    field = cls.model_fields[name]
    leaf = field.alias or name
    return f"{path}.{leaf}" if path else leaf


def _leaves(section: BaseModel, path: str, skip: set[str] = frozenset()) -> set[str]:
    out: set[str] = set()
    for name in type(section).model_fields:
        if name in skip or type(section).model_fields[name].alias in skip:
            continue
        value = BaseModel.__getattribute__(section, name)
        key = _key(path, type(section), name)
        out |= _leaves(value, key) if isinstance(value, BaseModel) else {key}
    return out


def trace_reads(params: BaseModel) -> set[str]:
    """Start recording the keys read from ``params`` (and its copies); returns the live set."""
    global _READS
    _READS = set() if _READS is None else _READS
    _PATHS[id(params)] = ""
    return _READS
