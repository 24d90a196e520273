"""Checkpoints on disk: Hugging Face model directories in and out, and train.py's out_dir.

`load_model` reads config.json + safetensors (one file, or shards with an index), `save_model` writes one file,
through model.py's name table; `prepare_out_dir`, `save_checkpoint` and `load_for_training` own train.py's out_dir:
its rules, its lock, its checkpoints. Choices: a load copies one tensor at a time into the allocated parameters (never
two copies in memory); every file is written under a temp name, then renamed; out_dir is itself a model directory. A
checkpoint is one unit: its files go to out_dir/.ckpt-tmp, then its manifest (the commit point), then all are renamed
into place; the next start finishes or discards a save cut short. Kill -9 at any instant leaves the last one whole.
Left out: formats other than safetensors (.bin pickles, GGUF: prepare.py converts the default); writing shards (one
file of any size loads in transformers too).
"""
import atexit
import fcntl
import json
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model import ModelConfig, Transformer, hf_names, rope_inv_freq

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "tekken.json", "tokenizer.model")


# ---- model directories ----

def load_config(path) -> ModelConfig:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} not found: expected a Hugging Face model directory")
    try:
        with open(file) as f:
            return ModelConfig.from_hf(json.load(f), source=file)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None


def safetensors_files(path) -> dict[str, str]:
    """HF tensor name -> file holding it, from model.safetensors.index.json or model.safetensors."""
    index, single = os.path.join(path, "model.safetensors.index.json"), os.path.join(path, "model.safetensors")
    file = index if os.path.isfile(index) else single
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    try:
        if file == index:
            with open(index) as f:
                return {name: os.path.join(path, shard) for name, shard in json.load(f)["weight_map"].items()}
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    except Exception as e:  # a truncated or corrupt file: say which one
        raise ValueError(f"{file}: cannot read it ({e})") from None


@torch.no_grad()
def load_model(path, dtype=torch.float32, device="cpu") -> Transformer:
    """The model in `path`, its parameters in `dtype` on `device`, each checked for presence and shape."""
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
    for file, names in by_file.items():  # each file opened once (a shard's header is parsed once)
        try:
            with safe_open(file, framework="pt") as f:
                for ours, hf in names:
                    t, want = f.get_tensor(hf), tuple(params[ours].shape)
                    if tuple(t.shape) != want:
                        hint = ("; config.json has no num_key_value_heads, so it was taken to equal num_attention_heads"
                                if "k_proj" in hf and "num_key_value_heads" not in cfg.hf else "")
                        raise ValueError(f"tensor {hf!r} has shape {tuple(t.shape)}, expected {want} "
                                         f"(config.json){hint}")
                    params[ours].copy_(t)
        except Exception as e:  # a truncated file, a wrong shape: name the file
            raise ValueError(f"{file}: {e}") from None
    return model


def save_model(model, path, weight=lambda name, tensor: tensor):
    """config.json + model.safetensors, each written atomically; a shard index there, which would shadow the new
    file, goes. `weight(our_name, tensor)` may replace a tensor on its way out (lora.py writes merged weights so)."""
    os.makedirs(path, exist_ok=True)
    params, file = dict(model.named_parameters()), os.path.join(path, "model.safetensors")
    tensors = {hf: weight(ours, params[ours].detach()).contiguous().cpu() for ours, hf in hf_names(model.cfg).items()}
    save_file(tensors, file + ".tmp", metadata={"format": "pt"})
    _finish(file + ".tmp", rename_to=file)
    if os.path.exists(index := os.path.join(path, "model.safetensors.index.json")):
        os.remove(index)
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    atomic_write(os.path.join(path, "config.json"), dict(model.cfg.hf, torch_dtype=dtype))


def atomic_write(file, data):
    """`data` (bytes, or an object written as JSON) into a temp file beside `file`, then renamed over it."""
    with open(file + ".tmp", "wb") as f:
        f.write(data if isinstance(data, bytes) else json.dumps(data, indent=2).encode())
    _finish(file + ".tmp", rename_to=file)


def _finish(file, rename_to=None):
    """A written file: readable by all (a model directory is for sharing; safetensors writes 0600), on disk, renamed
    if asked. Every file of a save passes here: the tests cut a save short by dying after the n-th call."""
    os.chmod(file, 0o644)
    _fsync(file)
    if rename_to:
        os.replace(file, rename_to)


