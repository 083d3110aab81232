"""The device backends (issue 13: torch, and mlx on its CPU device, mlx[cpu]) against the
native one, dense and sparse, on every tiny family and storage format; the SmolLM2 greedy
tokens; the backend seam itself (lazy imports, the error without the framework,
RuntimeConfig, the CLI and info).

Tolerances (logits, torch or mlx on `device` in float32 against native; mlx measured the same
as torch):
- float formats (float32, float16, bfloat16): max relative error 1e-4 (measured: <= 2.4e-5,
  Gemma 3's soft-caps the largest; the rest <= 2e-6). Both multiply the same float32 values.
- block formats (q8_0, q4_0, q4_1): NMSE 1e-6 and max relative error 5e-3 (measured: NMSE
  <= 2.5e-7, max relative <= 1.8e-3, argmax identical). The native kernels quantize the
  activations to 16 bits per block of 32 for their integer dot products
  (csrc/kernels_quant.h); the device backends keep the blocks as stored on the device,
  dequantize them there (exactly the native dequantize's float32 values) and multiply by
  float32 activations. The difference is that rounding.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

import flashinfer_py as fi
from conftest import TINY_MODELS, rel_err

torch = pytest.importorskip("torch")

FLOAT_TOL = 1e-4
BLOCK_NMSE, BLOCK_REL = 1e-6, 5e-3
DTYPES = ["float32", "float16", "bfloat16", "q8_0", "q4_0", "q4_1"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda),
           pytest.param("mps", marks=pytest.mark.mps)]


def _have_mlx() -> bool:
    try:
        import mlx.core  # noqa: F401
    except ImportError:
        return False
    return True


needs_mlx = pytest.mark.skipif(not _have_mlx(), reason='mlx is not installed: '
                               'pip install "flashinfer_py[mlx]" (mlx[cpu] on Linux)')
MLX = pytest.param("mlx", marks=needs_mlx)
BACKENDS = ["torch", MLX]  # each on its CPU device
# (backend, device): every device of each backend; Metal is mlx's "gpu"
BACKEND_DEVICES = [
    ("torch", "cpu"), pytest.param("torch", "cuda", marks=pytest.mark.cuda),
    pytest.param("torch", "mps", marks=pytest.mark.mps),
    pytest.param("mlx", "cpu", marks=needs_mlx),
    pytest.param("mlx", "gpu", marks=[needs_mlx, pytest.mark.mps])]
RELU = ["llama-relu", "llama-fatrelu", "opt", "opt-350m"]


def nmse(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sum((a - b) ** 2) / max(np.sum(b ** 2), 1e-300))


def assert_close(got, ref, dtype: str) -> None:
    if dtype in ("q8_0", "q4_0", "q4_1"):
        assert nmse(got, ref) < BLOCK_NMSE and rel_err(got, ref) < BLOCK_REL, (
            nmse(got, ref), rel_err(got, ref))
    else:
        assert rel_err(got, ref) < FLOAT_TOL, rel_err(got, ref)


def chunked(model, ids, first: int = 9) -> np.ndarray:
    """Logits of ids as a prompt chunk, then token by token through the KV cache."""
    cache = model.new_cache()
    model.reset()
    out = [model.forward(ids[:first], cache)] + [model.forward([t], cache) for t in ids[first:]]
    return np.concatenate(out)


def assert_mirrors_host(m) -> None:
    """Each layer's device rows are the host cache's rows, in its slot order: block formats
    the records' payload bytes as stored (byte for byte), float formats dequantized; and the
    values the FFN takes from them are the host's dequantized values exactly."""
    mirror, host, ops = m.ffn.mirror, m.ffn.cache, m.ffn.ops
    layout = mirror.fmt.layout
    for layer in range(m.args.num_hidden_layers):
        mirror.sync(layer)
        n = host.n_used(layer)
        assert mirror.n[layer] == n
        assert np.array_equal(mirror.ids[layer][:n], host.ids(layer))
        rows = host.rows(layer)
        if layout.fmt.quantized:
            got = ops.numpy(mirror.mats[layer][0][:n], float32=False)
            assert got.dtype == np.uint8 and got.shape == (n, layout.payload_bytes)
            assert np.array_equal(got, rows.view(np.uint8)[:, :layout.payload_bytes])
        with ops.context():
            parts, _ = mirror.rows(layer, slice(0, n))
            for name in mirror.part_names:
                want = m.ffn.host_kernel.part_f32(layer, rows, name, host.ids(layer))
                assert np.array_equal(ops.numpy(parts[name]), want), (layer, name)


