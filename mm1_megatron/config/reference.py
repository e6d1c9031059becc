"""docs/configuration.md, generated from the schema: every field of `Config`, section by section,
with its type, its default and the comment written beside it in schema.py (the `#` lines
directly above the field and the one trailing it).

    python -m mm1_megatron.config.reference            # print the page
    python -m mm1_megatron.config.reference --write    # regenerate docs/configuration.md
    python -m mm1_megatron.config.reference --check    # exit 1 if the page is stale

tests/test_config_reference.py holds the page equal to `render()`; to change a field's text,
edit its comment in schema.py and regenerate.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import json
import sys
import tokenize
import typing
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Union

from mm1_megatron.config import schema
from mm1_megatron.config.schema import Config

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
COMMAND = "python -m mm1_megatron.config.reference --write"

INTRO = """\
A run is one `Config`: the fields below, section by section. A preset (`--preset NAME`, see
the [README](../README.md#presets)) gives the starting values; change any field on the command
line as `section.field=value` (parsed as YAML and checked against the field's type) or with
`--config file.yaml` (nested sections, applied before the command-line overrides):

```
mm1-train --preset mm1-30b parallel.tp=8 parallel.pp=4 parallel.world_size=256 --dry-run
mm1-train --preset tiny llm.moe.num_experts=4 llm.moe.layer_freq=2 connector.type=avg_pool --dry-run
```

`--dry-run` prints the resolved config, the layout and the plan. Validation runs before any
process group starts and refuses a bad config in one line naming the field (the rules:
[reliability](reliability.md#config-validation)):

```
$ mm1-train --preset mm1-30b parallel.tp=13 --dry-run
mm1-train: config error: parallel.tp: 13 does not divide llm.num_attention_heads=56
```

The defaults below are the dataclasses' own; every preset sets many of them."""


def field_docs(source: str) -> dict[tuple[str, str], str]:
    """(class, field) -> the comment lines directly above the field and its trailing comment,
    joined into one line, for every annotated field of every class in `source`."""
    lines = source.splitlines()
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    docs = {}
    for cls in ast.walk(ast.parse(source)):
        if not isinstance(cls, ast.ClassDef):
            continue
        for node in cls.body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            above, line = [], node.lineno - 1
            while line in comments and lines[line - 1].lstrip().startswith("#"):
                above.insert(0, comments[line])
                line -= 1
            trailing = [comments[node.end_lineno]] if node.end_lineno in comments else []
            docs[cls.name, node.target.id] = " ".join(above + trailing)
    return docs


def type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " / ".join(f"`{a}`" for a in args)
    if origin is Union:
        kept = [a for a in args if a is not type(None)]
        return " or ".join(type_name(a) for a in kept) + (" or None" if len(kept) < len(args)
                                                            else "")
    return hint.__name__


def default_of(f: dataclasses.Field) -> str:
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return f"`{json.dumps(value) if isinstance(value, str) else repr(value)}`"


def sections(cls: type = Config, prefix: str = ""
             ) -> Iterator[tuple[str, type, list[dataclasses.Field]]]:
    """(dotted section, its dataclass, its own fields) in declaration order, nested sections
    (llm.moe) right after their parent; the top-level fields come first as section ""."""
    hints = typing.get_type_hints(cls)
    nested = [f for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])]
    yield prefix.rstrip("."), cls, [f for f in dataclasses.fields(cls) if f not in nested]
    for f in nested:
        yield from sections(hints[f.name], f"{prefix}{f.name}.")


def documented_fields() -> Iterator[tuple[str, type, list[tuple[str, str, str, str]]]]:
    """Per section: (dotted section, dataclass, [(dotted field, type, default, doc)])."""
    docs = field_docs(Path(schema.__file__).read_text())
    for section, cls, own in sections():
        hints, prefix = typing.get_type_hints(cls), f"{section}." if section else ""
        yield section, cls, [(prefix + f.name, type_name(hints[f.name]), default_of(f),
                              docs.get((cls.__name__, f.name), "")) for f in own]


def render() -> str:
    out = ["# Configuration", "",
           f"<!-- Generated from mm1_megatron/config/schema.py by `{COMMAND}`: edit the "
           "comments there, not this page. -->", "", INTRO]
    for section, cls, rows in documented_fields():
        out += ["", f"## `{section}` ({cls.__name__})" if section else "## Top level", ""]
        if section and cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
            out += [" ".join(cls.__doc__.split()), ""]  # not the dataclass's own signature
        out += ["| field | type | default | meaning |", "|---|---|---|---|"]
        out += [f"| `{name}` | {kind} | {default} | {doc.replace('|', '/')} |"
                for name, kind, default, doc in rows]
    return "\n".join(out) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Print or write docs/configuration.md.")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"write {PAGE.name}")
    mode.add_argument("--check", action="store_true", help="exit 1 if the page is stale")
    args = ap.parse_args(argv)
    page = render()
    if args.write:
        PAGE.write_text(page)
    elif args.check:
        if not PAGE.exists() or PAGE.read_text() != page:
            print(f"{PAGE} is stale: regenerate it with `{COMMAND}`", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
