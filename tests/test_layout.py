"""The package layout and the one-way import direction of docs/design.md."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ["common", "cache_format", "ops", "models", "extract", "train", "eval", "demo"]
# What each package may import from the project (docs/design.md).
ALLOWED = {
    "common": set(),
    "cache_format": {"common"},
    "ops": {"common"},
    "models": {"common", "cache_format", "ops"},
    "extract": {"common", "cache_format", "models", "ops"},
    "train": {"common", "cache_format", "models", "ops"},
    "eval": {"common", "cache_format", "models", "ops"},
    "demo": set(FOLDERS),
}


def _project_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            m = re.match(r"vlsi\.(\w+)", name)
            if m:
                found.add(m.group(1))
    return found


def test_import_direction():
    bad = []
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            for target in _project_imports(path) - ALLOWED[folder] - {folder}:
                bad.append(f"{path.relative_to(ROOT)} imports vlsi.{target}")
    assert not bad, "import direction violated:\n" + "\n".join(bad)


def test_every_package_is_installed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {v: k for k, v in cfg["package-dir"].items()}
    for folder in FOLDERS:
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = str(init.parent.relative_to(ROOT))
            assert rel in mapped, f"{rel} is a package but not in pyproject's package-dir"
            assert mapped[rel] in cfg["packages"], f"{mapped[rel]} missing from pyproject's packages"


def test_no_top_level_train_or_eval_module(tmp_path):
    """Installed, the project is importable only under `vlsi.`: no top-level `train`/`eval` to collide with."""
    import subprocess
    import sys

    code = (
        "import importlib.util as u; "
        "assert u.find_spec('vlsi.train') and u.find_spec('vlsi.cache_format'); "
        "print([n for n in ('train', 'eval', 'extract', 'cache_format', 'models', 'ops', 'demo') if u.find_spec(n)])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
