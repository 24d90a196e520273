"""KV-cached sampling: the hot path of NRT (K reasoning traces per question, every step).

`generate` samples `num_samples` rows per prompt: each distinct prompt is prefilled once and its cache replicated
into its K rows (the NRT access pattern). Prompts are left-padded to one length, pad slots masked out of attention
(RoPE is relative: a shifted start changes nothing). `compile_model` compiles sampling, scoring and training at once.

Choices
  - Static shapes, as in gpt-fast: a fixed-length cache (prompt + new tokens, rounded up to 64); each step
    writes at a position tensor and attends over every slot under a mask, so one compiled decode graph serves
    every step. A finished row stays in the batch (output ignored) until the live rows fit a power of two at
    most half the batch, which the batch then shrinks to: few shapes, yet short traces stop costing compute.
  - At most one host sync per step: the step's tokens come to the host for the stop checks (none without stop
    ids or strings); tokens and log-probs stay on the device until the end.
  - Inverse-CDF draws (cumsum + searchsorted: ~10x cheaper than torch.multinomial over 49k tokens), reproducible: a
    uniform per row of the whole batch every step, from an explicit generator (no row depends on when others stop).
  - Log-probs are those of the distribution sampled from (after temperature, top-k, top-p), from fp32 logits;
    with temperature 0 (greedy) the model's plain log-probs.
  - Under bf16-mixed, each linear weight is cast once per call, not once per step (`casting_weights_once`).
  - Stop strings are checked on text through the caller's `decode`, on each row's last few tokens.
Left out: beam search, repetition penalties, speculative decoding, paged caches, a rolling sliding-window cache (the
mask enforces Mistral's window).
"""
import functools
import sys
import time
from dataclasses import dataclass

import torch


