"""Prompt tokenizer for deployments without torch or transformers (TensorRT-only hosts).

Gives the same ids as `runtime.model.text_encoder.tokenize` (transformers' CodeGen tokenizer called
with `max_length=..., truncation=True, padding="max_length"`), using only the `tokenizers` package
on the checkpoint's `tokenizer/` folder. The settings transformers takes from the folder are read
the same way:

- special tokens are whatever `tokenizer.json`'s post-processor adds (none for Phi-2's ByteLevel
  one); transformers drops `add_bos_token` / `add_eos_token` from the config when a
  `tokenizer.json` is present, so they are ignored here too;
- `add_prefix_space` comes from `tokenizer_config.json` (default false), as the CodeGen class
  rebuilds its byte-level pre-tokenizer from it;
- the pad token comes from `tokenizer_config.json` only (CodeGen's own `pad_token=None` default
  hides the one in `tokenizer.json`'s padding section);
- padding and truncation sides come from the config, else from `tokenizer.json`'s padding /
  truncation sections, else right; `split_special_tokens` from the config (default false).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, pre_tokenizers


class PromptTokenizer:
    """Right-padded, truncated prompt ids for the Phi-2 text-encoder graph."""

    def __init__(self, backend: Tokenizer, pad_id: int, truncation_side: str):
        self._backend = backend
        self.pad_id = pad_id
        self.truncation_side = truncation_side
        # Truncation is set on the backend per call (max_length varies), so calls must not interleave.
        self._lock = threading.Lock()

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "PromptTokenizer":
        """Load `tokenizer.json` + `tokenizer_config.json`; refuse folders NOVA cannot pad with."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"tokenizer folder {folder} does not exist")
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(f"tokenizer folder {folder} has no tokenizer.json")
        try:
            backend = Tokenizer.from_file(str(tokenizer_file))
        except Exception as err:  # the Rust loader raises a bare Exception for any malformed file
            raise ValueError(f"{tokenizer_file} is not a readable tokenizers file ({err})") from None
        config = _read_config(folder / "tokenizer_config.json")

        pad_token = config.get("pad_token")
        if isinstance(pad_token, dict):  # a serialized AddedToken
            pad_token = pad_token.get("content")
        if not pad_token:
            raise ValueError(f"tokenizer in {folder} defines no pad token; NOVA pads prompts to a fixed length")
        pad_id = backend.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"tokenizer in {folder} has pad token {pad_token!r} outside its vocabulary")
        padding_side = config.get("padding_side", (backend.padding or {}).get("direction", "right"))
        if padding_side != "right":
            raise ValueError(f"tokenizer in {folder} pads on the {padding_side}; NOVA needs right padding")
        truncation_side = config.get("truncation_side", (backend.truncation or {}).get("direction", "right"))
        if truncation_side not in ("right", "left"):
            raise ValueError(f"tokenizer in {folder} has an unknown truncation side {truncation_side!r}")

        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False)))
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        backend.no_padding()
        backend.no_truncation()
        return cls(backend, pad_id, truncation_side)

    def __call__(self, prompts: list[str], max_length: int) -> tuple[np.ndarray, list[int]]:
        """-> token ids int64 [n, max_length] (right-padded, truncated) and each prompt's real length."""
        with self._lock:
            self._backend.enable_truncation(max_length, direction=self.truncation_side)
            encodings = self._backend.encode_batch(list(prompts), add_special_tokens=True)
        ids = np.full((len(encodings), max_length), self.pad_id, dtype=np.int64)
        for row, encoding in zip(ids, encodings):
            row[: len(encoding.ids)] = encoding.ids
        return ids, [len(encoding.ids) for encoding in encodings]


def _read_config(path: Path) -> dict:
    """The tokenizer config as a dict; a folder without one gets transformers' defaults (empty)."""
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not readable JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object of settings")
    return config
