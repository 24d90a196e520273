"""One NRT step in slow motion, on one question, with train.py's own functions.

    python explain.py                          # the default model, the first training question
    python explain.py --question=5 --aggregation=gm --samples_per_question=4   # any train.py option

Prints, in order: the prompt and the delimiter; the K sampled traces; a table of the reference answer's tokens
with c_i after the empty trace and after each trace, and the ws_nlog weights −log c_i^∅; the rewards R_k under the
chosen aggregation and, for comparison, under all six; R(∅), R'_k and the advantages A_k; the three loss terms;
then one AdamW step and the same numbers after it. Nothing is saved: the checkpoint on disk is never touched. The
output is a pure function of the seed. Left out: several questions at once, mini-batches (one step is one update).
"""
import torch

import train
from cli import check_ranges, parse_args, resolve_device, resolve_precision
from data import encode_delimiter, load_rows
from eval import load
from reward import AGGREGATIONS, aggregate, clip_to_baseline, score_answers, score_empty_traces

DEFAULTS = {**train.DEFAULTS, "question": 0, "samples_per_question": 4, "lr": 1e-4}


def table(tok, answer, logc_empty, logc):
    """The answer's tokens down, c^∅, the ws_nlog weight −log c^∅ and c after each trace across."""
    print(f"  {'token':<12}{'c∅':>8}{'−log c∅':>9}" + "".join(f"{f'c|z{k}':>8}" for k in range(len(logc))))
    for i, t in enumerate(answer):
        print(f"  {tok.decode([t])!r:<12}{logc_empty[i].exp():8.3f}{-logc_empty[i]:9.3f}"
              + "".join(f"{logc[k, i].exp():8.3f}" for k in range(len(logc))))
    print(f"  {'Σ log c':<12}{logc_empty.sum():8.2f}{'':9}" + "".join(f"{s:8.2f}" for s in logc.sum(-1)))


def rewards(logc, logc_empty, cfg):
    """R_k under every aggregation (the chosen one marked), and R(∅), R'_k, A_k under the chosen one (train.py's)."""
    mask = torch.ones_like(logc, dtype=torch.bool)
    out = {name: aggregate(name, logc, mask, logc_empty.expand(len(logc), -1)) for name in AGGREGATIONS}
    for name, R in out.items():
        print(f"  R_k {name:<8}{'*' if name == cfg.aggregation else ' '} " + " ".join(f"{r:9.4f}" for r in R))
    R, R_empty, A, zero = train.advantages(logc, logc_empty, mask, cfg)
    R_prime = clip_to_baseline(R, R_empty) if cfg.baseline_clip else R
    print(f"  R(∅) = {R_empty:.4f}   R'_k = {'max(0, R_k − R(∅))' if cfg.baseline_clip else 'R_k (no clip)'}: "
          + " ".join(f"{r:.4f}" for r in R_prime))
    print("  A_k = (R'_k − mean) / (std + ε): " + " ".join(f"{a:+.3f}" for a in A)
          + ("   (all equal: this question teaches the policy nothing this step)" if zero.all() else ""))
    return out, A


def main(argv=None):
    cfg = parse_args(DEFAULTS, argv)
    check_ranges(cfg, minibatches=(cfg.minibatches == 1, "1 here (one step is one update)"))
    device = resolve_device(cfg.device)
    weight_dtype, amp = resolve_precision(cfg.dtype, device)
    model, tok = load(cfg.model_dir, weight_dtype, device)  # checked finite
    delimiter_ids, rows = encode_delimiter(tok, cfg.delimiter), load_rows(cfg.data)
    q = rows[cfg.question % len(rows)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.95))
    # train.py's step on this one question: rollout, empty trace, forward + backward, AdamW; its numbers printed below
    [(g, result)] = train.nrt_step(model, optimizer, tok, delimiter_ids, [q], cfg, amp, cfg.seed)[1]
    logc_empty, norm = result.logc_empty, len(g.traces) * cfg.max_think_tokens

    print("== 1. the prompt (the chat template's user turn) and the end-of-thinking delimiter")
    print(tok.decode(g.prompt) + f"\n  delimiter: {cfg.delimiter!r} = ids {delimiter_ids};  "
          f"reference answer y*: {q['answer']!r}")
    print(f"\n== 2. K = {len(g.traces)} sampled traces (temperature {cfg.temperature}, ≤ {cfg.max_think_tokens} tokens)")
    for k, (z, e) in enumerate(zip(g.traces, g.emitted)):
        print(f"  z{k} ({len(z)} tokens, {'wrote the delimiter' if e else 'truncated: delimiter appended'}): "
              f"{tok.decode(z)!r}")

    print("\n== 3. c_i = π(y*_i | x, z, y*_<i): the answer's tokens after the empty trace and after each trace")
    table(tok, g.answer, logc_empty, result.logc)

    print("\n== 4. rewards (R = f(c); * = --aggregation), the baseline and the advantages")
    before, A = rewards(result.logc, logc_empty, cfg)

    print(f"\n== 5. the loss terms (summed over tokens, divided by K·max_think_tokens = {norm})")
    t = result.terms
    print(f"  policy      {t['policy']:+.4f}  − Σ A_k·log π(z_k): raises the traces with A > 0, lowers those with A < 0")
    print(f"  format      {t['format']:+.4f}  − log π(delimiter) where a trace did not write it (× {cfg.format_loss_coef})")
    print(f"  answer_nll  {t['answer_nll']:+.4f}  − Σ log c_i: raises y* after every trace (× {cfg.token_loss_coef})")

    print(f"\n== 6. after one AdamW step (lr {cfg.lr:g}): the same traces, scored again")
    model.eval()
    with torch.no_grad(), amp():
        _, _, logc_after, _ = score_answers(model, g.rows(), delimiter_ids)
        logc_empty_after = score_empty_traces(model, [(g.prompt, g.answer)], delimiter_ids)[0]
    table(tok, g.answer, logc_empty_after, logc_after)
    after, _ = rewards(logc_after, logc_empty_after, cfg)
    print(f"  mean Σ log c over the traces: {result.logc.sum(-1).mean():.3f} → {logc_after.sum(-1).mean():.3f};"
          f"  empty trace: {logc_empty.sum():.3f} → {logc_empty_after.sum():.3f}")
    return dict(logc=result.logc, logc_empty=logc_empty, R=before, A=A, logc_after=logc_after, R_after=after)


if __name__ == "__main__":
    main()
