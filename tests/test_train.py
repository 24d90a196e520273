"""train.py: config, schedule, data order, the NRT loss and update, one real step, NaN skip, checkpoint/resume."""
import contextlib
import copy
import json
import math
import os
import subprocess
import sys
import shutil
import types

import pytest
import torch
from conftest import ROOT, tiny_model

import checkpoint
import train
from cli import Config
from data import answer_ids, encode_delimiter, prompt_ids
from model import Transformer, token_logprobs
from reward import answer_logc, build_batch, score_answers, score_empty_traces, score_traces
from sample import generate
from tokenizer import Tokenizer

NO_AMP = contextlib.nullcontext  # the precision policy's autocast factory for float32


def make_cfg(**overrides):
    return Config({**train.DEFAULTS, **overrides})


class CharTokenizer:
    """A minimal tokenizer for the in-process tests: one id per character of a 96-char alphabet (ids
    4..99), <eos> (1) ends a turn, <think_end> (2) is a one-token delimiter that decodes to its name, so
    the sampler's stop string matches it; <bos> (3) opens a prompt."""
    CHARS = "\n" + "".join(chr(i) for i in range(32, 127))
    SPECIALS = {"<eos>": 1, "<think_end>": 2, "<bos>": 3}

    def __init__(self):
        self.eos_id = 1
        self.stop_ids = frozenset({1})
        self._names = {i: s for s, i in self.SPECIALS.items()}

    def special_id(self, name):
        return self.SPECIALS[name]  # KeyError for anything else, as the real tokenizer

    def encode(self, text, continuation=False):  # a character tokenizer: nothing to continue
        return [4 + self.CHARS.index(ch) for ch in text]

    def decode(self, ids):
        return "".join(self._names.get(i) or (self.CHARS[i - 4] if 4 <= i < 4 + len(self.CHARS) else "")
                       for i in ids)

    def encode_chat(self, messages):
        return [3] + self.encode("\n".join(m["content"] for m in messages) + "\n")


TOK = CharTokenizer()
QUESTIONS = [dict(question="2+3", answer="5"), dict(question="7*6", answer="42")]


def step_cfg(**overrides):
    return make_cfg(**{**dict(samples_per_question=4, max_think_tokens=6, instruction="", delimiter="<think_end>"),
                       **overrides})


def mean_answer_logprob(model, groups, delimiter_ids):
    """Mean log π(y*_i | x, z_k, y*_<i) over every answer token of every trace of every group."""
    rows = [(g.prompt, z, e, g.answer) for g in groups for z, e in zip(g.traces, g.emitted)]
    b = build_batch(rows, delimiter_ids)
    with torch.no_grad():
        lp = token_logprobs(model, b.tokens, b.answer_mask)
    return lp[b.answer_mask].mean().item()


def all_finite(model):
    return all(torch.isfinite(p).all() for p in model.parameters())


# ---- configuration ----

@pytest.mark.parametrize("argv, message", [
    (["--preset=nope"], "unknown preset 'nope'"),
    (["--aggregation=mean"], "--aggregation: expected one of"),
    (["--token_weight=soft"], "--token_weight: expected one of"),
    (["--method=dpo"], "--method: expected one of"),
    (["--preset=rlpr", "--aggregation=max"], "--aggregation: expected one of"),
    (["--dtype=bf16-true"], "fp32 master weights"),
    (["--dtype=bfloat16"], "--dtype: expected one of"),
    (["--minibatches=3"], "must be divisible by --minibatches=3"),
    (["--steps=2", "--steps=3"], "--steps is given twice"),
])
def test_resolve_config_rejects_unknown_preset_and_choices(argv, message):
    with pytest.raises(SystemExit, match=message):
        train.resolve_config(argv)


def test_resolve_config_preset_then_explicit_overrides():
    cfg = train.resolve_config(["--preset=rlpr", "--aggregation=gm", "--steps=3"])
    assert cfg.aggregation == "gm" and cfg.steps == 3                # explicit wins
    assert cfg.token_loss_coef == 0.0 and cfg.baseline_clip is False  # from the preset
    cfg = train.resolve_config(["--preset=verifree"])
    assert (cfg.aggregation, cfg.token_weight) == ("prob", "derived")


# ---- schedule and data order ----

def test_lr_warmup_then_cosine_to_min_lr():
    cfg = make_cfg(lr=1.0, steps=100, warmup_frac=0.1, min_lr_frac=0.1)
    lrs = [train.lr_at(s, cfg) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warm-up to the peak
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 89)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))                # cosine decay, monotone
    assert min(lrs) >= 0.1 and lrs[-1] == pytest.approx(0.1)
    assert train.lr_at(100, cfg) == pytest.approx(0.1)                    # the floor is min_lr_frac · lr
    no_warmup = make_cfg(lr=2e-6, steps=5, warmup_frac=0.0, min_lr_frac=0.5)
    assert train.lr_at(0, no_warmup) == pytest.approx(2e-6)


