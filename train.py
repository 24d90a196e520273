"""Native Reasoning Training (NRT) on question–answer pairs, on one CPU or GPU. The method: NRT.md.

    python train.py [--model_dir=DIR --data=FILE.jsonl --aggregation=gm --preset=paper ...]   # the default: README

One step, read top-down in `nrt_step` (names as in NRT.md): rollout (K traces per question) → score ∅ (log c^∅,
no grad) → ONE teacher-forced forward of prompt ‖ z_k ‖ delimiter ‖ y* gives both log c_{i,k} (detached: the
rewards) and the log-probs the loss differentiates → advantages → loss (policy gradient + format + answer NLL,
over a constant token count).

Simplifications, stated:
  1. Each question's K traces are one micro-batch; gradients accumulate over the step's questions.
  2. Trace entropy is estimated as the mean −log π of the sampled trace tokens (unbiased per token).
  3. A trace that ends its turn (EOS) before the delimiter counts as truncated: EOS dropped, delimiter appended.
  4. All randomness of step s derives from (seed, s, rank), so --resume needs no RNG state.
The loss hovers near 0 by construction (advantages have zero mean): watch `reward`, not `loss`.
Off the core path: --minibatches (M updates per rollout, clipped importance weights), torchrun (parallel.py),
--lora_rank (lora.py), --dry_run (memory.py), --compile (sample.py). Left out: value functions, KL, entropy bonuses.
"""
import importlib.util
import math
import sys
import time
from dataclasses import dataclass

import torch

from checkpoint import append_log, load_config, load_for_training, load_tokenizer, prepare_out_dir, save_checkpoint
from cli import check_training_flags, parse_args, print_config, resolve_device, resolve_precision
from data import INSTRUCTION, DELIMITER, answer_ids, encode_delimiter, prompt_ids, step_questions, training_rows
from eval import heldout_eval
from parallel import all_reduce_grads, any_rank, barrier, finish_distributed, init_distributed, stop_on_signals
from reward import (AGGREGATIONS, aggregate, clip_to_baseline, group_normalise, hard_tokens, sample_traces,
                    score_answers, score_empty_traces, score_traces, token_weights)
from sample import compile_model

