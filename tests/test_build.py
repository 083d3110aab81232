"""What the installed build says about itself: one version everywhere, and build_info()
reporting the build options a wheel was made with."""
from __future__ import annotations

from importlib.metadata import version

import flashinfer_py
from flashinfer_py import _bookkeeping, _core, window


def test_one_version():
    """__version__ (flashinfer_py/__init__.py, the one place it is written), the installed
    metadata and the native core's build_info agree."""
    info = flashinfer_py.build_info()
    assert version("flashinfer_py") == flashinfer_py.__version__ == info["version"]


def test_build_info_reports_the_build_options():
    info = flashinfer_py.build_info()
    assert info["simd"] in info["isa_dispatch"]
    assert info["isa_dispatch"][0] == "scalar"  # the portable code is always there
    if info["io_uring"]:
        assert info["io_uring_link"] in ("static", "shared")
    else:
        assert info["io_uring_link"] is None
    assert int(info["cython"].split(".")[0]) >= 3
    assert info["direct_io"] in ("O_DIRECT", "F_NOCACHE", "none")
    assert isinstance(info["openmp"], bool) and info["compiler"]


def test_the_bookkeeping_module_is_compiled():
    """The policies are the compiled ones, beside the native core (not a Python fallback)."""
    assert _bookkeeping.__file__.endswith((".so", ".pyd"))
    assert window.SlidingWindow is _bookkeeping.SlidingWindow
    assert _core.__file__.endswith((".so", ".pyd"))
