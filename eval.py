"""Evaluation: what reasoning buys on held-out questions, for one model or a base/trained pair (--compare).

    python eval.py                                    # the default model on arithmetic + object counting
    python eval.py --model_dir=DIR --data=all --limit=100 --k=4 --compare=out/nrt

Metrics (summarize) after a greedy trace and, suffix _direct, straight after the prompt (the empty trace): exact-match
accuracy of the greedy answer; the answer's log-likelihood Σ log c_i incl. its end-of-turn token (what NRT raises),
per token and on hard tokens (c_i^∅ < 0.5); multiple choice by likelihood; trace length, delimiter rate; pass@k of
sampled traces; --compare: paired 95 % CIs of the deltas. Choices: scoring batched as in training (score_answers);
the JSONL is appended per chunk (a crash keeps what was done); a question too long for the context is `skipped`.
Left out: sampled answers, LLM judges, per-task breakdowns (slice the JSONL), free-text options ("X or Y?"),
reading the prompt format from a checkpoint (pass the flags it was trained with).
"""
import json
import math
import os
import re
import time

import torch

from checkpoint import append_log, check_finite, load_config, safetensors_files
from cli import Config, check_ranges, parse_args, print_config, progress, resolve_device, resolve_precision
from data import (INSTRUCTION, DELIMITER, answer_ids, encode_delimiter, extract_answer, is_correct, json_safe, load_qa,
                  load_rows, normalize_answer, prompt_ids, resolve_paths)
from model import Transformer
from reward import hard_tokens, sample_traces, score_answers
from sample import generate
from tokenizer import Tokenizer

DEFAULTS = dict(
    model_dir="models/SmolLM2-135M-Instruct", data="default",  # data: JSONL files, bundled names, suites default | all
    compare="",           # a second model directory (e.g. a trained out_dir): side by side, paired deltas
    limit=0, think=True,  # the first N questions of each data set (0 = all); think=False: direct answers only
    k=1, n_samples=0, temperature=1.0,  # pass@k when k > 1, from n_samples (0 = k) traces sampled per question
    instruction=INSTRUCTION, delimiter=DELIMITER, system="",  # train.py's prompt: evaluated as it was trained
    max_think_tokens=48, max_answer_tokens=16, batch_size=32, seed=1337,  # batch_size: questions per chunk
    device="auto", dtype="auto",  # dtype auto | float32 | bf16-mixed | bf16-true; auto is what train.py uses
    out="", overwrite=False,  # the per-example JSONL (default out/eval_<model>[_vs_<other>].jsonl); replace it?
)
MAIN_ONLY = {"model_dir", "data", "compare", "limit", "device", "dtype", "out", "overwrite"}  # the rest: evaluate
PAIRED = {"accuracy" + c: "correct" + c for c in ("", "_direct", "_mc", "_mc_direct")}  # summary key -> per-example
PAIRED.update({key: key for key in ("accuracy_sampled", "answer_logprob", "answer_logprob_direct")})
FIRST_LINE_END = [chr(c) + "\n" for c in range(33, 127)]  # a newline after text (a bare one may lead)


def mc_options(row):
    """Options of a row: its "options", yes/no or true/false, or "(A) … (B) …" in the question; None if free-form."""
    answer, norm = row["answer"], normalize_answer(row["answer"])
    if isinstance(row.get("options"), list) and len(row["options"]) > 1:
        options = [str(o) for o in row["options"]]
        return options if any(is_correct(o, row) for o in options) else options + [answer]
    for pair in (("yes", "no"), ("true", "false")):
        if norm in pair:  # spelled like the reference (Yes/No, YES/NO): only the word differs
            return [answer if w == norm else w.upper() if answer.isupper()
                    else w.capitalize() if answer[:1].isupper() else w for w in pair]
    found = re.findall(r"\(([A-Za-z])\)\s*([^()\n]+)", row["question"])  # "(A) text (B) text"
    label = re.fullmatch(r"\W*([A-Za-z])\W*", answer)
    if len(found) > 1 and label and label.group(1).lower() in [x.lower() for x, _ in found]:
        i, j = label.span(1)  # the reference is a label ("B", "(B)"): the options are the labels
        case = str.upper if label.group(1).isupper() else str.lower
        return [answer[:i] + case(x) + answer[j:] for x, _ in found]
    texts = [t.strip() for _, t in found]
    return texts if len(texts) > 1 and any(is_correct(t, row) for t in texts) else None