DEFAULTS = dict(
    # model and data
    model_dir="models/SmolLM2-135M-Instruct",
    data="data/multi_add_train.jsonl,data/letters_train.jsonl",  # comma-separated JSONL files
    test_data="data/multi_add_test.jsonl,data/letters_test.jsonl",
    eval_questions=200,          # held-out questions evaluated before and after, split over test_data (0 = skip)
    skip_too_long=False,         # skip (and count) questions that cannot fit the context; False: an error
    out_dir="out/nrt",
    # the method (NRT.md)
    method="nrt",                # nrt | sft (plain NLL of the answer with no trace: the SFT baseline)
    preset="",                   # smoke | long | rlpr | verifree | paper (applied before the other overrides)
    aggregation="ws_nlog",       # logp | prob | gm | am | ws_inv | ws_nlog
    token_weight="fixed",        # fixed (s_i = 1) | derived (s_i = α_i c_i)
    baseline_clip=True,          # R' = max(0, R − R(∅))
    policy_loss_coef=1.0,        # weight of the policy gradient on the traces (0: answer NLL after traces only)
    token_loss_coef=1.0,         # weight of the answer NLL term
    format_loss_coef=0.0,        # delimiter NLL where a trace did not write it: 0.3 in the paper; here it collapses traces
    # the prompt (data.py)
    instruction=INSTRUCTION,     # "Think briefly, then write 'Answer:' followed by the final answer only."
    delimiter=DELIMITER,         # "\nAnswer:": the end-of-thinking delimiter (or a special token's name)
    new_delimiter_token=False,   # add delimiter to the vocabulary as a new special token, initialised from EOS
    system="",                   # optional system message
    # rollout
    questions_per_step=4,        # B
    samples_per_question=8,      # K
    max_think_tokens=48,
    temperature=1.0,
    rollout_questions=0,         # questions per sampler call (0 = all B at once; bounds the KV cache on a GPU)
    # optimisation
    steps=45,
    lr=1e-5,
    warmup_frac=0.1,
    min_lr_frac=0.1,             # cosine decay to lr · min_lr_frac (1.0 = constant after warm-up)
    weight_decay=0.0,
    adam_eps=1e-8,
    grad_clip=1.0,
    minibatches=1,               # optimizer steps per rollout; > 1 reuses it with clipped importance weights
    clip_low=0.8,                # the importance weight's clip range (only with minibatches > 1)
    clip_high=1.28,
    # logging, checkpoints, system
    example_every=10,            # print the best trace of a question every N steps
    save_every=20,
    time_budget_min=0.0,         # > 0 stops training after this many minutes (equal-budget comparisons)
    resume=False,
    resume_override=False,       # let --resume change a setting that alters the run (data, lr, seed, ...)
    seed=1337,
    device="auto",
    dtype="auto",                # auto | float32 | bf16-mixed | bf16-true (LoRA only) — cli.resolve_precision
    compile=False,
    activation_checkpointing=False,
    dry_run=False,               # print the memory plan (memory.py) and exit: no weights loaded
    gpu_mem_gb=0.0,              # the budget the dry run checks (0 = the device's memory)
    # LoRA (lora.py)
    lora_rank=0,                 # > 0: train adapters of this rank on a frozen base
    lora_alpha=32.0,             # the adapter update is scaled by lora_alpha / lora_rank
    lora_dropout=0.0,            # keep 0 for NRT: the rewards come from the training forward
    lora_targets="wq,wk,wv,wo",  # comma-separated, any of wq wk wv wo w_gate w_up w_down
    save_merged=True,            # checkpoints also hold the merged model (for eval.py and transformers)
)
PRESETS = {
    "smoke": dict(steps=4, questions_per_step=2, samples_per_question=4, max_think_tokens=16,
                  eval_questions=8, example_every=2, save_every=2),
    "rlpr": dict(aggregation="am", token_loss_coef=0.0, baseline_clip=False),
    "verifree": dict(aggregation="prob", token_weight="derived", baseline_clip=False),
    # 200 steps, answer NLL weighted by α_i c_i, 400 held-out questions: README "Results"
    "long": dict(steps=200, token_weight="derived", eval_questions=400),
    # the authors' released recipe (README: "The released recipe"), at this project's batch size and trace length
    "paper": dict(delimiter="<|response_start|>", new_delimiter_token=True, instruction="", baseline_clip=False,
                  format_loss_coef=0.3, minibatches=4, lr=2e-6, min_lr_frac=1.0, weight_decay=0.01, adam_eps=1e-15),
}


# ---- one NRT step: rollout → score the empty traces → one forward for rewards and loss → update ----

@dataclass(frozen=True)
class Group:
    """One question and the K traces sampled for it: what the rollout made, never changed afterwards."""
    row: dict
    prompt: list
    answer: list
    traces: list            # K lists of token ids
    emitted: list           # did trace k end with a delimiter it wrote itself
    trace_logprobs: list    # the sampler's log π of each trace token (the entropy estimate)

    def rows(self):
        return [(self.prompt, z, e, self.answer) for z, e in zip(self.traces, self.emitted)]


