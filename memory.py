"""Memory plan: will an NRT run fit on this GPU? Counted from config.json, before loading any weight.

    python train.py --dry_run=True --model_dir=DIR ...   # the plan of a training config (config.json, tokenizer)

total = weights + gradients + optimizer + max(activations, KV cache) + overhead (1 GiB of CUDA context).
Exact: weights in the working dtype (+ fp32 LoRA adapters); a gradient per trained parameter (fp32 for fp32
masters or adapters); AdamW's two fp32 moments (+ the fp32 master when bf16-mixed keeps bf16 weights for the
math); the sampler's KV cache for all B·K rollout rows. A rule of thumb: the activations autograd keeps for
one micro-batch (K rows), 6·r·d + b·(2q + 2kv + 4f) bytes per token per layer (d = dim, q/kv/f = query /
key-value / ffn widths, r/b = bytes of the residual stream / matmul outputs: 4/4 fp32, 4/2 bf16-mixed), within
15 % of autograd for full fine-tuning (tests/test_memory.py), an overestimate for LoRA; checkpointing keeps
r·d per token per layer plus one block's worth; plus the vocabulary projection (1024 rows × vocab × 16 bytes).
Left out: allocator fragmentation (keep ~10 % headroom), torch.compile's buffers.
"""
import os

import torch

from checkpoint import load_config
from cli import resolve_device
from data import answer_ids, load_rows, prompt_ids
from model import ModelConfig
from tokenizer import Tokenizer

GiB = 2**30
COMPONENTS = ("weights", "gradients", "optimizer", "activations", "kv_cache")


def param_count(cfg: ModelConfig, lora_rank=0, targets=()) -> int:
    """Parameters of the model, or of its LoRA adapters when lora_rank > 0."""
    d, q, kv, f = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_dim
    shapes = dict(wq=(d, q), wk=(d, kv), wv=(d, kv), wo=(q, d), w_gate=(d, f), w_up=(d, f), w_down=(f, d))  # (in, out)
    if lora_rank:
        return cfg.n_layers * sum(lora_rank * sum(shapes[t]) for t in targets)
    per_layer = sum(i * o for i, o in shapes.values()) + 2 * cfg.dim
    return cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2) + cfg.n_layers * per_layer + cfg.dim


def activations_per_token_layer(cfg: ModelConfig, r: int, b: int) -> int:
    """The rule of thumb of the module docstring (full fine-tuning, no checkpointing)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return 6 * r * cfg.dim + b * (2 * q + 2 * kv + 4 * cfg.ffn_dim)


def memory_plan(cfg: ModelConfig, *, K, B, seq_len, weight_bytes, master_fp32, lora_rank=0,
                lora_targets=("wq", "wk", "wv", "wo"), checkpointing=False, budget_gb=None, overhead_gb=1.0):
    """Bytes of one NRT training step by component (a dict), and whether the total fits budget_gb.
    seq_len: tokens of one training row, prompt + trace + delimiter + answer (the sampler's cache holds fewer)."""
    n, n_train = param_count(cfg), param_count(cfg, lora_rank, lora_targets)  # the same when lora_rank = 0
    master = master_fp32 and weight_bytes < 4 and not lora_rank
    r, b = (4 if master else weight_bytes), weight_bytes
    per_layer, tokens = activations_per_token_layer(cfg, r, b), K * seq_len
    kept = r * cfg.dim if checkpointing else per_layer
    plan = dict(params=n, trainable_params=n_train, seq_len=seq_len,
                weights=n * weight_bytes + (4 * n_train if lora_rank else 0),
                gradients=n_train * (4 if master or lora_rank else weight_bytes),
                optimizer=n_train * (8 + (4 if master else 0)),
                activations=cfg.n_layers * tokens * kept + (tokens * per_layer if checkpointing else 0)
                + min(1024, tokens) * cfg.vocab_size * 16,
                kv_cache=B * K * seq_len * cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * b,
                overhead=int(overhead_gb * GiB), budget=None if budget_gb is None else int(budget_gb * GiB))
    plan["total"] = (plan["weights"] + plan["gradients"] + plan["optimizer"]
                     + max(plan["activations"], plan["kv_cache"]) + plan["overhead"])
    plan["fits"] = None if budget_gb is None else plan["total"] <= plan["budget"]
    return plan


def plan_training_run(cfg) -> dict:
    """train.py --dry_run=True: the plan for a training config, from config.json and the tokenizer alone, printed."""
    tok, device = Tokenizer.from_pretrained(cfg.model_dir), resolve_device(cfg.device)
    some = load_rows(cfg.data)[:2000]  # the longest prompt and answer among up to 2000 questions
    prompt = max(len(prompt_ids(tok, q["question"], cfg.instruction, cfg.system)) for q in some)
    answer = max(len(answer_ids(tok, q["answer"])) for q in some) + 8  # + the delimiter
    cuda = device.startswith("cuda")
    budget = cfg.gpu_mem_gb or (torch.cuda.get_device_properties(device).total_memory if cuda  # 0: the GPU's
                                else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / GiB  # or the machine's
    dtype = cfg.dtype if cfg.dtype != "auto" else "bf16-mixed" if cuda else "float32"  # as cli.resolve_precision
    plan = memory_plan(load_config(cfg.model_dir), K=cfg.samples_per_question, B=cfg.questions_per_step,
                       seq_len=prompt + cfg.max_think_tokens + answer, weight_bytes=4 if dtype == "float32" else 2,
                       master_fp32=dtype == "bf16-mixed", lora_rank=cfg.lora_rank,
                       lora_targets=cfg.lora_targets.split(","), checkpointing=cfg.activation_checkpointing,
                       budget_gb=budget, overhead_gb=1.0 if cuda else 0.5)
    print(f"memory plan ({device}, {cfg.questions_per_step} questions × {cfg.samples_per_question} traces, prompt ≤ "
          f"{prompt}, think ≤ {cfg.max_think_tokens}, answer ≤ {answer} tokens):\n  parameters "
          f"{plan['params'] / 1e6:,.1f}M, trained {plan['trainable_params'] / 1e6:,.2f}M, training rows of "
          f"{plan['seq_len']} tokens")
    for key in (*COMPONENTS, "overhead", "total"):
        print(f"  {key:<12} {plan[key] / GiB:>8.1f} GiB" + ("   (rule of thumb)" if key == "activations" else ""))
    print(f"  {'fits' if plan['fits'] else 'DOES NOT FIT'} in {plan['budget'] / GiB:.1f} GiB "
          f"({100 * plan['total'] / plan['budget']:.0f} %)")
    return plan
