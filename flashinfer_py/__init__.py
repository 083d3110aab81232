"""flashinfer_py: run LLMs larger than DRAM by streaming sparse FFN neurons from flash.

Quick use::

    import flashinfer_py as fi
    fi.convert("path/to/hf-checkpoint", "model.flash")
    model = fi.load("model.flash")
    for piece in model.generate("The capital of France is", max_new_tokens=16):
        print(piece, end="", flush=True)
"""
__version__ = "0.1.0"

import os as _os

# OpenMP threads that finish early spin by default, stealing the core their sibling still needs
# on a small (2-4 core) machine: measured 270 ms vs 38 ms per SmolLM2 token under load.
# Sleeping waiters cost microseconds per parallel region. Must be set before _core loads libgomp;
# an explicit OMP_WAIT_POLICY from the user wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "passive")

from ._core import build_info  # noqa: E402
from .config import ModelArgs, RuntimeConfig  # noqa: E402
from .errors import ConvertError, FlashFormatError, FlashIOError, UnsupportedModelError  # noqa: E402

# Binding the function after its module is imported keeps `flashinfer_py.convert` the function
# (the submodule stays reachable as `flashinfer_py.convert` in sys.modules).
from .checkpoint import CheckpointError  # noqa: E402
from .convert import convert  # noqa: E402
from .runtime import FlashModel, PromptCache, load  # noqa: E402

__all__ = ["__version__", "build_info", "convert", "load", "FlashModel", "PromptCache", "ModelArgs",
           "RuntimeConfig", "CheckpointError", "ConvertError", "FlashFormatError", "FlashIOError",
           "UnsupportedModelError"]