def nrt_step(model, optimizer, tok, delimiter_ids, questions, cfg, amp, seed, world=1):
    """One step on this rank's questions; returns the log line and each question's (group, result)."""
    # 1. Rollout: K traces per question from the current policy (eval mode: no adapter dropout).
    t0 = time.time()
    model.eval()
    with amp():
        groups = rollout(model, tok, questions, cfg, seed)
        t1 = time.time()
        # 2. The empty trace of every question, one no-grad forward: log c^∅ gives R(∅) and the ws_* weights.
        logc_empty = score_empty_traces(model, [(g.prompt, g.answer) for g in groups], delimiter_ids)
        # With several updates per rollout, the later ones see a changed policy: keep the rollout
        # policy's log-probs (importance weights) and rewards, scored now, before the first update.
        frozen = [score_traces(model, g.rows(), delimiter_ids) if cfg.minibatches > 1 else None for g in groups]
    t2 = time.time()
    # 3–5. Per mini-batch: one forward per question gives rewards and loss; backward; all-reduce; AdamW.
    model.train()
    per_batch = len(groups) // cfg.minibatches
    norm = per_batch * world * cfg.samples_per_question * cfg.max_think_tokens  # a constant token count
    results, grad_norms = [], []
    for m in range(cfg.minibatches):  # the gradients start cleared (apply_update clears them)
        for i in range(m * per_batch, (m + 1) * per_batch):
            results.append(train_on_group(model, groups[i], logc_empty[i], frozen[i], delimiter_ids, cfg, amp, norm))
        grad_norms.append(apply_update(model, optimizer, cfg, world))
    times = {"time/rollout": t1 - t0, "time/score_empty": t2 - t1, "time/update": time.time() - t2}
    return step_log(groups, results, grad_norms, times, cfg), list(zip(groups, results))


def rollout(model, tok, questions, cfg, seed):
    """K traces per question, `rollout_questions` questions per sampler call (0 = all at once)."""
    K, chunk = cfg.samples_per_question, cfg.rollout_questions or len(questions)
    generator = torch.Generator(model.embed.weight.device).manual_seed(seed)
    groups = []
    for start in range(0, len(questions), chunk):
        part = questions[start:start + chunk]
        prompts = [prompt_ids(tok, q["question"], cfg.instruction, cfg.system) for q in part]
        traces, emitted, logps = sample_traces(model, tok, prompts, cfg.delimiter, cfg.max_think_tokens, K,
                                               cfg.temperature, generator)
        for i, (q, prompt) in enumerate(zip(part, prompts)):  # rows are grouped by prompt: i*K .. i*K+K-1
            rows = slice(i * K, (i + 1) * K)
            groups.append(Group(q, prompt, answer_ids(tok, q["answer"]), traces[rows], emitted[rows], logps[rows]))
    return groups


@dataclass(frozen=True)
class Result:
    """What one question's update computed: rewards, advantages, and its loss terms (already normalised)."""
    logc: torch.Tensor        # (K, T) log c_{i,k}, detached
    logc_empty: torch.Tensor  # (T,) log c_i^∅
    R: torch.Tensor           # (K,) rewards f(c_k)
    R_empty: torch.Tensor     # () reward of the empty trace
    A: torch.Tensor           # (K,) advantages
    zero_std: bool            # every trace got the same reward: no policy-gradient signal
    terms: dict               # loss term name -> float
    clipped: float            # fraction of trace tokens whose importance weight was masked


def train_on_group(model, g, logc_empty, frozen, delimiter_ids, cfg, amp, norm):
    """Steps 3–5 for one question's K traces: the forward, rewards, advantages, loss, backward."""
    # 3. One teacher-forced forward with gradients: log-probs of trace, delimiter and answer tokens.
    with amp():
        batch, logprobs, logc, mask = score_answers(model, g.rows(), delimiter_ids, trace_too=True)
    # The rewards come from this very forward, detached: scoring and training are one computation.
    # Off-policy (a later mini-batch) they come from the scores taken before the first update.
    logc_reward, old_logprobs = (logc.detach(), None) if frozen is None else frozen
    # 4. Advantages: R_k = f(c_k), clipped at R(∅) if asked, normalised within the question's group.
    R, R_empty, A, zero_std = advantages(logc_reward, logc_empty, mask, cfg)
    # 5. The loss terms, summed over the group and divided by the constant token count; backward.
    terms, clipped = nrt_loss(logprobs, batch, logc, mask, logc_empty, A, cfg, old_logprobs)
    (total_loss(terms, cfg) / norm).backward()
    return Result(logc_reward, logc_empty, R, R_empty, A, bool(zero_std),
                  {k: v.item() / norm for k, v in terms.items()}, clipped)


