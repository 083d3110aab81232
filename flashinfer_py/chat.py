"""Chat: the model's own chat template, a conversation that keeps its KV cache between turns,
and `stream`, the text-generation loop that `chat`, `generate --chat` and the server share.

The template is the one the checkpoint ships (the converter copies ``chat_template.jinja`` or
``tokenizer_config.json``; for a GGUF it saves the metadata's ``tokenizer.chat_template`` as
``chat_template.jinja``). It is rendered as transformers' ``apply_chat_template`` renders it: a
sandboxed jinja2 environment with ``trim_blocks`` and ``lstrip_blocks``, the special tokens of
``tokenizer_config.json`` as variables, ``raise_exception``, ``strftime_now`` and a ``tojson``
that does not escape HTML; the text is then encoded without adding special tokens (the template
writes them).
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from .config import whole_at_least
from .errors import FlashFormatError
from .generate import StopStrings
from .sampling import check_sampling, log_softmax

__all__ = ["ChatTemplate", "Conversation", "Delta", "TokenLogprob", "normalize_messages",
           "stream", "token_logprob"]

ROLES = ("system", "user", "assistant", "tool", "developer")


class ChatTemplate:
    """A model's chat template: ``render(messages)`` -> the prompt text."""

    def __init__(self, source: str, origin: str, special_tokens: Optional[dict] = None):
        self.source, self.origin = source, origin
        self.special_tokens = dict(special_tokens or {})
        self._compiled = _compile(source, origin)

    @classmethod
    def from_dir(cls, directory, override: Optional[str] = None) -> "ChatTemplate":
        """The template of a flash directory, or of `override`: a template file (jinja text),
        a ``tokenizer_config.json``, or a ``.gguf`` whose metadata holds one (for directories
        converted before the converter kept templates, or to try another template).

        Raises:
            FlashFormatError: no template found; the message lists where it looked.
        """
        directory = Path(directory)
        special = _special_tokens(directory / "tokenizer_config.json")
        if override is not None:
            return cls(_read_override(Path(override).expanduser()), str(override), special)
        looked = []
        for name, read in (("chat_template.jinja", _read_text),
                           ("chat_template.json", _read_json_template),
                           ("tokenizer_config.json", _read_json_template)):
            path = directory / name
            looked.append(name)
            source = read(path) if path.is_file() else None
            if source:
                return cls(source, str(path), special)
        raise FlashFormatError(
            f"{directory}: no chat template (looked for {', '.join(looked)}). The model may be a "
            "base model without one; use `generate --prompt` for plain text, or pass "
            "--chat-template FILE (a jinja template, a tokenizer_config.json, or the source "
            ".gguf the directory was converted from).")

    def render(self, messages: list, add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}, ...])."""
        import jinja2

        _BUDGET.left = MAX_TEMPLATE_ITEMS
        try:
            return self._compiled.render(messages=messages,
                                         add_generation_prompt=add_generation_prompt,
                                         **{**self.special_tokens, **kwargs})
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template ({self.origin}) refused the messages: {e}") from None
        except RecursionError:
            raise ValueError(f"the chat template ({self.origin}) recursed too deeply") from None

    def encode(self, tokenizer, messages: list, **kwargs) -> list[int]:
        """Token ids of the rendered prompt (no special tokens added: the template writes them)."""
        return tokenizer.encode(self.render(messages, **kwargs), add_special_tokens=False)

    def stop_token_ids(self, tokenizer) -> list[int]:
        """Ids that end an assistant turn beyond the model's EOS: the template's eos_token."""
        tok = self.special_tokens.get("eos_token")
        i = tokenizer.token_id(tok) if tok else None
        return [] if i is None else [i]


# A template comes with the model, from whoever published it, and renders every request. The
# sandbox stops it touching Python; these bounds stop it spending unbounded time or memory:
# the items all of one render's range() calls may yield, and the length of a string or list
# made by repetition (a real template repeats nothing, and loops over the messages).
MAX_TEMPLATE_ITEMS = 1_000_000
_BUDGET = threading.local()


def _compile(source: str, origin: str):
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
    except ImportError:
        raise ImportError("chat templates need jinja2: pip install jinja2 (or "
                          "'flashinfer_py[serve]')") from None

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if (isinstance(seq, (str, list, tuple)) and isinstance(n, int)
                            and len(seq) * n > MAX_TEMPLATE_ITEMS):
                        raise SecurityError(f"a repetition of {len(seq)} x {n} items is longer "
                                            f"than {MAX_TEMPLATE_ITEMS}")
            elif (isinstance(right, int) and isinstance(left, int) and abs(right) > 64
                  and abs(left) > 1):
                raise SecurityError(f"{left} ** {right} is too large")
            return super().call_binop(context, operator, left, right)

    def bounded_range(*args):
        r = range(*args)
        left = getattr(_BUDGET, "left", MAX_TEMPLATE_ITEMS) - len(r)
        if left < 0:
            raise SecurityError(f"the template's loops ran past {MAX_TEMPLATE_ITEMS} items")
        _BUDGET.left = left
        return r

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.globals["range"] = bounded_range
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise FlashFormatError(f"{origin}: the chat template is not valid jinja (line "
                               f"{e.lineno}: {e.message}).") from None


def _special_tokens(config: Path) -> dict:
    """bos_token, eos_token, ... of a tokenizer_config.json as strings (values may be
    {"content": ...} objects)."""
    if not config.is_file():
        return {}
    cfg = json.loads(config.read_text(encoding="utf-8"))
    out = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                "mask_token"):
        v = cfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        if isinstance(v, str):
            out[key] = v
    return out


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _read_json_template(path: Path) -> Optional[str]:
    try:
        t = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, AttributeError):
        raise FlashFormatError(f"{path}: not a JSON object; re-run `flashinfer-py convert`.") from None
    if isinstance(t, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        t = next((x.get("template") for x in t if x.get("name") == "default"), None)
    return t if isinstance(t, str) else None


def _read_override(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"--chat-template {path}: no such file")
    if path.suffix == ".gguf":
        from .checkpoint import GGUFCheckpoint

        with GGUFCheckpoint(path) as ckpt:  # the checked reader: a damaged file is refused
            source = ckpt._field("tokenizer.chat_template")
        if not isinstance(source, str):
            raise FlashFormatError(f"{path}: this GGUF has no tokenizer.chat_template in its "
                                   "metadata.")
        return source
    if path.suffix == ".json":
        source = _read_json_template(path)
        if not source:
            raise FlashFormatError(f"{path}: has no \"chat_template\" entry.")
        return source
    return _read_text(path)


def normalize_messages(messages) -> list[dict]:
    """Check OpenAI-style messages and flatten content parts ([{"type": "text", "text": ...}])
    into strings, which every chat template understands.

    Raises:
        ValueError: naming the message and the field at fault.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with a role and a content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise ValueError(f"messages[{i}].content[{j}]: only text parts are "
                                     "supported (this is a text model)")
                texts.append(str(part.get("text", "")))
            content = "\n".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of text parts")
        out.append({**m, "content": content})
    return out