def test_step_questions_pure_function_covering_epochs():
    rows = [dict(i=i) for i in range(7)]
    B, seed = 3, 5
    steps = [[r["i"] for r in train.step_questions(rows, s, B, seed)] for s in range(7)]  # 21 = 3 epochs
    flat = [i for s in steps for i in s]
    for e in range(3):
        assert sorted(flat[7 * e:7 * (e + 1)]) == list(range(7))  # each epoch visits every row once
    assert flat[:7] != flat[7:14] or flat[7:14] != flat[14:]     # epochs are reshuffled
    assert steps[2] == [flat[6], flat[7], flat[8]]                # a step straddling two epochs
    # a pure function of (seed, step): any order of calls, repeated calls, give the same questions
    for s in (5, 0, 3, 3):
        assert [r["i"] for r in train.step_questions(rows, s, B, seed)] == steps[s]
    other = [r["i"] for s in range(3) for r in train.step_questions(rows, s, B, seed + 100)]
    assert other != flat[:9]


# ---- advantages ----

def test_advantages_hand_computed_gm_with_baseline_clip():
    c = torch.tensor([[0.5, 0.5], [0.1, 0.4], [0.9, 0.9], [0.2, 0.2]])
    c_empty = torch.tensor([0.25, 0.64])  # GM = 0.4
    mask = torch.ones(4, 2, dtype=torch.bool)
    R, R_empty, A, zero_std = train.advantages(c.log(), c_empty.log(), mask, make_cfg(aggregation="gm"))
    torch.testing.assert_close(R, torch.tensor([0.5, 0.2, 0.9, 0.2]))
    torch.testing.assert_close(R_empty, torch.tensor(0.4))
    Rp = torch.tensor([0.1, 0.0, 0.5, 0.0])  # max(0, R − R(∅))
    std = math.sqrt(((Rp - Rp.mean()) ** 2).mean().item())
    torch.testing.assert_close(A, (Rp - Rp.mean()) / (std + 1e-6))
    assert not zero_std
    _, _, A_noclip, _ = train.advantages(c.log(), c_empty.log(), mask, make_cfg(aggregation="gm", baseline_clip=False))
    R0 = torch.tensor([0.5, 0.2, 0.9, 0.2])
    torch.testing.assert_close(A_noclip, (R0 - R0.mean()) / (R0.std(unbiased=False) + 1e-6))


def test_advantages_every_trace_worse_than_empty_gives_zero_and_is_flagged():
    logc = torch.log(torch.tensor([[0.1, 0.2], [0.3, 0.1], [0.05, 0.3]]))
    logc_empty = torch.log(torch.tensor([0.9, 0.9]))
    R, R_empty, A, zero_std = train.advantages(logc, logc_empty, torch.ones(3, 2, dtype=torch.bool), make_cfg())
    assert (R < R_empty).all() and R.std() > 0
    assert A.tolist() == [0.0, 0.0, 0.0] and zero_std


# ---- the NRT loss on a toy case ----

def toy_case():
    """K = 3 traces: a truncated one, one that emitted the delimiter (9), a one-token truncated one."""
    rows = [([1, 2], [3, 4, 5], False, [10, 11]),   # [1 2 3 4 5 9 10 11]  trace 2..4, format 5, answer 6, 7
            ([1, 2], [6, 7, 9], True, [10, 11]),    # [1 2 6 7 9 10 11 0]  trace 2..4, answer 5, 6
            ([1, 2], [8], False, [10, 11])]         # [1 2 8 9 10 11 0 0]  trace 2, format 3, answer 4, 5
    batch = build_batch(rows, [9])
    torch.manual_seed(0)
    logprobs = (torch.rand(3, 8) * -3 - 0.1).requires_grad_(True)
    A = torch.tensor([1.0, -0.7, 0.3])
    return batch, logprobs, A, torch.tensor([-0.5, -2.0])


TRACE = {0: [2, 3, 4], 1: [2, 3, 4], 2: [2]}
FORMAT = [(0, 5), (2, 3)]
ANSWER = {0: [6, 7], 1: [5, 6], 2: [4, 5]}
# importance ratios at the trace positions, and the weight each must get (A = +1, −0.7, +0.3):
RATIO = {0: [1.5, 0.5, 1.1], 1: [0.5, 2.0, 0.9], 2: [1.2]}
WEIGHT = {0: [0.0, 0.8, 1.1],    # A > 0: ρ > 1.28 masked; ρ < 0.8 clipped to 0.8, not masked
          1: [0.0, 1.28, 0.9],   # A < 0: ρ < 0.8 masked; ρ > 1.28 clipped to 1.28, not masked
          2: [1.2]}


