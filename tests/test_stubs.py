"""flashinfer_py/_core.pyi declares what the native module exports, and ships with the
package (py.typed marks it as typed, PEP 561)."""
from __future__ import annotations

import ast
from pathlib import Path

import flashinfer_py
from flashinfer_py import _core

PKG = Path(flashinfer_py.__file__).parent


def _stub_tree():
    tree = ast.parse((PKG / "_core.pyi").read_text())
    top = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            top[node.name] = node
    return top


def test_every_export_is_stubbed():
    top = _stub_tree()
    exported = {n for n in dir(_core) if not n.startswith("_")}
    assert exported - set(top) == set(), "add these to flashinfer_py/_core.pyi"
    assert set(top) - exported - {"_Ids"} == set(), "stubs for names _core does not export"


def test_class_members_are_stubbed():
    top = _stub_tree()
    for name in ("BundleReader", "BundleWriter", "ReaderParams", "ReadStats", "NeuronCache",
                 "AsyncReads"):
        cls = getattr(_core, name)
        declared = {n.name for n in top[name].body if isinstance(n, ast.FunctionDef)}
        declared |= {n.target.id for n in top[name].body if isinstance(n, ast.AnnAssign)}
        members = {m for m in vars(cls) if not m.startswith("_")}
        assert members - declared == set(), f"{name}: add these to _core.pyi"
    testing = {n for n in dir(_core.testing) if not n.startswith("_")}
    assert testing <= {n.name for n in top["testing"].body if isinstance(n, ast.FunctionDef)}


def test_py_typed_marker():
    assert (PKG / "py.typed").is_file()
