"""The transformer: one decoder-only model for the Llama and Mistral checkpoint families.

What it is
  A from-scratch Llama/Mistral decoder (RMSNorm, rotary position embeddings, grouped-query attention with an
  optional sliding window, SwiGLU MLP), configured from a Hugging Face config.json. Checkpoint I/O: checkpoint.py.

Choices
  - Our module names are short; `hf_names()` is the single table that maps them to HF tensor names.
  - RoPE uses the rotate-half layout that HF checkpoints are saved in; angles are computed in fp32 on the fly for
    the positions at hand, so a 128k-context Llama 3.1 costs no 128k-row table.
  - Attention goes through `F.scaled_dot_product_attention`: SDPA's causal fast path without a cache, padding or
    a window, else a boolean mask built from position tensors. A KV cache (sample.KVCache) is written in place at
    a position tensor and attended over all its slots, unwritten ones masked, so a decode step has the same shapes
    at every position. Left padding is `key_valid` (rows, keys): pad slots are never attended to.
  - No Python branch depends on a tensor's shape or value, so torch.compile(dynamic=True) traces the whole
    forward, layer loop included, as one graph (sample.compile_model compiles it).
  - `token_logprobs` returns log π(token_t | tokens_<t) only at the positions asked for, computing logits in
    chunks (recomputed in backward under autograd), so no fp32 (B, T, vocab) tensor exists.
  - Norms, softmaxes and the vocabulary projection (`logits`) run in fp32 whatever the weight dtype or autocast:
    sampled and trained log-probs are never rounded to bf16.
Left out: biases in attention/MLP (no supported family uses them), rope scaling types other than `llama3` (an
error, never an approximation), a rolling sliding-window cache (the mask enforces the window), tensor parallelism.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": ..., ...} or None
    tie_embeddings: bool = False
    sliding_window: int | None = None  # Mistral v0.1: a query attends to the last `sliding_window` keys
    max_seq_len: int = 2048  # transformers' default when config.json omits it
    hf: dict = field(default_factory=dict, repr=False)  # the original config.json, written back on save

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        model_type = d.get("model_type")
        if model_type not in ("llama", "mistral"):
            raise ValueError(f"{source}: model_type {model_type!r} is not supported (expected 'llama' or 'mistral')")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
            if key not in d:
                raise ValueError(f"{source}: missing required key {key!r}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (expected 'silu')")
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise ValueError(f"{source}: attention_bias/mlp_bias are not supported")
        # transformers >= 5 nests theta and scaling under rope_parameters; older files use rope_scaling.
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"{source}: rope scaling type {rope_type!r} is not implemented (only 'llama3')")
        n_heads = d["num_attention_heads"]
        return cls(vocab_size=d["vocab_size"], dim=d["hidden_size"], n_layers=d["num_hidden_layers"], n_heads=n_heads,
                   n_kv_heads=d.get("num_key_value_heads") or n_heads, ffn_dim=d["intermediate_size"],
                   head_dim=d.get("head_dim") or d["hidden_size"] // n_heads, norm_eps=d.get("rms_norm_eps", 1e-5),
                   rope_theta=float(d.get("rope_theta", rope.get("rope_theta", 10000.0))),
                   rope_scaling=dict(rope, rope_type="llama3") if rope_type == "llama3" else None,
                   tie_embeddings=bool(d.get("tie_word_embeddings", False)), hf=dict(d),
                   sliding_window=d.get("sliding_window") if model_type == "mistral" else None,
                   max_seq_len=d.get("max_position_embeddings", 2048))


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies θ^(-2j/d) (fp32), with Llama 3.1's piecewise long-context rescaling."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    s = cfg.rope_scaling
    if s is not None:  # llama3: keep high frequencies, divide low ones by `factor`, blend in between
        old_len, factor = s.get("original_max_position_embeddings", 8192), s["factor"]
        lo, hi = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen - lo) / (hi - lo)).clamp(0, 1)  # 0: wavelen past old_len/lo, 1: below old_len/hi
        inv_freq = inv_freq * ((1 - smooth) / factor + smooth)
    return inv_freq.float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of angle position·inv_freq, duplicated to the full head dim (rotate-half layout)."""
    angles = (positions.float()[:, None] * inv_freq[None, :]).repeat(1, 2)  # (T, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)  # under autocast: fp32 angles, q/k stay bf16


def attention_mask(q_pos, k_pos, window=None, key_valid=None):
    """Boolean (rows|1, 1, Tq, Tk) mask, True = may attend: causal, within the sliding window, not a pad.

    key_valid (rows, ≥ Tk): real-token slots, the first Tk of them the keys'. A query always sees itself, so a pad
    row never has an all-False row (that would give NaN)."""
    delta = q_pos[:, None] - k_pos[None, :]  # (Tq, Tk)
    allowed = ((delta >= 0) & (delta < window) if window is not None else delta >= 0)[None]  # (1, Tq, Tk)
    if key_valid is not None:
        allowed = allowed & (key_valid[:, None, :delta.shape[1]] | (delta == 0))  # (rows, Tq, Tk)
    return allowed[:, None]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        # [wq; wk; wv] as one matrix, set by sample.py while it decodes (one matmul, not three); a buffer, so that a
        # compiled step takes it as an input at a fixed address (CUDA graphs), and never saved (not persistent)
        self.register_buffer("fused", None, persistent=False)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, pos=None):
        """mask None = causal over x itself; with a cache, `pos` (T,) are the slots this chunk fills."""
        B, T, _ = x.shape
        q, k, v = (F.linear(x, self.fused).split([self.wq.out_features, *[self.wk.out_features] * 2], -1)
                   if self.fused is not None else (self.wq(x), self.wk(x), self.wv(x)))
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H or H_kv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # write at the position tensor (an in-place index_put), attend over all slots
            cache.k[layer][:, :, pos] = k.to(cache.k[layer].dtype)
            cache.v[layer][:, :, pos] = v.to(cache.v[layer].dtype)
            k, v = cache.k[layer], cache.v[layer]  # (B, H_kv, max_len, hd)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                             is_causal=mask is None, enable_gqa=self.n_kv_heads != self.n_heads)
        # SDPA repeats each KV head for its H / H_kv query heads (enable_gqa); out: (B, H, T, hd)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, H·hd) → (B, T, dim)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w_up = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w_down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.register_buffer("fused", None, persistent=False)  # [w_gate; w_up] while sample.py decodes (as Attention)

    def forward(self, x):
        gate, up = F.linear(x, self.fused).chunk(2, -1) if self.fused is not None else (self.w_gate(x), self.w_up(x))
        return self.w_down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, pos=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer, pos)
        return x + self.mlp(self.mlp_norm(x))