def _fsync(path):
    """Flush a file, or a directory's renames, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def extend_tokenizer(model_dir, name, new_id):
    """A temp folder holding model_dir's tokenizer files with `name` added as special token `new_id` (the
    released recipe's delimiter <|response_start|>); read it with Tokenizer.from_pretrained, save it with the model."""
    import tempfile
    if not os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        raise SystemExit(f"--new_delimiter_token: {model_dir} has no tokenizer.json to add {name!r} to "
                         f"(tekken.json and tokenizer.model are not extended)")
    folder = tempfile.mkdtemp(prefix="nrt_tokenizer_")
    atexit.register(shutil.rmtree, folder, True)
    token = dict(content=name, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
    for n in [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(model_dir, n))]:
        with open(os.path.join(model_dir, n), "rb") as f:
            data = json.load(f) if n in ("tokenizer.json", "tokenizer_config.json") else f.read()
        if n == "tokenizer.json":  # the two files transformers reads added tokens from
            data["added_tokens"] = [*data.get("added_tokens", []), dict(id=new_id, **token)]
        elif n == "tokenizer_config.json":
            data["added_tokens_decoder"] = {**data.get("added_tokens_decoder", {}), str(new_id): token}
        atomic_write(os.path.join(folder, n), data)
    return folder


@torch.no_grad()
def init_token_row(model, new_id, source_id):
    """Give token `new_id` the embedding (and untied lm_head row) of `source_id`, growing the vocabulary if needed:
    the logits of every old token are unchanged, and the new token starts as likely as the source."""
    n, dim, like = model.cfg.vocab_size, model.cfg.dim, dict(device=model.embed.weight.device,
                                                              dtype=model.embed.weight.dtype)
    if new_id >= n:  # e.g. SmolLM2: its 49,152 rows are all taken
        embed, head = torch.nn.Embedding(new_id + 1, dim, **like), torch.nn.Linear(dim, new_id + 1, bias=False, **like)
        embed.weight[:n], head.weight[:n] = model.embed.weight, model.lm_head.weight
        model.embed, model.lm_head = embed, head
        if model.cfg.tie_embeddings:
            model.lm_head.weight = model.embed.weight
        model.cfg.vocab_size = model.cfg.hf["vocab_size"] = new_id + 1
    model.embed.weight[new_id] = model.embed.weight[source_id]
    model.lm_head.weight[new_id] = model.lm_head.weight[source_id]


# ---- train.py's out_dir: the rules, the lock, checkpoints committed as one unit ----

MARKER = "nrt_run.json"   # this trainer's run; also the manifest of its committed checkpoint (step, files, config)
STAGING = ".ckpt-tmp"     # the next checkpoint is written here, whole, before it is switched in
LOCK = ".nrt.lock"        # one run per out_dir: flock'ed by the run using it, which writes its pid in it
_locks = {}               # the lock files this process holds -> their open files (closing one drops its flock)
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
    """Before anything is loaded: refuse a foreign out_dir, take its lock, check room for a checkpoint, finish
    or discard a save cut short. A fresh run starts a new log; --resume verifies the checkpoint, compares the
    settings and cuts log.jsonl back to it. Returns the step to start from (0: a fresh run)."""
    out, log = cfg.out_dir, os.path.join(cfg.out_dir, "log.jsonl")
    refuse_foreign(cfg)
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
        raise SystemExit(f"{out} already holds a checkpoint (step {step}); pass --resume=True or pick a new --out_dir")
    if cfg.resume and not step:
        raise SystemExit(f"--resume=True but {out} holds no checkpoint yet; start it afresh without --resume")
    if not step:  # a fresh run: a new log, this run's settings in the marker
        if os.path.exists(log):
            os.remove(log)
        atomic_write(os.path.join(out, MARKER), dict(step=0, files={}, config=dict(cfg)))
        return 0
    for name, size in manifest["files"].items():
        path = os.path.join(out, name)
        found = f"{os.path.getsize(path)} bytes" if os.path.isfile(path) else "missing"
        if found != f"{size} bytes":
            raise SystemExit(f"{out}: the checkpoint of step {step} is inconsistent: {name} is {found}, its "
                             f"manifest says {size} bytes")
    check_settings(cfg, manifest.get("config", {}))
    truncate_log(log, step)
    return step


def refuse_foreign(cfg):
    """out_dir must be new, empty or this trainer's run, and never the model_dir: checked before any write."""
    out, ours = cfg.out_dir, os.path.isfile(os.path.join(cfg.out_dir, MARKER))
    if os.path.exists(out) and os.path.realpath(out) == os.path.realpath(cfg.model_dir):
        raise SystemExit(f"--out_dir={out} is the --model_dir: a run never writes over its own starting model")
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"--out_dir={out} exists and is not a directory")
    if os.path.isdir(out) and not ours and os.listdir(out):
        models = [e for e in sorted(os.listdir(out)) if e == "config.json" or e.endswith(".safetensors")]
        what = f"holds a model ({', '.join(models[:3])})" if models else "is not empty"
        raise SystemExit(f"--out_dir={out} {what} and is not an nrt run (no {MARKER}): refusing to write into "
                         f"it; pick a new or empty directory")
    if cfg.resume and not ours:
        raise SystemExit(f"--resume=True but {out} does not exist or holds no nrt run ({MARKER})")


