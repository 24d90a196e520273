"""The NRT reward: how much a sampled reasoning trace raises the model's own likelihood of the answer.

What it is (names as in NRT.md, the method in this repository)
  For a question x with reference answer y* (T tokens, the end-of-turn token included so the model also
  learns where the answer stops) and a trace z, teacher-force  prompt ‖ z ‖ delimiter ‖ y* ‖ EOS  and read
  c_i = π(y*_i | x, z, y*_<i); the empty trace ∅ (prompt ‖ delimiter ‖ y* ‖ EOS) gives c_i^∅. A reward
  R = f(c_1..c_T) is one of six aggregations; R'_k = max(0, R_k − R(∅)) optionally; the advantage is the
  group-normalised R' over the K traces of a question.

Choices
  - Everything is computed from log c (log-probs), so Π c over many tokens underflows to 0, never NaN.
  - `score_answers` is the one teacher-forced forward that reads log c after a trace, with gradients in training
    (one forward gives both the rewards and the loss), without for the empty traces, in eval.py and SFT.
  - `sample_traces` is the one place a sampler result becomes traces (delimiter emitted or not).
Left out: verifiers, learned reward models, and any reward on the trace text itself.
"""
import math
from dataclasses import dataclass

import torch

from model import token_logprobs
from sample import generate

AGGREGATIONS = ("logp", "prob", "gm", "am", "ws_inv", "ws_nlog")


# ---- the six aggregation functions f and their token weights α_i c_i = (∂f/∂c_i) c_i ----

def aggregate(name, logc, mask, logc_empty=None):
    """R = f(c) per row. logc: (N, T) log c_i, mask: (N, T) real answer tokens, logc_empty: (N, T) log c_i^∅."""
    logc, T = logc * mask, mask.sum(-1).clamp(min=1)  # padded positions contribute log 1 = 0; T per row
    if name == "logp":  # Σ log c_i
        return logc.sum(-1)
    if name == "prob":  # Π c_i
        return logc.sum(-1).exp()
    if name == "gm":  # exp((1/T) Σ log c_i)
        return (logc.sum(-1) / T).exp()
    if name == "am":  # (1/T) Σ c_i
        return (logc.exp() * mask).sum(-1) / T
    if name in ("ws_inv", "ws_nlog"):  # (1/T) Σ w_i c_i, w_i = 1 / c_i^∅ (ws_inv) or −log c_i^∅ (ws_nlog)
        # w_i are constants (no gradient); ws_inv is exp(log c − log c^∅), so a tiny c^∅ never overflows
        wc = (logc - logc_empty.detach()).exp() if name == "ws_inv" else -logc_empty.detach() * logc.exp()
        return torch.where(mask, wc, 0.0).sum(-1) / T  # where: an overflow on padding must not give NaN
    raise ValueError(f"unknown aggregation {name!r}; expected one of {AGGREGATIONS}")


def token_weights(name, logc, mask, logc_empty=None):
    """α_i c_i = (∂f/∂c_i) c_i = ∂f/∂log c_i for every answer token (the 'derived' weight of the answer NLL
    term), zero on padding, no gradient: 1 (logp), Π_j c_j (prob), GM / T (gm), c_i / T (am), w_i c_i / T
    (ws_*). Taken by autograd through `aggregate`, so it is always the weight of the reward actually used."""
    with torch.enable_grad():
        logc = logc.detach().requires_grad_()
        (grad,) = torch.autograd.grad(aggregate(name, logc, mask, logc_empty).sum(), logc)
    return torch.where(mask, grad, 0.0)  # where, not ·mask: a padded exp overflow gives 0·inf = NaN there


def clip_to_baseline(R, R_empty):
    """R'_k = max(0, R_k − R(∅)): a trace is only rewarded for beating the direct answer."""
    return (R - R_empty).clamp(min=0)


def group_normalise(R, group_size, eps=1e-6):
    """A_k = (R'_k − mean) / (std + eps) within each group of K. Returns (A, zero_std): zero_std marks each group
    whose rewards were all equal, and such a group gets A = 0."""
    groups = R.view(-1, group_size)
    std = groups.std(-1, unbiased=False, keepdim=True)
    zero_std = std.squeeze(-1) < 1e-8
    A = (groups - groups.mean(-1, keepdim=True)) / (std + eps)
    return A.masked_fill(zero_std[:, None], 0.0).view(-1), zero_std


# ---- traces, and the answer scored after them: one teacher-forced forward, used by train, eval and SFT ----

