"""Collect bench_*.py when pytest is pointed at this directory:

    python -m pytest benchmarks/ --benchmark-only -q

(the test command, plain `pytest`, only looks in tests/ — see testpaths in pyproject.toml).
Files named on the command line are collected by pytest itself, so they are skipped here.
"""
from __future__ import annotations

import pytest


def pytest_collect_file(file_path, parent):
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
