"""`load()` and `FlashModel`: open a flash directory and run it.

This is the object developers embed: ``model = flashinfer_py.load(DIR)``, then
``model.logits(ids)`` or ``for piece in model.generate("prompt"): ...``.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from .config import ModelArgs, RuntimeConfig, whole_at_least
from .errors import FlashFormatError, FlashIOError, UnsupportedModelError
from .format import check_files, load_dense, read_manifest, resident_formats
from .generate import StepResult, generate_step
from .ffn import ResidentFFN
from .model import KVCache, Transformer, check_tokens
from .sampling import check_sampling, make_sampler


@contextlib.contextmanager
def _manifest_errors(directory: Path, what: str):
    """Errors of a manifest that parses but does not describe the files (a field of the wrong
    type, a shape that disagrees) as FlashFormatError, not as whatever the code using it hit."""
    try:
        yield
    except (FlashFormatError, UnsupportedModelError, FlashIOError):
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, ArithmeticError) as e:
        raise FlashFormatError(f"{directory / 'manifest.json'}: does not match {what} "
                               f"({type(e).__name__}: {e}); re-run `flashinfer-py convert` to "
                               "rebuild the directory.") from None


def _check_against_bundles(directory: Path, manifest: dict, args: ModelArgs) -> None:
    """The manifest's shape is the bundle file's (whose header is checked against the file's
    length): a damaged manifest must not make the loader plan for a billion layers."""
    from .bundles import read_header

    h = read_header(str(directory / manifest["files"]["bundles"]))
    ours = (args.num_hidden_layers, args.hidden_size, args.intermediate_size)
    if ours != (h["n_layers"], h["d_model"], h["d_ff"]):
        raise FlashFormatError(
            f"{directory / 'manifest.json'}: layers, hidden size and FFN size {ours} disagree "
            f"with {manifest['files']['bundles']} ({h['n_layers']}, {h['d_model']}, "
            f"{h['d_ff']}); re-run `flashinfer-py convert` to rebuild the directory.")
    # What the kernels read a record as must be what the file holds: a gated model over
    # (up, down) records would run an ungated FFN without an error.
    bundle = manifest.get("bundle") or {}
    want = {"parts": ["up", "gate", "down"] if args.gated else ["up", "down"],
            "dtype": manifest["dtype"]}
    want.update({k: bundle[k] for k in ("record_bytes", "down_layout") if k in bundle})
    bad = [f"{k} {want[k]!r} (the file: {h[k]!r})" for k in want
           if (list(h[k]) if k == "parts" else h[k]) != want[k]]
    if bad:
        raise FlashFormatError(
            f"{directory / 'manifest.json'}: {', '.join(bad)} disagree with "
            f"{manifest['files']['bundles']}; re-run `flashinfer-py convert` to rebuild the "
            "directory.")


def _dense_entries(directory: Path, manifest: dict, args: ModelArgs) -> dict:
    """dense.safetensors' header (loader.dense_entries), checked against the manifest: token
    ids are checked against vocab_size, so the embedding (and LM head) must have that many
    rows, or an id past them reads the next tensor's bytes from a streamed embedding. (After
    the memory plan: a budget too small is reported before the resident file is opened.)"""
    from .checkpoint import CheckpointError
    from .loader import dense_entries

    try:
        entries = dense_entries(directory, manifest)
    except CheckpointError as e:
        raise FlashFormatError(f"{e} (re-run `flashinfer-py convert` to rebuild the "
                               "directory)") from None
    for name in ("tok_embeddings", "lm_head"):
        if name in entries and entries[name][1][0] != args.vocab_size:
            raise FlashFormatError(
                f"{directory / 'manifest.json'}: vocab_size {args.vocab_size} disagrees with "
                f"{name} in {manifest['files']['dense']} ({entries[name][1][0]} rows); re-run "
                "`flashinfer-py convert` to rebuild the directory.")
    return entries

class PromptCache:
    """A KV cache and the token ids whose keys and values it holds: a conversation's context.

    Pass the same one to successive ``generate_step`` calls (``model.new_prompt_cache()``):
    each call keeps the longest prefix its prompt shares with the ids already run and runs only
    the rest, so the turns of a chat, or requests that share a system prompt, do not recompute
    what came before (llama.cpp's server calls this ``cache_prompt``).
    """

    def __init__(self, kv: KVCache):
        self.kv = kv
        self.tokens: list[int] = []  # ids run so far, in order; the last sampled id is not
        # the generation using it now: one at a time (a paused generator that resumes after
        # another one used the cache raises instead of writing at the other's position)
        self.owner: Optional[object] = None

    def reuse(self, ids: list[int]) -> int:
        """Keep the longest prefix of the cached ids that `ids` starts with, leaving at least
        one id of `ids` to run (its logits are needed); return how many are kept."""
        n, limit = 0, min(len(self.tokens), len(ids) - 1)
        while n < limit and self.tokens[n] == ids[n]:
            n += 1
        self.truncate(n)
        return n

    def truncate(self, n: int) -> None:
        del self.tokens[n:]
        self.kv.truncate(n)

    def __len__(self) -> int:
        return len(self.tokens)


class FlashModel:
    """A model opened from a flash directory."""

    def __init__(self, directory, runtime: Optional[RuntimeConfig] = None, verify: bool = False):
        self.directory = Path(directory).expanduser()
        self.manifest = read_manifest(self.directory)
        check_files(self.directory, self.manifest, verify=verify)
        with _manifest_errors(self.directory, "its model configuration"):
            self.args = ModelArgs.from_dict(self.manifest["model"])
            _check_against_bundles(self.directory, self.manifest, self.args)
            self.resident_formats = resident_formats(self.manifest)
        self.dtype = self.manifest["dtype"]  # the FFN records' storage format
        self.runtime = runtime or RuntimeConfig()
        self.max_context = min(self.runtime.max_context, self.args.max_position_embeddings)
        bundle_path = str(self.directory / self.manifest["files"]["bundles"])
        self.sparse = self.runtime.sparse
        self.predictors = None
        self.last_stats: dict = {}
        if self.sparse:  # planned before any weight is read: a budget too small fails at once
            from .loader import prepare_sparse

            self.runtime, self.predictors, self.plan = prepare_sparse(
                self.directory, self.manifest, self.args, self.runtime)
        entries = _dense_entries(self.directory, self.manifest, self.args)
        streamed = None  # resident matrices the plan leaves on flash (resident_stream.py)
        if self.sparse and self.plan.streamed:
            from .resident_stream import stream_units

            left = {t for u in stream_units(self.args, entries) if u.name in self.plan.streamed
                    for t in u.tensors}
            streamed = (self.directory / self.manifest["files"]["dense"], entries, left)
        with _manifest_errors(self.directory, "the resident tensors"):
            dense = load_dense(self.directory, self.manifest,
                               None if streamed is None else
                               [n for n in streamed[1] if n not in streamed[2]])
        # where the forward pass runs (flashinfer_py.backends): "auto" made concrete
        from .backends import resolve_backend

        self.backend = resolve_backend(self.runtime.backend, self.runtime.device)
        if self.backend != "native":
            from .backends import open_model

            with _manifest_errors(self.directory, "the resident tensors"):
                self.ffn, self.transformer = open_model(self, dense)
        else:
            if self.sparse:
                from .ffn import SparseFFN

                self.ffn = SparseFFN(self.directory, self.manifest, self.args, dense,
                                     self.runtime, self.predictors, self.plan)
            else:
                with _manifest_errors(self.directory, "the FFN bundle file"):
                    self.ffn = ResidentFFN(bundle_path, self.args, dense, self.runtime)
            with _manifest_errors(self.directory, "the resident tensors"):
                self.transformer = Transformer(self.args, dense, self.resident_formats,
                                               self.ffn, self.runtime, streamed)
        self._tokenizer = None

    # ------------------------------------------------------------------ pieces
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import Tokenizer

            self._tokenizer = Tokenizer(self.directory)
        return self._tokenizer

    def new_cache(self) -> KVCache:
        if self.backend != "native":  # keys and values on the backend's device
            return self.transformer.new_cache(self.max_context)
        return KVCache(self.args, self.max_context)

    def new_prompt_cache(self) -> PromptCache:
        """An empty conversation context to pass to `generate_step(prompt_cache=...)`."""
        return PromptCache(self.new_cache())

    # ------------------------------------------------------------------ API
    def unusable(self) -> Optional[str]:
        """Why this model refuses to run after a failed read (then load it again), or None.
        A server's health check asks this."""
        return self.ffn.unusable() if self.sparse else None

    def reset(self) -> None:
        """Start a new sequence (sparse mode): forget the sliding window and empty the neuron
        cache. Under ``eviction="rank"`` (the default where a sketch exists) the cached
        neurons stay, by design: they are what the last tokens ranked highest, and refilling
        the cache would read all of it from flash again. So with ranking, what a sequence
        computes depends a little on what the model ran before; load a fresh model for a run
        that must be reproducible bit for bit."""
        if self.sparse:
            self.ffn.reset()

    def forward(self, token_ids, cache: KVCache, last_only: bool = False) -> np.ndarray:
        """Run token_ids after the context in `cache`; logits [T, vocab] (or [1, vocab]).

        Sparse mode processes several tokens in chunks of ``runtime.prefill_chunk``: each
        chunk needs the union of its tokens' active neurons, and counts as one window step.
        Per-call statistics are left in `last_stats`.
        """
        ids = check_tokens(token_ids, self.args.vocab_size)
        if not self.sparse:
            return self.transformer.forward(ids, cache, last_only)
        n = self.runtime.prefill_chunk
        outs, t0 = [], time.perf_counter_ns()
        total = None
        for i in range(0, len(ids), n):
            chunk = ids[i:i + n]
            self.ffn.start_token()
            # with last_only, only the last chunk's logits are used: the others skip the LM
            # head (a GEMV over the vocabulary, or a matrix read from flash when streamed)
            out = self.transformer.forward(chunk, cache, last_only,
                                           head=not last_only or i + n >= len(ids))
            if out is not None:
                outs.append(out)
            st = self.ffn.end_token()
            total = st if total is None else total.add(st)
        wall = time.perf_counter_ns() - t0
        d = total.as_dict()
        d["total_ns"] = wall
        stream = getattr(self.transformer, "stream", None)
        if stream is not None:  # resident matrices read from flash (stream_wait_ns: waited)
            d.update(stream.take_stats())
            d["direct"] = d["direct"] and stream.direct
        # what the token did besides waiting for reads, managing the cache and predicting
        d["compute_ns"] = (wall - total.io_wait_ns - total.mm_ns - total.predict_ns
                           - d.get("transfer_ns", 0)  # a device backend's copies of new rows
                           - d.get("stream_wait_ns", 0))
        self.last_stats = d
        return outs[-1] if last_only else np.concatenate(outs)

    def logits(self, token_ids, cache: Optional[KVCache] = None) -> np.ndarray:
        """Float32 next-token logits [len(token_ids), vocab]. Without `cache` the sequence starts
        from an empty context (and, in sparse mode, as after :meth:`reset`: under ranking the
        neuron cache keeps what earlier calls left in it); with one, it continues that
        cache's context."""
        if cache is None:
            cache = self.new_cache()
            self.reset()
        return self.forward(token_ids, cache)

    def generate_step(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0,
                      top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None,
                      stop_at_eos: bool = True,
                      prompt_cache: Optional[PromptCache] = None) -> Iterator[StepResult]:
        """Yield a StepResult per generated token; `prompt` is text or a list of token ids.

        Without `prompt_cache` the prompt starts from an empty context. With one, the prompt
        continues it: the ids it shares with the cache's start are not run again, and the ids
        run (prompt and generated) are added to it as they go.

        The arguments are checked here, when the call is made (ValueError naming the
        argument), not at the first ``next()``, and before any of the prompt runs.
        """
        check_sampling(temperature, top_k, top_p, seed)
        if not whole_at_least(max_new_tokens, 0):
            raise ValueError(f"max_new_tokens must be a whole number >= 0, got {max_new_tokens!r}")
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            seq = prompt if isinstance(prompt, np.ndarray) else list(prompt)
            ids = [int(i) for i in check_tokens(seq, self.args.vocab_size)] if len(seq) else []
        has_tok = isinstance(prompt, str) or (self.directory / "tokenizer.json").is_file()
        if len(ids) + max_new_tokens > self.max_context:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) "
                             f"exceeds the context limit {self.max_context}; shorten one"
                             + self._context_hint())
        if not ids:
            raise ValueError("the prompt encodes to no tokens; give a non-empty prompt")
        return self._generate_step(ids, has_tok, max_new_tokens, temperature, top_k, top_p, seed,
                                   stop_at_eos, prompt_cache)

    def _context_hint(self) -> str:
        """How the context limit can grow: max_context, unless the model's own limit binds."""
        if self.max_context >= self.args.max_position_embeddings:
            return (f" (the model's own limit, max_position_embeddings="
                    f"{self.args.max_position_embeddings})")
        return " or raise max_context (RuntimeConfig / --max-context)"

    def _generate_step(self, ids, has_tok, max_new_tokens, temperature, top_k, top_p, seed,
                       stop_at_eos, prompt_cache) -> Iterator[StepResult]:
        from .tokenizer import StreamingDetokenizer

        pc = prompt_cache if prompt_cache is not None else self.new_prompt_cache()
        me = pc.owner = object()
        kept = pc.reuse(ids)
        if kept == 0:
            self.reset()

        def forward(feed):
            if pc.owner is not me:
                raise RuntimeError("this PromptCache was used by another generation since this "
                                   "one started; a PromptCache serves one generation at a time "
                                   "(finish or close one before starting the next)")
            try:
                out = self.forward(feed, pc.kv, last_only=True)
            except BaseException:  # a failed read: the cache holds only what ran completely
                pc.truncate(len(pc.tokens))
                raise
            pc.tokens.extend(int(t) for t in feed)
            return out

        detok = StreamingDetokenizer(self.tokenizer, context=ids) if has_tok else None
        for step in generate_step(
                forward, ids[kept:], make_sampler(temperature, top_k, top_p, seed),
                max_new_tokens, stop_ids=self.args.eos_token_ids if stop_at_eos else (),
                on_token=detok.add if detok is not None else None,
                stats=(lambda: dict(self.last_stats)) if self.sparse else None):
            step.prompt_tokens, step.cached_tokens = len(ids), kept
            yield step

    def generate(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None) -> Iterator[str]:
        """Stream generated text pieces for `prompt` (greedy when temperature is 0)."""
        if not isinstance(prompt, str) and not (self.directory / "tokenizer.json").is_file():
            raise FlashFormatError(f"{self.directory} has no tokenizer.json, so generate() has "
                                   "no text to give; use generate_step() for the token ids")
        steps = self.generate_step(prompt, max_new_tokens, temperature, top_k, top_p, seed)
        return (s.text for s in steps if s.token not in self.args.eos_token_ids and s.text)

    def info(self) -> dict:
        """What this model is and what it keeps in DRAM."""
        a = self.args
        dense = self.transformer.nbytes
        rt = self.runtime
        return {"directory": str(self.directory), "arch": a.arch, "layers": a.num_hidden_layers,
                "hidden_size": a.hidden_size, "ffn_neurons": a.intermediate_size,
                "activation": a.hidden_act, "dtype": self.dtype,
                "resident_dtypes": sorted(set(self.resident_formats.values())),
                "resident_bytes": dense,
                "ffn_bytes_in_dram": self.ffn.nbytes,
                "record_bytes": self.manifest["bundle"]["record_bytes"], "sparse": self.sparse,
                "backend": self.backend,
                "device": (str(self.transformer.device) if self.backend == "torch"
                           else rt.device or "cpu"),
                "compute_dtype": rt.compute_dtype or "float32"}


def load(directory, runtime: Optional[RuntimeConfig] = None, verify: bool = False,
         **overrides) -> FlashModel:
    """Open a flash model directory made by `flashinfer-py convert`.

    Args:
        directory: the flash directory.
        runtime: a RuntimeConfig; keyword `overrides` replace its fields
            (e.g. ``load(d, use_direct_io=False)``).
        verify: also check every file's sha256 against the manifest.
    """
    runtime = (runtime or RuntimeConfig()).replace(**overrides) if overrides else runtime
    return FlashModel(directory, runtime, verify=verify)
