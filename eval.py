"""Evaluation: what reasoning buys on held-out questions, for one model or a base/trained pair.

    python eval.py                                    # the default model on arithmetic + object counting
    python eval.py --model_dir=DIR --data=all --limit=100 --k=4 --compare=out/nrt

Metrics per data set (keys of the final JSON line):
  accuracy / accuracy_direct   exact match (reward.is_correct: normalised, aliases) of the greedy answer
                               after a greedy trace / straight after the prompt (the empty trace)
  answer_logprob[_direct]      Σ_i log c_i of the reference answer incl. its end-of-turn token (what NRT
                               raises); token_logprob[_direct]: per-token mean, averaged over questions
  hard_token_logprob[_direct]  mean log c_i over hard tokens, c_i^∅ < 0.5 (frac_hard_tokens of all)
  trace_len_mean, frac_delimiter   greedy trace length; how often it wrote the delimiter itself
  accuracy_mc[_direct]         multiple-choice rows (n_mc): the option with the highest answer likelihood
  pass@k, accuracy_sampled     k > 1: n ≥ k traces sampled per question, unbiased 1 − C(n−c, k)/C(n, k)
--compare runs a second model on the same questions; a delta of a per-question metric gets a paired
95 % interval (normal approximation on the per-question differences).

Choices
  - Chunks of batch_size questions: one generate call for the traces, one per condition for the
    answers, one batched scoring pass (reward.build_batch + model.token_logprobs, as in training).
    The per-example JSONL is appended after every chunk: a crash or Ctrl-C keeps what was done.
  - The answer is the first non-empty line after the delimiter (reward.extract_answer), decoded up to
    max(max_answer_tokens, longest reference/alias/option) tokens, so every reference is reachable.
  - Multiple choice: an "options" list in the row, a yes/no or true/false reference, or "(A) … (B) …"
    in the question; each option is scored like the reference (Σ log c, EOS included).
  - pass@k samples the traces (temperature 1); the answer after each trace is greedy.
  - A question that cannot fit the context is skipped and counted (`skipped`), not an error mid-run.
Left out: sampled answers, LLM judges, per-task breakdowns (slice the JSONL), options written in free
text ("X or Y?"), reading the prompt format from a checkpoint (pass the flags it was trained with).
"""
import json
import math
import os
import re
import string
import sys
import time

import torch

from cli import parse_args, print_config, progress, resolve_device, resolve_precision
from data import (INSTRUCTION, THINK_END, answer_ids, delimiter_ids, extract_answer, is_correct, json_safe, load_qa,
                  load_rows, normalize_answer, prompt_ids, resolve_paths)
from model import Transformer
from reward import HARD_THRESHOLD, hard_tokens, sample_traces, score_answers
from sample import generate
from tokenizer import Tokenizer

DEFAULTS = dict(
    model_dir="models/SmolLM2-135M-Instruct",
    data="default",       # comma-separated: JSONL files, bundled names (strategyqa, ...), suites default | all
    compare="",           # a second model directory (e.g. a trained out_dir): side by side, paired deltas
    limit=0,              # the first N questions of each data set (0 = all)
    think=True,           # False: direct answers only, no trace
    k=1,                  # pass@k with sampled traces when > 1
    n_samples=0,          # traces sampled per question for pass@k (0 = k)
    temperature=1.0,      # of the sampled traces
    instruction=INSTRUCTION,  # the prompt format: data.py's defaults, which train.py uses too,
    think_end=THINK_END,      # so a model is evaluated as it was trained
    system="",
    max_think_tokens=48,
    max_answer_tokens=16,
    batch_size=32,        # questions per chunk
    seed=1337,
    device="auto",
    dtype="auto",         # auto | float32 | bf16-mixed | bf16-true; auto is what train.py's own eval uses
    out="",               # per-example JSONL; default out/eval_<model>[_vs_<other>].jsonl
    overwrite=False,      # replace an existing --out file
)
# summary key -> the per-example value it averages: deltas of these get a paired confidence interval
PAIRED = dict(accuracy="correct", accuracy_direct="correct_direct", accuracy_mc="correct_mc",
              accuracy_mc_direct="correct_mc_direct", accuracy_sampled="accuracy_sampled",
              answer_logprob="answer_logprob", answer_logprob_direct="answer_logprob_direct")
LETTERED = re.compile(r"\(([A-Za-z])\)\s*([^()\n]+)")  # "(A) text (B) text" in a question
FIRST_LINE_END = [c + "\n" for c in string.printable if not c.isspace()]  # a newline after some text