def pass_at_k(n, c, k):
    """Unbiased pass@k (Chen et al., 2021): less variance than drawing just k of the n samples (c correct)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def greedy_answers(model, tok, prompts, traces, emitted, delimiter_ids, budget):
    """(answers, raw texts) after prompt ‖ trace (‖ delimiter), each to EOS or the end of its first non-empty line."""
    contexts = [p + z + ([] if em else delimiter_ids) for p, z, em in zip(prompts, traces, emitted)]
    out = generate(model, contexts, max_new_tokens=min(budget, model.cfg.max_seq_len - max(map(len, contexts))),
                   temperature=0, stop_ids=tok.stop_ids, stop_strings=FIRST_LINE_END, decode=tok.decode)
    raw = [tok.decode(ids, skip_special=True) for ids in out.tokens]
    return [extract_answer(text) for text in raw], raw


def score_options(model, tok, exs, rows, prompts, options, conditions, delimiter_ids, batch_size):
    """Per condition: log c of the reference and, on multiple-choice rows, Σ log c of each option and the pick."""
    jobs = [(cond, i, text) for cond in conditions for i, row in enumerate(rows)
            for text in dict.fromkeys([row["answer"], *(options[i] or [])])]  # the reference first, once
    seqs = [(prompts[i], conditions[c][0][i], conditions[c][1][i], answer_ids(tok, text)) for c, i, text in jobs]
    logc = {}  # (condition, row) -> {text: log c of its tokens}
    for s in range(0, len(seqs), batch_size):
        _, _, lc, mask = score_answers(model, seqs[s:s + batch_size], delimiter_ids)
        for (cond, i, text), x, m in zip(jobs[s:s + batch_size], lc, mask):
            logc.setdefault((cond, i), {})[text] = x[m].float().cpu()
    for (cond, i), by_text in logc.items():
        e, row, opts, ref = exs[i], rows[i], options[i], by_text[rows[i]["answer"]]
        e.update({"logc" + cond: ref.tolist(), "answer_logprob" + cond: ref.sum().item()})
        if opts:
            lp = {o: by_text[o].sum().item() for o in opts}
            best = max(opts, key=lp.get)
            e.update({"option_logprobs" + cond: lp, "mc_pred" + cond: best, "correct_mc" + cond: is_correct(best, row)})


@torch.no_grad()
def evaluate_chunk(model, tok, rows, start, opt, delimiter_ids, generator):
    """The per-example values of every metric for one chunk of questions (rows[start:...])."""
    examples = [dict(index=start + j, question=r["question"], answer=r["answer"]) for j, r in enumerate(rows)]
    prompts = [prompt_ids(tok, r["question"], opt.instruction, opt.system) for r in rows]
    options = [mc_options(r) for r in rows]
    texts = [[r["answer"], *r.get("aliases", []), *(o or [])] for r, o in zip(rows, options)]  # all reachable
    budgets = [max(opt.max_answer_tokens, *(len(answer_ids(tok, t)) for t in ts)) for ts in texts]
    think_len, limit = opt.max_think_tokens if opt.think else 0, model.cfg.max_seq_len
    for e, p, b in zip(examples, prompts, budgets):
        if len(p) + think_len + len(delimiter_ids) + b > limit:
            e["skipped"] = f"prompt {len(p)} + trace {think_len} + delimiter {len(delimiter_ids)} + answer {b} > {limit}"
    ok = [i for i, e in enumerate(examples) if "skipped" not in e]
    if not ok:
        return examples
    exs, rows, prompts, options = ([xs[i] for i in ok] for xs in (examples, rows, prompts, options))
    budget, n = max(budgets[i] for i in ok), len(ok)
    conditions = {"_direct": ([[]] * n, [False] * n)}  # the empty trace; "" = after the greedy trace
    if opt.think:  # sample_traces gives (traces, emitted, log-probs)
        conditions[""] = sample_traces(model, tok, prompts, opt.delimiter, opt.max_think_tokens, temperature=0)[:2]
        for e, z, em in zip(exs, *conditions[""]):
            e.update(trace=tok.decode(z), trace_len=len(z), emitted=em)
    # one generate call per condition: a joint one would pad the direct contexts to the longest trace context
    for cond, (zs, ems) in conditions.items():
        preds, raws = greedy_answers(model, tok, prompts, zs, ems, delimiter_ids, budget)
        for e, row, pred, raw in zip(exs, rows, preds, raws):
            e.update({"pred" + cond: pred, "correct" + cond: is_correct(pred, row), "raw" + cond: raw})
    score_options(model, tok, exs, rows, prompts, options, conditions, delimiter_ids, opt.batch_size)
    n_s, step = opt.n_samples, max(1, opt.batch_size // opt.n_samples)  # ≈ batch_size sampled rows a call
    for s in range(0, n, step) if opt.k > 1 else ():
        ps = prompts[s:s + step]
        zs, ems, _ = sample_traces(model, tok, ps, opt.delimiter, opt.max_think_tokens, n_s, opt.temperature, generator)
        preds, _ = greedy_answers(model, tok, [p for p in ps for _ in range(n_s)], zs, ems, delimiter_ids, budget)
        for j, (e, row) in enumerate(zip(exs[s:s + step], rows[s:s + step])):
            c = sum(is_correct(p, row) for p in preds[j * n_s:(j + 1) * n_s])
            e.update(n_samples=n_s, n_correct=c, accuracy_sampled=c / n_s, pass_at_k=pass_at_k(n_s, c, opt.k))
    return examples


def evaluate(model, tok, rows, instruction="", system="", delimiter=DELIMITER, max_think_tokens=48,
             max_answer_tokens=16, think=True, batch_size=32, k=1, n_samples=0, temperature=1.0, seed=0,
             on_examples=lambda chunk: None, label=None):
    """(summary, per-example dicts) of `rows` (question, answer, aliases?, options?), chunk by chunk: on_examples
    gets each finished chunk, and a `label` turns on a progress line (stderr)."""
    opt = Config(instruction=instruction, system=system, delimiter=delimiter, max_think_tokens=max_think_tokens,
                 max_answer_tokens=max_answer_tokens, think=think, batch_size=batch_size, k=k,
                 n_samples=n_samples or k, temperature=temperature)
    delimiter_ids, examples, t0 = encode_delimiter(tok, delimiter), [], time.time()
    generator = torch.Generator(model.embed.weight.device).manual_seed(seed)
    for start in range(0, len(rows), batch_size):
        chunk = evaluate_chunk(model, tok, rows[start:start + batch_size], start, opt, delimiter_ids, generator)
        examples += chunk
        on_examples(chunk)
        if label:
            progress(label, len(examples), len(rows), t0)
    return summarize(examples, think, k), examples


def mean(values):
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")


def summarize(examples, think=True, k=1):
    """Data-set metrics from the per-example values; skipped questions are counted, not averaged."""
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
    pairs = [(x, x0) for e in done for x, x0 in zip(e.get("logc", e["logc_direct"]), e["logc_direct"])]
    hard = [(x, x0) for x, x0 in pairs if hard_tokens(torch.tensor(x0))]
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
    """other − base for every metric both have, in base's order; per-question metrics paired, with a 95 % CI."""
    paired = {key: "pass_at_k" if key.startswith("pass@") else PAIRED.get(key) for key in base if key in other}
    return {key: paired_delta(base_ex, other_ex, p) if p else dict(delta=other[key] - base[key])
            for key, p in paired.items() if key not in ("n", "skipped", "n_mc")}