def hand_token_weights(name, logc, logc_empty):
    """s_i = α_i c_i from the NRT.md table, in plain Python (T = 2, no padding)."""
    c, ce, T = [math.exp(x) for x in logc], [math.exp(x) for x in logc_empty], len(logc)
    if name == "logp":
        return [1.0] * T
    if name == "prob":
        return [c[0] * c[1]] * T
    if name == "gm":
        return [math.sqrt(c[0] * c[1]) / T] * T
    if name == "am":
        return [ci / T for ci in c]
    if name == "ws_inv":
        return [ci / cei / T for ci, cei in zip(c, ce)]
    return [-math.log(cei) * ci / T for ci, cei in zip(c, ce)]


@pytest.mark.parametrize("token_weight, aggregation", [("fixed", "ws_nlog")] + [("derived", a) for a in
                                                       ("logp", "prob", "gm", "am", "ws_inv", "ws_nlog")])
def test_nrt_loss_equals_hand_written_formula(token_weight, aggregation):
    batch, logprobs, A, logc_empty = toy_case()
    cfg = make_cfg(token_weight=token_weight, aggregation=aggregation)
    log_ratio = torch.full_like(logprobs, math.log(3.0))  # off the trace the ratio must not matter
    for k, pos in TRACE.items():
        for t, r in zip(pos, RATIO[k]):
            log_ratio[k, t] = math.log(r)
    old = logprobs.detach() - log_ratio
    logc, mask = answer_logc(logprobs, batch.answer_mask)
    terms, clipped = train.nrt_loss(logprobs, batch, logc, mask, logc_empty, A, cfg, old_logprobs=old)
    assert clipped == pytest.approx(2 / 7)  # two of the seven trace tokens are masked
    terms = dict(pg=terms["policy"], format=terms["format"], token=terms["answer_nll"])
    lp = logprobs.detach()
    pg = -sum(A[k].item() * w * lp[k, t].item() for k in TRACE for t, w in zip(TRACE[k], WEIGHT[k]))
    fmt = -sum(lp[k, t].item() for k, t in FORMAT)
    s = {k: hand_token_weights(aggregation, [lp[k, t].item() for t in pos], logc_empty.tolist())
         if token_weight == "derived" else [1.0, 1.0] for k, pos in ANSWER.items()}
    tok = -sum(si * lp[k, t].item() for k, pos in ANSWER.items() for t, si in zip(pos, s[k]))
    assert set(terms) == {"pg", "format", "token"}
    assert terms["pg"].item() == pytest.approx(pg, rel=1e-5)
    assert terms["format"].item() == pytest.approx(fmt, rel=1e-5)
    assert terms["token"].item() == pytest.approx(tok, rel=1e-5)
    # gradients: the importance weights and the token weights are constants (stop-gradient)
    (grad,) = torch.autograd.grad(terms["pg"] + terms["format"] + terms["token"], logprobs)
    expected = torch.zeros_like(grad)
    for k in TRACE:
        for t, w in zip(TRACE[k], WEIGHT[k]):
            expected[k, t] = -A[k] * w
    for k, t in FORMAT:
        expected[k, t] = -1.0
    for k, pos in ANSWER.items():
        for t, si in zip(pos, s[k]):
            expected[k, t] = -si
    torch.testing.assert_close(grad, expected)


def test_nrt_loss_on_policy_has_unit_importance_weight():
    batch, logprobs, A, logc_empty = toy_case()
    cfg = make_cfg()
    logc, mask = answer_logc(logprobs, batch.answer_mask)
    plain, _ = train.nrt_loss(logprobs, batch, logc, mask, logc_empty, A, cfg)
    same, clipped = train.nrt_loss(logprobs, batch, logc, mask, logc_empty, A, cfg, logprobs.detach().clone())
    lp = logprobs.detach()
    pg = -sum(A[k].item() * lp[k, t].item() for k in TRACE for t in TRACE[k])
    assert plain["policy"].item() == pytest.approx(pg, rel=1e-5)
    assert same["policy"].item() == pytest.approx(pg, rel=1e-5) and clipped == 0.0


# ---- train_on_group(): the loss over real groups, normalised by the constant B·K·max_think_tokens ----

def manual_groups():
    """Two questions, K = 4: truncated traces of different lengths, emitted ones, an empty one."""
    g0 = train.Group(dict(question="a", answer="b"), [3, 10, 11, 12], [20, 21, 1],
                     [[30, 31, 32], [33], [34, 2], []], [False, False, True, False], [[0.0] * 3, [0.0], [0.0] * 2, []])
    g1 = train.Group(dict(question="c", answer="d"), [3, 13], [22, 1],
                     [[40, 41, 42, 43, 44], [45, 46], [2], [47]], [False, False, True, False],
                     [[0.0] * 5, [0.0] * 2, [0.0], [0.0]])
    return [g0, g1]


