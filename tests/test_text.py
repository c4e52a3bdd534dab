"""Tokenizer, Phi-2 features and the null-text fill, with the official semantics."""

import torch

from runtime.model.text_encoder import encode_prompts, tokenize


def test_tokenizer_is_gpt2_bpe_with_right_padding(t2i_pipe):
    ids, lengths = tokenize(t2i_pipe.tokenizer, ["a photo of a cat", ""], 8)
    assert ids.tolist() == [[64, 4590, 286, 257, 3797, 50256, 50256, 50256], [50256] * 8]
    assert lengths == [5, 0]


def test_null_fill_keeps_prompt_rows_and_null_elsewhere(t2i_pipe):
    embed = t2i_pipe.transformer.text_embed
    features = encode_prompts(t2i_pipe.tokenizer, t2i_pipe.text_encoder, ["a photo of a cat", ""], 256)
    assert features[0].shape == (5, 80) and features[1].shape == (0, 80)
    filled = embed.fill_null(features)
    assert filled.shape == (2, 256, 80)
    assert torch.equal(filled[0, :5], features[0])
    assert torch.equal(filled[0, 5:], embed.weight[5:256])
    assert torch.equal(filled[1], embed.weight[:256])  # the empty negative prompt is pure null features


def test_features_of_real_tokens_do_not_depend_on_padding(t2i_pipe):
    # causal attention: a prompt's rows are the same whatever follows them
    short = encode_prompts(t2i_pipe.tokenizer, t2i_pipe.text_encoder, ["a cat"], 256)[0]
    ids, _ = tokenize(t2i_pipe.tokenizer, ["a cat"], 256)
    unpadded = t2i_pipe.text_encoder(input_ids=ids[:, :2]).last_hidden_state[0]
    torch.testing.assert_close(short, unpadded, rtol=1e-5, atol=1e-5)


def test_prompts_longer_than_256_tokens_are_truncated(t2i_pipe):
    long_prompt = " ".join(["cat"] * 300)
    features = encode_prompts(t2i_pipe.tokenizer, t2i_pipe.text_encoder, [long_prompt, " ".join(["cat"] * 256)], 256)
    assert features[0].shape == (256, 80)
    torch.testing.assert_close(features[0], features[1])