def sample_traces(model, tok, prompts, delimiter, max_tokens, num_samples=1, temperature=1.0, generator=None):
    """K traces per prompt (rows grouped by prompt), each ending at the delimiter or after max_tokens.

    Returns (trace ids, emitted, sampler log-probs) per row. `emitted`: the trace wrote the delimiter itself (it
    stays in the trace and gets the policy gradient); its text without the surrounding whitespace counts too
    (" Answer:" for "\nAnswer:"), or a trace that puts it mid-line would run on past its answer. A trace that ends
    its turn (EOS) before the delimiter is treated like a truncated one: EOS dropped, delimiter appended when scored."""
    stops = [delimiter, delimiter.strip()] if delimiter.strip() not in ("", delimiter) else [delimiter]
    out = generate(model, prompts, num_samples=num_samples, max_new_tokens=max_tokens, temperature=temperature,
                   stop_ids=tok.stop_ids, stop_strings=stops, decode=tok.decode, generator=generator)
    keep = [len(z) - (why == "stop_id") for z, why in zip(out.tokens, out.stop_reason)]  # a turn's EOS: dropped
    traces, logprobs = ([x[:n] for x, n in zip(xs, keep)] for xs in (out.tokens, out.logprobs))
    return traces, [why == "stop_string" for why in out.stop_reason], logprobs


@dataclass
class Batch:
    """Right-padded sequences prompt ‖ trace ‖ delimiter ‖ answer with per-token role masks."""
    tokens: torch.Tensor        # (N, L) ids
    trace_mask: torch.Tensor    # tokens the policy sampled (the trace, incl. a delimiter it emitted)
    format_mask: torch.Tensor   # delimiter tokens appended because the trace did not emit it
    answer_mask: torch.Tensor   # reference-answer tokens y* and the end-of-turn token


def build_batch(rows, delimiter_ids, device="cpu") -> Batch:
    """Rows (prompt, trace, emitted, answer) of id lists → right-padded prompt ‖ z ‖ delimiter? ‖ y*‖EOS."""
    seqs = [[(t, role) for role, ids in enumerate((prompt, trace, [] if emitted else delimiter_ids, answer))
             for t in ids] for prompt, trace, emitted, answer in rows]  # (token, role 0..3) pairs
    L = max(len(s) for s in seqs)
    padded = torch.tensor([s + [(0, -1)] * (L - len(s)) for s in seqs], device=device)  # (N, L, 2)
    tokens, roles = padded.movedim(-1, 0).contiguous()
    return Batch(tokens, roles == 1, roles == 2, roles == 3)  # role -1: padding


def answer_logc(logprobs, answer_mask):
    """Each row's answer-token log c_i, left-aligned and zero-padded into (N, T_max), and its mask (N, T_max).

    The answer starts at a different position in each row (traces differ in length): its j-th token is where the
    running count of answer tokens reaches j+1, so one scatter-add moves every row's answer to columns 0..T−1 at
    once (no per-row indexing: no host sync per row on a GPU)."""
    counts = answer_mask.sum(-1, keepdim=True)                                   # (N, 1) answer length per row
    T = int(counts.max())
    column = (answer_mask.cumsum(-1) - 1).clamp(0, T - 1)                        # (N, L) column of each answer token
    logc = logprobs.new_zeros(answer_mask.shape[0], T).scatter_add(1, column, logprobs * answer_mask)
    return logc, torch.arange(T, device=logc.device) < counts                    # (N, T), (N, T)


def score_answers(model, rows, delimiter_ids, trace_too=False):
    """Teacher-force rows (prompt, trace, emitted, answer ids) in one batched forward; gradients flow when enabled.

    Returns (batch, logprobs (N, L), log c (N, T), answer mask (N, T)), log-probs at the answer positions only,
    plus the trace and delimiter positions when `trace_too` (the training forward: policy-gradient, format terms)."""
    batch = build_batch(rows, delimiter_ids, model.embed.weight.device)
    want = batch.answer_mask | (batch.trace_mask | batch.format_mask if trace_too else False)
    logprobs = token_logprobs(model, batch.tokens, want)
    return batch, logprobs, *answer_logc(logprobs, batch.answer_mask)


@torch.no_grad()
def score_empty_traces(model, questions, delimiter_ids):
    """log c_i^∅ (T,) of each (prompt, answer) pair: prompt ‖ delimiter ‖ y*, all in one batch, no grad."""
    _, _, logc, mask = score_answers(model, [(p, [], False, a) for p, a in questions], delimiter_ids)
    return [lc[m] for lc, m in zip(logc, mask)]


@torch.no_grad()
def score_traces(model, rows, delimiter_ids):
    """(log c (K, T), log-probs (K, L)) of traces under the current policy, kept before an update changes it."""
    _, logprobs, logc, _ = score_answers(model, rows, delimiter_ids, trace_too=True)
    return logc, logprobs


def hard_tokens(logc_empty):
    """Answer tokens missed without a trace (c_i^∅ < 0.5): where reasoning must help (logged, not trained on)."""
    return logc_empty < math.log(0.5)