# ------------------------------------------------------------------------------------------------
# generation as text: the loop the CLI and the server share
# ------------------------------------------------------------------------------------------------


@dataclass
class Delta:
    """A piece of generated text; the last one of a generation has a `finish_reason`."""

    text: str
    finish_reason: Optional[str] = None  # "stop" (EOS, stop token or string) or "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0     # prompt tokens whose keys and values were already cached
    seconds: float = 0.0       # the whole generation, prompt included
    logprobs: Optional[list] = None  # TokenLogprobs of the tokens since the last Delta (asked)


@dataclass
class TokenLogprob:
    """A generated token's log-probability and its `top` most likely alternatives
    ([(token, logprob)], most likely first), under the model's own distribution: the
    log-softmax of its float32 logits, before temperature, top-k and top-p."""

    token: int
    logprob: float
    top: list


def token_logprob(step, n_top: int) -> TokenLogprob:
    """`step`'s token and the `n_top` most likely tokens of its logits (a StepResult that is
    still the current step: it has its logits)."""
    if n_top == 0:
        return TokenLogprob(step.token, step.logprob, [])
    lp = log_softmax(step.logits)
    n_top = min(n_top, lp.size)
    best = np.argpartition(-lp, n_top - 1)[:n_top]
    best = best[np.argsort(-lp[best], kind="stable")]
    return TokenLogprob(step.token, step.logprob, [(int(i), float(lp[i])) for i in best])