def full_logprobs(model, seq):
    """log π(seq[t] | seq[:t]) at index t (index 0 unused), from the plain forward and full log_softmax."""
    lsm = model(torch.tensor([seq]))[0].float().log_softmax(-1)
    return [None] + [lsm[t - 1, seq[t]] for t in range(1, len(seq))]


def train_groups(model, groups, delimiter_ids, cfg, world=1):
    """Steps 2–5 of nrt_step on fixed groups (no sampling): the results, gradients left in .grad."""
    logc_empty = score_empty_traces(model, [(g.prompt, g.answer) for g in groups], delimiter_ids)
    norm = len(groups) * world * cfg.samples_per_question * cfg.max_think_tokens
    return [train.train_on_group(model, g, lc0, None, delimiter_ids, cfg, NO_AMP, norm)
            for g, lc0 in zip(groups, logc_empty)]


@pytest.mark.parametrize("token_weight", ["fixed", "derived"])
def test_update_loss_and_gradient_equal_the_formula(token_weight):
    model = tiny_model(seed=3)
    reference = copy.deepcopy(model)
    delimiter_ids, max_think = [2], 5
    cfg = make_cfg(samples_per_question=4, max_think_tokens=max_think, baseline_clip=False, grad_clip=1e9,
                   token_weight=token_weight, aggregation="ws_nlog", policy_loss_coef=0.7, format_loss_coef=0.3)
    groups = manual_groups()
    results = train_groups(model, groups, delimiter_ids, cfg)

    norm = len(groups) * 4 * max_think  # B·K·max_think_tokens, whatever the traces' actual lengths
    totals = dict(policy=0.0, format=0.0, answer_nll=0.0)
    for g, r in zip(groups, results):
        empty = full_logprobs(reference, g.prompt + delimiter_ids + g.answer)
        le = torch.stack(empty[-len(g.answer):]).detach()
        torch.testing.assert_close(r.logc_empty, le, atol=1e-5, rtol=1e-5)
        per_trace = []
        for z, e in zip(g.traces, g.emitted):
            seq = g.prompt + z + ([] if e else delimiter_ids) + g.answer
            lp = full_logprobs(reference, seq)
            P, Z = len(g.prompt), len(z)
            per_trace.append(dict(trace=sum(lp[P:P + Z], torch.tensor(0.0)),
                                  fmt=torch.tensor(0.0) if e else sum(lp[P + Z:P + Z + len(delimiter_ids)]),
                                  ans=torch.stack(lp[-len(g.answer):])))
        # R_k = (1/T) Σ −log c^∅_i · c_ik (ws_nlog); no baseline clip; A = (R − mean)/(std + eps)
        R = torch.stack([(-le * d["ans"].detach().exp()).mean() for d in per_trace])
        A = (R - R.mean()) / (R.std(unbiased=False) + 1e-6)
        assert A.abs().max() > 0.5
        torch.testing.assert_close(r.A, A, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(r.R, R, atol=1e-5, rtol=1e-4)
        pg = -sum(a * d["trace"] for a, d in zip(A, per_trace))
        fmt = -sum(d["fmt"] for d in per_trace)
        if token_weight == "fixed":
            s = [torch.ones_like(d["ans"]) for d in per_trace]
        else:  # ws_nlog: s_i = −log c^∅_i · c_i / T
            s = [(-le * d["ans"].detach().exp() / len(g.answer)) for d in per_trace]
        tok = -sum((si * d["ans"]).sum() for si, d in zip(s, per_trace))
        for key, value in (("policy", pg), ("format", fmt), ("answer_nll", tok)):
            totals[key] = totals[key] + value
    for key in totals:
        assert sum(r.terms[key] for r in results) == pytest.approx(totals[key].item() / norm, rel=1e-4, abs=1e-6)
    loss = (0.7 * totals["policy"] + 0.3 * totals["format"] + 1.0 * totals["answer_nll"]) / norm
    loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=2e-6, rtol=1e-4, msg=name)


# ---- rollout on a tiny model with a tiny tokenizer ----

def eager_model(seed=0, scale=2.0):
    """A tiny random model nudged so that <eos> and <think_end> are sometimes sampled."""
    model = tiny_model(seed=seed)
    with torch.no_grad():
        h = model.hidden(torch.randint(4, 100, (8, 20), generator=torch.Generator().manual_seed(0)))
        direction = h.reshape(-1, h.shape[-1]).mean(0)
        model.lm_head.weight[1] = scale * direction / direction.norm()
        model.lm_head.weight[2] = scale * direction / direction.norm()
    return model