def total_loss(terms, cfg):
    return (cfg.policy_loss_coef * terms["policy"] + cfg.format_loss_coef * terms["format"]
            + cfg.token_loss_coef * terms["answer_nll"])


def advantages(logc, logc_empty, mask, cfg):
    """R_k = f(c_k), R(∅) = f(c^∅), R'_k (baseline clip), A_k = group-normalised R'_k."""
    empty = logc_empty.expand_as(logc)  # (T,) → (K, T): the same weights for every trace
    R = aggregate(cfg.aggregation, logc, mask, empty)
    R_empty = aggregate(cfg.aggregation, empty[:1], mask[:1], empty[:1])[0]
    R_prime = clip_to_baseline(R, R_empty) if cfg.baseline_clip else R
    A, zero_std = group_normalise(R_prime, len(R))
    return R, R_empty, A, zero_std[0]


def nrt_loss(logprobs, batch, logc, mask, logc_empty, A, cfg, old_logprobs=None):
    """The three NRT loss terms of one question's K traces, summed over tokens (not yet normalised).

    policy      − Σ_{t∈z_k} A_k · w_IS · log π(t)    REINFORCE on trace tokens (incl. a delimiter it wrote)
    format      − Σ log π(delimiter | x, z_k)         only where the trace did not write the delimiter
    answer_nll  − Σ_i s_i · log c_{i,k}               s_i = 1 (fixed) or α_i c_i (derived, reward.token_weights)
    Returns (terms, fraction of trace tokens whose importance weight was masked)."""
    w_is, clipped = torch.ones_like(logprobs), 0.0  # on-policy: ρ = 1, no ratio and no clip needed
    if old_logprobs is not None:  # stop-gradient ρ clipped to [low, high]; PPO-style mask where clipping binds
        ratio = (logprobs - old_logprobs).exp().detach()
        blocked = ((A[:, None] > 0) & (ratio > cfg.clip_high)) | ((A[:, None] < 0) & (ratio < cfg.clip_low))
        w_is = ratio.clamp(cfg.clip_low, cfg.clip_high).masked_fill(blocked, 0.0)
        clipped = blocked[batch.trace_mask].float().mean().item() if batch.trace_mask.any() else 0.0
    policy = -(A[:, None] * w_is * logprobs * batch.trace_mask).sum()
    fmt = -(logprobs * batch.format_mask).sum()
    s = (token_weights(cfg.aggregation, logc, mask, logc_empty.expand_as(logc)) if cfg.token_weight == "derived"
         else mask.float())
    answer_nll = -(s * logc * mask).sum()
    return dict(policy=policy, format=fmt, answer_nll=answer_nll), clipped


def sft_step(model, optimizer, tok, delimiter_ids, questions, cfg, amp, world=1):
    """The SFT baseline: − Σ_i log π(y*_i | x, ∅), averaged over the step's questions."""
    t0 = time.time()
    model.train()
    rows = [(prompt_ids(tok, q["question"], cfg.instruction, cfg.system), [], False, answer_ids(tok, q["answer"]))
            for q in questions]
    with amp():
        _, _, logc, mask = score_answers(model, rows, delimiter_ids)
    loss = -(logc * mask).sum() / (len(questions) * world)
    loss.backward()
    grad_norm = apply_update(model, optimizer, cfg, world)
    return {"loss": loss.item(), "loss/answer_nll": loss.item(), "grad_norm": grad_norm,
            "nrt/answer_logprob": logc[mask].mean().item(), "time/update": time.time() - t0}, []


