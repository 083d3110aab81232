"""Where the forward pass runs: the backend, chosen once at load (``RuntimeConfig.backend``).

=========  ==========================================================================
native     numpy and the C++ kernels on the CPU, every weight in its storage format
           (the default; ``flashinfer_py.model``)
torch      PyTorch on ``cpu``, ``cuda`` or ``mps``: the resident matrices and the FFN
           rows dequantized to the compute dtype on the device
           (``backends/torch_model.py``, ``backends/torch_ffn.py``); the native reader and
           neuron cache still stream the FFN from flash into host memory.
           RuntimeConfig.threads sets torch's intra-op threads during the model's calls
           (``torch.set_num_threads`` is process-wide: set on entry, put back on exit)
mlx        Apple's MLX on ``gpu`` (Metal) or ``cpu`` (``mlx[cpu]`` on Linux): the torch
           backend's forward pass ported op for op (``backends/mlx_model.py``,
           ``backends/mlx_ffn.py``), the neuron cache mirrored in mlx arrays the same way
auto       torch when it is importable and a ``cuda``/``mps`` device was asked for, mlx
           for a ``gpu`` device, else native
=========  ==========================================================================

What the device backends share is written once: ``common.py`` (resident tensors, KV cache,
RoPE tables, the transformer's blocks) and ``device_ffn.py`` (the FFN providers and the
device mirror of the neuron cache), each over the backend's small `ops` object.

Nothing here imports torch or mlx at module level: a numpy-only install never loads them,
and choosing a backend whose framework is missing raises an ImportError naming the extra.
"""
from __future__ import annotations

from typing import Optional

BACKENDS = ("native", "torch", "mlx", "auto")
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
INSTALL_HINT = ("pip install 'flashinfer_py[torch]' (for CUDA or Apple GPUs, first install "
                "torch's build for your device from pytorch.org)")

MLX_INSTALL_HINT = 'pip install "flashinfer_py[mlx]"'
MLX_DEVICES = ("cpu", "gpu")

__all__ = ["BACKENDS", "COMPUTE_DTYPES", "MLX_DEVICES", "available", "device_context",
           "import_mlx", "import_torch", "mlx_device", "open_model", "resolve_backend",
           "shares_host_memory", "torch_device"]