class KVCache:
    """Keys and values: per layer, (rows, kv_heads, max_len, head_dim) tensors in the lists `k` and `v`.

    One tensor per layer, not a slice of one big one: a compiled step writes each in place (a write into a view
    of a graph input would be functionalized into a copy of the whole cache). `pool` (set by compile_model on
    CUDA) reuses buffers per shape across calls: CUDA graphs replay on fixed addresses (new ones: re-recorded)."""
    pool = None  # {(layer, shape, dtype, device): (k, v)} or None

    def __init__(self, cfg, rows: int, max_len: int, dtype, device):
        self.n_layers, self.dtype, self.device = cfg.n_layers, dtype, device
        self.shape = (rows, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k, self.v = map(list, zip(*(self._buffers(i) for i in range(self.n_layers))))

    def _buffers(self, layer):
        key = (layer, self.shape, self.dtype, str(self.device))
        if KVCache.pool is not None and key in KVCache.pool:
            return KVCache.pool[key]  # stale slots are harmless: the mask hides every unwritten one
        kv = tuple(torch.zeros(self.shape, dtype=self.dtype, device=self.device) for _ in range(2))
        if KVCache.pool is not None:
            for t in kv:
                torch._dynamo.mark_static_address(t)
            KVCache.pool[key] = kv
        return kv

    def keep_rows(self, index: torch.Tensor):
        """Row r becomes old row index[r] (index_select: fresh tensors, not views)."""
        self.shape = (len(index),) + self.shape[1:]
        for i in range(self.n_layers):
            kv = (self.k[i].index_select(0, index), self.v[i].index_select(0, index))
            if KVCache.pool is not None:  # copy into the pooled buffers of the new shape
                kv = tuple(buf.copy_(t) for buf, t in zip(self._buffers(i), kv))
            self.k[i], self.v[i] = kv


@dataclass
class Generation:
    tokens: list[list[int]]      # generated ids per row, including the stop token when one ended the row
    logprobs: list[list[float]]  # log-prob of each generated id under the sampling distribution
    stop_reason: list[str]       # 'stop_id' | 'stop_string' | 'length'


@torch.no_grad()
def prefill(model, tokens, cache, key_valid=None, start_pos=0):
    """Run tokens (rows, T) through the model, filling the cache; fp32 logits of the last position (rows, vocab)."""
    return model(tokens, start_pos, cache, key_valid, last_only=True)[:, -1]


def decode_step(model, token, pos, cache, key_valid=None):
    """Feed one token per row at position `pos` (int or 0-d tensor); fp32 logits for the next (rows, vocab)."""
    return prefill(model, token[:, None], cache, key_valid, start_pos=torch.as_tensor(pos, device=token.device))


def decode_and_sample(model, token, pos, cache, key_valid, u, temperature, top_k, top_p):
    """One decode step and the draw from its logits: the unit compile_model compiles (CUDA graphs on GPU)."""
    return sample_next(decode_step(model, token, pos, cache, key_valid), temperature, top_k, top_p, u=u)


def compile_model(model, backend="inductor"):
    """torch.compile for --compile=True, the one call train.py and eval.py make after loading (and LoRA): compiles
    `model.hidden` (training forward, token_logprobs, prefill) and generate's decode step with the draw (CUDA graphs
    on CUDA). The module itself is not wrapped, so parameter names stay clean. `backend` is for tests."""
    cuda = model.embed.weight.is_cuda
    # Automatic dynamic shapes: a first graph for the first shapes, then one where only the dims that
    # changed (rows, lengths) are symbolic; head counts and sizes stay static, so no duck-sizing guards.
    model.hidden = torch.compile(model.hidden, backend=backend)
    model.compiled_decode = torch.compile(decode_and_sample, backend=backend,
                                          mode="reduce-overhead" if cuda and backend == "inductor" else None)
    if cuda and KVCache.pool is None:
        KVCache.pool = {}
    return model


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None, u=None):
    """One token per row and its log-prob under the (temperature, top-k, top-p) distribution.

    `u` (rows, 1) are the uniforms to draw with; by default fresh ones from `generator`."""
    logits = logits.float()
    if temperature == 0:
        token = logits.argmax(-1)
        return token, logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < logits.topk(top_k, dim=-1).values[:, -1:], float("-inf"))
    if top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p
        probs, order = logits.softmax(-1).sort(-1, descending=True)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    logp = logits.log_softmax(-1)
    cdf = logp.exp().cumsum(-1)
    if u is None:  # fresh ones, on the generator's device
        u = torch.rand(len(cdf), 1, generator=generator, device=getattr(generator, "device", cdf.device))
    # right=True picks the first index whose cdf exceeds u, so a zero-probability token is never drawn
    token = torch.searchsorted(cdf, u.to(cdf.device) * cdf[:, -1:], right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


def matches_stop_string(ids: list[int], stop_strings, decode) -> bool:
    """True when the text of the row's last few tokens contains a stop string (each token ≥ 1 byte)."""
    longest = max(len(s.encode()) for s in stop_strings)
    tail = decode(ids[-(longest + 1):])
    return any(s in tail for s in stop_strings)


def casting_weights_once(fn):
    """Under autocast with fp32 weights, every linear layer but the vocabulary projection (fp32, as are embedding, norms
    and residual stream) holds a bf16 copy of its weight while `fn` runs: autocast's cast cache is eager-only (a
    compiled step would re-cast every weight every step) and bypassed under inference_mode. The copies of q/k/v and
    of gate/up are one fused matrix each (Attention.fused, MLP.fused; never a LoRA layer's): one matmul, not three."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        device = model.embed.weight.device.type
        if not torch.is_autocast_enabled(device) or model.embed.weight.dtype != torch.float32:
            return fn(model, *args, **kwargs)
        dtype, fp32, fused = torch.get_autocast_dtype(device), {}, set()
        parts = [(p, [getattr(p, n) for n in names]) for block in model.layers
                 for p, names in ((block.attn, ("wq", "wk", "wv")), (block.mlp, ("w_gate", "w_up")))]
        try:
            for part, linears in parts:
                if all(type(m) is torch.nn.Linear for m in linears):  # plain layers are fused (an adapter is not)
                    part.fused, fused = torch.cat([m.weight.data for m in linears]).to(dtype), fused | set(linears)
            for m in model.modules():
                if isinstance(m, torch.nn.Linear) and m is not model.lm_head and m not in fused:
                    fp32[m], m.weight.data = m.weight.data, m.weight.data.to(dtype)
            return fn(model, *args, **kwargs)
        finally:
            for m, w in fp32.items():
                m.weight.data = w
            for part, _ in parts:
                part.fused = None
    return wrapper


@casting_weights_once
@torch.no_grad()
def generate(model, prompts: list[list[int]], num_samples=1, max_new_tokens=256, temperature=1.0, top_k=0,
             top_p=1.0, stop_ids=(), stop_strings=(), decode=None, generator=None) -> Generation:
    """Sample K = `num_samples` continuations of each prompt (row p*K + s); for bf16-mixed, call it under autocast."""
    if not prompts or not all(prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if stop_strings and decode is None:
        raise ValueError("generate: stop_strings need a decode function (e.g. tokenizer.decode)")
    device = model.embed.weight.device
    P = max(len(p) for p in prompts)
    if P + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"generate: prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_position_embeddings ({model.cfg.max_seq_len})")
    max_len = min(-(-(P + max_new_tokens) // 64) * 64, model.cfg.max_seq_len)  # bucketed: few cache shapes
    tokens = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device=device)  # right-aligned (n, P)
    pad = torch.tensor([P - len(p) for p in prompts], device=device)
    key_valid = torch.arange(max_len, device=device) >= pad[:, None]  # (n, max_len): real (non-pad) slots
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) \
        else model.embed.weight.dtype  # fp32 master weights under autocast: the cache holds bf16
    cache = KVCache(model.cfg, len(prompts), max_len, dtype, device)
    logits = prefill(model, tokens, cache, key_valid)  # (n, vocab)
    rows = len(prompts) * num_samples
    if num_samples > 1:  # (n, ...) → (n·K, ...): row p*K + s continues prompt p
        repeat = torch.arange(len(prompts), device=device).repeat_interleave(num_samples)
        cache.keep_rows(repeat)
        logits, key_valid = logits[repeat], key_valid[repeat]  # copies: a view's base would be guarded on

    temperature, top_k, top_p = float(temperature), int(top_k), float(top_p)  # one compiled graph per kind
    step_fn = getattr(model, "compiled_decode", None) or decode_and_sample
    out_tok, out_lp = (torch.zeros(rows, max_new_tokens, dtype=t, device=device) for t in (torch.long, torch.float32))
    slot_row = torch.arange(rows, device=device)  # original row of each batch slot
    slots = list(range(rows))  # the same on the host; None marks a finished row kept as filler
    lengths, reasons, history = [max_new_tokens] * rows, ["length"] * rows, [[] for _ in range(rows)]
    stop_set, check = set(stop_ids), bool(stop_ids or stop_strings)
    pos, draw_on = torch.full((), P, device=device), getattr(generator, "device", device)
    for step in range(max_new_tokens):
        u = (torch.rand(rows, 1, generator=generator, device=draw_on).to(device)[slot_row]
             if temperature > 0 else None)  # a uniform for every row, then those of the rows in the batch
        if step == 0:
            token, logp = sample_next(logits, temperature, top_k, top_p, u=u)
        else:
            if step_fn is not decode_and_sample:  # a compiled step may replay CUDA graphs
                torch.compiler.cudagraph_mark_step_begin()
            token, logp = step_fn(model, token, pos, cache, key_valid, u, temperature, top_k, top_p)
            token = token.clone()  # a CUDA-graph output is overwritten by the next replay
            pos += 1
        out_tok[slot_row, step] = token  # finished filler rows write past their length: trimmed below
        out_lp[slot_row, step] = logp
        # the step's one host sync, for the stop checks (none without stops: then no row ever finishes)
        for i, (row, t) in enumerate(zip(slots, token.tolist() if check else [])):
            if row is not None:  # a live row
                history[row].append(t)
                if t in stop_set or stop_strings and matches_stop_string(history[row], stop_strings, decode):
                    reasons[row] = "stop_id" if t in stop_set else "stop_string"
                    lengths[row], slots[i] = step + 1, None
        live = [i for i, row in enumerate(slots) if row is not None]
        if not live:
            break
        size = 1 << (len(live) - 1).bit_length()  # the next power of two
        if size < len(slots):  # shrink the batch: live rows plus enough finished ones to fill `size`
            keep = live + [i for i, row in enumerate(slots) if row is None][:size - len(live)]
            index = torch.tensor(keep, device=device)
            cache.keep_rows(index)
            token, key_valid, slot_row = token[index], key_valid[index], slot_row[index]
            slots = [slots[i] for i in keep]
    trimmed = ([r[:n] for r, n in zip(out.tolist(), lengths)] for out in (out_tok, out_lp))
    return Generation(*trimmed, reasons)


@torch.no_grad()
def generate_naive(model, prompt: list[int], max_new_tokens: int, stop_ids=()) -> list[int]:
    """Greedy decoding that recomputes the whole context every step: the reference the cache must match."""
    device = model.embed.weight.device
    ids = list(prompt)
    for _ in range(max_new_tokens):
        ids.append(int(model(torch.tensor([ids], device=device), last_only=True)[0, -1].argmax()))
        if ids[-1] in stop_ids:
            break
    return ids[len(prompt):]


DEFAULTS = dict(
    model_dir="models/SmolLM2-135M-Instruct",
    prompt="What is the capital of France?", chat=True,  # chat: wrap the prompt in the model family's chat template
    max_new_tokens=128, num_samples=1, temperature=0.0, top_k=0, top_p=1.0, seed=1337,  # temperature 0 = greedy
    device="auto", dtype="auto", compile=False,  # dtype auto | float32 | bf16-mixed | bf16-true (cli.resolve_precision)
)


def main():
    from cli import check_ranges, parse_args, print_config, resolve_device, resolve_precision
    from eval import load  # model and tokenizer, weights checked finite; a clear exit when they cannot be loaded

    cfg = parse_args(DEFAULTS)
    print_config(cfg)
    check_ranges(cfg, max_new_tokens=(cfg.max_new_tokens >= 1, "≥ 1"), temperature=(cfg.temperature >= 0, "≥ 0"),
                 num_samples=(cfg.num_samples >= 1, "≥ 1"), top_p=(0 < cfg.top_p <= 1, "in (0, 1]"))
    device = resolve_device(cfg.device)
    weight_dtype, autocast = resolve_precision(cfg.dtype, device)
    model, tok = load(cfg.model_dir, weight_dtype, device)
    if cfg.compile:
        compile_model(model)
    prompt = tok.encode_chat([{"role": "user", "content": cfg.prompt}]) if cfg.chat \
        else tok.encode(cfg.prompt, bos=tok.bos_id is not None)
    gen, t0 = torch.Generator(device=device).manual_seed(cfg.seed), time.perf_counter()
    with autocast():
        out = generate(model, [prompt], stop_ids=tok.stop_ids, generator=gen,
                       **{k: cfg[k] for k in ("num_samples", "max_new_tokens", "temperature", "top_k", "top_p")})
    elapsed, n_tokens = time.perf_counter() - t0, sum(len(t) for t in out.tokens)
    for i, (ids, reason) in enumerate(zip(out.tokens, out.stop_reason)):
        print(f"--- sample {i} ({len(ids)} tokens, stop: {reason})\n{tok.decode(ids, skip_special=True)}")
    print(f"--- {n_tokens} tokens in {elapsed:.2f}s ({n_tokens / elapsed:.1f} tok/s)", file=sys.stderr)


if __name__ == "__main__":
    main()
