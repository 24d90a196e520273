"""Command-line configuration shared by every script: a dict of defaults, overridden by --key=value, each parsed
as its default's type; an unknown key or a bad value stops the script naming the key. Also train.py's flag checks,
--device, --dtype and a progress line. No config files, no argparse: each script's defaults block is the docs.
"""
import contextlib
import math
import os
import re
import sys
import time

PRECISIONS = ("auto", "float32", "bf16-mixed", "bf16-true")
DEVICES = re.compile(r"auto|cpu|cuda(:\d+)?")  # what --device accepts
BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
AT_LEAST = dict(steps=1, questions_per_step=1, max_think_tokens=1, minibatches=1, rollout_questions=0, lora_rank=0,
                eval_questions=0, save_every=0, weight_decay=0, policy_loss_coef=0, token_loss_coef=0,
                format_loss_coef=0)  # train.py's flags with a lower bound only


class Config(dict):
    """A dict whose keys also read as attributes: cfg.lr is cfg["lr"]."""
    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def parse_args(defaults: dict, argv=None) -> Config:
    """Apply --key=value overrides to a copy of `defaults`, each parsed as its default's type (a None or str default
    takes any string, 'None' meaning None); a key given twice is an error."""
    config, seen = Config(defaults), set()
    for arg in sys.argv[1:] if argv is None else argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"expected --key=value, got {arg!r}")
        key, text = arg[2:].split("=", 1)
        if key not in defaults:
            raise SystemExit(f"unknown option --{key}; known: {', '.join(sorted(defaults))}")
        if key in seen:
            raise SystemExit(f"--{key} is given twice; give it once")
        seen.add(key)
        kind = type(defaults[key]) if isinstance(defaults[key], (bool, int, float)) else str
        try:
            value = BOOLS[text.lower()] if kind is bool else kind(text)
        except (KeyError, ValueError):
            expected = "True or False" if kind is bool else kind.__name__
            raise SystemExit(f"--{key}: expected {expected}, got {text!r}") from None
        config[key] = None if kind is str and text == "None" else value
    return config


def check_ranges(config: dict, **rules):
    """rules: flag=(ok, allowed). The first flag not ok stops the script with one line naming it and its range."""
    for key, (ok, allowed) in rules.items():
        if not ok:
            raise SystemExit(f"--{key}={config[key]!r}: must be {allowed}")


def check_training_flags(c, aggregations):
    """train.py's choices and ranges, one line each (temperature and K only matter to NRT, which samples)."""
    for key, allowed in (("aggregation", aggregations), ("token_weight", ("fixed", "derived")),
                         ("method", ("nrt", "sft")), ("dtype", PRECISIONS)):
        if c[key] not in allowed:
            raise SystemExit(f"--{key}: expected one of {allowed}, got {c[key]!r}")
    nrt, frac = c.method == "nrt", "in [0, 1]"
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's ranks: each takes an equal share of every mini-batch
    check_ranges(c, **{key: (c[key] >= least, f"≥ {least}") for key, least in AT_LEAST.items()})
    check_ranges(
        c, lr=(0 < c.lr < math.inf, "> 0"), adam_eps=(c.adam_eps > 0, "> 0"), grad_clip=(c.grad_clip > 0, "> 0"),
        temperature=(c.temperature > 0 or not nrt, "> 0"), warmup_frac=(0 <= c.warmup_frac <= 1, frac),
        samples_per_question=(c.samples_per_question >= (2 if nrt else 1), "≥ 2 for NRT (≥ 1 for SFT)"),
        min_lr_frac=(0 <= c.min_lr_frac <= 1, frac), clip_low=(0 <= c.clip_low <= 1, f"{frac} (≤ 1 ≤ clip_high)"),
        clip_high=(c.clip_high >= 1, "≥ 1 (clip_low ≤ 1 ≤ clip_high)"),
        device=(bool(DEVICES.fullmatch(c.device)), "auto, cpu, cuda or cuda:N"),
        delimiter=(c.delimiter != "", "non-empty"), data=(c.data.strip(" ,") != "", "one or more JSONL files"),
        new_delimiter_token=(not (c.new_delimiter_token and c.lora_rank), "False with --lora_rank > 0 (a frozen "
                             "embedding cannot learn a new token's row)"),
        dtype=(c.dtype != "bf16-true" or c.lora_rank > 0, "bf16-mixed, or bf16-true with --lora_rank > 0 (a frozen "
               "bf16 base): trained weights need fp32 master weights, as bf16 rounds most updates away"),
        questions_per_step=(c.questions_per_step % (c.minibatches * world) == 0,
                            f"divisible by --minibatches={c.minibatches} × {world} ranks"))


def print_config(config: dict):
    width = max(map(len, config))
    print("config:\n" + "\n".join(f"  {key:<{width}} = {value!r}" for key, value in config.items()))


def resolve_device(name: str) -> str:
    import torch  # imported here so prepare.py can use this module without torch
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def resolve_precision(name: str, device: str):
    """(weight dtype, autocast factory) for --dtype in every script. bf16-mixed: fp32 weights (the optimizer's master
    copy), bf16 math under autocast, on CPU too (so the CPU tests run the GPU's path); bf16-true: bf16 weights and
    math, never trained weights; auto: bf16-mixed on CUDA, float32 on CPU (where bf16 matmuls are slower)."""
    import torch
    if name not in PRECISIONS:
        raise SystemExit(f"--dtype: expected one of {', '.join(PRECISIONS)}, got {name!r}")
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if name == "auto":
        name = "bf16-mixed" if device_type == "cuda" else "float32"
    if name == "bf16-mixed":
        return torch.float32, lambda: torch.autocast(device_type, dtype=torch.bfloat16)
    return (torch.bfloat16 if name == "bf16-true" else torch.float32), contextlib.nullcontext


_last_progress = {}


def progress(label: str, done: int, total: int, t0: float):
    """A progress line with rate and ETA on stderr: redrawn on a terminal; in a log, one per 30 s and the last."""
    now = time.time()
    rate = done / max(now - t0, 1e-9)
    line = f"{label}: {done}/{total} questions, {rate:.2f}/s, ETA {(total - done) / max(rate, 1e-9) / 60:.1f} min"
    if sys.stderr.isatty():
        print(f"\r{line}\033[K", end="\n" if done >= total else "", file=sys.stderr, flush=True)
    elif done >= total or now - _last_progress.get(label, 0) >= 30:
        _last_progress[label] = now
        print(line, file=sys.stderr, flush=True)
