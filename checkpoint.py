"""Checkpoints on disk: Hugging Face model directories in, Hugging Face model directories out.

What it is
  `load_model` / `save_model` read and write config.json + safetensors (one file, or shards with an
  index) through model.py's one name table (`hf_names`); `save_checkpoint` / `load_train_state` add
  what train.py needs beside the model: tokenizer files, the optimizer state and the step.

Choices
  - Loading copies one tensor at a time into the already-allocated parameters (read on the CPU), so
    the checkpoint never exists twice in GPU memory.
  - Every file is written to a temp name and renamed: a crash never leaves a half-written file.
  - out_dir is itself a model directory that sample.py, eval.py and `transformers` load as it is.
Left out: formats other than safetensors (.bin pickles, GGUF: prepare.py converts the default).
"""
import json
import os
import shutil

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


# ---- training checkpoints: the model directory plus the optimizer state and the step ----

def save_checkpoint(model, optimizer, step, cfg):
    """Model in the HF layout (LoRA: adapters in the PEFT layout, plus the merged model unless
    save_merged=False) + tokenizer files + train_state.pt (optimizer state, step, config)."""
    from lora import save_adapters, save_merged
    out = cfg["out_dir"]
    if cfg["lora_rank"] > 0:
        save_adapters(model, out, cfg["model_dir"])
        if cfg["save_merged"]:
            save_merged(model, out)
    else:
        save_model(model, out)
    for name in TOKENIZER_FILES:
        src = os.path.join(cfg["model_dir"], name)
        if os.path.isfile(src) and os.path.abspath(src) != os.path.abspath(os.path.join(out, name)):
            shutil.copyfile(src, os.path.join(out, name + ".tmp"))
            os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
    tmp = os.path.join(out, "train_state.pt.tmp")
    torch.save(dict(step=step, optimizer=optimizer.state_dict(), config=dict(cfg)), tmp)
    os.replace(tmp, os.path.join(out, "train_state.pt"))
    print(f"saved checkpoint at step {step} to {out}", flush=True)


def load_for_training(cfg, device, weight_dtype):
    """(model, tokenizer, train state or None): from model_dir, or from out_dir on --resume."""
    from lora import apply_lora, load_adapters
    from tokenizer import Tokenizer
    state_file = os.path.join(cfg.out_dir, "train_state.pt")
    if os.path.exists(state_file) and not cfg.resume:
        raise SystemExit(f"{cfg.out_dir} already holds a checkpoint; pass --resume=True or pick another --out_dir")
    if cfg.resume and not os.path.exists(state_file):
        raise SystemExit(f"--resume=True but {state_file} does not exist")
    lora = cfg.lora_rank > 0  # the frozen base always comes from model_dir; out_dir holds the adapters
    model = load_model(cfg.out_dir if cfg.resume and not lora else cfg.model_dir, weight_dtype, device)
    model.activation_checkpointing = cfg.activation_checkpointing
    if lora and cfg.resume:
        load_adapters(model, cfg.out_dir)
    elif lora:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, seed=cfg.seed)
    state = torch.load(state_file, map_location=device, weights_only=False) if cfg.resume else None
    return model, Tokenizer.from_pretrained(cfg.model_dir), state