def print_table(title, columns):
    """Metrics down, columns ({name: {metric: value}}) across, "-" where missing or NaN; the richest sets the order."""
    w = max(10, *(len(name) + 2 for name in columns))
    print(f"\n{title:<26}" + "".join(f"{name:>{w}}" for name in columns))
    for key in dict.fromkeys(k for column in sorted(columns.values(), key=len, reverse=True) for k in column):
        cells = [column.get(key, math.nan) for column in columns.values()]
        cells = [("-" if math.isnan(v) else f"{v:.3f}") if isinstance(v, float) else v for v in cells]
        print(f"{key:<26}" + "".join(f"{v:>{w}}" for v in cells))


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


def heldout_eval(model, tok, cfg, amp, label, step, before=None):
    """train.py's before/after eval with the training prompt, on the first questions of each --test_data file."""
    files = [p for p in cfg.test_data.split(",") if p]
    if not files or cfg.eval_questions <= 0:
        return None
    rows = [row for path in files for row in load_rows(path, "test")[:max(1, cfg.eval_questions // len(files))]]
    model.eval()
    with amp():
        summary, _ = evaluate(model, tok, rows, cfg.instruction, cfg.system, cfg.delimiter, cfg.max_think_tokens,
                              think=cfg.method == "nrt", label=f"eval {label}")
    print_table(f"held-out ({len(rows)} questions)", dict(before=before, after=summary) if before else {label: summary})
    append_log(cfg, dict(eval=label, step=step, **summary))
    return summary


def load(model_dir, dtype=None, device="cpu"):
    """(model, tokenizer); with dtype=None only checks that both are there. A problem stops here."""
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
    check_ranges(cfg, k=(cfg.k >= 1, "≥ 1"), n_samples=(not 0 < cfg.n_samples < cfg.k, "0 (= k) or ≥ k"),
                 think=(cfg.think or cfg.k == 1, "--think=True for pass@k (k > 1), which samples reasoning traces"))
    sets, dirs = data_sets(cfg.data, cfg.limit), [d for d in (cfg.model_dir, cfg.compare) if d]
    for d in dirs:  # fail now, not after the first model's whole run
        load(d)
    device = resolve_device(cfg.device)
    weight_dtype, amp = resolve_precision(cfg.dtype, device)
    out = cfg.out or f"out/eval_{'_vs_'.join(os.path.basename(os.path.normpath(d)) for d in dirs)}.jsonl"
    if os.path.exists(out) and not cfg.overwrite:
        raise SystemExit(f"{out} exists; pass --overwrite=True to replace it, or --out=ANOTHER.jsonl")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    print(f"per-example predictions go to {out}, written as each chunk of questions finishes", flush=True)
    opts = {k: v for k, v in cfg.items() if k not in MAIN_ONLY}
    results, examples = [{}, {}], [{}, {}]  # per model: {data set: summary}, {data set: examples}
    with open(out, "w", encoding="utf-8", buffering=1) as f:  # line-buffered: each finished chunk is on disk
        for i, d in enumerate(dirs):
            model, tok = load(d, weight_dtype, device)
            for data, rows in sets.items():
                def write(chunk, d=d, data=data):  # one line per question
                    f.writelines(json.dumps(json_safe(dict(model_dir=d, data=data, **e))) + "\n" for e in chunk)
                with amp():
                    summary, exs = evaluate(model, tok, rows, **opts, on_examples=write, label=f"{d} {data}")
                results[i][data], examples[i][data] = summary, exs
            del model
    line = dict(model_dir=cfg.model_dir, results=results[0])
    if cfg.compare:
        diffs = {n: deltas(results[0][n], results[1][n], examples[0][n], examples[1][n]) for n in sets}
        for n, diff in diffs.items():  # per data set: base, other, delta and its paired CI where there is one
            columns = {"base": results[0][n], "other": results[1][n], "delta": {k: d["delta"] for k, d in diff.items()}}
            ci = [(k, d["ci95"]) for k, d in diff.items() if not math.isnan(d.get("ci95", [math.nan])[0])]
            print_table(n, dict(columns, **{"paired 95% CI": {k: f"  [{lo:+.3f}, {hi:+.3f}]" for k, (lo, hi) in ci}}))
        line.update(compare_dir=cfg.compare, compare_results=results[1], deltas=diffs)
    else:
        print_table("", results[0])
    print(json.dumps(json_safe(dict(line, out=out))), flush=True)


if __name__ == "__main__":
    main()