def stream(model, prompt_ids: list, max_tokens: int, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0, seed: Optional[int] = None, stop: Iterable[str] = (),
           stop_ids: Iterable[int] = (), ignore_eos: bool = False,
           prompt_cache=None, logprobs: Optional[int] = None) -> Iterator[Delta]:
    """Generate text for `prompt_ids`, one Delta per piece, then a last Delta that says why it
    ended. Stop strings are cut from the text (the OpenAI API's semantics); the EOS and
    `stop_ids` tokens end generation and are not shown. Closing the iterator stops generating.

    `logprobs`: None (default) computes nothing; a number N gives each Delta the
    TokenLogprobs of the tokens generated since the previous one (the last Delta has any
    whose text was held back or cut by a stop string), each with its N most likely
    alternatives. The ending EOS or stop token is not listed, as its text is not shown.
    """
    stops = StopStrings(stop)
    ends = set() if ignore_eos else set(model.args.eos_token_ids) | set(stop_ids)
    n, reason, cached, t0 = 0, "length", 0, time.perf_counter()
    listed = [] if logprobs is not None else None

    def taken() -> Optional[list]:
        if listed is None:
            return None
        out = listed[:]
        listed.clear()
        return out

    for step in model.generate_step(prompt_ids, max_tokens, temperature, top_k, top_p, seed,
                                    stop_at_eos=False, prompt_cache=prompt_cache):
        n, cached = n + 1, step.cached_tokens
        if step.token in ends:
            reason = "stop"
            break
        if listed is not None:
            listed.append(token_logprob(step, logprobs))
        text = stops.add(step.text)
        if text:
            yield Delta(text, logprobs=taken())
        if stops.hit is not None:
            reason = "stop"
            break
    if stops.hit is None:
        tail = stops.flush()
        if tail:
            yield Delta(tail, logprobs=taken())
    yield Delta("", reason, prompt_tokens=len(prompt_ids), completion_tokens=n,
                cached_tokens=cached, seconds=time.perf_counter() - t0, logprobs=taken())


class Conversation:
    """A chat with a model: the messages so far and the KV cache of what has been run.

    ``say(text)`` streams the answer as text pieces and records it; the next turn reruns only
    what the cache does not hold (the new message, and the end of the last answer when its
    tokens differ from the template's rendering).
    """

    def __init__(self, model, template: ChatTemplate, system: Optional[str] = None):
        self.model, self.template, self.system = model, template, system
        self.cache = model.new_prompt_cache()
        self.messages: list[dict] = []
        self.last: Optional[Delta] = None  # the last answer's end: why, tokens, time
        self._turn = 0  # say() calls so far: only the latest one records its answer
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the cache's ids are kept; a new prompt reuses its start)."""
        self._turn += 1  # an answer still streaming is not recorded after this
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def say(self, text: str, max_tokens: Optional[int] = None, **sampling) -> Iterator[str]:
        """Stream the answer to `text`. `max_tokens` defaults to the context left.

        The answer is to the conversation as it stands when the answer starts (the first
        ``next()``), so several ``say()`` made ahead and consumed in order are successive
        turns.

        Raises:
            ValueError: when called, `max_tokens` not a whole number >= 1 or a sampling
                setting that cannot work; when it starts, the conversation no longer fits
                in the context (``reset()`` it).
        """
        if max_tokens is not None and not whole_at_least(max_tokens, 1):
            raise ValueError(f"max_tokens must be a whole number >= 1 or None (the context "
                             f"left), got {max_tokens!r}")
        check_sampling(sampling.get("temperature", 0.0), sampling.get("top_k", 0),
                       sampling.get("top_p", 1.0), sampling.get("seed"))
        return self._say(text, max_tokens, sampling)

    def _say(self, text: str, max_tokens: Optional[int], sampling: dict) -> Iterator[str]:
        messages = self.messages + [{"role": "user", "content": text}]
        ids = self.template.encode(self.model.tokenizer, messages)
        room = self.model.max_context - len(ids)
        if room < 1 or (max_tokens is not None and max_tokens > room):
            hint = getattr(self.model, "_context_hint", lambda: " or raise --max-context")()
            raise ValueError(f"the conversation ({len(ids)} tokens) with "
                             f"{max_tokens or 1} more does not fit the context of "
                             f"{self.model.max_context} tokens; start a new one (/reset)"
                             + hint)
        max_tokens = room if max_tokens is None else max_tokens
        self._turn += 1
        turn = self._turn
        answer = []
        try:
            for d in stream(self.model, ids, max_tokens, prompt_cache=self.cache,
                            stop_ids=self.template.stop_token_ids(self.model.tokenizer),
                            **sampling):
                answer.append(d.text)
                if d.finish_reason:
                    self.last = d
                if d.text:
                    yield d.text
        finally:  # an interrupted answer is kept as far as it went, unless a later say()
            # started meanwhile (this one then stopped: see PromptCache.owner)
            if turn == self._turn:
                self.messages = messages + [{"role": "assistant", "content": "".join(answer)}]
