"""The configuration reference, generated from the schema: one table per section and stage type.

    python -m pipeline.config_reference            # prints the Markdown that README.md carries
    python -m pipeline.config_reference --write README.md   # refreshes it there, between the markers

Keys, types and defaults come from the pydantic sections themselves; the meaning of a key is the
comment its declaration carries in the source (``name: type = default  # meaning``), so the schema
and its documentation cannot drift apart (a test compares README.md with this output).
"""
from __future__ import annotations

import ast
import inspect
import io
import json
import textwrap
import tokenize
import typing

from ensemble.stacking import StackerConfig
from features.registry import FEATURE_BLOCKS, block_class
from flywheel.dedup import DedupConfig
from flywheel.shift import ShiftConfig
from flywheel.sources import ExternalConfig, ExternalSource
from kernel.schema import allowed_range, annotation_range
from models.stage import STAGE_TYPES, stage_class
from pipeline.config import RunConfig, StageSpec

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def field_comments(cls) -> dict[str, str]:
    """``{field: comment}`` from the class bodies (the class and its Section bases) in the source."""
    comments: dict[str, str] = {}
    for klass in reversed([c for c in cls.__mro__ if "model_fields" in c.__dict__ or hasattr(c, "__annotations__")]):
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        lines = source.splitlines()
        by_line: dict[int, str] = {}
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                by_line[tok.start[0]] = tok.string.lstrip("#").strip()
        body = ast.parse(source).body[0].body
        for node in body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                parts = [by_line[n] for n in range(node.lineno, node.end_lineno + 1) if n in by_line]
                n = node.end_lineno + 1  # comment-only continuation lines
                while n <= len(lines) and lines[n - 1].strip().startswith("#") and n in by_line:
                    parts.append(by_line[n])
                    n += 1
                parts = [p.split("#", 1)[1].strip() if p.startswith("type: ignore") and "#" in p else p
                         for p in parts if not (p.startswith("type: ignore") and "#" not in p)]
                comments[node.target.id] = " ".join(parts).strip(" ;")
    return comments


def _type_name(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " / ".join(json.dumps(a) for a in args)
    if origin is typing.Annotated:
        allowed = annotation_range(annotation)
        return _type_name(args[0]) + (f" {allowed}" if allowed else "")
    if origin in (list, tuple) and args and typing.get_origin(args[0]) is typing.Annotated \
            and typing.get_origin(typing.get_args(args[0])[0]) is typing.Union:
        return "list of {type, params}"  # a discriminated union of sections (feature blocks)
    if origin is tuple and len(args) > 1 and args[-1] is not Ellipsis:
        return f"[{', '.join(_type_name(a) for a in args)}]"
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"object of {_type_name(args[-1])}" if args else "object"
    if args and origin is not None:  # unions
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type):
        return {"str": "text", "int": "integer", "float": "number", "bool": "true / false"}.get(
            annotation.__name__, "object" if hasattr(annotation, "model_fields") else annotation.__name__)
    return str(annotation).replace("typing.", "")


def _default(field) -> str:
    if field.is_required():
        return "(required)"
    value = field.get_default(call_default_factory=True)
    if hasattr(value, "model_dump"):
        return "(section)"
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return ", ".join(v.get("type", "?") if isinstance(v, dict) else str(v) for v in value)
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def section_table(title: str, cls, note: str = "") -> str:
    comments = field_comments(cls)
    rows = [f"#### {title}", ""]
    if note:
        rows += [note, ""]
    rows += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in cls.model_fields.items():
        meaning = comments.get(name, "").replace("|", "\\|")
        kind = _type_name(field.annotation)
        allowed = allowed_range(field.metadata)
        if allowed:
            kind = kind[:-len(" or null")] + f" {allowed} or null" if kind.endswith(" or null") else f"{kind} {allowed}"
        rows.append(f"| `{name}` | {kind.replace('|', '/')} | `{_default(field)}` | {meaning} |")
    return "\n".join(rows)


def reference_markdown() -> str:
    parts = [
        section_table("Top level", RunConfig),
        section_table("`stages.<name>`", StageSpec, "`params` are those of the stage's type (tables below)."),
        section_table("`stacker`", StackerConfig),
        section_table("`external`", ExternalConfig),
        section_table("`external.sources[]`", ExternalSource),
        section_table("`external.dedup`", DedupConfig),
        section_table("`external.shift`", ShiftConfig),
    ]
    for kind in STAGE_TYPES:
        parts.append(section_table(f"Stage type `{kind}` (`stages.<name>.params`)", stage_class(kind).Params))
    for kind in FEATURE_BLOCKS:
        params = block_class(kind).Params
        if params.model_fields:
            parts.append(section_table(f"Feature block `{kind}` (`blocks[].params`)", params))
        else:
            parts.append(f"#### Feature block `{kind}`\n\nNo parameters.")
    return "\n\n".join(parts) + "\n"


def in_readme(text: str) -> str:
    """The reference block of a README's text (between the markers), or '' when absent."""
    if START not in text or END not in text:
        return ""
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def write_into(path) -> None:
    from pathlib import Path

    from kernel.files import write_text

    text = Path(path).read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"{path}: no {START} ... {END} markers to write between")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    write_text(path, f"{head}{START}\n{reference_markdown()}{END}{tail}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--write"] and len(sys.argv) == 3:
        write_into(sys.argv[2])
    else:
        print(reference_markdown(), end="")