def check_free_space(cfg):
    """Room for a checkpoint beside the previous one: fp32 weights, plus AdamW's two fp32 moments unless LoRA."""
    try:  # model_dir's weights are there and readable; its parameter count (on meta: nothing allocated)
        safetensors_files(cfg.model_dir)
        with torch.device("meta"):
            n = sum(p.numel() for p in Transformer(load_config(cfg.model_dir)).parameters())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--model_dir={cfg.model_dir}: {e}") from None
    need, free = n * (4 if cfg.lora_rank > 0 else 12) * 1.1, shutil.disk_usage(cfg.out_dir).free  # 10 % margin
    if free < need:
        raise SystemExit(f"--out_dir={cfg.out_dir}: {free / 1e9:.2f} GB free, a checkpoint needs about "
                         f"{need / 1e9:.2f} GB (fp32 weights and optimizer state, written beside the previous one)")


def recover(out):
    """Finish a save whose manifest was written (the commit point); discard one cut short before it."""
    for name in [n for n in os.listdir(out) if n.endswith(".tmp")]:
        os.remove(os.path.join(out, name))
    stage = os.path.join(out, STAGING)
    if os.path.isfile(os.path.join(stage, MARKER)):
        print(f"{out}: finishing the save of step {read_manifest(stage)['step']} that was cut short", flush=True)
        _switch_in(out)
    elif os.path.isdir(stage):
        print(f"{out}: discarding a save that was cut short before it was complete", flush=True)
        shutil.rmtree(stage)


def check_settings(cfg, old):
    """--resume refuses a changed setting that alters the run, unless --resume_override=True."""
    if (old.get("lora_rank", 0) > 0) != (cfg.lora_rank > 0):
        raise SystemExit(f"--lora_rank={cfg.lora_rank}: LoRA cannot be switched {'on' if cfg.lora_rank else 'off'} "
                         f"on --resume (the checkpoint was trained with --lora_rank={old.get('lora_rank', 0)})")
    changed = [k for k in cfg if k in old and k not in FREE_ON_RESUME and old[k] != cfg[k]]
    if changed and not cfg.resume_override:
        raise SystemExit("--resume: " + ", ".join(f"--{k}={cfg[k]!r} (the run used {old[k]!r})" for k in changed)
                         + " would change the run; keep the run's settings or pass --resume_override=True")


def truncate_log(path, step):
    """log.jsonl back to the checkpoint: step lines up to `step` and the "before" eval; a torn line goes too."""
    def keep(line):
        try:
            entry = json.loads(line)
        except ValueError:
            return False
        return entry.get("eval") == "before" or ("eval" not in entry and entry.get("step", 0) <= step)
    if os.path.exists(path):
        with open(path) as f:
            atomic_write(path, "".join(line.rstrip("\n") + "\n" for line in f if keep(line)).encode())


def take_lock(out):
    """An exclusive flock on out_dir/.nrt.lock, held until exit; the file holds our pid for the error message. The
    kernel drops the lock when a run ends, kill -9 included, so the file such a run leaves is simply locked again."""
    path = os.path.join(out, LOCK)
    while path not in _locks:  # else this process holds it already (a second prepare_out_dir)
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)  # the holder wrote its pid there
            raise SystemExit(f"--out_dir={out} is in use by another run (pid {f.read().strip()}, in {path})") from None
        if os.fstat(f.fileno()).st_nlink == 0:  # its holder deleted it on exit as we opened it: open the new one
            f.close()
            continue
        f.truncate(0)
        print(os.getpid(), file=f, flush=True)
        _locks[path] = f
        atexit.register(_release_lock, path, os.getpid())


def _release_lock(path, pid):
    """Delete the lock file, then close it (which drops the flock); a forked child (another pid) leaves it."""
    if pid == os.getpid() and path in _locks:
        if os.path.exists(path):  # else out_dir was deleted under the run
            os.remove(path)
        _locks.pop(path).close()


def _switch_in(out):
    """Rename the staged files into out_dir, drop the old checkpoint's files the new one lacks, then the manifest.
    Idempotent: a file that a switch cut short already moved is simply no longer in the stage."""
    stage = os.path.join(out, STAGING)
    new, old = read_manifest(stage), read_manifest(out) or {}
    for name in [n for n in new["files"] if os.path.exists(os.path.join(stage, n))]:
        _finish(os.path.join(stage, name), rename_to=os.path.join(out, name))
    for name in [n for n in set(old.get("files", {})) - set(new["files"]) if os.path.exists(os.path.join(out, n))]:
        os.remove(os.path.join(out, name))
    _finish(os.path.join(stage, MARKER), rename_to=os.path.join(out, MARKER))
    _fsync(out)
    shutil.rmtree(stage)


