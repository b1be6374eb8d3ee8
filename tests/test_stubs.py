"""The type stub of the extension matches what the extension exports."""

from __future__ import annotations

import ast
from pathlib import Path

from pie_rs import _core

STUB = Path(__file__).resolve().parents[1] / "python" / "pie_rs" / "_core.pyi"


def _stub_names() -> tuple[set[str], dict[str, set[str]]]:
    tree = ast.parse(STUB.read_text())
    top: set[str] = set()
    members: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            top.add(node.name)
        elif isinstance(node, ast.ClassDef):
            top.add(node.name)
            members[node.name] = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            top.add(node.target.id)
    return top, members


def test_every_stubbed_name_exists() -> None:
    top, members = _stub_names()
    missing = sorted(name for name in top if not hasattr(_core, name))
    assert not missing, f"_core.pyi declares names the extension lacks: {missing}"
    for cls, names in members.items():
        absent = sorted(n for n in names if not hasattr(getattr(_core, cls), n))
        assert not absent, f"_core.pyi declares {cls} members the extension lacks: {absent}"


def test_every_exported_name_is_stubbed() -> None:
    top, members = _stub_names()
    public = {n for n in dir(_core) if not n.startswith("_")} | {"__version__"}
    unstubbed = sorted(public - top)
    assert not unstubbed, f"the extension exports names _core.pyi does not declare: {unstubbed}"
    engine = {n for n in dir(_core.Engine) if not n.startswith("_")}
    assert not sorted(engine - members["Engine"]), (
        f"Engine members missing from the stub: {sorted(engine - members['Engine'])}"
    )