def hf_names(cfg: ModelConfig) -> dict[str, str]:
    """Our parameter name -> Hugging Face tensor name: the one place the checkpoint layout lives."""
    table = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        table["lm_head.weight"] = "lm_head.weight"
    per_layer = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "attn.wq": "self_attn.q_proj",
                 "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj", "attn.wo": "self_attn.o_proj",
                 "mlp.w_gate": "mlp.gate_proj", "mlp.w_up": "mlp.up_proj", "mlp.w_down": "mlp.down_proj"}
    return table | {f"layers.{i}.{ours}.weight": f"model.layers.{i}.{theirs}.weight"
                    for i in range(cfg.n_layers) for ours, theirs in per_layer.items()}


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.inv_freq = rope_inv_freq(cfg)  # a plain tensor, not a buffer: .to(bf16) must not round it
        self.activation_checkpointing = False

    def hidden(self, tokens, start_pos=0, cache=None, key_valid=None):
        """Final-norm hidden states (B, T, dim) for `tokens` placed at positions start_pos.. .

        start_pos: an int or a 0-d tensor (a tensor keeps one compiled decode graph for every step).
        key_valid: (B, keys) real-token slots, keys = cache length with a cache, ≥ T without."""
        if self.inv_freq.device != tokens.device:
            self.inv_freq = self.inv_freq.to(tokens.device)
        q_pos = torch.arange(tokens.shape[1], device=tokens.device) + start_pos  # (T,)
        x = self.embed(tokens)
        cos, sin = rope_cos_sin(self.inv_freq, q_pos, x.dtype)
        # The choice between SDPA's causal path (mask None) and a mask depends on which arguments were
        # given, never on shapes: a shape-dependent Python bool would graph-break under torch.compile.
        masked = cache is not None or key_valid is not None or self.cfg.sliding_window is not None
        k_pos = torch.arange(cache.k[0].shape[2], device=tokens.device) if cache is not None else q_pos
        mask = attention_mask(q_pos, k_pos, self.cfg.sliding_window, key_valid) if masked else None
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(self.layers):
            args = (x, cos, sin, mask, cache, i, q_pos)
            x = checkpoint(block, *args, use_reentrant=False) if recompute else block(*args)
        return self.norm(x)

    def logits(self, h):
        """The vocabulary projection in fp32 (autocast off): log-probs are never rounded to bf16."""
        with torch.autocast(h.device.type, enabled=False):
            return F.linear(h.float(), self.lm_head.weight.float())

    def forward(self, tokens, start_pos=0, cache=None, key_valid=None, last_only=False):
        """fp32 logits (B, T, vocab), or (B, 1, vocab) for the last position only when sampling."""
        h = self.hidden(tokens, start_pos, cache, key_valid)
        return self.logits(h[:, -1:] if last_only else h)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "Transformer":
        from checkpoint import load_model
        return load_model(path, dtype, device)

    def save_pretrained(self, path):
        from checkpoint import save_model
        save_model(self, path)


def token_logprobs(model: Transformer, tokens, mask, key_valid=None, chunk=1024):
    """log π(tokens[:, t] | tokens[:, :t]) at every t where mask[:, t] is True; zeros elsewhere. (B, T) fp32.

    Only the selected positions go through the vocabulary projection (fp32), `chunk` rows at a time; under autograd
    with several chunks, each chunk's logits are recomputed in backward, not stored: memory is one chunk × vocab."""
    # The hidden state at position t predicts token t+1: drop the last position of the inputs and the
    # first of the targets, so h[:, t] lines up with tokens[:, t+1]; the output is shifted back at the end.
    h = model.hidden(tokens[:, :-1], key_valid=key_valid)        # (B, T-1, dim)
    select = mask[:, 1:]                                         # (B, T-1): positions whose target we want
    rows, targets = h[select], tokens[:, 1:][select]             # (N, dim), (N,): only the selected ones

    def logprobs(rows, targets):
        logits = model.logits(rows)  # fp32 operands, also under autocast
        return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)
    recompute = torch.is_grad_enabled() and rows.shape[0] > chunk
    pieces = [checkpoint(logprobs, r, t, use_reentrant=False) if recompute else logprobs(r, t)
              for r, t in zip(rows.split(chunk), targets.split(chunk))]  # N = 0: one empty piece
    out = torch.zeros_like(select, dtype=torch.float32).masked_scatter(select, torch.cat(pieces))  # (B, T-1), row-major
    return F.pad(out, (1, 0))  # (B, T): position 0 has no prediction, log-prob 0