# ---- dense: every family x every storage format ---------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(TINY_MODELS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_cpu_gives_native_logits(backend, name, dtype, tiny_flash, prompt_ids):
    d = tiny_flash(name, dtype)
    native = fi.load(d)
    ours = fi.load(d, backend=backend, device="cpu")
    assert ours.backend == backend and native.backend == "native"
    assert_close(ours.logits(prompt_ids), native.logits(prompt_ids), dtype)
    # through the KV cache (LongRoPE picks its factors per call: compare like with like)
    assert_close(chunked(ours, prompt_ids), chunked(native, prompt_ids), dtype)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("name", ["llama-silu", "opt-350m", "qwen2", "phi3", "gemma3"])
def test_dense_on_each_device(name, backend, device, tiny_flash, prompt_ids):
    """The same check on a device (cuda/mps are skipped where there is none)."""
    d = tiny_flash(name, "q8_0")
    ref = fi.load(d).logits(prompt_ids)
    assert_close(fi.load(d, backend=backend, device=device).logits(prompt_ids), ref, "q8_0")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("compute_dtype", ["float16", "bfloat16"])
def test_half_compute_dtypes_stay_close(compute_dtype, backend, device, tiny_flash, prompt_ids):
    """float16/bfloat16 compute (meant for GPUs; the CPU devices run them too): the same
    argmax on nearly every position and logits within the half type's rounding."""
    d = tiny_flash("llama-silu", "float16")
    ref = fi.load(d).logits(prompt_ids)
    m = fi.load(d, backend=backend, device=device, compute_dtype=compute_dtype)
    got = chunked(m, prompt_ids)
    assert m.info()["compute_dtype"] == compute_dtype
    assert nmse(got, ref) < (1e-4 if compute_dtype == "float16" else 1e-3)
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.9


@pytest.mark.parametrize("backend", BACKENDS)
def test_observer_sees_the_native_activations(backend, tiny_flash, prompt_ids):
    """The dense device FFN reports every neuron's activation to an observer (predictor
    training's hook) as the native model does."""
    d = tiny_flash("llama-silu")
    seen = {}
    for b in ("native", backend):
        m = fi.load(d, backend=b)
        rec = []
        m.transformer.observer = lambda layer, x, act, ref, rec=rec: rec.append(
            (layer, x.copy(), act.copy(), ref.copy()))
        m.logits(prompt_ids[:8])
        seen[b] = rec
    assert len(seen[backend]) == len(seen["native"]) == 3
    for (l1, x1, a1, r1), (l2, x2, a2, r2) in zip(seen[backend], seen["native"]):
        assert l1 == l2 and rel_err(x1, x2) < FLOAT_TOL
        assert rel_err(a1, a2) < FLOAT_TOL and rel_err(r1, r2) < FLOAT_TOL


# ---- sparse: the device mirror of the neuron cache ------------------------------------------


def tight_budget(d, fraction: float = 0.7, **kw) -> int:
    """A DRAM budget whose neuron cache holds about `fraction` of the FFN."""
    from flashinfer_py.loader import plan_memory

    m = fi.load(d)
    base = plan_memory(m.args, m.manifest, fi.RuntimeConfig(sparse=True, selection="oracle", **kw))
    return base.total - base.cache_bytes + int(fraction * base.cache_bytes)


SPARSE_MODES = {
    "window": dict(window=3),
    "window-k1": dict(window=1),
    "no-reuse": dict(reuse=False),
    "unbundled": dict(window=2, bundled=False),
    "compute-predicted": dict(window=4, compute="predicted"),
    "tight-budget": dict(window=5, dram_budget="tight", prefill_chunk=1),
    "frequency-budget": dict(eviction="frequency", dram_budget="tight", prefill_chunk=1),
    "overlap-layer": dict(window=3, overlap="layer"),
    "overlap-ahead-budget": dict(eviction="frequency", dram_budget="tight", prefill_chunk=1,
                                 overlap="ahead"),
    "rank-budget": dict(eviction="rank", dram_budget="tight"),
}


def on_device(d, rt: fi.RuntimeConfig, backend: str, device: str = "cpu") -> fi.RuntimeConfig:
    """`rt` on a device backend with the native run's cache sizes (to compare the two): the
    device's memory planned apart (unified_memory=False) and the backend's host overhead
    (framework, staging buffer) added to the DRAM budget."""
    from flashinfer_py.config import ModelArgs
    from flashinfer_py.loader import device_costs

    rt = rt.replace(backend=backend, device=device, unified_memory=False)
    if rt.dram_budget is None:
        return rt
    man = full_manifest(d)
    extra = device_costs(d, man, ModelArgs.from_dict(man["model"]), rt, backend).host
    return rt.replace(dram_budget=rt.dram_budget + extra)


