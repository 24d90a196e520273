"""LoRA: low-rank adapters on the linear layers of a frozen model, saved in the PEFT layout.

What it is
  y = x Wᵀ + (alpha / r) · dropout(x) Aᵀ Bᵀ, with W frozen, A (r, in) random and B (out, r) zero, so a
  fresh adapter changes nothing. `apply_lora` adapts chosen linears of every block in place and freezes
  everything else; `merge_lora` folds the adapters into W; `save_adapters` / `load_adapters` write and
  read the adapters alone, in the layout the `peft` library uses (adapter_model.safetensors +
  adapter_config.json), so `peft` can load them onto the Hugging Face model that `save_pretrained` writes.

Choices
  - `LoRALinear` *is* an `nn.Linear` and keeps the very `weight` Parameter of the layer it replaces: the
    base weight is still named `layers.0.attn.wq.weight`, so `hf_names`, `save_pretrained` (which then
    writes the base weights, adapters left out) and every caller of the model work unchanged. The
    sampler, the scoring passes and `token_logprobs` all go through `LoRALinear.forward`.
  - Adapters live in fp32 whatever the base dtype (a bf16 base on a GPU), like master weights in mixed
    precision: the forward casts them to the activations' dtype (casting the activations up instead
    would keep an fp32 copy of every adapted layer's input for backward: ~19 GB more for Llama-3.1-8B
    at 8 × 1312 tokens), and their gradients arrive in fp32. With fp32 activations (CPU) the whole
    path is fp32; under CUDA autocast the two small matmuls run in bf16 like every other linear.
  - Merging computes W + (alpha/r)·B·A in fp32 and rounds once to W's dtype (in bf16 an update much
    smaller than W's rounding step is lost: that is bf16, not the merge).

Left out
  Bias adapters, DoRA / rsLoRA variants, several named adapters at once, quantised (QLoRA) bases.
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import atomic_write, save_model
from model import hf_names

ATTN_TARGETS = ("wq", "wk", "wv", "wo")
MLP_TARGETS = ("w_gate", "w_up", "w_down")
ADAPTER_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PEFT wraps the HF model: base_model (LoraModel) . model (…ForCausalLM)


class LoRALinear(nn.Linear):
    """A frozen linear plus a trainable low-rank update; `weight` is the original layer's Parameter."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, dtype=torch.float32,
                 generator: torch.Generator | None = None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: that would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        device = base.weight.device
        A = torch.empty(rank, self.in_features, dtype=dtype)  # drawn on CPU: one generator for any device
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)  # what nn.Linear and PEFT use for A
        self.lora_A = nn.Parameter(A.to(device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        # The low-rank path runs in x's dtype: the fp32 adapters are cast down (r × in, tiny), never x up,
        # which would keep an fp32 copy of the input alive for backward in every adapted layer.
        A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return y + F.linear(F.linear(self.lora_dropout(x), A), B * self.scale).to(y.dtype)

    def delta(self) -> torch.Tensor:
        """(alpha/r)·B·A in fp32: what merging adds to the weight."""
        return self.scale * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    def extra_repr(self):
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def lora_modules(model) -> dict[str, LoRALinear]:
    """Our module name ('layers.0.attn.wq') -> LoRALinear, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model, rank: int, alpha: float, dropout: float = 0.0, targets=ATTN_TARGETS, seed: int = 0) -> list:
    """Adapt `targets` (any of wq wk wv wo w_gate w_up w_down) in every block; freeze every other parameter.

    Returns the adapter parameters in model order (what the optimizer should get). A is drawn from a
    generator seeded with `seed`, so a run is reproducible. Adapters are created fp32 on the base
    weights' device: give the model its device and dtype first (a later .to(bf16) would cast them too)."""
    if isinstance(targets, str):
        targets = [t for t in targets.split(",") if t]
    unknown = set(targets) - set(ATTN_TARGETS + MLP_TARGETS)
    if unknown or not targets:
        raise ValueError(f"LoRA targets must be among {ATTN_TARGETS + MLP_TARGETS}, got {list(targets)}")
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    model.requires_grad_(False)
    params, generator = [], torch.Generator().manual_seed(seed)
    for block in model.layers:
        for name in [t for t in ATTN_TARGETS + MLP_TARGETS if t in targets]:  # model order, whatever the order given
            parent = block.attn if name in ATTN_TARGETS else block.mlp
            base = getattr(parent, name)
            if isinstance(base, LoRALinear):
                raise ValueError(f"{name} is already adapted")
            adapted = LoRALinear(base, rank, alpha, dropout, generator=generator)
            setattr(parent, name, adapted)
            params += [adapted.lora_A, adapted.lora_B]
    return params


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its base weight (W += (alpha/r)·B·A, in fp32) and put plain nn.Linear back."""
    for name, m in lora_modules(model).items():
        m.weight.copy_((m.weight.float() + m.delta()).to(m.weight.dtype))
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias  # the same Parameters: names and tying unchanged
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, plain)
    return model


# ---- the PEFT file layout ----

def _hf_module_names(model) -> dict[str, str]:
    """Our module name -> the HF module name, e.g. 'layers.0.attn.wq' -> 'model.layers.0.self_attn.q_proj'."""
    table = hf_names(model.cfg)
    return {name: table[name + ".weight"].removesuffix(".weight") for name in lora_modules(model)}


def _hf_target_names(model, targets) -> dict[str, str]:
    """Short target ('wq') <-> HF leaf module name ('q_proj'), read from hf_names: one table, not two."""
    table = hf_names(model.cfg)
    short = {"wq": "attn", "wk": "attn", "wv": "attn", "wo": "attn", "w_gate": "mlp", "w_up": "mlp", "w_down": "mlp"}
    return {t: table[f"layers.0.{short[t]}.{t}.weight"].split(".")[-2] for t in targets}


def adapter_state(model) -> dict[str, torch.Tensor]:
    """PEFT tensor names -> adapter tensors (fp32, on CPU)."""
    out, mods = {}, lora_modules(model)
    for name, hf in _hf_module_names(model).items():
        m = mods[name]
        out[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = m.lora_A.detach().float().contiguous().cpu()
        out[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = m.lora_B.detach().float().contiguous().cpu()
    return out


def save_adapters(model, path, base_model: str = ""):
    """adapter_model.safetensors + adapter_config.json in `path` (PEFT's layout), each written atomically."""
    from safetensors.torch import save_file
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters to save")
    first = next(iter(mods.values()))
    targets = sorted({name.rsplit(".", 1)[1] for name in mods})
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, ADAPTER_FILE + ".tmp")
    save_file(adapter_state(model), tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(path, ADAPTER_FILE))
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model or None,
                  r=first.rank, lora_alpha=first.alpha, lora_dropout=dropout,
                  target_modules=sorted(_hf_target_names(model, targets).values()),
                  bias="none", fan_in_fan_out=False, inference_mode=True, init_lora_weights=True,
                  modules_to_save=None, use_rslora=False, use_dora=False)
    atomic_write(os.path.join(path, CONFIG_FILE), json.dumps(config, indent=2).encode())


def load_adapters(model, path):
    """Load adapters saved by save_adapters (or by peft, same layout) into `model`.

    A model without adapters is adapted first, with the rank, alpha, dropout and targets of the saved
    config; a model already adapted must match them. Returns the adapter parameters."""
    from safetensors.torch import load_file
    with open(os.path.join(path, CONFIG_FILE)) as f:
        config = json.load(f)
    if config.get("use_dora") or config.get("use_rslora") or config.get("bias", "none") != "none":
        raise ValueError(f"{path}: DoRA, rsLoRA and bias adapters are not supported")
    to_short = {hf: short for short, hf in _hf_target_names(model, ATTN_TARGETS + MLP_TARGETS).items()}
    targets = [to_short[t] for t in config["target_modules"] if t in to_short]
    if len(targets) != len(config["target_modules"]):
        raise ValueError(f"{path}: target_modules {config['target_modules']} not all in {sorted(to_short)}")
    if not lora_modules(model):
        apply_lora(model, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0),
                   [t for t in ATTN_TARGETS + MLP_TARGETS if t in targets])
    mods = lora_modules(model)
    state = load_file(os.path.join(path, ADAPTER_FILE))
    expected = adapter_state(model)
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(f"{path}: adapter tensors do not match the model (missing {missing[:3]}, extra {extra[:3]})")
    with torch.no_grad():
        for name, hf in _hf_module_names(model).items():
            m = mods[name]
            if m.rank != config["r"] or m.alpha != config["lora_alpha"]:
                raise ValueError(f"{path}: r={config['r']}, alpha={config['lora_alpha']} but the model has "
                                 f"r={m.rank}, alpha={m.alpha}")
            for side in ("A", "B"):
                t = state[f"{PEFT_PREFIX}{hf}.lora_{side}.weight"]
                getattr(m, f"lora_{side}").copy_(t)
    return [p for m in mods.values() for p in (m.lora_A, m.lora_B)]


@torch.no_grad()
def save_merged(model, path, max_shard_bytes=5 * 2**30):
    """Write the merged model (W + (alpha/r)·B·A) as a Hugging Face checkpoint, leaving `model` untouched:
    the same files as `save_pretrained` after `merge_lora`, so training goes on from the unmerged weights."""
    mods = lora_modules(model)

    def merged(name, w):
        m = mods.get(name.removesuffix(".weight"))
        return w if m is None else (w.float() + m.delta()).to(w.dtype)
    save_model(model, path, max_shard_bytes, weight=merged)