def apply_update(model, optimizer, cfg, world=1):
    """All-reduce, clip and step (skipped with a warning if the gradient is not finite), then clear the gradients."""
    all_reduce_grads(model, world)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
    if math.isfinite(grad_norm):
        optimizer.step()
    else:
        print(f"warning: non-finite gradient norm ({grad_norm}); update skipped", file=sys.stderr)
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def lr_at(step, cfg):
    """Linear warm-up, then cosine decay from lr to lr·min_lr_frac, reached on the last step."""
    warmup = max(1, int(cfg.warmup_frac * cfg.steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.steps - 1 - warmup))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---- logging: TRL's names where TRL logs the same quantity, nrt/… for what is NRT's own ----

def step_log(groups, results, grad_norms, times, cfg):
    """One line of log.jsonl for an NRT step (rank 0's questions)."""
    cat = lambda xs: torch.cat([x.float().flatten().cpu() for x in xs])  # noqa: E731
    R, lens = cat(r.R for r in results), torch.tensor([len(z) for g in groups for z in g.traces], dtype=torch.float)
    terms = {k: sum(r.terms[k] for r in results) / cfg.minibatches for k in results[0].terms}
    log = {"loss": total_loss(terms, cfg), **{f"loss/{k}": v for k, v in terms.items()},
           "grad_norm": sum(grad_norms) / len(grad_norms),
           "reward": R.mean().item(), "reward_std": R.std(unbiased=False).item(),
           "frac_reward_zero_std": sum(r.zero_std for r in results) / len(results),
           "completions/mean_length": lens.mean().item(), "completions/max_length": lens.max().item(),
           "entropy": -torch.tensor([x for g in groups for lp in g.trace_logprobs for x in lp]).mean().item(),
           "nrt/reward_empty": cat(r.R_empty for r in results).mean().item(),
           "nrt/answer_logprob": cat(r.logc for r in results).mean().item(),
           "nrt/hard_answer_logprob": cat(r.logc[:, hard_tokens(r.logc_empty)] for r in results).mean().item(),
           "nrt/frac_delimiter": sum(e for g in groups for e in g.emitted) / len(lens)}
    if cfg.minibatches > 1:
        log["clip_ratio/region_mean"] = sum(r.clipped for r in results) / len(results)
    n_tokens = sum(len(g.prompt) + len(z) + len(g.answer) for g in groups for z in g.traces)
    return {**log, **times, "tokens_per_s": n_tokens / max(sum(times.values()), 1e-9)}


def print_step(log, cfg, elapsed, done, todo, tok, examples):
    console = ("reward", "nrt/reward_empty", "frac_reward_zero_std", "completions/mean_length", "entropy",
               "nrt/frac_delimiter", "nrt/answer_logprob", "loss", "grad_norm")
    parts = " ".join(f"{k} {log[k]:.3g}" for k in console if k in log)
    times = " ".join(f"{k[5:]} {v:.1f}s" for k, v in log.items() if k.startswith("time/"))
    print(f"step {log['step']}/{cfg.steps} {parts} learning_rate {log['learning_rate']:.2e} | {times} "
          f"| ETA {elapsed / max(done, 1) * todo / 60:.1f} min", flush=True)
    if examples and cfg.example_every and log["step"] % cfg.example_every == 0:
        (g, r), k = examples[0], int(torch.argmax(examples[0][1].R))
        print(f"  example  Q: {g.row['question']!r}  y*: {g.row['answer']!r}\n  best trace (reward {r.R[k]:.3g}, "
              f"empty {r.R_empty:.3g}, emitted {g.emitted[k]}): {tok.decode(g.traces[k])!r}", flush=True)


# ---- configuration, set-up, the loop ----

def resolve_config(argv=None):
    cfg = parse_args(DEFAULTS, argv)
    if cfg.preset and cfg.preset not in PRESETS:
        raise SystemExit(f"--preset: unknown preset {cfg.preset!r}; known: {', '.join(PRESETS)}")
    cfg = parse_args({**DEFAULTS, **PRESETS.get(cfg.preset, {})}, argv)  # the preset, then explicit overrides
    check_training_flags(cfg, AGGREGATIONS)  # every choice and range, one line each, before anything is loaded
    return cfg


