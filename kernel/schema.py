"""The base of every configuration section: declared keys, declared types, one default each.

Each layer declares the parameters of what it owns next to the code that reads them: a feature
block's ``Params`` in its module, a stage's ``Params`` on its class, the stacker's and the external
data's sections in theirs. :mod:`pipeline.config` assembles them into the one run schema. A key
nobody declared, or a value of the wrong type, is an error (pydantic), never silently ignored.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    def as_dict(self) -> dict:
        """Plain JSON-able values (what is saved beside a model and hashed into resume keys)."""
        return self.model_dump(mode="json")


def validated(cls: type[Section], params) -> Section:
    """``params`` (a dict, ``None`` or an instance) as a validated ``cls`` instance."""
    if isinstance(params, cls):
        return params.model_copy(deep=True)
    return cls.model_validate(dict(params or {}))