def mc_options(row):
    """The options of a multiple-choice row (module docstring), or None for a free-form one."""
    answer, norm = row["answer"], normalize_answer(row["answer"])
    if isinstance(row.get("options"), list) and len(row["options"]) > 1:
        options = [str(o) for o in row["options"]]
        return options if any(is_correct(o, row) for o in options) else options + [answer]
    for pair in (("yes", "no"), ("true", "false")):
        if norm in pair:  # spelled like the reference (Yes/No, YES/NO): only the word differs
            return [answer if w == norm else w.upper() if answer.isupper() and len(answer) > 1
                    else w.capitalize() if answer[:1].isupper() else w for w in pair]
    found = LETTERED.findall(row["question"])
    label = re.fullmatch(r"\W*([A-Za-z])\W*", answer)
    if len(found) > 1 and label and label.group(1).lower() in [x.lower() for x, _ in found]:
        i, j = label.span(1)  # the reference is a label ("B", "(B)"): the options are the labels
        case = str.upper if label.group(1).isupper() else str.lower
        return [answer[:i] + case(x) + answer[j:] for x, _ in found]
    texts = [t.strip() for _, t in found]
    return texts if len(texts) > 1 and any(is_correct(t, row) for t in texts) else None


def pass_at_k(n, c, k):
    """Unbiased pass@k (Chen et al., 2021): the chance that k of the n samples (c correct) include a
    correct one, 1 − C(n−c, k)/C(n, k); less variance than drawing just k samples."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def greedy_answers(model, tok, contexts, budget):
    """Greedy continuation of each context (ending with the delimiter): (extracted answers, raw texts).
    A row stops at EOS or at the end of its first non-empty line (a plain newline stop string would
    also stop a row that opens with a newline)."""
    budget = min(budget, model.cfg.max_seq_len - max(map(len, contexts)))  # rows were checked to fit
    out = generate(model, contexts, max_new_tokens=budget, temperature=0, stop_ids=tok.stop_ids,
                   stop_strings=FIRST_LINE_END, decode=tok.decode)
    raw = [tok.decode(ids, skip_special=True) for ids in out.tokens]
    return [extract_answer(text) for text in raw], raw


def answer_logc_rows(model, rows, delim, batch_size):
    """log c_i of each row's answer, rows = (prompt, trace, emitted, answer ids): a list of 1-D tensors."""
    out = []
    for i in range(0, len(rows), batch_size):
        _, _, logc, mask = score_answers(model, rows[i:i + batch_size], delim)
        out.extend(lc[m].float().cpu() for lc, m in zip(logc, mask))
    return out


def score_options(model, tok, exs, rows, prompts, options, conditions, delim, batch_size):
    """log c of the reference and Σ log c of each other option under every condition; the MC picks."""
    jobs, seqs = [], []
    for cond, (zs, ems) in conditions.items():  # "_direct" = empty trace, "" = after the greedy trace
        for i, row in enumerate(rows):
            for o in [None] + [o for o in options[i] or [] if o != row["answer"]]:
                seqs.append((prompts[i], zs[i], ems[i], answer_ids(tok, row["answer"] if o is None else o)))
                jobs.append((exs[i], cond, o))
    for (e, cond, o), lc in zip(jobs, answer_logc_rows(model, seqs, delim, batch_size)):
        if o is None:
            e.update({"logc" + cond: lc.tolist(), "answer_logprob" + cond: lc.sum().item()})
        else:
            e.setdefault("option_logprobs" + cond, {})[o] = lc.sum().item()
    for e, row, opts in zip(exs, rows, options):
        for cond in conditions if opts else ():
            lp = {o: e["answer_logprob" + cond] if o == row["answer"] else e["option_logprobs" + cond][o] for o in opts}
            best = max(opts, key=lp.get)
            e.update({"option_logprobs" + cond: lp, "mc_pred" + cond: best, "correct_mc" + cond: is_correct(best, row)})


