"""memory.py: exact counts match the model, the activation rule of thumb holds, the README table is current
(it is generated here, by `readme_table`)."""
import itertools
import os
import re

import pytest
import torch
from conftest import ROOT, tiny_model

from lora import apply_lora
from memory import COMPONENTS, GiB, activations_per_token_layer, memory_plan, param_count
from model import ModelConfig

PLAN = dict(K=8, B=2, seq_len=128, weight_bytes=2, master_fp32=True)
LLAMAS = {  # the README table's models, from the Hub's config.json: vocab, dim, layers, heads, kv heads, head dim, ffn
    "llama-3.2-1b": ModelConfig(128256, 2048, 16, 32, 8, 64, 8192, tie_embeddings=True),
    "llama-3.2-3b": ModelConfig(128256, 3072, 28, 24, 8, 128, 8192, tie_embeddings=True),
    "llama-3.1-8b": ModelConfig(128256, 4096, 32, 32, 8, 128, 14336),
}


def readme_table(budget_gb=80.0, seq_len=256 + 1024 + 32, K=8, rank=16) -> str:
    """Markdown: the three Llama sizes, full fine-tuning (bf16-mixed) vs LoRA (bf16 base), ± checkpointing."""
    lines = [f"| model | training | act. ckpt | weights | grads | optimizer | activations | KV cache | total "
             f"| fits {budget_gb:g} GiB |", "|---|---|---|---:|---:|---:|---:|---:|---:|:-:|"]
    for name, lora_rank, ckpt in itertools.product(LLAMAS, (0, rank), (False, True)):
        p = memory_plan(LLAMAS[name], K=K, B=1, seq_len=seq_len, weight_bytes=2, master_fp32=True,
                        lora_rank=lora_rank, checkpointing=ckpt, budget_gb=budget_gb)
        how = f"LoRA r={lora_rank} q,k,v,o" if lora_rank else "full, bf16-mixed"
        cells = " | ".join(f"{p[c] / GiB:.1f}" for c in (*COMPONENTS, "total"))
        lines.append(f"| {name} | {how} | {'yes' if ckpt else 'no'} | {cells} | {'yes' if p['fits'] else 'no'} |")
    return "\n".join(lines)


@pytest.mark.parametrize("tied", [False, True])
def test_param_count_matches_the_model(tied):
    model = tiny_model(tie_word_embeddings=tied)
    assert param_count(model.cfg) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("targets", [("wq", "wk", "wv", "wo"), ("wv", "w_down")])
def test_lora_param_count_matches_apply_lora(targets):
    model = tiny_model()
    params = apply_lora(model, rank=4, alpha=8, targets=targets)
    assert param_count(model.cfg, 4, targets) == sum(p.numel() for p in params)


def saved_bytes(model, tokens):
    """Bytes of every tensor autograd keeps for backward in model.hidden (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.hidden(tokens)
    return sum(seen.values())


@pytest.mark.parametrize("mixed", [False, True])
def test_activation_rule_of_thumb_within_15_percent_of_autograd(mixed):
    """Full fine-tuning, fp32 and bf16-mixed (fp32 weights, bf16 autocast on CPU: the GPU's code path)."""
    model = tiny_model()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):  # two lengths: the per-token slope,
        small, large = (saved_bytes(model, torch.randint(0, 101, (4, n))) for n in (32, 96))  # not weight casts
    measured = (large - small) / (4 * 64)
    predicted = model.cfg.n_layers * activations_per_token_layer(model.cfg, 4, 2 if mixed else 4)
    assert abs(measured - predicted) < 0.15 * measured, (measured, predicted)


def test_exact_components_for_llama_8b_full_and_lora():
    cfg = LLAMAS["llama-3.1-8b"]
    full = memory_plan(cfg, **PLAN, checkpointing=True)
    lora = memory_plan(cfg, **PLAN, lora_rank=16, checkpointing=True)
    n = 8_030_261_248  # Llama-3.1-8B
    assert full["params"] == n and full["weights"] == 2 * n and full["gradients"] == 4 * n
    assert full["optimizer"] == 12 * n  # two fp32 moments + the fp32 master
    assert lora["trainable_params"] == 13_631_488  # r=16 on q,k,v,o: PEFT's count for this model
    assert lora["optimizer"] == 8 * lora["trainable_params"] and lora["total"] < full["total"]
    assert full["kv_cache"] == 2 * 8 * 128 * 32 * 2 * 8 * 128 * 2  # B·K rows × seq × layers × k,v × kv width × bf16


def test_checkpointing_smaller_and_the_fits_flag():
    cfg = LLAMAS["llama-3.2-1b"]
    off, on = (memory_plan(cfg, **PLAN, checkpointing=c) for c in (False, True))
    assert on["activations"] < off["activations"] and on["fits"] is None
    assert memory_plan(cfg, **PLAN, budget_gb=1000)["fits"] is True
    assert memory_plan(cfg, **PLAN, budget_gb=2)["fits"] is False


def test_readme_table_is_what_memory_plan_gives_now():
    """The README's memory table is this test's `readme_table`: it must not drift from memory.py."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    table = readme_table()
    assert table in readme, f"README.md's memory table is stale; the current one:\n{table}"
    assert len(re.findall(r"^\| llama", table, re.M)) == 12