def test_rollout_traces_emitted_flags_and_dropped_eos():
    model = eager_model()
    cfg = step_cfg(samples_per_question=8, max_think_tokens=8)
    groups = train.rollout(model, TOK, QUESTIONS, cfg, 0)
    prompts = [TOK.encode_chat([dict(role="user", content=q["question"])]) for q in QUESTIONS]
    out = generate(model, prompts, num_samples=8, max_new_tokens=8, temperature=1.0, stop_ids=TOK.stop_ids,
                   stop_strings=["<think_end>"], decode=TOK.decode, generator=torch.Generator().manual_seed(0))
    assert set(out.stop_reason) == {"stop_id", "stop_string", "length"}  # all three cases are exercised
    assert len(groups) == 2
    for i, (g, q) in enumerate(zip(groups, QUESTIONS)):
        assert g.prompt == prompts[i] and g.answer == TOK.encode(" " + q["answer"]) + [TOK.eos_id]
        assert len(g.traces) == len(g.emitted) == len(g.trace_logprobs) == 8
        for k in range(8):
            r = i * 8 + k
            reason = out.stop_reason[r]
            expected = out.tokens[r][:-1] if reason == "stop_id" else out.tokens[r]
            assert g.traces[k] == expected and g.trace_logprobs[k] == pytest.approx(out.logprobs[r][:len(expected)])
            assert g.emitted[k] == (reason == "stop_string")
            assert TOK.eos_id not in g.traces[k]
            assert (g.traces[k][-1:] == [2]) == g.emitted[k]


# ---- one NRT step moves the answer likelihood the right way ----

@pytest.mark.parametrize("minibatches", [1, 2])
def test_one_nrt_step_raises_answer_logprob_given_the_same_traces(minibatches):
    model = tiny_model(seed=2)
    cfg = step_cfg(minibatches=minibatches, questions_per_step=2)
    delimiter_ids = encode_delimiter(TOK, cfg.delimiter)
    assert delimiter_ids == [2]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    groups = train.rollout(model, TOK, QUESTIONS, cfg, 0)
    before = mean_answer_logprob(model, groups, delimiter_ids)
    log, examples = train.nrt_step(model, optimizer, TOK, delimiter_ids, QUESTIONS, cfg, NO_AMP, seed=0)
    assert [g.traces for g, _ in examples] == [g.traces for g in groups]  # the same seed, the same traces
    after = mean_answer_logprob(model, groups, delimiter_ids)
    assert after > before + 0.1, (before, after)
    assert all_finite(model) and math.isfinite(log["grad_norm"]) and math.isfinite(log["loss"])
    assert optimizer.state[next(model.parameters())]["step"].item() == minibatches
    assert ("clip_ratio/region_mean" in log) == (minibatches > 1)


def test_minibatches_one_rollout_four_updates_unit_importance_weight_first():
    """The released recipe: one rollout, four optimizer steps; the first sees ρ = π/π_old = 1 exactly."""
    model = tiny_model(seed=2)
    questions = [dict(question=f"{a}+{a}", answer=str(2 * a)) for a in range(4)]
    cfg = step_cfg(minibatches=4, questions_per_step=4)
    delimiter_ids = [2]
    g = train.rollout(model, TOK, questions[:1], cfg, 1)[0]
    logc_old, old = score_traces(model, g.rows(), delimiter_ids)
    batch, lp, logc, _ = score_answers(model, g.rows(), delimiter_ids, trace_too=True)  # the first update's forward
    ratio = (lp - old).exp()[batch.trace_mask]
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-6, rtol=0)
    torch.testing.assert_close(logc.detach(), logc_old, atol=1e-6, rtol=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    log, _ = train.nrt_step(model, optimizer, TOK, delimiter_ids, questions, cfg, NO_AMP, seed=1)
    assert optimizer.state[next(model.parameters())]["step"].item() == 4
    assert math.isfinite(log["grad_norm"]) and 0 <= log["clip_ratio/region_mean"] <= 1


def test_off_policy_update_with_emitted_traces_shorter_than_the_delimiter():
    """A multi-token text delimiter can be sampled as fewer tokens than its canonical encoding (here
    one token that decodes to it): the old log-probs must still line up with the update's."""
    model = tiny_model(seed=2)
    cfg = step_cfg(minibatches=2, samples_per_question=2)
    delimiter_ids = [4 + CharTokenizer.CHARS.index("#")] * 2  # the text delimiter "##" encodes as two tokens
    g = train.Group(dict(question="q", answer="a"), [3, 50, 51], [60, 1], [[100], [100]], [True, True], [[-1.0]] * 2)
    logc_empty = score_empty_traces(model, [(g.prompt, g.answer)], delimiter_ids)[0]
    old = score_traces(model, g.rows(), delimiter_ids)
    r = train.train_on_group(model, g, logc_empty, old, delimiter_ids, cfg, NO_AMP, 8)
    assert all(math.isfinite(v) for v in r.terms.values())


def test_sft_step_raises_answer_logprob():
    model = tiny_model(seed=4)
    cfg = step_cfg(method="sft")
    delimiter_ids = [2]
    rows = [(prompt_ids(TOK, q["question"], cfg.instruction, cfg.system), [], False,
             answer_ids(TOK, q["answer"])) for q in QUESTIONS]
    groups = [types.SimpleNamespace(prompt=p, answer=a, traces=[[]], emitted=[False]) for p, _, _, a in rows]
    before = mean_answer_logprob(model, groups, delimiter_ids)
    n_answer_tokens = sum(len(a) for _, _, _, a in rows)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    log, _ = train.sft_step(model, optimizer, TOK, delimiter_ids, QUESTIONS, cfg, NO_AMP)
    after = mean_answer_logprob(model, groups, delimiter_ids)
    # the loss is the answer NLL summed over tokens, averaged over questions
    assert log["loss/answer_nll"] == pytest.approx(-before * n_answer_tokens / len(QUESTIONS), rel=1e-4)
    assert after > before + 0.1 and all_finite(model)


# ---- non-finite gradients skip the update ----

def test_apply_update_with_nan_gradient_leaves_weights_and_optimizer_unchanged(capsys):
    model = tiny_model(seed=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    cfg = make_cfg()
    for p in model.parameters():  # one healthy step first, so the optimizer has state to protect
        p.grad = torch.ones_like(p)
    assert math.isfinite(train.apply_update(model, optimizer, cfg))
    weights = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(optimizer.state_dict())
    for bad in (float("nan"), float("inf")):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        next(model.parameters()).grad[0, 0] = bad
        assert not math.isfinite(train.apply_update(model, optimizer, cfg))
        assert "update skipped" in capsys.readouterr().err
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
        assert all(p.grad is None for p in model.parameters())
        after = optimizer.state_dict()
        for i, s in state["state"].items():
            assert all(torch.equal(v, after["state"][i][k]) for k, v in s.items())


def test_update_with_nan_reward_skips_the_step():
    model = tiny_model(seed=2)
    cfg = step_cfg()
    delimiter_ids = [2]
    g = train.rollout(model, TOK, QUESTIONS[:1], cfg, 0)[0]
    nan_empty = torch.full((len(g.answer),), float("nan"))  # → R, A, loss all NaN
    train.train_on_group(model, g, nan_empty, None, delimiter_ids, cfg, NO_AMP, 10)
    weights = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    assert not math.isfinite(train.apply_update(model, optimizer, cfg))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))


