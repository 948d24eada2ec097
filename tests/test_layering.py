"""Import rules between the packages, and the namespace packaging (docs: README 'Layout').

service -> core;  worker -> model, core;  training -> model, core;  model -> nothing of ours;
core never imports torch (its CLI imports the other packages lazily, inside the subcommands).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "training", "worker", "service", "core")
ALLOWED = {
    "model": set(),
    "core": set(),
    "training": {"model", "core"},
    "worker": {"model", "core"},
    "service": {"core"},
}
TORCH_FREE = {"core", "service"}


def _imports(path: Path, top_level_only: bool) -> list[tuple[str, int]]:
    """Absolute module names imported by a file (relative imports resolved to hsc.<pkg>)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = path.relative_to(ROOT).parts[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                out.append((f"hsc.{pkg}", node.lineno))
            elif node.module:
                out.append((node.module, node.lineno))
    return out


def _files(pkg: str) -> list[Path]:
    return sorted((ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("pkg", PACKAGES)
def test_package_imports_follow_the_layering(pkg):
    bad = []
    for f in _files(pkg):
        # core's CLI may import anything lazily inside functions: check only its module level
        top_only = pkg == "core"
        for name, line in _imports(f, top_level_only=top_only):
            parts = name.split(".")
            if parts[0] == "hsc" and len(parts) > 1 and parts[1] != pkg and parts[1] not in ALLOWED[pkg]:
                bad.append(f"{f.relative_to(ROOT)}:{line} imports {name}")
            if pkg in TORCH_FREE and parts[0] in ("torch", "torchvision"):
                bad.append(f"{f.relative_to(ROOT)}:{line} imports {name} (must stay torch-free)")
    assert not bad, "\n".join(bad)


def test_importing_core_and_the_cli_leaves_torch_out():
    code = "import sys, hsc.core.cli; hsc.core.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_non_editable_install_maps_the_folders_into_the_hsc_namespace(tmp_path):
    """A plain (non-editable) install, imported from the repository root, must still find hsc.*."""
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    for pkg in PACKAGES:
        assert (target / "hsc" / pkg / "__init__.py").is_file(), pkg
    assert not (target / "hsc" / "__init__.py").exists()  # hsc stays a namespace
    code = (
        f"import sys; sys.path.insert(0, {str(target)!r}); "
        "import hsc.model.losses, hsc.model.hsc_net, hsc.core.cli, hsc.training; "
        "print(hsc.model.hsc_net.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target)), out.stdout
