"""Benchmark of the hot paths: KV-cached sampling (eager and compiled), naive recompute, scoring, memory.

Speed targets are checked here by reading the printed numbers, never by timed assertions in tests. All figures come
from one process, so ratios (cached / naive, compiled / eager, ours / Hugging Face) are comparable on a noisy machine.
Every decode: a 64-token prompt, greedy, no stop tokens (256 new tokens a row), batch 1 and 8, in the --dtype
precision; compiled runs time their compiling first call apart. Also: whether the cached, compiled, naive and HF
greedy tokens agree; scoring (token_logprobs, 8 × 256 tokens, no grad); tokenizer encode speed; peak memory (CUDA
allocator peak, or max RSS on CPU); matmul_floor_b1_tok_s: every weight matrix times one row, per second, a rate no
batch-1 decoder beats. One line per figure under its JSON key, then one JSON line for scripts.
"""
import importlib.util
import json
import os
import resource
import time

import torch

from cli import parse_args, print_config, resolve_device, resolve_precision
from model import Transformer, token_logprobs
from sample import compile_model, generate, generate_naive
from tokenizer import Tokenizer

DEFAULTS = dict(
    model_dir="models/SmolLM2-135M-Instruct",
    device="auto",
    dtype="auto",         # cli.PRECISIONS: auto | float32 | bf16-mixed | bf16-true
    compile=True,         # also time the decode after sample.compile_model (compiling takes ~1 min on CPU)
    naive=True,           # the naive loop at 256 tokens takes about a minute on 2 CPU cores
    hf=True,              # also time Hugging Face generate, if transformers is installed
)
PROMPT, NEW, SCORE, REPEATS = 64, 256, (8, 256), 2  # decode: prompt, new tokens; scored rows × tokens; best of N


def main():
    cfg = parse_args(DEFAULTS)
    print_config(cfg)
    device = resolve_device(cfg.device)
    dtype, autocast = resolve_precision(cfg.dtype, device)
    model = Transformer.from_pretrained(cfg.model_dir, dtype=dtype, device=device).eval()
    g = torch.Generator().manual_seed(0)  # a deterministic prompt from the ordinary-text part of the vocabulary
    prompt = torch.randint(1000, min(model.cfg.vocab_size, 30000), (PROMPT,), generator=g).tolist()
    print(f"device {device}, --dtype={cfg.dtype} (weights {dtype}), {torch.get_num_threads()} threads, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    results = {}
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None  # time the kernels, not the launch

    def rate(key, fn, n, repeats=REPEATS):
        """results[key] = n / the best wall time of `repeats` calls of fn (the first also warms up allocator and
        kernels), each under no_grad and autocast; printed under its key (ending in the unit). Returns fn's result."""
        best = float("inf")
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            with torch.no_grad(), autocast():
                out = fn()
            sync()
            best = min(best, time.perf_counter() - t0)
        results[key] = n / best
        print(f"{key}: {n / best:.1f} ({best:.2f}s)")
        return out

    def decode(rows):  # greedy, no stop tokens: row 0's tokens
        return generate(model, [prompt], num_samples=rows, max_new_tokens=NEW, temperature=0).tokens[0]

    tokens = {rows: rate(f"decode_b{rows}_tok_s", lambda: decode(rows), rows * NEW) for rows in (1, 8)}
    # The batch-1 floor: each weight matrix multiplied once by one row, the least work any decoder does per token
    # (at batch 1 that is reading every weight from memory); no attention, norms or sampling. The matrices are in
    # the dtypes a decode step multiplies in (bf16-mixed: bf16, cast once here, the vocabulary projection fp32).
    device_type = device.split(":")[0]
    with autocast():
        low = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else dtype
    mats = [m.weight if m is model.lm_head else m.weight.to(low) for m in model.modules()
            if isinstance(m, torch.nn.Linear)]
    one_row = {(w.shape[1], w.dtype): torch.randn(1, w.shape[1], device=device, dtype=w.dtype) for w in mats}

    def floor():
        with torch.autocast(device_type, enabled=False):  # each product in its matrix's own dtype
            return [torch.nn.functional.linear(one_row[w.shape[1], w.dtype], w) for w in mats]
    rate("matmul_floor_b1_tok_s", floor, 1, 20)
    print(f"cached batch 1 is {results['decode_b1_tok_s'] / results['matmul_floor_b1_tok_s']:.0%} of the floor")

    seq = torch.tensor(prompt, device=device).repeat(*SCORE)[:, :SCORE[1]]
    rate("score_tok_s", lambda: token_logprobs(model, seq, torch.ones_like(seq, dtype=torch.bool)), seq.numel())
    tok, here = Tokenizer.from_pretrained(cfg.model_dir), os.path.dirname(os.path.abspath(__file__))
    text = "".join(open(os.path.join(here, f), encoding="utf-8").read() for f in ("README.md", "NRT.md", "train.py"))
    text = (text * (1 + 10**6 // len(text)))[:10**6]  # encode speed: 1 MB of this project's own prose and code
    rate("tokenizer_encode_mb_s", lambda: tok.encode(text), len(text.encode()) / 1e6, 2)

    if cfg.compile:
        compile_model(model)  # each first call compiles (a batch-1 graph, then one for other sizes): timed apart
        compiled = {}
        for rows in (1, 8):
            rate(f"decode_b{rows}_compiled_first_call_tok_s", lambda: decode(rows), rows * NEW, 1)
            compiled[rows] = rate(f"decode_b{rows}_compiled_tok_s", lambda: decode(rows), rows * NEW)
            results[f"compiled_b{rows}_vs_eager"] = (results[f"decode_b{rows}_compiled_tok_s"]
                                                     / results[f"decode_b{rows}_tok_s"])
        results["greedy_compiled_equals_eager"] = compiled == tokens
    if cfg.naive:
        naive = rate("naive_b1_tok_s", lambda: generate_naive(model, prompt, NEW), NEW, 1)
        results["speedup_b1_256"] = results["decode_b1_tok_s"] / results["naive_b1_tok_s"]
        results["greedy_cached_equals_naive"] = naive == tokens[1]
    if cfg.hf and importlib.util.find_spec("transformers") is None:
        print("transformers not installed: skipping the Hugging Face comparison")
    elif cfg.hf:
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_pretrained(cfg.model_dir, dtype=dtype).to(device).eval()
        for rows in (1, 8):
            x = torch.tensor([prompt] * rows, device=device)
            out = rate(f"hf_b{rows}_tok_s", lambda: hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                       max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0), rows * NEW)
            fastest = max(results[f"decode_b{rows}_tok_s"], results.get(f"decode_b{rows}_compiled_tok_s", 0))
            results[f"ours_vs_hf_b{rows}"] = fastest / results[f"hf_b{rows}_tok_s"]
            results[f"greedy_equals_hf_b{rows}"] = out[0, len(prompt):].tolist() == tokens[rows]
        print(f"HF generate batch 1 is {results['hf_b1_tok_s'] / results['matmul_floor_b1_tok_s']:.0%} of the floor")

    results["peak_mem_mb"] = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
                              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB
    print(f"peak memory: {results['peak_mem_mb']:.0f} MB")
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