def main(argv=None):
    cfg = resolve_config(argv)
    rank, world, device = init_distributed(resolve_device(cfg.device))
    if rank == 0:
        print_config(cfg)
    if cfg.dry_run:
        from memory import plan_training_run
        return plan_training_run(cfg)
    if rank == 0:  # out_dir's rules, lock, recovery and resume checks: before anything is loaded
        prepare_out_dir(cfg)
    barrier(world)
    tok, tok_dir, new_id = load_tokenizer(cfg)  # new_id: the delimiter, added as a new special token (or None)
    delimiter_ids = encode_delimiter(tok, cfg.delimiter, tok_dir)
    rows = training_rows(tok, delimiter_ids, cfg, load_config(cfg.model_dir).max_seq_len)
    weight_dtype, amp = resolve_precision(cfg.dtype, device)
    model, state = load_for_training(cfg, device, weight_dtype, new_id, tok.eos_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.95),
                                  eps=cfg.adam_eps, weight_decay=cfg.weight_decay, fused=device.startswith("cuda"))
    start = state["step"] if state else 0
    if state:
        optimizer.load_state_dict(state["optimizer"])
    if rank == 0:
        print(f"{f'resumed from {cfg.out_dir} at step {start}; ' if start else ''}{len(rows)} training questions; "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters on {device} × {world}, "
              f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trained", flush=True)
    if cfg.compile:  # training forward, prefill and decode step (sample.py); parameter names stay clean
        compile_model(model)
    before = heldout_eval(model, tok, cfg, amp, "before", start) if rank == 0 and start == 0 else None
    stop = stop_on_signals()  # Ctrl-C or SIGTERM (a scheduler's preemption): finish the step, save, exit non-zero
    t_start, step, skipped = time.time(), start, 0
    while step < cfg.steps:
        out_of_time = cfg.time_budget_min > 0 and time.time() - t_start > 60 * cfg.time_budget_min
        if any_rank(bool(stop) or out_of_time, world):
            break
        for group in optimizer.param_groups:
            group["lr"] = lr = lr_at(step, cfg)
        questions = step_questions(rows, step, cfg.questions_per_step, cfg.seed)[rank::world]  # this rank's share
        if cfg.method == "sft":
            log, examples = sft_step(model, optimizer, tok, delimiter_ids, questions, cfg, amp, world)
        else:  # each rank samples with its own stream: seeded by (seed, step, rank)
            seed = (cfg.seed * 1_000_003 + step) * 1009 + rank
            log, examples = nrt_step(model, optimizer, tok, delimiter_ids, questions, cfg, amp, seed, world)
        step += 1
        log = {"step": step, "learning_rate": lr, **log}
        if rank == 0:  # rank 0 logs its own questions' statistics and saves for everyone
            append_log(cfg, log)
            print_step(log, cfg, time.time() - t_start, step - start, cfg.steps - step, tok, examples)
        skipped = 0 if math.isfinite(log["grad_norm"]) else skipped + 1  # the same on every rank (all-reduced)
        if skipped == 3:  # three updates in a row skipped: stop, and do not save weights that went bad
            raise SystemExit(f"stopped at step {step}: 3 updates in a row skipped (non-finite gradients), not saved")
        if rank == 0 and cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            save_checkpoint(model, optimizer, step, cfg, tok_dir)
        barrier(world)  # the other ranks wait here while rank 0 saves
    if rank == 0:
        save_checkpoint(model, optimizer, step, cfg, tok_dir)
    finish_distributed(world)
    if stop:
        sys.exit(128 + stop["signal"])
    if rank == 0:
        heldout_eval(model, tok, cfg, amp, "after", step, before)
        if importlib.util.find_spec("matplotlib"):  # the curves as a picture, when it can draw
            from plot import plot_runs
            print(f"training curves: {plot_runs([cfg.out_dir])}", flush=True)


if __name__ == "__main__":
    main()