# ---- the script end to end: checkpoint, resume, refusal, log (subprocesses on a tiny model) ----

def bytes_to_unicode():
    """GPT-2's byte → printable char table, the alphabet of a byte-level tokenizer.json."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return dict(zip(printable + others, map(chr, printable + list(range(256, 256 + len(others))))))


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny random chatml model with a 259-token byte-level tokenizer, and 5 training questions."""
    root = tmp_path_factory.mktemp("nrt_run")
    model_dir = root / "model"
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tokenizer = dict(version="1.0", normalizer=None,
                     pre_tokenizer=dict(type="ByteLevel", add_prefix_space=False, trim_offsets=True, use_regex=True),
                     added_tokens=[dict(id=256 + i, content=s, single_word=False, lstrip=False, rstrip=False,
                                       normalized=False, special=True) for i, s in enumerate(SPECIAL_TOKENS)],
                     model=dict(type="BPE", vocab=vocab, merges=[]))
    model = tiny_model(vocab_size=256 + len(SPECIAL_TOKENS), max_position_embeddings=512, seed=7)
    model.save_pretrained(str(model_dir))
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    (model_dir / "tokenizer_config.json").write_text(json.dumps(dict(chat_template=template)))
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(dict(question=f"{a}+{b}=?", answer=str(a + b))) + "\n"
                            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10)]))
    return root, model_dir, data


def run_train(setup, out_dir, *args, launcher=()):
    root, model_dir, data = setup
    cmd = [sys.executable, *launcher, os.path.join(ROOT, "train.py"), f"--model_dir={model_dir}", f"--data={data}",
           f"--out_dir={out_dir}", "--questions_per_step=2", "--samples_per_question=2", "--max_think_tokens=4",
           "--eval_questions=0", "--device=cpu", "--lr=1e-3", "--example_every=1", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def read_tensors(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "model.safetensors"))


