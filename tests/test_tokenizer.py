"""The torch-free PromptTokenizer gives transformers' ids, refuses unusable folders, imports alone."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.model.text_encoder import load_tokenizer, tokenize
from runtime.tokenizer import PromptTokenizer

REPO = Path(__file__).resolve().parents[1]
LONG = " ".join(f"item{i}, " for i in range(300))  # ~1200 tokens, all different: truncation side shows
PROMPTS = [
    "",
    "a photo of a cat",
    "A red fox jumping over a lazy dog in the snow.",
    "  leading spaces",
    "trailing spaces   ",
    "multiple    inner     spaces",
    "line one\nline two\n\n\ttabbed\r\n",
    "café crème brûlée, naïve Zoë",
    "東京の夜景、猫が寝ている",
    "a dog 🐶 and a cat 🐱 👩‍🚀",
    "1234567890 3.14159 -42 +7% $100 #1 @home (a) [b] {c} <d> a/b\\c ... !?;:'\"",
    "<|endoftext|> special token typed in a prompt",
    LONG,
]


@pytest.fixture(scope="module")
def folder(tiny_t2i) -> Path:
    return tiny_t2i / "tokenizer"


def edited_copy(folder: Path, tmp_path: Path, config: dict | None = None, tokenizer_json: dict | None = None) -> Path:
    """A copy of the tokenizer folder with keys of its two JSON files replaced (None deletes a key)."""
    copy = tmp_path / "tokenizer"
    shutil.copytree(folder, copy)
    for name, edits in (("tokenizer_config.json", config), ("tokenizer.json", tokenizer_json)):
        if edits:
            data = json.loads((copy / name).read_text())
            data.update(edits)
            (copy / name).write_text(json.dumps({k: v for k, v in data.items() if edits.get(k, v) is not None}))
    return copy


def assert_same_as_transformers(folder: Path, max_length: int) -> tuple[np.ndarray, list[int]]:
    expected_ids, expected_lengths = tokenize(load_tokenizer(folder), PROMPTS, max_length)
    ids, lengths = PromptTokenizer.from_folder(folder)(PROMPTS, max_length)
    assert ids.dtype == np.int64 and ids.shape == (len(PROMPTS), max_length)
    np.testing.assert_array_equal(ids, expected_ids.numpy())
    assert lengths == expected_lengths
    return ids, lengths


@pytest.mark.parametrize("max_length", [256, 8])
def test_ids_and_lengths_equal_transformers(folder, max_length):
    ids, lengths = assert_same_as_transformers(folder, max_length)
    assert lengths[0] == 0 and (ids[0] == 50256).all()  # the empty prompt is all padding
    assert lengths[-1] == max_length  # the long prompt is truncated


def test_known_ids_without_bos_or_eos(folder):
    ids, lengths = PromptTokenizer.from_folder(folder)(["a photo of a cat", ""], 8)
    assert ids.tolist() == [[64, 4590, 286, 257, 3797, 50256, 50256, 50256], [50256] * 8]
    assert lengths == [5, 0]


# What transformers reads from the folder, each followed the same way.
TEMPLATE_WITH_BOS_AND_EOS = {
    "type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
               {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}],
    "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
    "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [50256], "tokens": ["<|endoftext|>"]}},
}
PAD_AS_ADDED_TOKEN = {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False, "special": True}


@pytest.mark.parametrize("config, tokenizer_json", [
    ({"add_bos_token": True, "add_eos_token": True}, None),  # ignored by transformers next to a tokenizer.json
    (None, {"post_processor": TEMPLATE_WITH_BOS_AND_EOS}),  # special tokens come from the post-processor
    ({"add_prefix_space": True}, None),  # the config's flag overrides tokenizer.json's pre-tokenizer
    ({"truncation_side": "left"}, None),
    ({"split_special_tokens": True}, None),
    ({"pad_token": PAD_AS_ADDED_TOKEN}, None),
], ids=["config-bos-eos", "template-bos-eos", "add-prefix-space", "truncate-left", "split-special", "pad-dict"])
def test_folder_settings_are_read_as_transformers_reads_them(folder, tmp_path, config, tokenizer_json):
    copy = edited_copy(folder, tmp_path, config, tokenizer_json)
    for max_length in (256, 8):
        assert_same_as_transformers(copy, max_length)


def test_template_special_tokens_are_kept_through_truncation(folder, tmp_path):
    copy = edited_copy(folder, tmp_path, tokenizer_json={"post_processor": TEMPLATE_WITH_BOS_AND_EOS})
    ids, lengths = PromptTokenizer.from_folder(copy)(["a cat", LONG], 8)
    assert ids[0].tolist() == [50256, 64, 3797, 50256, 50256, 50256, 50256, 50256] and lengths == [4, 8]
    assert ids[1, 0] == ids[1, 7] == 50256


def write_garbage(path: Path) -> None:
    path.write_text("{not json")


@pytest.mark.parametrize("break_folder, problem", [
    (lambda f: shutil.rmtree(f), "does not exist"),
    (lambda f: (f / "tokenizer.json").unlink(), "has no tokenizer.json"),
    (lambda f: write_garbage(f / "tokenizer.json"), "tokenizer.json is not a readable tokenizers file"),
    (lambda f: write_garbage(f / "tokenizer_config.json"), "tokenizer_config.json is not readable JSON"),
    (lambda f: (f / "tokenizer_config.json").write_text("[]"), "tokenizer_config.json holds a JSON list"),
    (lambda f: (f / "tokenizer_config.json").unlink(), "defines no pad token"),
], ids=["no-folder", "no-tokenizer-json", "corrupt-tokenizer-json", "corrupt-config", "config-not-object",
        "no-config"])
def test_unusable_folders_are_refused(folder, tmp_path, break_folder, problem):
    copy = edited_copy(folder, tmp_path)
    break_folder(copy)
    with pytest.raises(ValueError, match=problem) as refusal:
        PromptTokenizer.from_folder(copy)
    assert str(copy) in str(refusal.value)


@pytest.mark.parametrize("config, problem", [
    ({"pad_token": None}, "defines no pad token"),
    ({"padding_side": "left"}, "pads on the left; NOVA needs right padding"),
    ({"pad_token": "<pad>"}, "pad token '<pad>' outside its vocabulary"),
    ({"truncation_side": "middle"}, "unknown truncation side 'middle'"),
], ids=["no-pad-token", "left-padding", "pad-not-in-vocab", "bad-truncation-side"])
def test_unusable_settings_are_refused(folder, tmp_path, config, problem):
    copy = edited_copy(folder, tmp_path, config)
    with pytest.raises(ValueError, match=problem) as refusal:
        PromptTokenizer.from_folder(copy)
    assert str(copy) in str(refusal.value)


@pytest.mark.parametrize("direction, config, problem", [
    ("Left", None, "pads on the left"),  # the side is taken from tokenizer.json when the config has none
    ("Right", {"pad_token": None}, "defines no pad token"),  # but the pad token never is
], ids=["left-side", "pad-token-only-there"])
def test_tokenizer_json_padding_section_is_read_as_transformers_reads_it(folder, tmp_path, direction, config,
                                                                         problem):
    padding = {"strategy": "BatchLongest", "direction": direction, "pad_to_multiple_of": None, "pad_id": 50256,
               "pad_type_id": 0, "pad_token": "<|endoftext|>"}
    copy = edited_copy(folder, tmp_path, config, tokenizer_json={"padding": padding})
    with pytest.raises(ValueError, match=problem):
        load_tokenizer(copy)
    with pytest.raises(ValueError, match=problem):
        PromptTokenizer.from_folder(copy)


SCRIPT = """
import sys
sys.modules["torch"] = None
sys.modules["transformers"] = None
from runtime.tokenizer import PromptTokenizer
ids, lengths = PromptTokenizer.from_folder(sys.argv[1])(["a photo of a cat"], 8)
print(ids.tolist(), lengths)
"""


def test_imports_without_torch_or_transformers(folder):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(folder)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[[64, 4590, 286, 257, 3797, 50256, 50256, 50256]] [5]"
