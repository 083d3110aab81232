"""Thin wrapper over the `tokenizers` library, plus incremental detokenization for streaming."""
from __future__ import annotations

import json
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

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()


class StreamingDetokenizer:
    """Turns a growing list of ids into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok, self.ids, self.emitted = tokenizer, [], 0

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece
