"""Checkpoints on disk: Hugging Face model directories in, Hugging Face model directories out.

What it is
  `load_model` / `save_model` read and write config.json + safetensors (one file, or shards with an
  index) through model.py's one name table (`hf_names`); `prepare_out_dir`, `save_checkpoint` and
  `load_for_training` own train.py's out_dir: its rules, its lock, and checkpoints committed as one unit.

Choices
  - Loading copies one tensor at a time into the already-allocated parameters (read on the CPU), so
    the checkpoint never exists twice in GPU memory.
  - Every file is written to a temp name and renamed: a crash never leaves a half-written file.
  - out_dir is itself a model directory that sample.py, eval.py and `transformers` load as it is.
  - A training checkpoint is one unit: every file of step N is written into out_dir/.ckpt-tmp, then
    its manifest (the commit point), then the files are renamed into place; a save cut short anywhere
    is finished (manifest written) or discarded (not) by the next start, so kill -9 at any instant
    leaves the last complete checkpoint. nrt_run.json (the manifest) also marks out_dir as this trainer's.
Left out: formats other than safetensors (.bin pickles, GGUF: prepare.py converts the default).
"""
import atexit
import json
import math
import os
import shutil
import time

import torch

from model import ModelConfig, Transformer, hf_names, rope_inv_freq

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "tekken.json", "tokenizer.model")


# ---- model directories ----

def load_config(path) -> ModelConfig:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} not found: expected a Hugging Face model directory")
    with open(file) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None
    return ModelConfig.from_hf(d, source=file)


def safetensors_files(path) -> dict[str, str]:
    """HF tensor name -> file holding it, from model.safetensors.index.json or model.safetensors."""
    from safetensors import safe_open
    index, single = os.path.join(path, "model.safetensors.index.json"), os.path.join(path, "model.safetensors")
    try:
        if os.path.isfile(index):
            with open(index) as f:
                return {name: os.path.join(path, file) for name, file in json.load(f)["weight_map"].items()}
        if os.path.isfile(single):
            with safe_open(single, framework="pt") as f:
                return {name: single for name in f.keys()}
    except Exception as e:  # a truncated or corrupt file: say which one
        raise ValueError(f"{index if os.path.isfile(index) else single}: cannot read it ({e})") from None
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


@torch.no_grad()
def load_model(path, dtype=torch.float32, device="cpu") -> Transformer:
    """The model in `path`, its parameters in `dtype` on `device`, each checked for presence and shape."""
    from safetensors import safe_open
    cfg = load_config(path)
    with torch.device("meta"):  # no random init: every parameter is about to be overwritten
        model = Transformer(cfg).to(dtype)
    model.to_empty(device=device)
    model.inv_freq = rope_inv_freq(cfg).to(device)
    if cfg.tie_embeddings:  # to_empty unties shared parameters; tie them again before loading
        model.lm_head.weight = model.embed.weight
    where, params, by_file = safetensors_files(path), dict(model.named_parameters()), {}
    for ours, hf in hf_names(cfg).items():
        if hf not in where:
            raise KeyError(f"{path}: tensor {hf!r} is missing from the checkpoint")
        by_file.setdefault(where[hf], []).append((ours, hf))
    for file, names in by_file.items():
        try:
            with safe_open(file, framework="pt") as f:
                for ours, hf in names:
                    t = f.get_tensor(hf)
                    if tuple(t.shape) != tuple(params[ours].shape):
                        raise ValueError(f"tensor {hf!r} has shape {tuple(t.shape)}, expected "
                                         f"{tuple(params[ours].shape)} from config.json")
                    params[ours].copy_(t)
        except Exception as e:  # a truncated file, a wrong shape: name the file
            raise ValueError(f"{file}: {e}") from None
    return model


def save_model(model, path, max_shard_bytes=5 * 2**30, weight=None):
    """config.json + safetensors (sharded with an index above max_shard_bytes), every file atomically.

    `weight(our_name, tensor)` may replace a tensor on its way out (lora.py writes merged weights so)."""
    os.makedirs(path, exist_ok=True)
    params = dict(model.named_parameters())
    tensors = {}
    for ours, hf in hf_names(model.cfg).items():
        w = params[ours].detach()
        tensors[hf] = (weight(ours, w) if weight else w).contiguous().cpu()
    dtype = next(iter(tensors.values())).dtype
    write_safetensors(path, tensors, max_shard_bytes)
    hf_cfg = dict(model.cfg.hf, torch_dtype=str(dtype).removeprefix("torch."))
    atomic_write(os.path.join(path, "config.json"), json.dumps(hf_cfg, indent=2).encode())


def write_safetensors(path, tensors: dict[str, torch.Tensor], max_shard_bytes: int):
    from safetensors.torch import save_file
    shards, size = [{}], 0
    for name, t in tensors.items():  # fill shards in order, a new one when the next tensor would overflow
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for file, shard in zip(files, shards):
        tmp = os.path.join(path, file + ".tmp")
        save_file(shard, tmp, metadata={"format": "pt"})
        os.chmod(tmp, 0o644)  # safetensors creates 0600 files; a model directory is for sharing
        os.replace(tmp, os.path.join(path, file))
        _file_done()
    index = os.path.join(path, "model.safetensors.index.json")
    if n == 1:
        if os.path.exists(index):  # a stale index would shadow the new single file
            os.remove(index)
    else:
        weight_map = {name: file for file, shard in zip(files, shards) for name in shard}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        atomic_write(index, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2).encode())


def atomic_write(file, data: bytes):
    """Write to a temp file beside `file`, then rename: a crash never leaves a half-written file."""
    tmp = file + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)
    _file_done()


_files_done = 0


def _file_done():
    """Counts files written or renamed; NRT_TEST_DIE_AFTER=n kills the process (like kill -9, no clean-up)
    right after the n-th one: the tests' way to cut a save short at every point."""
    global _files_done
    _files_done += 1
    if _files_done == int(os.environ.get("NRT_TEST_DIE_AFTER", "0")):
        os._exit(9)


# ---- train.py's out_dir: the rules, the lock, checkpoints committed as one unit ----

MARKER = "nrt_run.json"   # this trainer's run; also the manifest of its committed checkpoint (step, files, config)
STAGING = ".ckpt-tmp"     # the next checkpoint is written here, whole, before it is switched in
LOCK = ".nrt.lock"        # one run per out_dir: holds the pid of the run using it
# settings that do not change what a run computes: free to change on --resume (every other one is refused)
FREE_ON_RESUME = {"steps", "eval_questions", "test_data", "example_every", "save_every", "time_budget_min", "resume",
                  "resume_override", "device", "compile", "activation_checkpointing", "dry_run", "gpu_mem_gb",
                  "save_merged", "out_dir", "preset"}


def append_log(cfg, entry):
    """One strict-JSON line in out_dir/log.jsonl (a NaN, e.g. no hard tokens this step, becomes null)."""
    from data import json_safe
    with open(os.path.join(cfg.out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(json_safe(entry)) + "\n")


def read_manifest(folder):
    """The manifest in `folder` ({"step", "files": {name: bytes}, "config"}), or None if there is none."""
    path = os.path.join(folder, MARKER)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: unreadable ({e}); the run's manifest is damaged") from None


def prepare_out_dir(cfg):
    """Before anything is loaded: refuse an out_dir that is neither new, empty nor this trainer's run;
    take its lock; check it is writable with room for a checkpoint; finish or discard a save cut short;
    on --resume verify the checkpoint, compare the settings and cut log.jsonl back to it.
    A fresh run starts a new log. Returns the step to start from (0: a fresh run)."""
    out = cfg.out_dir
    if os.path.exists(out) and os.path.realpath(out) == os.path.realpath(cfg.model_dir):
        raise SystemExit(f"--out_dir={out} is the --model_dir: a run never writes over its own starting model")
    ours = os.path.isfile(os.path.join(out, MARKER))
    if os.path.exists(out) and not ours:
        entries = sorted(os.listdir(out)) if os.path.isdir(out) else None
        if entries is None:
            raise SystemExit(f"--out_dir={out} exists and is not a directory")
        model_files = [e for e in entries if e == "config.json" or e.endswith(".safetensors")]
        if model_files:
            raise SystemExit(f"--out_dir={out} holds a model ({', '.join(model_files[:3])}) and is not an nrt run "
                             f"(no {MARKER}): refusing to write into it; pick a new or empty directory")
        if entries:
            raise SystemExit(f"--out_dir={out} is not empty and is not an nrt run (no {MARKER}): pick a new or "
                             f"empty directory")
    if cfg.resume and not ours:
        raise SystemExit(f"--resume=True but {out} does not exist or holds no nrt run ({MARKER})")
    try:
        os.makedirs(out, exist_ok=True)
        take_lock(out)
    except OSError as e:
        raise SystemExit(f"--out_dir={out}: not writable ({e.strerror or e})") from None
    check_free_space(cfg)
    recover(out)
    manifest = read_manifest(out) or {}
    step = manifest.get("step", 0)
    if step and not cfg.resume:
        raise SystemExit(f"{out} already holds a checkpoint (step {step}); pass --resume=True or pick another --out_dir")
    if cfg.resume and not step:
        raise SystemExit(f"--resume=True but {out} holds no checkpoint yet; start it afresh without --resume")
    if not step:  # a fresh run: a new log, this run's settings in the marker
        if os.path.exists(os.path.join(out, "log.jsonl")):
            os.remove(os.path.join(out, "log.jsonl"))
        atomic_write(os.path.join(out, MARKER), json.dumps(dict(step=0, files={}, config=dict(cfg)), indent=1).encode())
        return 0
    for name, size in manifest["files"].items():
        path = os.path.join(out, name)
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            found = f"{os.path.getsize(path)} bytes" if os.path.isfile(path) else "missing"
            raise SystemExit(f"{out}: the checkpoint of step {step} is inconsistent: {name} is {found}, its "
                             f"manifest says {size} bytes")
    check_settings(cfg, manifest.get("config", {}))
    truncate_log(os.path.join(out, "log.jsonl"), step)
    return step


def check_settings(cfg, old):
    """--resume refuses a changed setting that alters the run, unless --resume_override=True."""
    if (old.get("lora_rank", 0) > 0) != (cfg.lora_rank > 0):
        switch = "on" if cfg.lora_rank else "off"
        raise SystemExit(f"--lora_rank={cfg.lora_rank}: the checkpoint was trained with --lora_rank="
                         f"{old.get('lora_rank', 0)}; LoRA cannot be switched {switch} on --resume")
    changed = [k for k in cfg if k in old and k not in FREE_ON_RESUME and old[k] != cfg[k]]
    if changed and not cfg.resume_override:
        raise SystemExit("--resume: " + ", ".join(f"--{k}={cfg[k]!r} (the run used {old[k]!r})" for k in changed)
                         + " would change the run; keep the run's settings or pass --resume_override=True")


def truncate_log(path, step):
    """log.jsonl back to the checkpoint: step lines up to `step` and the "before" eval; a torn line goes too."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("eval") == "before" or ("eval" not in entry and entry.get("step", 0) <= step):
                keep.append(line if line.endswith("\n") else line + "\n")
    atomic_write(path, "".join(keep).encode())


def take_lock(out):
    """Create out_dir/.nrt.lock exclusively (O_EXCL) holding our pid; a lock whose process is gone is taken
    over, a live one is an error. The lock goes when the process exits (not after kill -9: then it is stale)."""
    path = os.path.join(out, LOCK)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    text = f.read().strip()
                age = time.time() - os.path.getmtime(path)
            except FileNotFoundError:
                continue  # released meanwhile
            pid = int(text) if text.isdigit() else None
            if (pid is None and age < 10) or (pid is not None and pid != os.getpid() and _alive(pid)):
                raise SystemExit(f"--out_dir={out} is in use by another run (pid {pid or 'starting'}; lock file {path})")
            os.remove(path)  # stale: its process is gone
            continue
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        atexit.register(_release_lock, path, os.getpid())
        return
    raise SystemExit(f"--out_dir={out}: could not take the lock {path}")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _release_lock(path, pid):
    try:
        with open(path) as f:
            if f.read().strip() == str(pid):
                os.remove(path)
    except OSError:
        pass


def checkpoint_bytes(model_dir, lora):
    """About what one checkpoint takes on disk: fp32 weights, plus AdamW's two fp32 moments unless LoRA."""
    from safetensors import safe_open
    try:
        files = set(safetensors_files(model_dir).values())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--model_dir={model_dir}: {e}") from None
    n = 0
    for file in files:
        with safe_open(file, framework="pt") as f:
            n += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return n * (4 if lora else 12)


def check_free_space(cfg, margin=1.1):
    need = checkpoint_bytes(cfg.model_dir, cfg.lora_rank > 0) * margin
    free = shutil.disk_usage(cfg.out_dir).free
    if free < need:
        raise SystemExit(f"--out_dir={cfg.out_dir}: {free / 1e9:.2f} GB free, a checkpoint needs about "
                         f"{need / 1e9:.2f} GB (fp32 weights and optimizer state, written beside the previous one)")


def recover(out):
    """Finish a save whose manifest was written (the commit point); discard one cut short before it."""
    for name in os.listdir(out):
        if name.endswith(".tmp"):
            os.remove(os.path.join(out, name))
    stage = os.path.join(out, STAGING)
    if os.path.isfile(os.path.join(stage, MARKER)):
        print(f"{out}: finishing the save of step {read_manifest(stage)['step']} that was cut short", flush=True)
        _switch_in(out)
    elif os.path.isdir(stage):
        print(f"{out}: discarding a save that was cut short before it was complete", flush=True)
        shutil.rmtree(stage)


def _switch_in(out):
    """Rename the staged files into out_dir, drop files of the old checkpoint the new one lacks, then the
    manifest. Idempotent: a file already moved by a switch cut short is simply not in the stage any more."""
    stage = os.path.join(out, STAGING)
    new, old = read_manifest(stage), read_manifest(out) or {}
    for name in new["files"]:
        if os.path.exists(os.path.join(stage, name)):
            os.replace(os.path.join(stage, name), os.path.join(out, name))
            _file_done()
    for name in set(old.get("files", {})) - set(new["files"]):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    os.replace(os.path.join(stage, MARKER), os.path.join(out, MARKER))
    _fsync_dir(out)
    _file_done()
    shutil.rmtree(stage)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(model, optimizer, step, cfg):
    """Step `step` as one unit: the model in the HF layout (LoRA: adapters in the PEFT layout, plus the
    merged model unless save_merged=False), tokenizer files and train_state.pt (optimizer state, step,
    config), all staged in out_dir/.ckpt-tmp, then the manifest (the commit point), then switched in.
    A failed write names the file and leaves the previous checkpoint as it was."""
    from lora import save_adapters, save_merged
    out = cfg["out_dir"]
    stage = os.path.join(out, STAGING)
    check_finite(model, f"the weights at step {step}")
    try:
        shutil.rmtree(stage, ignore_errors=True)
        os.makedirs(stage)
        if cfg["lora_rank"] > 0:
            save_adapters(model, stage, cfg["model_dir"])
            if cfg["save_merged"]:
                save_merged(model, stage)
        else:
            save_model(model, stage)
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(cfg["model_dir"], name)):
                shutil.copyfile(os.path.join(cfg["model_dir"], name), os.path.join(stage, name))
                _file_done()
        state = dict(step=step, optimizer=optimizer.state_dict(), config=dict(cfg))
        torch.save(state, os.path.join(stage, "train_state.pt"))
        _file_done()
        files = {}
        for name in sorted(os.listdir(stage)):
            path = os.path.join(stage, name)
            os.chmod(path, 0o644)  # a model directory is for sharing (safetensors writes 0600)
            with open(path, "rb") as f:
                os.fsync(f.fileno())  # on disk before the manifest says it is
            files[name] = os.path.getsize(path)
        atomic_write(os.path.join(stage, MARKER), json.dumps(dict(step=step, files=files, config=dict(cfg)),
                                                             indent=1).encode())
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        raise SystemExit(f"saving the checkpoint of step {step} failed writing {e.filename or stage}: "
                         f"{e.strerror or e}; the previous checkpoint in {out} is left as it was") from None
    _switch_in(out)
    print(f"saved checkpoint at step {step} to {out}", flush=True)


