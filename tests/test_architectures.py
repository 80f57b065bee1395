"""A sweep of the architectures transformers ships, each with a tiny random config on the CPU:
every build ends in PASSED, or in a one-line refusal that names the real fix, never a traceback.
docs/architectures.md lists the outcomes; this test is what keeps that list true."""

from __future__ import annotations

import textwrap

import pytest

from tests.test_hardening import cli

ENCODER = "num_hidden_layers = 2, hidden_size = 32, num_attention_heads = 2, intermediate_size = 64, vocab_size = 1000"
DECODER = ("num_hidden_layers = 2, hidden_size = 32, num_attention_heads = 2, intermediate_size = 64, vocab_size = 1000, "
           "max_position_embeddings = 64")
SEQUENCE = "batch = [1, 2, 4]\nsequence = [1, 16, 32]"
IMAGE = "batch = [1, 2, 4]"

# (architecture, task, config, shapes, expected): "pass", or the words of the refusal.
SWEEP = [
    ("bert", "feature-extraction", ENCODER + ", max_position_embeddings = 64", SEQUENCE, "pass"),
    ("roberta", "feature-extraction", ENCODER + ", max_position_embeddings = 66", SEQUENCE, "pass"),
    ("xlm-roberta", "sequence-classification", ENCODER + ", max_position_embeddings = 66", SEQUENCE, "pass"),
    ("mpnet", "feature-extraction", ENCODER + ", max_position_embeddings = 66", SEQUENCE, "pass"),
    ("distilbert", "token-classification", "n_layers = 2, dim = 32, n_heads = 2, hidden_dim = 64, vocab_size = 1000, "
     "max_position_embeddings = 64", SEQUENCE, "pass"),
    ("albert", "feature-extraction", ENCODER + ", embedding_size = 16, max_position_embeddings = 64", SEQUENCE, "pass"),
    ("electra", "feature-extraction", ENCODER + ", embedding_size = 16, max_position_embeddings = 64", SEQUENCE, "pass"),
    ("deberta-v2", "sequence-classification", ENCODER + ", max_position_embeddings = 64", SEQUENCE, "pass"),
    ("modernbert", "feature-extraction", "num_hidden_layers = 2, hidden_size = 32, num_attention_heads = 2, "
     "intermediate_size = 64, vocab_size = 1000, max_position_embeddings = 64, pad_token_id = 0, bos_token_id = 1, "
     "eos_token_id = 2, cls_token_id = 3, sep_token_id = 4", SEQUENCE, "pass"),
    ("gpt2", "causal-lm", "n_layer = 2, n_embd = 32, n_head = 2, vocab_size = 1000, n_positions = 64", SEQUENCE, "pass"),
    ("gpt2", "sequence-classification", "n_layer = 2, n_embd = 32, n_head = 2, vocab_size = 1000, n_positions = 64",
     SEQUENCE, "has no pad_token_id"),
    ("gpt2", "sequence-classification", "n_layer = 2, n_embd = 32, n_head = 2, vocab_size = 1000, n_positions = 64, "
     "pad_token_id = 0", SEQUENCE, "pass"),
    ("llama", "causal-lm", DECODER + ", num_key_value_heads = 1", SEQUENCE, "pass"),
    ("qwen2", "feature-extraction", DECODER + ", num_key_value_heads = 1", SEQUENCE, "pass"),
    ("opt", "causal-lm", "num_hidden_layers = 2, hidden_size = 32, num_attention_heads = 2, ffn_dim = 64, "
     "vocab_size = 1000, max_position_embeddings = 64, word_embed_proj_dim = 32", SEQUENCE, "pass"),
    ("bart", "feature-extraction", "encoder_layers = 1, decoder_layers = 1, d_model = 32, encoder_attention_heads = 2, "
     "decoder_attention_heads = 2, encoder_ffn_dim = 64, decoder_ffn_dim = 64, vocab_size = 1000, "
     "max_position_embeddings = 64", SEQUENCE, "pass"),
    ("t5", "feature-extraction", "num_layers = 1, d_model = 32, num_heads = 2, d_ff = 64, d_kv = 16, vocab_size = 100",
     SEQUENCE, "encoder-decoder model"),
    ("vit", "image-classification", "num_hidden_layers = 2, hidden_size = 32, num_attention_heads = 2, "
     "intermediate_size = 64, image_size = 32, patch_size = 8, num_labels = 3", IMAGE, "pass"),
    ("swin", "image-classification", "embed_dim = 16, depths = [1, 1], num_heads = [1, 2], image_size = 32, "
     "patch_size = 4, window_size = 4, num_labels = 3", IMAGE, "pass"),
    ("convnext", "image-classification", "hidden_sizes = [8, 16], depths = [1, 1], num_stages = 2, image_size = 32, "
     "num_labels = 3", IMAGE, "pass"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "task", "config", "shapes", "expected"), SWEEP,
                         ids=[f"{a}-{t}-{e.split()[0]}" for a, t, _, _, e in SWEEP])
def test_every_tiny_architecture_passes_or_is_refused_in_one_line(tmp_path, arch, task, config, shapes, expected):
    recipe = tmp_path / "r.toml"
    recipe.write_text(textwrap.dedent(f"""\
        [model]
        name = "sweep"
        source = "random"
        architecture = "{arch}"
        task = "{task}"
        config = {{ {config} }}

        [shapes]
        """) + shapes + "\n")
    code, _, stderr = cli("build", str(recipe), "--out", str(tmp_path / "out"))
    assert "Traceback" not in stderr, stderr
    if expected == "pass":
        assert code == 0, stderr
    else:
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and expected in lines[0], stderr