def import_torch():
    """The torch module, or an ImportError that says how to install it."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"backend='torch' needs PyTorch, which is not installed ({e}); "
                          f"{INSTALL_HINT}") from None
    return torch


def import_mlx():
    """mlx.core, or an ImportError that says how to install it."""
    try:
        import mlx.core as mx
    except ImportError as e:
        raise ImportError(f"backend='mlx' needs MLX, which is not installed ({e}); "
                          f"{MLX_INSTALL_HINT} (on Linux it installs mlx[cpu], MLX's CPU "
                          "device)") from None
    return mx


def mlx_device(device: Optional[str]):
    """mx.cpu or mx.gpu for `device` (None: cpu), or a ValueError when it is not there."""
    mx = import_mlx()
    kind = _device_kind(device)
    if kind not in MLX_DEVICES or (device is not None and ":" in str(device)):
        raise ValueError(f"device {device!r} is not an mlx device; use 'cpu' or 'gpu' "
                         "(Apple's Metal GPU)")
    if kind == "gpu" and not mx.metal.is_available():
        raise ValueError(f"device {device!r}: MLX sees no Metal GPU (this is a CPU-only "
                         "build, mlx[cpu], or not a Mac with Apple Silicon); use device='cpu'")
    return mx.gpu if kind == "gpu" else mx.cpu


def _device_kind(device: Optional[str]) -> str:
    return "cpu" if device is None else str(device).split(":", 1)[0]


def resolve_backend(backend: str, device: Optional[str]) -> str:
    """"native", "torch" or "mlx" for a RuntimeConfig's backend and device ("auto": torch
    where it is installed and the device is cuda/mps, mlx for "gpu", native otherwise)."""
    if backend != "auto":
        return backend
    if _device_kind(device) == "gpu":
        try:
            import_mlx()
            return "mlx"
        except ImportError:
            pass
    if _device_kind(device) in ("cuda", "mps"):
        try:
            import_torch()
            return "torch"
        except ImportError:
            pass
    return "native"


def torch_device(device: Optional[str]):
    """A torch.device for `device` (None: cpu), or a ValueError when it does not exist here."""
    torch = import_torch()
    kind = _device_kind(device)
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch {torch.__version__} sees no CUDA device "
                         "(a CPU-only build of torch, or no GPU/driver); use device='cpu' or "
                         "install torch's CUDA build from pytorch.org")
    if kind == "mps" and not (getattr(torch.backends, "mps", None)
                              and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r}: torch {torch.__version__} sees no Apple GPU "
                         "(MPS needs macOS on Apple Silicon); use device='cpu'")
    try:
        dev = torch.device(device or "cpu")
    except RuntimeError as e:
        raise ValueError(f"device {device!r} is not a torch device ({e}); use 'cpu', 'cuda', "
                         "'cuda:N' or 'mps'") from None
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def shares_host_memory(backend: str, device: Optional[str],
                       override: Optional[bool] = None) -> Optional[str]:
    """Why `backend`'s `device` keeps its arrays in the host's RAM (a phrase for `info`), or
    None for a device with its own memory. mlx: always (Apple silicon's unified memory;
    mlx[cpu] computes in host RAM); torch: cpu and mps, and an integrated CUDA GPU (Jetson).
    `override` (RuntimeConfig.unified_memory) decides instead when it is not None."""
    kind = _device_kind(device)
    if override is not None:
        return f"{backend} on {kind}, unified_memory=True" if override else None
    if backend == "mlx":
        return f"mlx on {kind}: Apple silicon's unified memory, or mlx[cpu]'s host RAM"
    if kind == "cpu":
        return "torch on cpu: the device is the host"
    if kind == "mps":
        return "torch on mps: Apple silicon's unified memory"
    if kind == "cuda":
        torch = import_torch()
        if torch.cuda.is_available():
            dev = torch_device(device)
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            if getattr(torch.cuda.get_device_properties(index), "is_integrated", False):
                return "torch on an integrated CUDA GPU: it shares the host's RAM"
    return None


def device_context(backend: str, device: Optional[str]) -> tuple:
    """(bytes, how found) of device memory the runtime takes outside any tensor: the CUDA
    context for torch on cuda (loader.CUDA_CONTEXT_BYTES, "estimate"; where that CUDA device
    is visible and this process has no context yet, the context is measured and the larger
    figure kept, "measured"); (0, "") elsewhere."""
    from ..loader import CUDA_CONTEXT_BYTES

    if backend != "torch" or _device_kind(device) != "cuda":
        return 0, ""
    measured = _measure_cuda_context(device)
    if measured is None or measured <= CUDA_CONTEXT_BYTES:
        return CUDA_CONTEXT_BYTES, "estimate"
    return measured, "measured"


def _measure_cuda_context(device: Optional[str]) -> Optional[int]:
    """Bytes of device memory that creating this process's CUDA context took: the device's
    used memory before (NVML, through torch.cuda.device_memory_used: no context needed) and
    after (torch.cuda.mem_get_info, which creates it), less what the allocator holds. None
    where there is no CUDA device, the context exists already (its size cannot be told from
    other use), or NVML is not installed (pip install nvidia-ml-py)."""
    torch = import_torch()
    if not torch.cuda.is_available() or torch.cuda.is_initialized():
        return None
    dev = torch_device(device)
    index = dev.index if dev.index is not None else 0
    try:
        before = torch.cuda.device_memory_used(index)
    except (ImportError, ModuleNotFoundError, RuntimeError, AttributeError):
        return None  # no NVML here: the estimate stands
    free, total = torch.cuda.mem_get_info(index)
    return max(0, total - free - before - torch.cuda.memory_reserved(index))


def available(probe: bool = False) -> dict:
    """What this install can run, for `info`: the backends, torch's and mlx's versions (from
    their package metadata: neither is imported) and, with `probe`, the devices they see
    (imports them)."""
    from importlib import metadata

    out: dict = {"native": True, "torch": None, "mlx": None}
    try:
        out["mlx"] = metadata.version("mlx")
    except metadata.PackageNotFoundError:
        pass
    if probe and out["mlx"]:
        try:
            out["metal"] = bool(import_mlx().metal.is_available())
        except ImportError:  # installed but does not load here
            out["mlx"] = None
    try:
        out["torch"] = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return out
    if probe:
        import torch

        out["cuda"] = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                       if torch.cuda.is_available() else [])
        out["mps"] = bool(getattr(torch.backends, "mps", None)
                          and torch.backends.mps.is_available())
    return out


def open_model(model, dense: dict):
    """(ffn, transformer) of a FlashModel on a device backend (model.backend): the model's
    args, runtime, manifest, directory, predictors and plan are set; `dense` holds the
    resident tensors. Both backends run the same providers and structure over their `ops`."""
    rt = model.runtime
    dtype = rt.compute_dtype or "float32"
    if model.backend == "mlx":
        import_mlx()  # the install hint, before the modules below import it
        from .mlx_ffn import MlxOps
        from .mlx_model import MlxTransformer as Transformer

        ops = MlxOps(mlx_device(rt.device), dtype)
    else:
        import_torch()
        from .torch_ffn import TorchOps
        from .torch_model import TorchTransformer as Transformer

        ops = TorchOps(torch_device(rt.device), dtype, rt.threads)
    from .device_ffn import DeviceResidentFFN, DeviceSparseFFN

    if model.sparse:
        ffn = DeviceSparseFFN(model.directory, model.manifest, model.args, dense, rt,
                              model.predictors, model.plan, ops)
    else:
        bundle_path = str(model.directory / model.manifest["files"]["bundles"])
        ffn = DeviceResidentFFN(bundle_path, model.args, dense, rt, ops)
    return ffn, Transformer(model.args, dense, model.resident_formats, ffn, rt, ops)