@torch.no_grad()
def check_finite(model, source, logits=True):
    """Stop, naming `source`, if a weight is NaN or infinite (or, with logits=True, the logits of a short
    probe input): a broken checkpoint must not be trained, evaluated, sampled or saved."""
    for name, p in model.named_parameters():
        bad = (~torch.isfinite(p)).sum().item()
        if bad:
            raise SystemExit(f"{source}: {bad} non-finite values (NaN or inf) in {name}; the weights are broken")
    if logits:
        probe = torch.arange(min(8, model.cfg.vocab_size), device=model.embed.weight.device)[None]
        if not torch.isfinite(model(probe)).all():
            raise SystemExit(f"{source}: the weights are finite but give non-finite logits (NaN or inf)")


def load_for_training(cfg, device, weight_dtype):
    """(model, train state or None): from model_dir, or from out_dir's checkpoint on --resume."""
    from lora import apply_lora, load_adapters
    lora = cfg.lora_rank > 0  # the frozen base always comes from model_dir; out_dir holds the adapters
    source = cfg.out_dir if cfg.resume else cfg.model_dir
    model = load_model(cfg.out_dir if cfg.resume and not lora else cfg.model_dir, weight_dtype, device)
    model.activation_checkpointing = cfg.activation_checkpointing
    if lora and cfg.resume:
        load_adapters(model, cfg.out_dir)
    elif lora:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, seed=cfg.seed)
    check_finite(model, source)
    if not cfg.resume:
        return model, None
    state = torch.load(os.path.join(cfg.out_dir, "train_state.pt"), map_location=device, weights_only=False)
    if state["step"] != read_manifest(cfg.out_dir)["step"]:
        raise SystemExit(f"{cfg.out_dir}: train_state.pt is of step {state['step']}, the manifest of step "
                         f"{read_manifest(cfg.out_dir)['step']}: the checkpoint is inconsistent")
    return model, state
