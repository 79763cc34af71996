"""The layering rule (docs/architecture.md): `wsss/` is the method and knows nothing of Ray,
object storage or Parquet; `pipelines/` may use `wsss/`, never the other way round."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_WSSS = ("ray", "boto3", "botocore", "pyarrow", "pipelines", "s3fs")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize(
    "path", sorted((ROOT / "wsss").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_the_method_imports_no_plumbing(path):
    bad = {name for name in imported_modules(path) if name.split(".")[0] in FORBIDDEN_IN_WSSS}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_rule_sees_an_import_it_forbids(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import numpy\nfrom ray.data import Dataset\nfrom . import sibling\n")
    assert imported_modules(sample) == {"numpy", "ray.data"}


def test_importing_the_whole_method_loads_no_plumbing():
    """Not even through a dependency: a process that imports every wsss module has none of
    Ray, boto3 or pyarrow loaded."""
    modules = [
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in sorted((ROOT / "wsss").rglob("*.py"))
    ]
    script = (
        f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        f"print(sorted(n for n in {FORBIDDEN_IN_WSSS!r} if n in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
