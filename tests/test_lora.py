"""lora.py: adapters change nothing at init, merge exactly, train alone, round-trip, and load in HF / PEFT."""
import copy
import json

import pytest
import torch
from conftest import tiny_model

from lora import (LoRALinear, apply_lora, load_adapters, lora_modules, merge_lora, save_adapters,
                  save_merged)
from model import Transformer, token_logprobs
from sample import generate

ALL = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def perturb(params, seed=1):
    """A few random 'updates' to the adapters (B starts at zero, so a fresh adapter is a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def logits(model, x):
    with torch.no_grad():
        return model(x)


def test_fresh_adapter_changes_nothing_and_keeps_names():
    model = tiny_model()
    names = [n for n, _ in model.named_parameters()]
    x = torch.randint(0, 101, (2, 16))
    before = logits(model, x)
    params = apply_lora(model, rank=4, alpha=8, targets=ALL)
    assert torch.equal(logits(model, x), before)
    assert len(params) == 2 * 7 * model.cfg.n_layers
    assert isinstance(model.layers[0].attn.wq, torch.nn.Linear)  # still a Linear, weight at the same path
    adapted = [n for n, _ in model.named_parameters()]
    assert [n for n in adapted if "lora_" not in n] == names
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("overrides", [{}, dict(tie_word_embeddings=True)])
def test_merge_gives_the_same_logits(overrides):
    model = tiny_model(**overrides)
    x = torch.randint(0, 101, (2, 16))
    perturb(apply_lora(model, rank=4, alpha=16, targets=ALL))
    adapted = logits(model, x)
    assert not torch.allclose(adapted, logits(tiny_model(**overrides), x), atol=1e-3)  # the adapters do something
    merge_lora(model)
    assert not lora_modules(model)
    torch.testing.assert_close(logits(model, x), adapted, atol=1e-5, rtol=1e-5)


def test_only_adapters_get_gradients_through_token_logprobs():
    model = tiny_model()
    params = apply_lora(model, rank=2, alpha=4)
    perturb(params)
    x = torch.randint(0, 101, (3, 12))
    mask = torch.ones_like(x, dtype=torch.bool)
    token_logprobs(model, x, mask, chunk=8).sum().backward()  # several chunks: the recompute path too
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_sampler_and_cache_go_through_the_adapters():
    model = tiny_model()
    perturb(apply_lora(model, rank=4, alpha=8, targets=ALL))
    merged = merge_lora(copy.deepcopy(model))
    prompts = [[1, 2, 3, 4], [5, 6]]
    a = generate(model, prompts, num_samples=2, max_new_tokens=8, temperature=0)
    b = generate(merged, prompts, num_samples=2, max_new_tokens=8, temperature=0)
    assert a.tokens == b.tokens


def test_save_and_load_adapters_round_trip(tmp_path):
    model = tiny_model()
    perturb(apply_lora(model, rank=4, alpha=8, dropout=0.1, targets=("wq", "wv", "w_down")))
    model.eval()
    save_adapters(model, tmp_path, base_model="tiny")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["lora_dropout"] == 0.1
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    from safetensors import safe_open
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in f.keys()
    fresh = tiny_model()  # same seed, same base; load_adapters adapts it from the config
    load_adapters(fresh, tmp_path)
    fresh.eval()
    x = torch.randint(0, 101, (2, 16))
    assert torch.equal(logits(fresh, x), logits(model, x))
    assert not list(tmp_path.glob("*.tmp"))
    wrong = tiny_model()
    apply_lora(wrong, rank=2, alpha=8, targets=("wq", "wv", "w_down"))
    with pytest.raises(ValueError):
        load_adapters(wrong, tmp_path)


def test_saved_checkpoints_base_and_merged(tmp_path):
    model = tiny_model()
    x = torch.randint(0, 101, (2, 16))
    base_logits = logits(model, x)
    perturb(apply_lora(model, rank=4, alpha=8, targets=ALL))
    # save_pretrained of an adapted model writes the base weights, adapters left out
    model.save_pretrained(tmp_path / "base")
    torch.testing.assert_close(logits(Transformer.from_pretrained(tmp_path / "base"), x), base_logits)
    # save_merged writes W + (alpha/r)·B·A and leaves the model adapted
    save_merged(model, tmp_path / "merged")
    assert lora_modules(model)
    m = model.layers[1].mlp.w_up
    from safetensors import safe_open
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        w = f.get_tensor("model.layers.1.mlp.up_proj.weight")
    torch.testing.assert_close(w, m.weight + 2.0 * m.lora_B @ m.lora_A)
    adapted = logits(model, x)
    torch.testing.assert_close(logits(Transformer.from_pretrained(tmp_path / "merged"), x), adapted,
                               atol=1e-5, rtol=1e-5)
    # merge in place, then the ordinary save_pretrained: the same files, loadable by transformers too
    merge_lora(model).save_pretrained(tmp_path / "merged2")
    torch.testing.assert_close(logits(Transformer.from_pretrained(tmp_path / "merged2"), x), adapted,
                               atol=1e-5, rtol=1e-5)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, adapted, atol=1e-5, rtol=1e-5)


def test_bf16_base_with_fp32_adapters():
    model = tiny_model().to(torch.bfloat16)
    params = apply_lora(model, rank=4, alpha=8)
    assert all(p.dtype == torch.float32 for p in params) and model.layers[0].attn.wq.weight.dtype == torch.bfloat16
    perturb(params)
    x = torch.randint(0, 101, (2, 10))
    lp = token_logprobs(model, x, torch.ones_like(x, dtype=torch.bool))
    lp.sum().backward()
    assert torch.isfinite(lp).all()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    with torch.no_grad():  # the blocks run in bf16; the vocabulary projection always gives fp32 logits
        assert model.hidden(x).dtype == torch.bfloat16 and model(x).dtype == torch.float32


def test_peft_loads_our_adapters(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = tiny_model()
    model.save_pretrained(tmp_path / "base")
    perturb(apply_lora(model, rank=4, alpha=8, targets=ALL))
    save_adapters(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, logits(model, x), atol=1e-5, rtol=1e-5)
    # and the other way: adapters peft saves load into our model
    hf.save_pretrained(tmp_path / "from_peft")
    ours = tiny_model()
    load_adapters(ours, tmp_path / "from_peft")
    assert torch.equal(logits(ours, x), logits(model, x))
    assert isinstance(ours.layers[0].mlp.w_down, LoRALinear)


# ---- train.py end to end with --lora_rank (skipped until train.py has the LoRA flags) ----

def byte_level_tokenizer():
    """A 256-byte BPE tokenizer.json with no merges plus chatml specials (ids 256..258)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    chars = map(chr, printable + list(range(256, 256 + len(others))))
    vocab = {ch: b for b, ch in zip(printable + others, chars)}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return dict(version="1.0", normalizer=None,
                pre_tokenizer=dict(type="ByteLevel", add_prefix_space=False, trim_offsets=True, use_regex=True),
                added_tokens=[dict(id=256 + i, content=s, special=True) for i, s in enumerate(specials)],
                model=dict(type="BPE", vocab=vocab, merges=[]))


