"""The base of every configuration section: declared keys, declared types, one default each.

Each layer declares the parameters of what it owns next to the code that reads them: a feature
block's ``Params`` in its module, a stage's ``Params`` on its class, the stacker's and the external
data's sections in theirs. :mod:`pipeline.config` assembles them into the one run schema. A key
nobody declared, or a value of the wrong type, is an error (pydantic), never silently ignored.

Every number declares its range beside its default (``Field(gt=0)``, ``ge=1``, the aliases below),
and no number of a section may be NaN or infinite (``allow_inf_nan=False``), so a value that would
mean nothing (a zero rate, a negative count, a NaN) is refused when the config is checked, before
any data is read. :func:`allowed_range` words a field's range for error messages and the reference.
"""
from __future__ import annotations

import typing
from typing import Annotated

import annotated_types as at
from pydantic import BaseModel, ConfigDict, Field, model_validator

# The ranges the sections use most (pydantic checks them; the reference table and errors show them).
PositiveInt = Annotated[int, Field(ge=1)]  # a count: at least 1
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]  # a rate, a strength, a temperature
NonNegativeFloat = Annotated[float, Field(ge=0)]
Probability = Annotated[float, Field(ge=0, le=1)]  # a share in [0, 1]
OpenProbability = Annotated[float, Field(gt=0, lt=1)]  # a share in (0, 1)
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]  # numpy, LightGBM and torch take seeds in [0, 2^32)
Port = Annotated[int, Field(ge=0, le=65535)]  # a TCP port; 0: one the system picks


class Section(BaseModel):
    """A config section: unknown keys are errors, values are checked on assignment too, numbers are
    finite (NaN and infinities are refused)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(),
                              allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, data):
        """``true``/``false`` where a number is declared is a mistake, not 1/0 (pydantic's lax mode would
        take it)."""
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                flags = [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, bool)]
                if field is not None and flags and _wants_number(field.annotation):
                    raise ValueError(f"{name}: Input should be a number, not {str(flags[0]).lower()}")
        return data

    def as_dict(self) -> dict:
        """Plain JSON-able values (what is saved beside a model and hashed into resume keys)."""
        return self.model_dump(mode="json")


def _wants_number(annotation) -> bool:
    """Whether ``annotation`` takes numbers and not booleans (through Annotated, unions, lists, tuples)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is bool:
        return False
    if annotation in (int, float):
        return True
    if origin is typing.Annotated:
        return _wants_number(args[0])
    if origin in (typing.Union, _UnionType):
        return any(_wants_number(a) for a in args) and bool not in args
    if origin in (list, tuple):
        return bool(args) and _wants_number(args[0])
    return False


def validated(cls: type[Section], params) -> Section:
    """``params`` (a dict, ``None`` or an instance) as a validated ``cls`` instance."""
    if isinstance(params, cls):
        return params.model_copy(deep=True)
    return cls.model_validate(dict(params or {}))


def allowed_range(metadata) -> str:
    """The range that ``metadata`` (a field's or an annotation's constraints) declares, in words:
    ``"> 0"``, ``">= 1"``, ``"in [0, 1]"``, ``"in (0, 1)"``; '' when it declares none."""
    low = high = None
    for item in metadata:
        if isinstance(item, at.Interval):
            item = [c for c in (at.Gt(item.gt) if item.gt is not None else None,
                                at.Ge(item.ge) if item.ge is not None else None,
                                at.Lt(item.lt) if item.lt is not None else None,
                                at.Le(item.le) if item.le is not None else None) if c is not None]
        for c in item if isinstance(item, list) else [item]:
            if isinstance(c, at.Gt):
                low = ("(", c.gt)
            elif isinstance(c, at.Ge):
                low = ("[", c.ge)
            elif isinstance(c, at.Lt):
                high = (")", c.lt)
            elif isinstance(c, at.Le):
                high = ("]", c.le)
    if low and high:
        return f"in {low[0]}{_num(low[1])}, {_num(high[1])}{high[0]}"
    if low:
        return f"{'>' if low[0] == '(' else '>='} {_num(low[1])}"
    if high:
        return f"{'<' if high[0] == ')' else '<='} {_num(high[1])}"
    return ""


def annotation_range(annotation) -> str:
    """:func:`allowed_range` of an annotation (``Annotated[int, Field(ge=1)]``, or a union holding one)."""
    if typing.get_origin(annotation) is Annotated:
        inner, *extra = typing.get_args(annotation)
        meta = []
        for e in extra:
            meta += list(getattr(e, "metadata", [])) if hasattr(e, "metadata") else [e]
        return allowed_range(meta) or annotation_range(inner)
    for arg in typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, _UnionType) else ():
        found = annotation_range(arg)
        if found:
            return found
    return ""


def field_range(field) -> str:
    """:func:`allowed_range` of a pydantic ``FieldInfo`` (its own constraints, else its annotation's)."""
    return allowed_range(field.metadata) or annotation_range(field.annotation)


# pydantic's error kinds about a number's value or type: their message adds the value and the declared range
NUMBER_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number",
                 "float_parsing", "float_type", "int_parsing", "int_type", "int_from_float", "multiple_of"}


def error_message(error: dict, allowed: str = "") -> str:
    """One pydantic error (an item of ``ValidationError.errors()``) as one line without its key path:
    what is wrong and, for a number, the value given and the allowed range (``allowed``)."""
    message = " ".join(str(error["msg"]).removeprefix("Value error, ").split())
    if error["type"] in NUMBER_ERRORS:
        value = error.get("input")
        shown = f'"{value}"' if isinstance(value, str) else repr(value)
        message += f" (got {shown}" + (f"; allowed: {allowed})" if allowed else ")")
    return message


def _num(value) -> str:
    return f"{value:g}" if isinstance(value, float) else (f"2^{value.bit_length()}-1" if value == 2**32 - 1 else str(value))


_UnionType = type(int | None)