@torch.no_grad()
def evaluate_chunk(model, tok, rows, start, opt, delim, generator):
    """The per-example values of every metric for one chunk of questions (rows[start:...])."""
    examples = [dict(index=start + j, question=r["question"], answer=r["answer"]) for j, r in enumerate(rows)]
    prompts = [prompt_ids(tok, r["question"], opt["instruction"], opt["system"]) for r in rows]
    options = [mc_options(r) for r in rows]
    budgets = [max(opt["max_answer_tokens"], *(len(answer_ids(tok, t)) for t in [r["answer"], *r.get("aliases", []),
                                                                               *(o or [])])) for r, o in zip(rows, options)]
    think_len, limit = opt["max_think_tokens"] if opt["think"] else 0, model.cfg.max_seq_len
    for e, p, b in zip(examples, prompts, budgets):
        if len(p) + think_len + len(delim) + b > limit:
            e["skipped"] = f"prompt {len(p)} + trace {think_len} + delimiter {len(delim)} + answer {b} tokens > {limit}"
    ok = [i for i, e in enumerate(examples) if "skipped" not in e]
    if not ok:
        return examples
    exs, rows, prompts, options = ([xs[i] for i in ok] for xs in (examples, rows, prompts, options))
    budget, n = max(budgets[i] for i in ok), len(ok)
    conditions = {"_direct": ([[]] * n, [False] * n)}
    if opt["think"]:
        zs, ems, _ = sample_traces(model, tok, prompts, opt["think_end"], opt["max_think_tokens"], temperature=0)
        conditions[""] = (zs, ems)
        for e, z, em in zip(exs, *conditions[""]):
            e.update(trace=tok.decode(z), trace_len=len(z), emitted=em)
    # one generate call per condition: a joint call would pad the short direct contexts to the longest
    # trace context, costing more prefill than the decode steps it would share
    for cond, (zs, ems) in conditions.items():
        contexts = [p + z + ([] if em else delim) for p, z, em in zip(prompts, zs, ems)]
        preds, raws = greedy_answers(model, tok, contexts, budget)
        for e, row, pred, raw in zip(exs, rows, preds, raws):
            e.update({"pred" + cond: pred, "correct" + cond: is_correct(pred, row), "raw" + cond: raw})
    score_options(model, tok, exs, rows, prompts, options, conditions, delim, opt["batch_size"])
    k, n_s = opt["k"], opt["n_samples"]
    step = max(1, opt["batch_size"] // n_s)  # ≈ batch_size sampled rows per generate call
    for s in range(0, n, step) if k > 1 else ():
        zs, ems, _ = sample_traces(model, tok, prompts[s:s + step], opt["think_end"], opt["max_think_tokens"], n_s,
                                   opt["temperature"], generator)
        preds, _ = greedy_answers(model, tok, [prompts[s + j // n_s] + z + ([] if em else delim)
                                               for j, (z, em) in enumerate(zip(zs, ems))], budget)
        for j, (e, row) in enumerate(zip(exs[s:s + step], rows[s:s + step])):
            c = sum(is_correct(p, row) for p in preds[j * n_s:(j + 1) * n_s])
            e.update(n_samples=n_s, n_correct=c, accuracy_sampled=c / n_s, pass_at_k=pass_at_k(n_s, c, k))
    return examples


def evaluate(model, tok, rows, instruction="", system="", think_end=THINK_END, max_think_tokens=48,
             max_answer_tokens=16, think=True, batch_size=16, hard_threshold=HARD_THRESHOLD, k=1, n_samples=0,
             temperature=1.0, seed=0, on_examples=None, label=None):
    """Metrics on `rows` (dicts: question, answer, aliases?, options?) → (summary, per-example dicts).

    `on_examples(chunk)` receives each finished chunk's example dicts (to write them as they come);
    a `label` turns on a progress line with rate and ETA on stderr."""
    opt = dict(instruction=instruction, system=system, think_end=think_end, max_think_tokens=max_think_tokens,
               max_answer_tokens=max_answer_tokens, think=think, batch_size=batch_size, k=k,
               n_samples=n_samples or k, temperature=temperature)
    delim = delimiter_ids(tok, think_end)
    generator = torch.Generator(model.embed.weight.device).manual_seed(seed)
    examples, t0 = [], time.time()
    for start in range(0, len(rows), batch_size):
        chunk = evaluate_chunk(model, tok, rows[start:start + batch_size], start, opt, delim, generator)
        examples += chunk
        if on_examples:
            on_examples(chunk)
        if label:
            progress(label, len(examples), len(rows), t0)
    return summarize(examples, think, k, hard_threshold), examples


def mean(values):
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")


def summarize(examples, think=True, k=1, hard_threshold=HARD_THRESHOLD):
    """Data-set metrics from the per-example values (skipped questions are counted, not averaged)."""
    done = [e for e in examples if "skipped" not in e]
    col = lambda key: [e[key] for e in done if key in e]  # noqa: E731
    conds = ["", "_direct"] if think else ["_direct"]
    s = {"accuracy" + c: mean(col("correct" + c)) for c in conds}
    if col("correct_mc_direct"):  # multiple-choice rows only
        s.update({"accuracy_mc" + c: mean(col("correct_mc" + c)) for c in conds}, n_mc=len(col("correct_mc_direct")))
    if k > 1:
        s.update({f"pass@{k}": mean(col("pass_at_k")), "accuracy_sampled": mean(col("accuracy_sampled"))})
    for c in conds:
        s.update({"answer_logprob" + c: mean(col("answer_logprob" + c)),
                  "token_logprob" + c: mean(mean(lc) for lc in col("logc" + c))})
    # hard tokens: those the model misses without a trace (c^∅ < threshold), pooled over questions
    pairs = [(x, x0) for e in done for x, x0 in zip(e.get("logc", e["logc_direct"]), e["logc_direct"])]
    hard = [(x, x0) for x, x0 in pairs if hard_tokens(torch.tensor(x0), hard_threshold)]
    s.update({"hard_token_logprob" + c: mean(x if c == "" else x0 for x, x0 in hard) for c in conds})
    s["frac_hard_tokens"] = len(hard) / len(pairs) if pairs else float("nan")
    if think:
        s.update(trace_len_mean=mean(col("trace_len")), frac_delimiter=mean(col("emitted")))
    return dict(s, n=len(done), skipped=len(examples) - len(done))


def paired_delta(base, other, key):
    """Mean per-question difference other − base, with its 95 % normal-approximation interval."""
    before = {e["index"]: float(e[key]) for e in base if key in e}
    d = [float(e[key]) - before[e["index"]] for e in other if key in e and e["index"] in before]
    m = mean(d)
    half = 1.96 * math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)) if len(d) > 1 else float("nan")
    return dict(delta=m, ci95=[m - half, m + half], n=len(d))


