"""model.py: config parsing, HF checkpoint load/save, RoPE, GQA, sliding window, log-prob helper."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from conftest import tiny_hf_config, tiny_model

from model import (ModelConfig, Transformer, apply_rope, attention_mask, rope_cos_sin, rope_inv_freq,
                   token_logprobs)

LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=64)
CONFIGS = {
    "llama": dict(model_type="llama"),
    "llama3_tied": dict(model_type="llama", tie_word_embeddings=True, rope_scaling=LLAMA3_SCALING),
    "mistral_window": dict(model_type="mistral", sliding_window=6),
    "mistral_nemo_head_dim": dict(model_type="mistral", head_dim=24),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_load_gives_identical_logits(tmp_path, name):
    model = tiny_model(**CONFIGS[name])
    model.save_pretrained(tmp_path)
    loaded = Transformer.from_pretrained(tmp_path)
    x = torch.randint(0, 101, (2, 30))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.cfg.hf == json.loads((tmp_path / "config.json").read_text()) | {"torch_dtype": "float32"}


def test_sharded_load_and_no_stale_index(tmp_path):
    """A sharded checkpoint (as the Hub holds large models) loads; saving writes one file and drops the index."""
    model = tiny_model()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    names = sorted(tensors)
    shards = {f"model-0000{i + 1}-of-00003.safetensors": names[i::3] for i in range(3)}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, tmp_path / file)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: file for file, part in shards.items() for n in part}}))
    x = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(x), Transformer.from_pretrained(tmp_path)(x))
    model.save_pretrained(tmp_path)  # back to one file: the index must not shadow it
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_bf16_load_keeps_fp32_rope_and_stays_close_to_fp32(tmp_path):
    """A regression guard: RoPE angles rounded to bf16 (a buffer cast with the weights) drift at long
    positions; the bf16 model must stay within bf16 noise of the fp32 one."""
    reference = tiny_model()
    reference.save_pretrained(tmp_path)
    model = Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.inv_freq.dtype == torch.float32
    x = torch.randint(0, 101, (1, 64))
    with torch.no_grad():
        diff = (model(x).float().log_softmax(-1) - reference(x).log_softmax(-1)).abs()
    assert diff.mean() < 0.05, diff.mean()


def test_matches_huggingface_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    for i, overrides in enumerate(CONFIGS.values()):
        model = tiny_model(**overrides)
        model.save_pretrained(tmp_path / str(i))
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / str(i), dtype=torch.float32).eval()
        x = torch.randint(0, 101, (2, 30))
        with torch.no_grad():
            torch.testing.assert_close(model(x), hf(x).logits, atol=1e-5, rtol=1e-5)


def test_rope_plain_against_formula():
    cfg = ModelConfig.from_hf(tiny_hf_config(head_dim=8, rope_theta=500.0))
    inv = rope_inv_freq(cfg)
    torch.testing.assert_close(inv, torch.tensor([500.0 ** (-2 * j / 8) for j in range(4)]))
    # rotate-half layout: pair (j, j + d/2) is rotated by angle pos * inv_freq[j]
    x = torch.randn(1, 1, 3, 8)
    cos, sin = rope_cos_sin(inv, torch.arange(3), torch.float32)
    y = apply_rope(x, cos, sin)
    for pos in range(3):
        for j in range(4):
            a = pos * inv[j].item()
            x1, x2 = x[0, 0, pos, j].item(), x[0, 0, pos, j + 4].item()
            assert math.isclose(y[0, 0, pos, j].item(), x1 * math.cos(a) - x2 * math.sin(a), abs_tol=1e-5)
            assert math.isclose(y[0, 0, pos, j + 4].item(), x2 * math.cos(a) + x1 * math.sin(a), abs_tol=1e-5)


def test_rope_llama3_scaling_against_formula():
    cfg = ModelConfig.from_hf(tiny_hf_config(head_dim=64, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING))
    inv = rope_inv_freq(cfg)
    base = [500000.0 ** (-2 * j / 64) for j in range(32)]
    old, lo, hi, factor = 64, 1.0, 4.0, 8.0
    for j, f in enumerate(base):
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            expected = f
        elif wavelen > old / lo:
            expected = f / factor
        else:
            s = (old / wavelen - lo) / (hi - lo)
            expected = (1 - s) * f / factor + s * f
        assert math.isclose(inv[j].item(), expected, rel_tol=1e-5), j
    assert inv[0].item() == pytest.approx(base[0]) and inv[-1].item() == pytest.approx(base[-1] / factor)


def test_gqa_equals_repeated_heads():
    model = tiny_model(num_attention_heads=4, num_key_value_heads=2)
    x = torch.randn(1, 7, 64)
    attn = model.layers[0].attn
    cos, sin = rope_cos_sin(model.inv_freq, torch.arange(7), torch.float32)
    with torch.no_grad():
        out = attn(x, cos, sin, None)
        q = apply_rope(attn.wq(x).view(1, 7, 4, 16).transpose(1, 2), cos, sin)
        k = apply_rope(attn.wk(x).view(1, 7, 2, 16).transpose(1, 2), cos, sin).repeat_interleave(2, dim=1)
        v = attn.wv(x).view(1, 7, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)
        scores = (q @ k.transpose(-1, -2) / 4.0).masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), -1e9)
        expected = attn.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 7, 64))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_sliding_window_mask_against_direct_construction():
    window, T = 3, 8
    mask = attention_mask(torch.arange(T), torch.arange(T), window)[0, 0]
    for i in range(T):
        for j in range(T):
            assert mask[i, j].item() == (j <= i and i - j < window)
    # with left padding a pad key is hidden from every query except itself
    valid = torch.tensor([[False, False, True, True, True, True, True, True]])
    padded = attention_mask(torch.arange(T), torch.arange(T), None, valid)[0, 0]
    assert not padded[5, 0] and padded[0, 0] and padded[5, 2]


def test_sliding_window_changes_long_range_logits_only():
    windowed = tiny_model("mistral", sliding_window=4)
    full = tiny_model("mistral", sliding_window=None)
    x = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        a, b = windowed(x), full(x)
    torch.testing.assert_close(a[:, :4], b[:, :4])  # the first `window` positions see everything anyway
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_token_logprobs_match_full_log_softmax_and_gradients():
    model = tiny_model()
    x = torch.randint(0, 101, (2, 10))
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[0, 3:7] = True
    mask[1, 8:] = True
    lp = token_logprobs(model, x, mask, chunk=3)
    full = model(x)[:, :-1].float().log_softmax(-1).gather(-1, x[:, 1:, None]).squeeze(-1)
    expected = F.pad(full * mask[:, 1:], (1, 0))
    torch.testing.assert_close(lp, expected, atol=1e-5, rtol=1e-5)
    (g1,) = torch.autograd.grad(lp.sum(), model.layers[0].attn.wq.weight)
    (g2,) = torch.autograd.grad(expected.sum(), model.layers[0].attn.wq.weight)
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)


def test_activation_checkpointing_keeps_gradients():
    model = tiny_model().train()
    x = torch.randint(0, 101, (2, 9))
    grads = []
    for flag in (False, True):
        model.activation_checkpointing = flag
        model.zero_grad()
        model(x).float().logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("change, message", [
    (dict(model_type="gpt2"), "model_type 'gpt2' is not supported"),
    (dict(rope_scaling=dict(rope_type="yarn", factor=4.0)), "rope scaling type 'yarn' is not implemented"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
])
def test_unsupported_config_is_a_clear_error(tmp_path, change, message):
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config(**change)))
    with pytest.raises(ValueError, match=message) as err:
        Transformer.from_pretrained(tmp_path)
    assert "config.json" in str(err.value)


def test_missing_files_tensors_and_wrong_shapes_are_clear_errors(tmp_path):
    from safetensors.torch import load_file, save_file
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        Transformer.from_pretrained(tmp_path)
    tiny_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, weights)
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        Transformer.from_pretrained(tmp_path)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(5, 5)
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' has shape \(5, 5\)"):
        Transformer.from_pretrained(tmp_path)
    os.remove(weights)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Transformer.from_pretrained(tmp_path)