def save_checkpoint(model, optimizer, step, cfg, tokenizer_dir):
    """Step `step` as one unit, staged in out_dir/.ckpt-tmp: the HF model (LoRA: PEFT adapters, plus the merged model
    unless save_merged=False), `tokenizer_dir`'s tokenizer files and train_state.pt (optimizer, step, config); then the
    manifest (the commit point); then switched in. A failed write names the file and keeps the previous checkpoint."""
    from lora import save_adapters, save_merged
    out, stage = cfg.out_dir, os.path.join(cfg.out_dir, STAGING)
    check_finite(model, f"the weights at step {step}")
    try:
        shutil.rmtree(stage, ignore_errors=True)
        os.makedirs(stage)
        if cfg.lora_rank > 0:
            save_adapters(model, stage, cfg.model_dir)
            if cfg.save_merged:
                save_merged(model, stage)
        else:
            save_model(model, stage)
        for name in [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_dir, n))]:
            _finish(shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(stage, name)))
        torch.save(dict(step=step, optimizer=optimizer.state_dict(), config=dict(cfg)),
                   os.path.join(stage, "train_state.pt"))
        _finish(os.path.join(stage, "train_state.pt"))  # each staged file is on disk before the manifest says it is
        files = {name: os.path.getsize(os.path.join(stage, name)) for name in sorted(os.listdir(stage))}
        atomic_write(os.path.join(stage, MARKER), dict(step=step, files=files, config=dict(cfg)))
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        raise SystemExit(f"saving the checkpoint of step {step} failed writing {e.filename or stage}: "
                         f"{e.strerror or e}; the previous checkpoint in {out} is left as it was") from None
    _switch_in(out)
    print(f"saved checkpoint at step {step} to {out}", flush=True)


@torch.no_grad()
def check_finite(model, source):
    """Stop, naming `source`, if a weight or a short probe's logits are NaN or infinite: a broken checkpoint
    must not be trained, evaluated, sampled or saved."""
    for name, p in model.named_parameters():
        if bad := (~torch.isfinite(p)).sum().item():
            raise SystemExit(f"{source}: {bad} non-finite values (NaN or inf) in {name}; the weights are broken")
    probe = torch.arange(min(8, model.cfg.vocab_size), device=model.embed.weight.device)[None]
    if not torch.isfinite(model(probe)).all():
        raise SystemExit(f"{source}: the weights are finite but give non-finite logits (NaN or inf)")


def load_tokenizer(cfg):
    """(tokenizer, the folder its files come from, the id of a delimiter token added now or None): model_dir's, or
    on --resume the checkpoint's; --new_delimiter_token adds the delimiter (the released recipe) if it is missing."""
    from tokenizer import Tokenizer
    folder = cfg.out_dir if cfg.resume else cfg.model_dir
    tok = Tokenizer.from_pretrained(folder)
    if not cfg.new_delimiter_token or cfg.delimiter in tok.special_tokens:
        return tok, folder, None
    folder = extend_tokenizer(cfg.model_dir, cfg.delimiter, tok.n_vocab)  # the next free id
    return Tokenizer.from_pretrained(folder), folder, tok.n_vocab


def load_for_training(cfg, device, weight_dtype, new_id=None, eos_id=None):
    """(model, train state or None): from model_dir, or from out_dir's checkpoint on --resume; a delimiter token
    added by load_tokenizer (new_id) gets the embedding of EOS."""
    from lora import apply_lora, load_adapters
    lora = cfg.lora_rank > 0  # the frozen base always comes from model_dir; out_dir holds the adapters
    model = load_model(cfg.out_dir if cfg.resume and not lora else cfg.model_dir, weight_dtype, device)
    model.activation_checkpointing = cfg.activation_checkpointing
    if new_id is not None:
        init_token_row(model, new_id, eos_id)
    if lora and cfg.resume:
        load_adapters(model, cfg.out_dir)
    elif lora:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, seed=cfg.seed)
    check_finite(model, cfg.out_dir if cfg.resume else cfg.model_dir)
    if not cfg.resume:
        return model, None
    state = torch.load(os.path.join(cfg.out_dir, "train_state.pt"), map_location=device, weights_only=False)
    if state["step"] != (committed := read_manifest(cfg.out_dir)["step"]):
        raise SystemExit(f"{cfg.out_dir}: train_state.pt is of step {state['step']}, the manifest of step "
                         f"{committed}: the checkpoint is inconsistent")
    return model, state