def deltas(base, other, base_ex, other_ex):
    """other − base for every metric both have; per-question metrics paired, with a 95 % CI."""
    out = {}
    for key in base.keys() & other.keys() - {"n", "skipped", "n_mc"}:
        per_question = "pass_at_k" if key.startswith("pass@") else PAIRED.get(key)
        out[key] = paired_delta(base_ex, other_ex, per_question) if per_question else dict(delta=other[key] - base[key])
    return {key: out[key] for key in base if key in out}


def fmt(v, width=10):
    if v is None or isinstance(v, float) and math.isnan(v):
        return f"{'-':>{width}}"
    return f"{v:>{width}d}" if isinstance(v, int) else f"{v:>{width}.3f}"


def print_table(results, others=None, diffs=None):
    if others is None:  # metrics down, data sets across; the richest summary gives the row order
        names = list(results)
        keys = dict.fromkeys(k for s in sorted(results.values(), key=len, reverse=True) for k in s)
        w = max(10, *(len(n) + 2 for n in names))
        print(f"{'':<26}" + "".join(f"{n:>{w}}" for n in names))
        for key in keys:
            print(f"{key:<26}" + "".join(fmt(results[n].get(key), w) for n in names))
        return
    for name in results:
        print(f"\n{name:<26}{'base':>10}{'other':>10}{'delta':>10}   paired 95% CI")
        for key, b in results[name].items():
            d = diffs[name].get(key, {})
            ci = d.get("ci95") or [float("nan")]
            ci = f"   [{ci[0]:+.3f}, {ci[1]:+.3f}]" if not math.isnan(ci[0]) else ""
            delta = fmt(None) if "delta" not in d or math.isnan(d["delta"]) else f"{d['delta']:>+10.3f}"
            print(f"{key:<26}{fmt(b)}{fmt(others[name].get(key))}{delta}{ci}")


def data_sets(spec, limit):
    """{name: rows} for each file / bundled name / suite in `spec`; any problem stops here, before work."""
    paths, sets = resolve_paths(spec), {}
    if not paths:
        raise SystemExit("--data: no data set given")
    for path in paths:
        name = os.path.splitext(os.path.basename(path))[0]
        try:
            rows = load_qa(path)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--data: {e}") from None
        sets[f"{name}_{len(sets)}" if name in sets else name] = rows[:limit] if limit > 0 else rows
    return sets