def sparse_runtime(d, mode: str, **extra) -> fi.RuntimeConfig:
    kw = {"selection": "oracle", **SPARSE_MODES[mode], **extra}
    if kw.get("dram_budget") == "tight":  # (the read-ahead slots are in the plan)
        kw["dram_budget"] = tight_budget(d, overlap=kw.get("overlap", "off"))
    return fi.RuntimeConfig(sparse=True, **kw)


@pytest.mark.parametrize("mode", list(SPARSE_MODES))
@pytest.mark.parametrize("name", RELU)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_oracle_gives_native_logits(backend, name, mode, tiny_flash, prompt_ids):
    """ReLU models with the true active set: a device backend's sparse logits equal native's
    sparse logits in every mode (and, but under eviction "rank" with a budget, the dense
    ones); the same neurons were read; the device cache moved and received rows, and counted
    the transfers."""
    d = tiny_flash(name)
    rt = sparse_runtime(d, mode)
    native = fi.load(d, rt)
    ours = fi.load(d, on_device(d, rt, backend))
    got = chunked(ours, prompt_ids)
    assert_close(got, chunked(native, prompt_ids), "float32")
    if mode != "rank-budget":
        assert_close(got, fi.load(d).logits(prompt_ids), "float32")
    tot = ours.ffn.total
    assert tot.transfer_bytes > 0 and tot.transfer_ns > 0
    assert tot.loaded == native.ffn.total.loaded  # the same neurons were read
    if mode in ("window", "window-k1", "tight-budget"):  # more neurons leave than enter
        assert tot.moved_rows > 0  # compaction ran on the device
    assert {"transfer_ns", "transfer_bytes", "moved_rows"} <= set(ours.last_stats)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["llama-relu", "opt"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_storage_formats(backend, name, dtype, tiny_flash, prompt_ids):
    """Each storage format through the device cache under a budget (rows dequantized as they
    arrive), against native sparse."""
    d = tiny_flash(name, dtype)
    rt = sparse_runtime(d, "tight-budget")
    assert_close(chunked(fi.load(d, on_device(d, rt, backend)), prompt_ids),
                 chunked(fi.load(d, rt), prompt_ids), dtype)


@pytest.mark.parametrize("name", [n for n in TINY_MODELS if n not in RELU])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_every_neuron_is_dense_for_every_family(backend, name, tiny_flash, prompt_ids):
    """SwiGLU/GeGLU families: the sparse path with every neuron (selection "all") on a device
    backend gives the dense logits."""
    d = tiny_flash(name)
    m = fi.load(d, sparse=True, selection="all", window=2, backend=backend)
    assert_close(chunked(m, prompt_ids), chunked(fi.load(d), prompt_ids), "float32")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_sparse_on_each_device(backend, device, tiny_flash, prompt_ids):
    d = tiny_flash("opt-350m", "q8_0")
    rt = sparse_runtime(d, "frequency-budget")
    got = chunked(fi.load(d, on_device(d, rt, backend, device)), prompt_ids)
    assert_close(got, chunked(fi.load(d, rt), prompt_ids), "q8_0")


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0", "q4_1", "float16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_device_cache_mirrors_the_host_cache(backend, dtype, tiny_flash, prompt_ids):
    """After every token, each layer's device rows are the host cache's rows in the host's
    slot order (eviction and compaction included): a block format's payload bytes as stored,
    byte for byte, dequantized on the device to the host's values exactly."""
    d = tiny_flash("opt" if dtype == "q4_1" else "llama-relu", dtype)  # (opt: an up bias too)
    m = fi.load(d, on_device(d, sparse_runtime(d, "tight-budget", window=2), backend))
    cache = m.new_cache()
    for t in prompt_ids[:12]:
        m.forward([t], cache)
        assert_mirrors_host(m)
    assert m.ffn.total.moved_rows > 0


@pytest.mark.parametrize("dtype", ["q4_1", "float32"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_block_formats_send_and_hold_their_stored_bytes(backend, dtype, tiny_flash,
                                                        prompt_ids, capsys):
    """A block format's cached neuron is its record's payload on the device (plus the up
    bias in the compute dtype): what each token sends (transfer_bytes) is the rows it read
    times that, the device holds that per cached row, and the VRAM plan and `info` count it;
    float formats keep their parts in the compute dtype."""
    from flashinfer_py.dtypes import RecordLayout

    d = tiny_flash("opt", dtype)
    layout = RecordLayout.from_manifest(full_manifest(d))
    args = fi.load(d).args
    esize = 4
    row = (layout.payload_bytes + esize if dtype == "q4_1"
           else (len(layout.parts) * args.hidden_size + 1) * esize)
    rt = on_device(d, sparse_runtime(d, "window"), backend).replace(vram_budget=1 << 40)
    m = fi.load(d, rt)
    assert m.plan.vram.row_bytes == row
    caps = m.plan.vram.cache_capacity
    cache = m.new_cache()
    for t in prompt_ids[:6]:
        m.forward([t], cache)
        st = m.last_stats
        assert st["transfer_bytes"] == st["loaded"] * row
    assert m.ffn.total.transfer_bytes == m.ffn.total.loaded * row > 0
    assert m.ffn.mirror.device_bytes == sum(caps) * row
    from flashinfer_py import cli

    assert cli.main(["info", str(d), "--backend", backend, "--unified-memory", "no",
                     "--vram-budget", "64GB", "--selection", "oracle", "--eviction", "window",
                     "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["memory_plan"]["vram"]["row_bytes"] == row
    if dtype == "q4_1":  # about a fifth of the float32 copy
        assert row < 0.2 * len(layout.parts) * args.hidden_size * esize


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_rank_with_the_sketch_on_swiglu(backend, tiny_flash, tmp_path_factory,
                                               prompt_ids):
    """The default sparse mode of SwiGLU models (eviction "rank", the 4-bit sketch) on a
    device backend: the same neurons read as native, the same logits."""
    from test_rank import sketch_dir

    d, _ = sketch_dir(tiny_flash, tmp_path_factory)
    rt = fi.RuntimeConfig(dram_budget=tight_budget(d, 0.5), prefill_chunk=4)
    native, ours = fi.load(d, rt), fi.load(d, on_device(d, rt, backend))
    assert ours.runtime.selection == "sketch" and ours.runtime.eviction == "rank"
    got, ref = chunked(ours, prompt_ids), chunked(native, prompt_ids)
    assert_close(got, ref, "float32")
    assert ours.ffn.total.loaded == native.ffn.total.loaded > 0


@pytest.fixture(scope="module")
def codes_flash(tmp_path_factory):
    """A flash directory in the codes layout: test_quantized's tiny llama GGUF (Q4_1 FFN and
    attention, Q8_0 embeddings and head) converted with its blocks kept, so each record's down
    part is codes and the scales are resident per 32 neurons."""
    import warnings

    pytest.importorskip("gguf")
    from gguf_export import write_gguf
    from test_quantized import llama_model

    d = tmp_path_factory.mktemp("codes")
    write_gguf(llama_model(), d / "m.gguf", "llama",
               qtypes={"attn_": "Q4_1", "ffn_": "Q4_1", "token_embd": "Q8_0", "output.": "Q8_0"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny GGUF has no tokenizer
        out = fi.convert(d / "m.gguf", d / "flash", dtype="q4_1", progress=False)
    assert full_manifest(out)["bundle"]["down_layout"] == "codes"
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_codes_layout_on_the_device(backend, codes_flash, prompt_ids):
    """The codes layout kept on the device (the down codes dequantized there with the
    layer's resident scales, looked up by neuron id): dense, and sparse with every neuron,
    give native's logits; under a budget (rank, oracle) the device rows stay the host
    cache's bytes through evictions, dequantized to the host's values."""
    d = codes_flash
    ids = [i % 256 for i in prompt_ids]
    native = fi.load(d)
    ref = chunked(native, ids)
    dense = fi.load(d, backend=backend)
    assert_close(chunked(dense, ids), ref, "q4_1")
    assert dense.ffn.rows.scales is not None and dense.ffn.nbytes < sum(
        native.ffn.rows_by_layer[i].nbytes for i in range(native.args.num_hidden_layers))
    every = fi.load(d, sparse=True, selection="all", window=1, backend=backend)
    assert_close(chunked(every, ids, 4), ref, "q4_1")
    rt = fi.RuntimeConfig(dram_budget=tight_budget(d, 0.5), selection="oracle",
                          eviction="rank", prefill_chunk=4)
    m = fi.load(d, on_device(d, rt, backend))
    cache = m.new_cache()
    m.forward(ids[:4], cache)
    for t in ids[4:14]:
        m.forward([t], cache)
        assert_mirrors_host(m)
    assert m.ffn.total.loaded > 0 and m.ffn.total.transfer_bytes > 0


# ---- the seam: configuration, lazy imports, CLI, info ----------------------------------------


def test_runtime_config_checks_the_backend():
    assert fi.RuntimeConfig().backend == "native"
    with pytest.raises(ValueError, match="backend must be one of"):
        fi.RuntimeConfig(backend="jax")
    with pytest.raises(ValueError, match="needs backend='torch'"):
        fi.RuntimeConfig(device="cuda")
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        fi.RuntimeConfig(backend="torch", compute_dtype="float8")
    with pytest.raises(ValueError, match="needs backend='torch'"):
        fi.RuntimeConfig(compute_dtype="float16")
    assert fi.RuntimeConfig(backend="torch", device="cuda:1").device == "cuda:1"


def test_auto_backend_and_missing_devices(tiny_flash):
    from flashinfer_py.backends import resolve_backend

    assert resolve_backend("auto", None) == "native"
    assert resolve_backend("auto", "cpu") == "native"
    assert resolve_backend("auto", "cuda") == "torch"
    assert fi.load(tiny_flash("llama-silu"), backend="auto").backend == "native"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            fi.load(tiny_flash("llama-silu"), backend="torch", device="cuda")
    with pytest.raises(ValueError, match="not a torch device"):
        fi.load(tiny_flash("llama-silu"), backend="torch", device="tpu")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)


def test_native_backend_never_imports_torch(tiny_flash, prompt_ids):
    """A numpy-only program (load, logits, sparse, the backends module) leaves torch alone."""
    d = tiny_flash("llama-relu")
    r = _run(f"""
import sys
import flashinfer_py as fi, flashinfer_py.backends as b
m = fi.load({str(d)!r}); m.logits({prompt_ids[:5]})
s = fi.load({str(d)!r}, sparse=True, selection="oracle"); s.logits({prompt_ids[:5]})
b.available()
print("torch" in sys.modules, "mlx" in sys.modules)
""")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False False"


@pytest.mark.parametrize("backend,modules,hint", [
    ("torch", ["torch"], "pip install 'flashinfer_py[torch]'"),
    ("mlx", ["mlx", "mlx.core"], 'pip install "flashinfer_py[mlx]"')])
def test_backend_without_its_framework_says_how_to_install(backend, modules, hint, tiny_flash):
    d = tiny_flash("llama-relu")
    r = _run(f"""
import sys
for name in {modules!r}:
    sys.modules[name] = None  # as if it were not installed
import flashinfer_py as fi
try:
    fi.load({str(d)!r}, backend={backend!r})
except ImportError as e:
    print(e)
""")
    assert r.returncode == 0, r.stderr
    assert hint in r.stdout


@pytest.mark.parametrize("sparse", [False, True])
def test_threads_are_torchs_intra_op_threads_during_the_models_calls(sparse, tiny_flash,
                                                                     prompt_ids):
    """RuntimeConfig.threads is torch's intra-op thread count inside the model's forward pass
    (0: whatever the process set), and the process's own count is back after each call."""
    d = tiny_flash("llama-relu")
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    for threads, want in ((other, other), (0, before)):
        kw = dict(sparse=True, selection="oracle", window=2) if sparse else {}
        m = fi.load(d, backend="torch", threads=threads, **kw)
        assert torch.get_num_threads() == before  # loading put it back too
        seen = []
        if sparse:  # (the observer is the dense model's) the FFN over the device rows
            rows_ffn = m.ffn.rows_ffn
            m.ffn.rows_ffn = lambda *a, **k: (seen.append(torch.get_num_threads()),
                                              rows_ffn(*a, **k))[1]
        else:
            m.transformer.observer = lambda *a: seen.append(torch.get_num_threads())
        m.logits(prompt_ids[:6])
        assert len(seen) >= m.args.num_hidden_layers and set(seen) == {want}
        assert torch.get_num_threads() == before


@needs_mlx
def test_mlx_devices(tiny_flash):
    import mlx.core as mx

    d = tiny_flash("llama-silu")
    assert fi.RuntimeConfig(backend="mlx", device="gpu").device == "gpu"
    with pytest.raises(ValueError, match="not an mlx device"):
        fi.load(d, backend="mlx", device="cuda")
    if not mx.metal.is_available():
        with pytest.raises(ValueError, match="no Metal GPU"):
            fi.load(d, backend="mlx", device="gpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_info_records_backend_and_device(backend, tiny_flash):
    d = tiny_flash("opt")
    info = fi.load(d, backend=backend, device="cpu").info()
    assert (info["backend"], info["device"], info["compute_dtype"]) == (backend, "cpu", "float32")
    assert info["resident_bytes"] > 0 and info["ffn_bytes_in_dram"] > 0
    assert fi.load(d).info()["backend"] == "native"


def test_cli_backend_flags(tiny_flash, capsys):
    from flashinfer_py.cli import main

    d = tiny_flash("llama-relu")
    assert main(["generate", str(d), "--prompt", "w5 w6", "-n", "4", "--backend", "torch",
                 "--device", "cpu", "--sparse", "--selection", "oracle", "--stats",
                 "--json"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("w5 w6")
    rows = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any("transfer_bytes" in r for r in rows)
    assert main(["generate", str(d), "--prompt", "w5 w6", "-n", "4"]) == 0
    assert capsys.readouterr().out == out  # greedy, the true active set: the native text
    assert main(["info", str(d), "--backend", "torch", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["runtime"] == {"backend": "torch", "device": "cpu", "compute_dtype": "float32"}
    assert info["backends"]["torch"] and "cuda" in info["backends"]
    assert main(["generate", str(d), "--device", "cuda", "-n", "1"]) == 1  # native: no device
    assert "needs backend='torch'" in capsys.readouterr().err


@needs_mlx
def test_cli_mlx_backend(tiny_flash, capsys):
    """--backend mlx is a choice of the CLI's flag; generate and info run on it."""
    from flashinfer_py.cli import main

    d = tiny_flash("llama-relu")
    assert main(["generate", str(d), "--prompt", "w5 w6", "-n", "4", "--backend", "mlx",
                 "--sparse", "--selection", "oracle", "--stats", "--json"]) == 0
    out, err = capsys.readouterr()
    assert any("transfer_bytes" in json.loads(line) for line in err.splitlines()
               if line.startswith("{"))
    assert main(["generate", str(d), "--prompt", "w5 w6", "-n", "4"]) == 0
    assert capsys.readouterr().out == out
    assert main(["info", str(d), "--backend", "mlx", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["runtime"] == {"backend": "mlx", "device": "cpu", "compute_dtype": "float32"}
    assert info["backends"]["mlx"] and "metal" in info["backends"]


# ---- the real model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    from flashinfer_py.default_model import default_model_dir

    try:
        return default_model_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_smollm2_greedy_tokens_are_natives(smollm2, backend, device):
    native = fi.load(smollm2)
    ours = fi.load(smollm2, backend=backend, device=device)
    ids = native.tokenizer.encode("The capital of France is")

    def greedy(m):
        return [s.token for s in m.generate_step(ids, max_new_tokens=32, stop_at_eos=False)]

    ref = greedy(native)
    assert greedy(ours) == ref
    assert "Paris" in native.tokenizer.decode(ref)


@pytest.mark.slow
def test_smollm2_q4_1_codes_layout(tmp_path_factory):
    """SmolLM2 with its GGUF's Q4_1 blocks kept: the down parts hold codes with resident
    scales per 32 neurons, dequantized by neuron id. Dense, and sparse with every neuron,
    against native; under a budget (rank, oracle) the device cache stays the host's rows
    through evictions. (Under a budget the logits are not compared: native quantizes the
    activations for its block dot products, which moves the oracle's near-ties, so the two
    backends rank a few neurons differently.)"""
    from flashinfer_py.default_model import default_gguf_path

    try:
        gguf = default_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    d = fi.convert(gguf, tmp_path_factory.mktemp("smol") / "q4_1", dtype="q4_1", progress=False)
    native = fi.load(d)
    assert native.manifest["bundle"]["down_layout"] == "codes"
    ids = native.tokenizer.encode("Flash memory is large but slow; DRAM is fast and small.")
    ref = native.logits(ids)
    assert_close(fi.load(d, backend="torch").logits(ids), ref, "q4_1")
    every = fi.load(d, sparse=True, selection="all", window=1, backend="torch")
    assert_close(chunked(every, ids, 4), ref, "q4_1")
    rt = fi.RuntimeConfig(dram_budget=tight_budget(d, 0.5), selection="oracle", eviction="rank",
                          prefill_chunk=4)
    m = fi.load(d, on_device(d, rt, "torch"))
    cache = m.new_cache()
    m.forward(ids[:4], cache)
    for t in ids[4:]:
        m.forward([t], cache)
        assert_mirrors_host(m)
    assert m.ffn.total.loaded > 0 and m.ffn.total.transfer_bytes > 0


# ---- the device memory plan (vram_budget) ----------------------------------------------------


def _device_bytes(m) -> int:
    """What the model holds on its device: resident tensors and the neuron cache's copy."""
    res = sum(t.nbytes for t in {id(t): t for t in m.transformer.w.values()}.values())
    return res + m.ffn.mirror.device_bytes  # (its staging buffer is host memory)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vram_budget_splits_device_memory_and_shrinks_the_cache(backend, tiny_flash,
                                                                prompt_ids):
    """A discrete device's plan (the CPU device standing in for one: unified_memory=False)."""
    from flashinfer_py.loader import ALLOCATOR_MARGIN

    d = tiny_flash("llama-relu")
    kw = dict(backend=backend, device="cpu", selection="oracle", eviction="window", window=1,
              prefill_chunk=1, unified_memory=False)
    free = fi.load(d, sparse=True, **kw)
    full = free.plan.cache_capacity
    probe = fi.load(d, vram_budget=1 << 40, **kw).plan.vram
    assert probe.cache_capacity == full  # a huge budget changes nothing
    assert probe.context == 0  # no CUDA context off CUDA
    # room for about 95% of the cache on the device (a random ReLU layer fires ~90%), with
    # the allocator's margin on every tensor
    tensors = probe.resident + probe.kv_cache + int(0.95 * probe.cache_bytes)
    budget = int(tensors * (1 + ALLOCATOR_MARGIN))
    m = fi.load(d, vram_budget=budget, **kw)
    v = m.plan.vram
    assert m.sparse and v.total <= budget and v.resident == probe.resident
    assert v.allocator == int(ALLOCATOR_MARGIN * (v.resident + v.kv_cache + v.cache_bytes))
    assert v.total == v.resident + v.kv_cache + v.cache_bytes + v.allocator
    assert m.plan.cache_capacity == v.cache_capacity
    assert all(c <= f for c, f in zip(v.cache_capacity, full)) and sum(v.cache_capacity) < sum(full)
    assert [m.ffn.cache.capacity(i) for i in range(m.args.num_hidden_layers)] == v.cache_capacity
    # the plan's figures are what the device really holds (the KV cache grows with use)
    assert _device_bytes(m) <= v.resident + v.cache_bytes
    assert _device_bytes(m) >= 0.95 * (v.resident + v.cache_bytes)
    cache = m.new_cache()
    m.reset()
    assert np.isfinite(m.forward(prompt_ids[:8], cache)).all()


def _cuda_plan(d, budget):
    """The plan of torch on a CUDA device (made on paper: nothing touches a device here)."""
    from flashinfer_py.loader import plan_directory

    rt = fi.RuntimeConfig(backend="torch", device="cuda", vram_budget=budget,
                          selection="oracle", eviction="window")
    return plan_directory(d, rt)[1]


def test_cuda_plan_counts_the_context_and_the_allocator_margin(tiny_flash):
    """Under a CUDA vram_budget the context (CUDA_CONTEXT_BYTES, or measured where a device
    is visible) and the allocator margin come off the top; the smallest workable figure in
    the error counts both, and works."""
    import re

    from flashinfer_py.loader import ALLOCATOR_MARGIN, CUDA_CONTEXT_BYTES

    d = tiny_flash("llama-relu")
    v = _cuda_plan(d, 64 << 30).vram
    assert v.context_note in ("estimate", "measured")
    assert v.context == CUDA_CONTEXT_BYTES if not torch.cuda.is_available() else \
        v.context >= CUDA_CONTEXT_BYTES
    tensors = v.resident + v.kv_cache + v.cache_bytes
    assert v.allocator == int(ALLOCATOR_MARGIN * tensors)
    assert v.total == tensors + v.context + v.allocator
    # just enough for every neuron: nothing cut; 1% less: the cache shrinks
    enough = v.context + int(np.ceil(tensors * (1 + ALLOCATOR_MARGIN))) + 1
    assert _cuda_plan(d, enough).vram.cache_capacity == v.cache_capacity
    less = _cuda_plan(d, enough - int(0.01 * tensors)).vram
    assert sum(less.cache_capacity) < sum(v.cache_capacity) and less.total <= enough
    # the tensors alone, without the context: too small, and the error says by how much
    with pytest.raises(ValueError, match=r"vram_budget .* is too small.*the CUDA context "
                       r".*allocator margin.*Give at least") as ei:
        _cuda_plan(d, v.resident + v.kv_cache + v.cache_bytes)
    need = fi.RuntimeConfig(backend="torch", vram_budget=re.search(
        r"Give at least ([0-9.]+ \w+)", str(ei.value)).group(1).replace(" ", "")).vram_budget
    assert need > v.context + (v.resident + v.kv_cache) * (1 + ALLOCATOR_MARGIN)
    assert _cuda_plan(d, need).vram.total <= need


@pytest.mark.parametrize("unified", [True, False])
def test_vram_budget_too_small_names_the_smallest_that_works(unified, tiny_flash):
    import re

    d = tiny_flash("llama-relu")
    kw = dict(backend="torch", device="cpu", selection="oracle", eviction="window",
              unified_memory=None if unified else False)
    with pytest.raises(ValueError, match="vram_budget .* is too small.*Give at least") as ei:
        fi.load(d, vram_budget=1024, **kw)
    assert ("one budget" in str(ei.value)) == unified
    need = re.search(r"Give at least ([0-9.]+ \w+)", str(ei.value)).group(1).replace(" ", "")
    plan = fi.load(d, vram_budget=need, **kw).plan
    assert (plan.vram if not unified else plan).total <= \
        fi.RuntimeConfig(vram_budget=need, backend="torch").vram_budget
    with pytest.raises(ValueError, match="vram_budget is device memory: it needs backend"):
        fi.RuntimeConfig(vram_budget="1GB")


def test_info_prints_the_vram_plan(tiny_flash, capsys):
    from flashinfer_py import cli
    from flashinfer_py.loader import CUDA_CONTEXT_BYTES

    d = tiny_flash("llama-relu")
    flags = ["info", str(d), "--backend", "torch", "--device", "cuda", "--vram-budget", "2GB",
             "--selection", "oracle", "--eviction", "window"]
    assert cli.main(flags + ["--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["memory_plan"]
    assert plan["vram"]["budget"] == 2 << 30
    assert plan["vram"]["cache_neurons_per_layer"] == plan["cache_neurons_per_layer"]
    assert plan["vram"]["context"] >= CUDA_CONTEXT_BYTES and plan["vram"]["allocator"] > 0
    assert cli.main(flags) == 0
    text = capsys.readouterr().out
    assert re.search(r"^  CUDA context \((estimate|measured)\): +\d", text, re.M)
    assert re.search(r"^  allocator margin \(10% of tensors\): +\d", text, re.M)


# ---- unified memory: one plan for host and device --------------------------------------------


@pytest.mark.parametrize("backend,flag", [("torch", None), pytest.param("mlx", None, marks=needs_mlx),
                                          ("torch", True)])
def test_unified_memory_is_one_plan_with_one_budget(backend, flag, tiny_flash, prompt_ids):
    """A device sharing the host's RAM (mlx, torch's cpu: found from the device; or
    unified_memory=True): one plan whose budget is the smaller of dram_budget and
    vram_budget; the resident tensors and KV cache counted once, as the device holds them;
    each cached neuron costs its host record and its device copy, so fewer neurons fit than
    a plan that ignored the copy; and what the model holds stays within the plan."""
    from flashinfer_py.loader import ALLOCATOR_MARGIN, FRAMEWORK_OVERHEAD_BYTES, device_costs

    d = tiny_flash("llama-relu")
    kw = dict(backend=backend, device="cpu", selection="oracle", eviction="window", window=1,
              prefill_chunk=1, unified_memory=flag)
    full = fi.load(d, sparse=True, **kw).plan
    assert full.unified and full.vram is None
    costs = device_costs(d, full_manifest(d), fi.load(d).args,
                         fi.RuntimeConfig(sparse=True, **kw), backend)
    assert (full.resident, full.kv_cache) == (costs.resident, costs.kv_cache)
    assert full.device_row_bytes == int(np.ceil(costs.row_bytes * (1 + ALLOCATOR_MARGIN)))
    assert full.allocator == int(ALLOCATOR_MARGIN * (costs.resident + costs.kv_cache))
    assert full.overhead >= FRAMEWORK_OVERHEAD_BYTES[backend]
    budget = full.total - full.cache_bytes + int(0.6 * full.cache_bytes)
    for dram, vram in ((budget, None), (None, budget), (budget, 2 * budget),
                       (2 * budget, budget)):
        m = fi.load(d, dram_budget=dram, vram_budget=vram, **kw)
        p = m.plan
        assert p.budget == budget and p.total <= budget and p.vram is None
        assert p.cache_bytes == sum(p.cache_capacity) * (p.row_bytes + p.device_row_bytes)
    # the same budget planned as if the device had its own memory caches more neurons,
    # whose device copies the unified plan counts
    apart = fi.load(d, dram_budget=budget, **{**kw, "unified_memory": False}).plan
    assert sum(apart.cache_capacity) > sum(p.cache_capacity)
    # what the model holds: the host cache's rows and the device copy fit the plan's figure
    held = sum(m.ffn.cache.capacity(i) * m.ffn.cache.row_bytes
               for i in range(m.args.num_hidden_layers))
    held += m.ffn.mirror.device_bytes
    assert held <= p.cache_bytes
    assert np.isfinite(chunked(m, prompt_ids[:10])).all()


def full_manifest(d):
    from flashinfer_py.format import read_manifest

    return read_manifest(d)


def test_info_says_the_plan_is_unified(tiny_flash, capsys):
    from flashinfer_py import cli

    d = tiny_flash("llama-relu")
    flags = ["info", str(d), "--backend", "torch", "--dram-budget", "2GB", "--vram-budget",
             "1GB", "--selection", "oracle", "--eviction", "window"]
    assert cli.main(flags) == 0
    text = capsys.readouterr().out
    assert "unified memory (torch on cpu: the device is the host)" in text
    assert "of a 1.00 GiB budget" in text or "of a 1 GiB budget" in text
    assert "device memory (vram_budget)" not in text  # no second plan
    assert cli.main(flags + ["--unified-memory", "no", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["memory_plan"]
    assert "unified" not in plan and plan["vram"]["budget"] == 1 << 30


def test_train_predictors_on_a_torch_model_says_what_to_do(tiny_flash):
    from flashinfer_py.train import train_predictors

    m = fi.load(tiny_flash("llama-relu"), backend="torch", device="cpu")
    with pytest.raises(ValueError, match="native backend: load .* with flashinfer_py.load"):
        train_predictors(m, list(range(3, 40)), progress=False, save=False)
