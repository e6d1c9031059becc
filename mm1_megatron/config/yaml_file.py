"""Reading a YAML file of ours (a run config, a data blend): a syntax error or non-UTF-8
byte is a ConfigError naming FILE:LINE in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml

from mm1_megatron.config.schema import ConfigError


def _yaml_problem(err: yaml.YAMLError, text: str) -> tuple[Optional[int], str]:
    """(1-based line or None, one-line description) of a YAML syntax error."""
    if isinstance(err, yaml.reader.ReaderError):  # a character YAML does not allow
        line = text.count("\n", 0, err.position) + 1 if isinstance(err.position, int) else None
        char = f"#x{err.character:04x}" if isinstance(err.character, int) else \
            repr(err.character)
        return line, f"unacceptable character {char}: {err.reason}"
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    if mark is not None:
        problem += f" (column {mark.column + 1})"
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context:
        where = f" from line {context_mark.line + 1}" if context_mark is not None else ""
        problem += f", {context}{where}"
    return (mark.line + 1 if mark is not None else None), " ".join(problem.split())


def read_yaml_file(path: str | Path) -> Any:
    """Parse a YAML config file; a syntax error is a ConfigError naming FILE:LINE (one line).
    OSError (missing or unreadable file) propagates for the caller to report."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{path}:{line}", f"not UTF-8 text (byte {err.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        line, problem = _yaml_problem(err, text)
        raise ConfigError(f"{path}:{line}" if line else str(path), problem) from None
