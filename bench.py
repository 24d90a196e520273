"""Benchmark of the hot paths: KV-cached sampling (eager and compiled), naive recompute, scoring, memory.

Prints one line per measurement and ends with one JSON line for scripts. Speed targets are checked
here by reading the numbers, never by timed assertions in tests. All figures come from one process,
so ratios (cached / naive, compiled / eager, ours / Hugging Face) are comparable on a noisy machine.

What it measures (64-token prompt, greedy, no stop tokens so every row runs to the full length), in
the --dtype precision (cli.resolve_precision: weights in its dtype, every run inside its autocast):
  decode_b1 / decode_b8 at 128 and 256 new tokens, eager; with --compile=True the same at 256 after
  sample.compile_model (the first call, which compiles, is not timed); naive full-recompute at batch
  1; the greedy tokens of the cached, compiled and naive paths compared; teacher-forced scoring
  throughput (token_logprobs, no grad); peak memory (CUDA allocator peak on a GPU, process max RSS on
  CPU); and, when `transformers` is installed and --hf=True, Hugging Face `generate` at batch 1 and 8
  on the same weights and settings. ours_vs_hf_b1/b8 divide our fastest decode (eager or compiled).
  matmul_floor_b1_tok_s: every weight matrix times one row, per second: no batch-1 decoder can beat it.
"""
import json
import os
import resource
import sys
import time

import torch

from cli import parse_args, print_config, resolve_device, resolve_precision
from model import Transformer, token_logprobs
from sample import compile_model, generate, generate_naive

DEFAULTS = dict(
    model_dir="models/SmolLM2-135M-Instruct",
    prompt_len=64,
    device="auto",
    dtype="auto",         # cli.PRECISIONS: auto | float32 | bf16-mixed | bf16-true
    compile=True,         # also time the decode after sample.compile_model (compiling takes ~1 min on CPU)
    naive=True,           # the naive loop at 256 tokens takes about a minute on 2 CPU cores
    hf=True,              # also time Hugging Face generate, if transformers is installed
    score_rows=8,
    score_len=256,
    repeats=2,            # best of N for the cached runs
)


def timed(fn, repeats=1):
    """Best wall time of `repeats` calls (the first call also warms up allocator and kernels)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, result


def bench_prompt(model, n: int) -> list[int]:
    """A deterministic prompt of n ids from the ordinary-text part of the vocabulary."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(1000, min(model.cfg.vocab_size, 30000), (n,), generator=g).tolist()


def peak_mem_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def hf_generate_tok_s(model_dir, prompt, rows, new_tokens, device, dtype, autocast, repeats):
    """HF generate, greedy, `rows` copies of the prompt: (tok/s, tokens of row 0), or None."""
    try:
        import transformers
    except ImportError:
        return None
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    x = torch.tensor([prompt] * rows, device=device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  attention_mask=torch.ones_like(x), pad_token_id=0)
    with torch.no_grad(), autocast():
        seconds, out = timed(lambda: hf.generate(x, **kwargs), repeats)
    return rows * new_tokens / seconds, out[0, len(prompt):].tolist()


