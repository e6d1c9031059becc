"""A transformers release in a folder, to put in front of the installed one with PYTHONPATH
(pure Python, as .ci/mcore_overlay.sh does for Megatron-Core): the release and what of its
own time the installed environment does not satisfy.

    folder = overlay("4.57.6")   # cached in $MM1_TRANSFORMERS_OVERLAYS (/tmp/mm1-transformers)

What goes in: the packages pip would install for `transformers==V` into this environment
(`pip install --dry-run --report`: e.g. 4.57's huggingface-hub < 1.0 and tokenizers <= 0.23.0),
and, from the release's own `dependency_versions_table.py`, a version in range of each package
it checks when present (`pkgs_to_check_at_runtime`, and `kernels`, whose hub layers it builds
at import: 5.0 raises against the kernels 0.19 that 5.25 brings) whose installed version is
out of that range. Everything else (torch, numpy, PIL) is the environment's.
"""

from __future__ import annotations

import ast
import os
import sys
from importlib import metadata
from pathlib import Path

from tests._helpers.pip_target import built_once, install_into, missing_pins

ROOT = Path(os.environ.get("MM1_TRANSFORMERS_OVERLAYS", "/tmp/mm1-transformers"))
IMPORTED_WHEN_PRESENT = ("kernels",)


def _release_checks(folder: Path) -> dict[str, str]:
    """{package: requirement} the release checks against what is installed."""
    scope: dict = {}
    exec((folder / "transformers/dependency_versions_table.py").read_text(), scope)
    tree = ast.parse((folder / "transformers/dependency_versions_check.py").read_text())
    checked = next(ast.literal_eval(node.value) for node in ast.walk(tree)
                   if isinstance(node, ast.Assign)
                   and getattr(node.targets[0], "id", "") == "pkgs_to_check_at_runtime")
    return {p: scope["deps"][p] for p in (*checked, *IMPORTED_WHEN_PRESENT)
            if p in scope["deps"] and p != "python"}


def _out_of_range(requirement: str) -> bool:
    from packaging.requirements import Requirement

    req = Requirement(requirement)
    try:
        installed = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        return False  # absent: transformers does not import it
    return not req.specifier.contains(installed, prereleases=True)


def overlay(version: str, root: Path = ROOT) -> Path:
    return built_once(root / version, lambda folder: _build(version, folder))


def _build(version: str, folder: Path) -> None:
    from packaging.utils import canonicalize_name

    pins = missing_pins(f"transformers=={version}")
    install_into(folder, *pins)
    names = {canonicalize_name(p.split("==")[0]) for p in pins}
    extra = [req for pkg, req in _release_checks(folder).items()
             if canonicalize_name(pkg) not in names and _out_of_range(req)]
    if extra:
        install_into(folder, *extra)
    (folder / "pins.txt").write_text("\n".join(pins + extra) + "\n")


if __name__ == "__main__":
    for v in sys.argv[1:]:
        print(overlay(v))
