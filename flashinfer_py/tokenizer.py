"""Thin wrapper over the `tokenizers` library, plus incremental detokenization for streaming."""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Optional

from .errors import FlashFormatError


class Tokenizer:
    """Encode text to ids and decode ids back, from a flash directory's ``tokenizer.json``."""

    def __init__(self, directory: Path):
        from tokenizers import Tokenizer as _HFTokenizer

        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise FlashFormatError(
                f"{path}: missing. Generation needs the tokenizer: copy the checkpoint's "
                "tokenizer.json into the flash directory, or re-run `flashinfer-py convert`.")
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as e:
            raise FlashFormatError(f"{path}: cannot be read by `tokenizers` ({e}).") from None
        cfg_path = Path(directory) / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self._byte_level = _uses_byte_level(json.loads(self._tok.to_str()).get("decoder"))
        self._added = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items()}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for, on its own (a piece of a multi-byte character is
        its bytes, where ``decode`` would give U+FFFD): byte-level BPE's vocabulary mapped
        back to bytes, SentencePiece's ``<0xNN>`` byte tokens and its "▁" as a space."""
        token = int(token)
        if token in self._added:
            return self._added[token].encode("utf-8")
        piece = self._tok.id_to_token(token)
        if piece is None:
            return b""
        if self._byte_level:
            table = _unicode_to_byte()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        m = _BYTE_TOKEN.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _uses_byte_level(decoder: Optional[dict]) -> bool:
    if not decoder:
        return False
    if decoder.get("type") == "Sequence":
        return any(_uses_byte_level(d) for d in decoder.get("decoders", []))
    return decoder.get("type") == "ByteLevel"


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict:
    """GPT-2's byte-level alphabet, reversed: the printable character each byte is written as
    in a byte-level BPE vocabulary -> the byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
            *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class StreamingDetokenizer:
    """Turns a growing list of ids into text pieces, holding back incomplete UTF-8 sequences.

    Each new id is decoded together with the ids of the last piece (a window, so a token
    costs the same at the 10,000th as at the first) and the piece is what that adds. The
    window also gives the first piece its context: the last prompt ids (`context`), so a
    SentencePiece decoder that strips the text's leading space (Llama 2, Mistral: ``Strip``)
    does not strip the space before the first generated word.
    """

    CONTEXT = 4  # prompt ids decoded before the first piece

    def __init__(self, tokenizer: Tokenizer, context=()):
        self.tok = tokenizer
        # the last prompt ids that decode to text (a chat prompt ends in special tokens, which
        # decode to nothing and would leave the first piece without its context)
        added = getattr(tokenizer, "_added", {})
        self.ids = [int(t) for t in context if int(t) not in added][-self.CONTEXT:]
        self.prefix = 0             # ids[prefix:read]: already shown (or context)
        self.read = len(self.ids)

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        shown = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        if len(text) <= len(shown) or text.endswith("\ufffd"):
            return ""  # nothing visible yet, or a multi-byte character still incomplete
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(shown):]