def main():
    cfg = parse_args(DEFAULTS)
    print_config(cfg)
    device = resolve_device(cfg["device"])
    dtype, autocast = resolve_precision(cfg["dtype"], device)
    model = Transformer.from_pretrained(cfg["model_dir"], dtype=dtype, device=device).eval()
    prompt = bench_prompt(model, cfg["prompt_len"])
    print(f"device {device}, --dtype={cfg['dtype']} (weights {dtype}), {torch.get_num_threads()} threads, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    results, tokens = {}, {}

    def decode(rows, new):
        with autocast():
            return generate(model, [prompt], num_samples=rows, max_new_tokens=new, temperature=0)

    for rows in (1, 8):
        for new in (128, 256):
            seconds, out = timed(lambda: decode(rows, new), cfg["repeats"])
            results[f"decode_b{rows}_{new}_tok_s"] = rows * new / seconds
            tokens[(rows, new)] = out.tokens[0]
            print(f"cached  batch {rows}  {new:3d} new tokens: {rows * new / seconds:7.1f} tok/s ({seconds:.2f}s)")
    results["decode_b1_tok_s"] = results["decode_b1_256_tok_s"]
    results["decode_b8_tok_s"] = results["decode_b8_256_tok_s"]
    # The batch-1 floor: each weight matrix multiplied once by one row, the least work any decoder does per token
    # (at batch 1 that is reading every weight from memory); no attention, norms or sampling.
    mats = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    rows1 = {w.shape[1]: torch.randn(1, w.shape[1], device=device) for w in mats}
    with torch.no_grad(), autocast():
        seconds, _ = timed(lambda: [torch.nn.functional.linear(rows1[w.shape[1]], w) for w in mats], 20)
    results["matmul_floor_b1_tok_s"] = 1 / seconds
    print(f"batch-1 floor (every weight matrix times one row): {1 / seconds:7.1f} tok/s; cached batch 1 is "
          f"{results['decode_b1_tok_s'] * seconds:.0%} of it")

    ids = (prompt * (cfg["score_len"] // len(prompt) + 1))[:cfg["score_len"]]
    seq = torch.tensor([ids] * cfg["score_rows"], device=device)
    mask = torch.ones_like(seq, dtype=torch.bool)
    with torch.no_grad(), autocast():
        seconds, _ = timed(lambda: token_logprobs(model, seq, mask), cfg["repeats"])
    results["score_tok_s"] = seq.numel() / seconds
    print(f"scoring {cfg['score_rows']}x{cfg['score_len']} tokens (no grad): {results['score_tok_s']:.0f} tok/s")
    from tokenizer import Tokenizer  # encode speed: 1 MB of this project's own prose and code
    tok, here = Tokenizer.from_pretrained(cfg["model_dir"]), os.path.dirname(os.path.abspath(__file__))
    text = "".join(open(os.path.join(here, f), encoding="utf-8").read() for f in ("README.md", "NRT.md", "train.py"))
    text = (text * (1 + 10**6 // len(text)))[:10**6]
    seconds, ids = timed(lambda: tok.encode(text), 2)
    results["tokenizer_encode_mb_s"] = len(text.encode()) / 1e6 / seconds
    print(f"tokenizer encode 1 MB: {results['tokenizer_encode_mb_s']:.1f} MB/s ({len(ids)} tokens)")

    if cfg["compile"]:
        compile_model(model)
        for rows in (1, 8):
            t0 = time.perf_counter()
            decode(rows, 256)  # compiles (a batch-1 graph, then one for every other batch size)
            compile_s = time.perf_counter() - t0
            seconds, out = timed(lambda: decode(rows, 256), cfg["repeats"])
            results[f"decode_b{rows}_compiled_tok_s"] = rows * 256 / seconds
            results[f"compiled_b{rows}_vs_eager"] = rows * 256 / seconds / results[f"decode_b{rows}_tok_s"]
            print(f"compiled batch {rows} 256 new tokens: {rows * 256 / seconds:7.1f} tok/s ({seconds:.2f}s; "
                  f"first call {compile_s:.0f}s); {results[f'compiled_b{rows}_vs_eager']:.2f}x eager")
        results["greedy_compiled_equals_eager"] = out.tokens[0] == tokens[(8, 256)]
    fastest = {b: max(results.get(f"decode_b{b}_tok_s", 0), results.get(f"decode_b{b}_compiled_tok_s", 0))
               for b in (1, 8)}

    if cfg["naive"]:
        seconds, naive = timed(lambda: generate_naive(model, prompt, 256))
        results["naive_b1_tok_s"] = 256 / seconds
        results["speedup_b1_256"] = results["decode_b1_tok_s"] / results["naive_b1_tok_s"]
        results["greedy_cached_equals_naive"] = naive == tokens[(1, 256)]
        print(f"naive   batch 1  256 new tokens: {results['naive_b1_tok_s']:7.1f} tok/s ({seconds:.2f}s); "
              f"cached is {results['speedup_b1_256']:.1f}x faster; same tokens: {results['greedy_cached_equals_naive']}")

    if cfg["hf"]:
        for rows in (1, 8):
            hf = hf_generate_tok_s(cfg["model_dir"], prompt, rows, 256, device, dtype, autocast, cfg["repeats"])
            if hf is None:
                print("transformers not installed: skipping the Hugging Face comparison")
                break
            results[f"hf_b{rows}_tok_s"], hf_tokens = hf
            results[f"ours_vs_hf_b{rows}"] = fastest[rows] / results[f"hf_b{rows}_tok_s"]
            if rows == 1:
                results["greedy_equals_hf"] = hf_tokens == tokens[(1, 256)]
                print(f"HF generate batch 1 is {results['hf_b1_tok_s'] / results['matmul_floor_b1_tok_s']:.0%} of "
                      f"the batch-1 floor")
            same = hf_tokens == tokens[(rows, 256)]
            print(f"HF generate batch {rows} 256 new tokens: {results[f'hf_b{rows}_tok_s']:7.1f} tok/s; ours "
                  f"(fastest) / HF = {results[f'ours_vs_hf_b{rows}']:.2f}; same tokens: {same}")

    results["peak_mem_mb"] = peak_mem_mb(device)
    print(f"peak memory: {results['peak_mem_mb']:.0f} MB")
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in results.items()}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
