"""LoRA: low-rank adapters on the linear layers of a frozen model, saved in the PEFT layout.

y = x Wᵀ + (alpha / r) · dropout(x) Aᵀ Bᵀ with W frozen, A (r, in) random and B (out, r) zero: a fresh adapter
changes nothing. `apply_lora` adapts chosen linears of every block in place and freezes the rest; `merge_lora` folds
the adapters into W; `save_adapters` / `load_adapters` write and read them alone, in PEFT's layout for HF models.
Choices
  - `LoRALinear` *is* an nn.Linear holding the replaced layer's very `weight` Parameter: parameter names
    (`hf_names`, `save_pretrained`, which writes the base weights alone) and every caller work unchanged.
  - Adapters are fp32 on any base dtype, with fp32 gradients; the forward casts them down to the activations'
    dtype, never the activations up (that would keep an fp32 copy of each adapted layer's input for backward:
    ~19 GB more for Llama-3.1-8B at 8 × 1312 tokens).
  - Merging adds (alpha/r)·B·A in fp32, then rounds once to W's dtype (bf16 loses updates below its rounding step).
Left out: bias adapters, DoRA / rsLoRA, several named adapters at once, quantised (QLoRA) bases.
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save

from checkpoint import atomic_write, save_model
from model import hf_names

# every linear of a block that can be adapted, in model order -> the submodule holding it
TARGETS = dict(wq="attn", wk="attn", wv="attn", wo="attn", w_gate="mlp", w_up="mlp", w_down="mlp")
ADAPTER_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PEFT wraps the HF model: base_model (LoraModel) . model (…ForCausalLM)


class LoRALinear(nn.Linear):
    """A frozen linear plus a trainable low-rank update; `weight` is the original layer's Parameter."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, generator=None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: that would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        A = torch.empty(rank, self.in_features, dtype=torch.float32)  # drawn on CPU: one generator for any device
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)  # what nn.Linear and PEFT use for A
        self.lora_A = nn.Parameter(A.to(base.weight.device))
        self.lora_B = nn.Parameter(self.lora_A.new_zeros(self.out_features, rank))  # fp32 too, on the same device
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)  # the adapters cast down, never x up
        return y + F.linear(F.linear(self.lora_dropout(x), A), B * self.scale).to(y.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + (alpha/r)·B·A, added in fp32 and rounded once to W's dtype."""
        return (self.weight.float() + self.scale * (self.lora_B.float() @ self.lora_A.float())).to(self.weight.dtype)


def lora_modules(model) -> dict[str, LoRALinear]:
    """Our module name ('layers.0.attn.wq') -> LoRALinear, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model, rank: int, alpha: float, dropout: float = 0.0, targets="wq,wk,wv,wo", seed: int = 0) -> list:
    """Adapt `targets` (of TARGETS; a list or "wq,wv") in every block, freeze the rest, and return the adapter
    parameters in model order. A is seeded by `seed`; adapters are made fp32 on the base weights' device,
    so give the model its device and dtype first (a later .to(bf16) would cast them too)."""
    targets = [t for t in targets.split(",") if t] if isinstance(targets, str) else list(targets)
    if rank <= 0 or not targets or set(targets) - set(TARGETS):
        raise ValueError(f"LoRA needs a rank > 0 (got {rank}) and targets among {tuple(TARGETS)} (got {targets})")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for block in model.layers:
        for name in [t for t in TARGETS if t in targets]:  # model order, whatever the order given
            parent = getattr(block, TARGETS[name])
            if isinstance(getattr(parent, name), LoRALinear):
                raise ValueError(f"{name} is already adapted")
            setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, dropout, generator=generator))
    return list(adapter_params(model).values())


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its base weight (W += (alpha/r)·B·A, in fp32) and put plain nn.Linear back."""
    for name, m in lora_modules(model).items():
        m.weight.copy_(m.merged_weight())
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias  # the same Parameters: names and tying unchanged
        model.set_submodule(name, plain)
    return model


def adapter_params(model) -> dict[str, nn.Parameter]:
    """PEFT tensor name ('base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight') -> adapter, in order."""
    out, table = {}, hf_names(model.cfg)
    for name, m in lora_modules(model).items():
        hf = PEFT_PREFIX + table[name + ".weight"].removesuffix(".weight")
        out.update({f"{hf}.lora_A.weight": m.lora_A, f"{hf}.lora_B.weight": m.lora_B})
    return out


def save_adapters(model, path, base_model: str = ""):
    """adapter_model.safetensors + adapter_config.json in `path` (PEFT's layout), each written atomically."""
    params = adapter_params(model)
    first = next(iter(lora_modules(model).values()))  # apply_lora gives every adapter the same rank, alpha, dropout
    os.makedirs(path, exist_ok=True)
    tensors = {k: p.detach().float().cpu() for k, p in params.items()}
    atomic_write(os.path.join(path, ADAPTER_FILE), save(tensors, metadata={"format": "pt"}))
    atomic_write(os.path.join(path, CONFIG_FILE), dict(  # target_modules: 'q_proj' of '….q_proj.lora_A.weight'
        peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model or None, r=first.rank,
        lora_alpha=first.alpha, lora_dropout=getattr(first.lora_dropout, "p", 0.0),
        target_modules=sorted({k.split(".")[-3] for k in params}), bias="none", fan_in_fan_out=False,
        inference_mode=True, init_lora_weights=True, modules_to_save=None, use_rslora=False, use_dora=False))


@torch.no_grad()
def load_adapters(model, path):
    """Load adapters saved by save_adapters (or by peft) into `model`, which is first adapted with the saved
    rank, alpha, dropout and targets if it has no adapters; adapted, it must match them. Returns their params."""
    with open(os.path.join(path, CONFIG_FILE)) as f:
        config = json.load(f)
    if config.get("use_dora") or config.get("use_rslora") or config.get("bias", "none") != "none":
        raise ValueError(f"{path}: DoRA, rsLoRA and bias adapters are not supported")
    table = hf_names(model.cfg)  # PEFT's target_modules ('q_proj') -> ours ('wq')
    to_short = {table[f"layers.0.{part}.{t}.weight"].split(".")[-2]: t for t, part in TARGETS.items()}
    if not set(config["target_modules"]) <= set(to_short):
        raise ValueError(f"{path}: target_modules {config['target_modules']} not all in {sorted(to_short)}")
    if not lora_modules(model):
        apply_lora(model, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0),
                   [to_short[t] for t in config["target_modules"]])
    params, state = adapter_params(model), load_file(os.path.join(path, ADAPTER_FILE))
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    m = next(iter(lora_modules(model).values()))  # apply_lora gives every adapter the same rank and alpha
    if missing or extra or (m.rank, m.alpha) != (config["r"], config["lora_alpha"]):
        raise ValueError(f"{path}: adapters (r={config['r']}, alpha={config['lora_alpha']}) do not match the model's "
                         f"(r={m.rank}, alpha={m.alpha}; missing {missing[:3]}, extra {extra[:3]})")
    for key, p in params.items():
        p.copy_(state[key])
    return list(params.values())


def save_merged(model, path):
    """Write the merged model (W + (alpha/r)·B·A) as a Hugging Face checkpoint, leaving `model` untouched:
    the same files as `save_pretrained` after `merge_lora`, so training goes on from the unmerged weights."""
    mods = {name + ".weight": m for name, m in lora_modules(model).items()}
    save_model(model, path, weight=lambda name, w: mods[name].merged_weight() if name in mods else w)