def read_log(folder):
    with open(os.path.join(folder, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


LOG_KEYS = {"step", "learning_rate", "loss", "loss/policy", "loss/format", "loss/answer_nll", "grad_norm", "reward",
            "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/max_length", "entropy",
            "nrt/reward_empty", "nrt/answer_logprob", "nrt/hard_answer_logprob", "nrt/frac_delimiter",
            "time/rollout", "time/score_empty", "time/update", "tokens_per_s"}


@pytest.fixture(scope="module")
def resumed_runs(tiny_setup):
    """Per minibatches: run A = 2 steps straight; run B = 1 step, then --resume=True --steps=2."""
    root, runs = tiny_setup[0], {}
    for upr in (1, 2):
        a, b = root / f"A{upr}", root / f"B{upr}"
        extra = f"--minibatches={upr}"
        run_a = run_train(tiny_setup, a, "--steps=2", extra)
        assert run_a.returncode == 0, run_a.stderr[-3000:]
        run_b1 = run_train(tiny_setup, b, "--steps=1", extra)
        assert run_b1.returncode == 0, run_b1.stderr[-3000:]
        after_one = read_tensors(b)
        run_b2 = run_train(tiny_setup, b, "--steps=2", "--resume=True", extra)
        assert run_b2.returncode == 0, run_b2.stderr[-3000:]
        runs[upr] = dict(a=a, b=b, after_one=after_one, stdout_b2=run_b2.stdout)
    return runs


@pytest.mark.parametrize("minibatches", [1, 2])
def test_resume_continues_exactly_like_an_uninterrupted_run(tiny_setup, resumed_runs, minibatches):
    run = resumed_runs[minibatches]
    a, b = run["a"], run["b"]
    assert "resumed from" in run["stdout_b2"]
    ta, tb, start = read_tensors(a), read_tensors(b), read_tensors(tiny_setup[1])
    assert ta.keys() == tb.keys() == start.keys()
    for name in ta:
        torch.testing.assert_close(tb[name], ta[name], atol=1e-6, rtol=0, msg=name)
    assert any(not torch.equal(run["after_one"][n], tb[n]) for n in tb)  # the resumed step did train
    assert any(not torch.equal(start[n], ta[n]) for n in ta)             # and so did the run
    assert torch.load(os.path.join(b, "train_state.pt"), weights_only=False)["step"] == 2

    log_a, log_b = read_log(a), read_log(b)
    assert [r["step"] for r in log_a] == [r["step"] for r in log_b] == [1, 2]
    for ra, rb in zip(log_a, log_b):
        for key in ("reward", "nrt/reward_empty", "completions/mean_length", "nrt/answer_logprob", "loss",
                    "learning_rate"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), key


def test_checkpoint_contents_and_log_keys(tiny_setup, resumed_runs):
    model_dir, out = tiny_setup[1], resumed_runs[1]["a"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "train_state.pt",
                 "log.jsonl"):
        assert (out / name).is_file(), name
    assert (out / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 259
    state = torch.load(out / "train_state.pt", weights_only=False)
    assert state["step"] == 2 and state["config"]["steps"] == 2 and state["optimizer"]["state"]
    rows = read_log(out)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert LOG_KEYS <= set(row), LOG_KEYS - set(row)
        for key in LOG_KEYS - {"nrt/hard_answer_logprob"}:
            assert math.isfinite(row[key]), key
        assert 0 <= row["nrt/frac_delimiter"] <= 1 and 0 <= row["frac_reward_zero_std"] <= 1
        assert 0 < row["completions/mean_length"] <= 4 and row["entropy"] > 0 and row["nrt/answer_logprob"] < 0


def test_fresh_run_into_a_checkpoint_folder_refuses(tiny_setup, resumed_runs):
    out = resumed_runs[1]["a"]
    saved, log = (out / "model.safetensors").read_bytes(), (out / "log.jsonl").read_bytes()
    fresh = run_train(tiny_setup, out, "--steps=1")
    assert fresh.returncode != 0
    assert "already holds a checkpoint" in fresh.stderr and "--resume=True" in fresh.stderr
    assert (out / "model.safetensors").read_bytes() == saved and (out / "log.jsonl").read_bytes() == log
    missing = run_train(tiny_setup, tiny_setup[0] / "nothing_here", "--steps=1", "--resume=True")
    assert missing.returncode != 0 and "does not exist" in missing.stderr


# ---- the released recipe's delimiter: a new special token, its rows copied from EOS ----

@pytest.mark.parametrize("tied", [False, True])
def test_new_delimiter_token_rows_from_eos_and_old_logits_unchanged(tied):
    model = tiny_model(seed=1, tie_word_embeddings=tied)
    base, x = copy.deepcopy(model), torch.tensor([[5, 17, 99, 3]])
    checkpoint.init_token_row(model, 101, source_id=7)  # 101 rows: the new id grows the vocabulary by one
    assert model.cfg.vocab_size == model.cfg.hf["vocab_size"] == 102 and model.embed.weight.shape[0] == 102
    assert (model.lm_head.weight is model.embed.weight) == tied
    assert torch.equal(model.embed.weight[101], model.embed.weight[7])
    assert torch.equal(model.lm_head.weight[101], model.lm_head.weight[7])
    logits = model(x)
    assert torch.equal(logits[..., :101], base(x)) and torch.equal(logits[..., 101], logits[..., 7])
    checkpoint.init_token_row(model, 50, source_id=7)  # a spare row inside the vocabulary: no growth
    assert model.cfg.vocab_size == 102 and torch.equal(model.embed.weight[50], model.embed.weight[7])


def test_new_delimiter_token_saved_and_reloaded_by_us_and_transformers(tiny_setup, tmp_path):
    name, model_dir = "<|response_start|>", tiny_setup[1]
    folder = checkpoint.extend_tokenizer(str(model_dir), name, Tokenizer.from_pretrained(model_dir).n_vocab)
    tok = Tokenizer.from_pretrained(folder)
    new = tok.special_id(name)
    assert new == 259 and tok.encode(name, allow_special=True) == [new] and tok.eos_id == 258
    model, base = Transformer.from_pretrained(model_dir), Transformer.from_pretrained(model_dir)
    checkpoint.init_token_row(model, new, tok.eos_id)
    out = tmp_path / "resized"
    model.save_pretrained(str(out))
    for file in os.listdir(folder):
        shutil.copy(os.path.join(folder, file), out / file)
    x = torch.tensor([[257, 10, 20, 30, 258, 259]])
    reloaded = Transformer.from_pretrained(out)
    ours = reloaded(x)
    assert Tokenizer.from_pretrained(out).special_id(name) == new
    torch.testing.assert_close(reloaded(x[:, :-1])[..., :259], base(x[:, :-1]), atol=0, rtol=0)  # old tokens: unchanged
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours, atol=1e-5, rtol=1e-5)
    assert transformers.AutoTokenizer.from_pretrained(out).convert_tokens_to_ids(name) == new


def test_paper_preset_trains_with_the_new_token_and_resumes(tiny_setup, tmp_path):
    out = tmp_path / "paper"
    args = ("--preset=paper", "--minibatches=2")
    first = run_train(tiny_setup, out, "--steps=1", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
    assert saved[-1]["content"] == "<|response_start|>" and saved[-1]["id"] == 259
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 260
    assert json.loads((out / "tokenizer_config.json").read_text())["added_tokens_decoder"]["259"]["special"]
    resumed = run_train(tiny_setup, out, "--steps=2", "--resume=True", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in read_log(out)] == [1, 2]
    assert read_tensors(out)["model.embed_tokens.weight"].shape[0] == 260
    lora = run_train(tiny_setup, tmp_path / "lora", "--steps=1", "--lora_rank=2", *args)
    assert lora.returncode != 0 and "--new_delimiter_token" in lora.stderr


DDP_SCRIPT = """
import sys, torch
sys.path[:0] = [{root!r}, {tests!r}]
import test_train as T
from parallel import all_reduce_grads, finish_distributed, init_distributed
rank, world, _ = init_distributed("cpu")
model = T.tiny_model(seed=3)
groups = T.manual_groups()  # fixed traces: each rank takes every world-th one, as train.py does
T.train_groups(model, groups[rank::world], [2], T.make_cfg(samples_per_question=4, max_think_tokens=5), world)
all_reduce_grads(model, world)
if rank == 0:
    torch.save([p.grad for p in model.parameters()], sys.argv[1])
finish_distributed(world)
"""


def test_two_data_parallel_ranks_equal_one_process(tiny_setup, tmp_path):
    """On fixed groups: the all-reduced gradient of 2 gloo ranks × 1 question == 1 process × 2 questions.
    (Each rank samples its own traces, seeded by (seed, step, rank), so whole runs are not compared.)"""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests")))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                          str(script), str(tmp_path / "g.pt")], env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    model = tiny_model(seed=3)
    train_groups(model, manual_groups(), [2], make_cfg(samples_per_question=4, max_think_tokens=5))
    for p, g in zip(model.parameters(), torch.load(tmp_path / "g.pt")):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-5)
    # and train.py itself runs end to end under torchrun: rank 0 logs and saves
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29518"]
    ddp = run_train(tiny_setup, tmp_path / "ddp", "--steps=2", launcher=torchrun)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert [r["step"] for r in read_log(tmp_path / "ddp")] == [1, 2] and (tmp_path / "ddp" / "train_state.pt").exists()


def test_smoke_preset_on_the_real_default_model(default_model_dir, tmp_path):
    """python train.py --preset=smoke on the prepared SmolLM2: out_dir loads in sample/eval and transformers."""
    out = tmp_path / "smoke"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--preset=smoke", f"--out_dir={out}", "--steps=2",
           "--eval_questions=4", "--device=cpu"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "held-out" in run.stdout and "answer_logprob" in run.stdout  # the before/after table
    logs = read_log(out)
    assert [entry.get("eval") for entry in logs] == ["before", None, None, "after"]
    assert LOG_KEYS <= set(logs[1])
    model, tok = Transformer.from_pretrained(out), Tokenizer.from_pretrained(out)
    ids = tok.encode_chat([dict(role="user", content="What is 2 plus 3?")])
    assert len(generate(model, [ids], max_new_tokens=3, temperature=0).tokens[0]) == 3
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=1e-4)