def test_train_with_lora_resumes_exactly_and_saves_adapters_and_merged(tmp_path):
    import os
    import subprocess
    import sys

    import train
    from conftest import ROOT
    if "lora_rank" not in train.DEFAULTS:
        pytest.skip("train.py has no --lora_rank yet")
    model_dir, data = tmp_path / "model", tmp_path / "train.jsonl"
    tiny_model(vocab_size=259, max_position_embeddings=512, seed=7).save_pretrained(model_dir)
    (model_dir / "tokenizer.json").write_text(json.dumps(byte_level_tokenizer()))
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    (model_dir / "tokenizer_config.json").write_text(json.dumps(dict(chat_template=template)))
    data.write_text("".join(json.dumps(dict(question=f"{a}+{b}=?", answer=str(a + b))) + "\n"
                            for a, b in [(1, 2), (3, 4), (5, 6)]))

    def run(out, *args):
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--model_dir={model_dir}", f"--data={data}",
               f"--out_dir={out}", "--questions_per_step=2", "--samples_per_question=2", "--max_think_tokens=4",
               "--eval_questions=0", "--device=cpu", "--lr=1e-2", "--lora_rank=4", "--lora_targets=wq,wv,w_up", *args]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    plan = run(tmp_path / "dry", "--dry_run=True")
    assert "memory plan" in plan and "fits in" in plan and not (tmp_path / "dry").exists()
    a, b = tmp_path / "a", tmp_path / "b"
    run(a, "--steps=2")
    run(b, "--steps=1")
    assert "resumed from" in run(b, "--steps=2", "--resume=True")
    from safetensors.torch import load_file
    ta, tb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert ta.keys() == tb.keys() and any(t.abs().sum() > 0 for n, t in ta.items() if "lora_B" in n)
    for name in ta:
        torch.testing.assert_close(tb[name], ta[name], atol=1e-6, rtol=0, msg=name)
    # out_dir's model is the merged one; the base checkpoint is untouched; base + adapters = merged
    x = torch.randint(0, 259, (2, 12))
    base = Transformer.from_pretrained(model_dir)
    base_logits = logits(base, x)
    load_adapters(base, a)
    torch.testing.assert_close(logits(Transformer.from_pretrained(a), x), logits(base, x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(base_logits, logits(base, x))
    assert torch.load(b / "train_state.pt", weights_only=False)["step"] == 2