def heldout_eval(model, tok, cfg, amp, label, before=None):
    """train.py's before/after eval: an even mix of the first questions of each --test_data file,
    with the training prompt; after training, the table of both next to each other."""
    files = [p for p in cfg.test_data.split(",") if p]
    if not files or cfg.eval_questions <= 0:
        return None
    rows = [row for path in files for row in load_rows(path, "test")[:max(1, cfg.eval_questions // len(files))]]
    model.eval()
    t0 = time.time()
    with amp():
        summary, _ = evaluate(model, tok, rows, cfg.instruction, cfg.system, cfg.think_end, cfg.max_think_tokens,
                              think=cfg.method == "nrt", label=f"eval {label}")
    print(f"eval ({label}, {len(rows)} held-out questions, {time.time() - t0:.0f}s): "
          + " ".join(f"{k} {v:.3f}" for k, v in summary.items() if k != "n"), flush=True)
    if before:
        print("held-out                    before    after")
        for key in summary:
            if key != "n" and key in before:
                print(f"  {key:<24} {before[key]:8.3f} {summary[key]:8.3f}")
    return summary


def load(model_dir, dtype=None, device="cpu"):
    """(model, tokenizer); with dtype=None only checks that both are there. A problem stops here."""
    from checkpoint import check_finite, load_config, safetensors_files
    try:
        tok = Tokenizer.from_pretrained(model_dir)
        if dtype is None:
            return load_config(model_dir), safetensors_files(model_dir)
        model = Transformer.from_pretrained(model_dir, dtype, device).eval()
        check_finite(model, model_dir)  # NaN weights would give null metrics and exit 0
        return model, tok
    except (OSError, ValueError, KeyError) as e:
        hint = " (python prepare.py makes the default)" if model_dir == DEFAULTS["model_dir"] else ""
        raise SystemExit(f"cannot load a model from {model_dir!r}: {e}{hint}") from None


def main(argv=None):
    cfg = parse_args(DEFAULTS, argv)
    print_config(cfg)
    if cfg.k < 1 or 0 < cfg.n_samples < cfg.k or cfg.k > 1 and not cfg.think:
        raise SystemExit(f"--k={cfg['k']} --n_samples={cfg['n_samples']}: pass@k needs k ≥ 1, n_samples 0 "
                         "(= k) or ≥ k, and --think=True (it samples reasoning traces)")
    sets = data_sets(cfg.data, cfg.limit)
    dirs = [d for d in (cfg.model_dir, cfg.compare) if d]
    for d in dirs:  # fail now, not after the first model's whole run
        load(d)
    device = resolve_device(cfg.device)
    weight_dtype, amp = resolve_precision(cfg.dtype, device)
    name = lambda d: os.path.basename(os.path.normpath(d))  # noqa: E731
    out = cfg.out or os.path.join("out", "eval_" + "_vs_".join(map(name, dirs)) + ".jsonl")
    if os.path.exists(out) and not cfg.overwrite:
        raise SystemExit(f"{out} exists; pass --overwrite=True to replace it, or --out=ANOTHER.jsonl")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    print(f"per-example predictions go to {out}, written as each chunk of questions finishes", flush=True)
    keys = ("instruction", "system", "think_end", "max_think_tokens", "max_answer_tokens", "think", "batch_size",
            "k", "n_samples", "temperature", "seed")
    results, examples = [], []
    with open(out, "w", encoding="utf-8") as f:
        for d in dirs:
            model, tok = load(d, weight_dtype, device)
            results.append({}), examples.append({})
            for data, rows in sets.items():
                def write(chunk, d=d, data=data):  # one line per question, flushed after every chunk
                    f.write("".join(json.dumps(json_safe(dict(model_dir=d, data=data, **e))) + "\n" for e in chunk))
                    f.flush()
                t0 = time.time()
                with amp():
                    results[-1][data], examples[-1][data] = evaluate(
                        model, tok, rows, **{k: cfg[k] for k in keys}, on_examples=write, label=f"{name(d)} {data}")
                print(f"{d} {data}: {len(rows)} questions in {time.time() - t0:.0f}s", flush=True)
            del model
    line = dict(model_dir=cfg.model_dir, results=results[0])
    if cfg.compare:
        diffs = {n: deltas(results[0][n], results[1][n], examples[0][n], examples[1][n]) for n in sets}
        print_table(results[0], results[1], diffs)
        line.update(compare_dir=cfg.compare, compare_results=results[1], deltas=diffs)
    else:
        print_table(results[0])
    print(json.dumps(json_safe(dict(line, out=out))), flush=True)


if __name__ == "__main__":
    main()
