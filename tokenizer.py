"""tokenizer.py: one Tokenizer for the model families this project trains.

from_pretrained(model_dir) reads the first file there of: tekken.json (Mistral NeMo / Small 3 / Ministral),
tokenizer.json (HF byte-level BPE: SmolLM2, Llama 3, GPT-2; or SentencePiece-style BPE with byte fallback:
Mistral 7B v0.1-v0.3, Llama 2), original/tokenizer.model or tokenizer.model (Llama 3's tiktoken file).
It sets n_vocab, bos_id, eos_id (ends an assistant turn), stop_ids and chat_format ('chatml', 'llama3',
'mistral' or 'plain'; from the chat template, overridable).

Choices: byte-level formats become one tiktoken.Encoding whose token values are the model's ids, tested id for
id against HF; SentencePiece-style BPE, which tiktoken cannot run, is sentencepiece_bpe.py. allow_special=False
(the default) encodes text that spells a special token ("<|im_end|>") as ordinary text, so user data cannot
inject control tokens; encode_chat puts the special ids in.
Left out: Unigram models, normalizers other than SentencePiece's space handling, add_prefix_space, ids out
of merge order, Llama 2's chat format (<<SYS>>), tools, and the system prompts chat templates add by
default (SmolLM2's "You are a helpful AI assistant named SmolLM...", Llama 3.1's dates): pass a system message.
"""
import base64
import itertools
import json
import os
import pathlib
import re

import tiktoken

from sentencepiece_bpe import SPACE, SentencePieceBPE

# GPT-2's split regex, the one HF's ByteLevel pre-tokenizer applies when use_regex is true.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Llama 3's split regex (Meta's tokenizer.py; tokenizer.json carries the same one in a Split step).
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"""
                  r"""[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Llama 3.1's 256 special tokens, ids 128000.. (3.0 named a few reserved ones differently: not ids used here).
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                   *[f"<|reserved_special_token_{i}|>" for i in range(3, 248)]]
# Ids 0..19 of older tekken.json files (v3), which carry no special-token list; the rest are <SPECIAL_i>.
TEKKEN_SPECIALS = ("<unk> <s> </s> [INST] [/INST] [AVAILABLE_TOOLS] [/AVAILABLE_TOOLS] "
                   "[TOOL_RESULTS] [/TOOL_RESULTS] [TOOL_CALLS] [IMG] <pad> [IMG_BREAK] [IMG_END] "
                   "[PREFIX] [MIDDLE] [SUFFIX] [SYSTEM_PROMPT] [/SYSTEM_PROMPT] [TOOL_CONTENT]").split()

FORMATS = {  # chat format -> (what marks it in a chat template, the special tokens it needs, its eos)
    "chatml": ("<|im_start|>", ("<|im_start|>", "<|im_end|>"), "<|im_end|>"),
    "llama3": ("<|start_header_id|>", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                                       "<|begin_of_text|>"), "<|eot_id|>"),
    "mistral": ("[INST]", ("<s>", "</s>"), "</s>"),  # [INST] is plain text in Mistral 7B v0.1/v0.2
    "plain": (None, (), None),  # eos: the first of END_OF_TEXT the vocabulary has
}
STOP_NAMES = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "</s>")
END_OF_TEXT = ("<|end_of_text|>", "<|endoftext|>", "</s>")
BOS_NAMES = ("<|begin_of_text|>", "<s>")  # SmolLM2 has no BOS: its template starts with im_start
ROLES = ("system", "user", "assistant")


def _byte_decoder():
    """GPT-2's byte-level alphabet, char -> byte: printable bytes stand for themselves, the other 68 for chars 256.."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + k): b for k, b in enumerate(others)}}


def _hf_pattern(pre, path):
    """The split regex equivalent to a tokenizer.json pre_tokenizer."""
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre]
    kinds = [(s or {}).get("type") for s in steps or []]
    if kinds[-1:] == ["ByteLevel"] and not steps[-1].get("add_prefix_space"):
        uses_regex, split = steps[-1].get("use_regex", True), steps[0]
        if kinds == ["ByteLevel"] and uses_regex:
            return GPT2_PATTERN
        if kinds == ["Digits", "ByteLevel"] and uses_regex:  # a number is a piece of its own (each digit alone if
            # individual_digits), taking no leading space, and \s+(?!\S) stops before it as before the end
            number = r"\p{N}" if split.get("individual_digits") else r"\p{N}+"
            return GPT2_PATTERN.replace(r" ?\p{N}+", number).replace(r"\s+(?!\S)", r"\s+(?![^\s\p{N}])")
        if (kinds == ["Split", "ByteLevel"] and not uses_regex and "Regex" in split.get("pattern", {})
                and split.get("behavior") == "Isolated" and not split.get("invert")):
            return split["pattern"]["Regex"]
    raise ValueError(f"{path}: unsupported pre_tokenizer {json.dumps(pre)[:300]}; supported: ByteLevel, "
                     "Digits + ByteLevel, Split(regex, Isolated) + ByteLevel")


def _read_json(path):
    try:
        return json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid JSON file ({e})") from None


def _load_hf(path, d):
    """tokenizer.json -> a Tokenizer source: SentencePieceBPE if it writes the text with "▁", else byte-level BPE."""
    model = d["model"] or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: model type {model.get('type')!r} is not supported; only BPE is")
    if (model.get("byte_fallback") or (d.get("pre_tokenizer") or {}).get("type") == "Metaspace"
            or SPACE in json.dumps(d.get("normalizer"), ensure_ascii=False)):
        return SentencePieceBPE(path, d)
    if d.get("normalizer"):
        raise ValueError(f"{path}: byte-level BPE with a normalizer ({json.dumps(d['normalizer'])[:60]}): unsupported")
    specials = {t["content"]: t["id"] for t in d.get("added_tokens", [])}
    special_ids, to_byte = set(specials.values()), _byte_decoder()
    try:  # added tokens may sit in the vocab too: keep them out of the BPE ranks
        ranks = {bytes(to_byte[c] for c in s): i for s, i in model["vocab"].items() if i not in special_ids}
    except KeyError as e:
        raise ValueError(f"{path}: vocab has a char {e} outside GPT-2's byte alphabet: not byte-level") from None
    # tiktoken ranks by id, HF by merge position: the same only if the merge results' ids never decrease
    # (ties: Llama 3 lists every split of a token)
    ids = [model["vocab"].get(m.replace(" ", "", 1) if isinstance(m, str) else "".join(m), -1)
           for m in model.get("merges", [])]
    if k := next((k for k in range(1, len(ids)) if ids[k] < ids[k - 1]), 0):
        raise ValueError(f"{path}: merge #{k} gives id {ids[k]}, below the previous merge's id {ids[k - 1]}: "
                         "ids must follow the merge order for tiktoken; not supported")
    return _hf_pattern(d.get("pre_tokenizer"), path), ranks, specials


def _load_tiktoken_file(path):
    """Llama 3's tokenizer.model: "base64(bytes) rank" lines only; regex and specials: Llama 3's (only it ships one)."""
    try:
        with open(path, "rb") as f:
            ranks = {base64.b64decode(token, validate=True): int(rank)
                     for token, rank in (line.split() for line in f if line.strip())}
    except ValueError:  # also binascii.Error
        raise ValueError(f"{path}: expected 'base64-token rank' lines (a tiktoken BPE file); a SentencePiece "
                         "tokenizer.model (Llama 2, Mistral v0.1) is not supported") from None
    if len(ranks) != 128000:
        raise ValueError(f"{path}: {len(ranks)} tokens; only Llama 3's tiktoken file (128000 tokens) is known")
    return LLAMA3_PATTERN, ranks, {s: 128000 + i for i, s in enumerate(LLAMA3_SPECIALS)}


def _load_tekken(path, d):
    """tekken.json: specials are ids 0..n_special-1, vocab rank r is id r + n_special, below default_vocab_size."""
    cfg, n_special = d["config"], d["config"]["default_num_special_tokens"]
    named = {t["rank"]: t["token_str"] for t in d.get("special_tokens") or []} or dict(enumerate(TEKKEN_SPECIALS))
    specials = {named.get(i, f"<SPECIAL_{i}>"): i for i in range(n_special)}
    inner = cfg["default_vocab_size"] - n_special
    ranks = {base64.b64decode(t["token_bytes"]): t["rank"] + n_special for t in d["vocab"] if t["rank"] < inner}
    return cfg["pattern"], ranks, specials


def _guess_format(specials, template):
    """With a chat template, the format whose marker it mentions ('plain' if none: a base model, or <<SYS>>: Llama 2's
    [INST], unsupported); without one (a bare Meta/Mistral download), the one whose marker and needs are specials."""
    for fmt, (marker, needs, _) in FORMATS.items():
        if marker and (all(n in specials for n in (marker, *needs)) if template is None
                       else marker in template and not (fmt == "mistral" and "<<SYS>>" in template)):
            return fmt
    return "plain"


class Tokenizer:
    """Text <-> ids for one model family, plus its special ids and chat format (module docstring)."""

    def __init__(self, name, source, chat_format=None, template=None):
        """source: a SentencePieceBPE, or (split regex, {token bytes: id}, {special: id}) for tiktoken."""
        if isinstance(source, SentencePieceBPE):  # it decodes as a tiktoken.Encoding does
            self._enc, self._encode_text, self.n_vocab = source, source.encode, source.n_vocab
            specials = source.specials
        else:
            self._pattern, ranks, specials = source
            self.n_vocab = max(max(ranks.values()), max(specials.values(), default=-1)) + 1
            # tiktoken needs a rank for every byte: one with no token (SmolLM2 lacks 21) gets a spare: see encode
            self._drop = bytes(b for b in range(256) if bytes([b]) not in ranks)
            ranks = {**ranks, **{bytes([b]): self.n_vocab + k for k, b in enumerate(self._drop)}}
            self._enc = tiktoken.Encoding(name, pat_str=self._pattern, mergeable_ranks=ranks, special_tokens=specials)
            self._encode_text = self._encode_byte_level
        self.name, self.special_tokens, self._special_set = name, dict(specials), frozenset(specials.values())
        names = sorted(specials, key=len, reverse=True)  # the longest first, as HF matches them
        self._special_re = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
        self.chat_format = chat_format or _guess_format(specials, template)
        if self.chat_format not in FORMATS:
            raise ValueError(f"chat_format {self.chat_format!r}: expected one of {list(FORMATS)}")
        for needed in FORMATS[self.chat_format][1]:
            self.special_id(needed)  # a clear KeyError if the vocabulary lacks it
        self.bos_id = next((specials[s] for s in BOS_NAMES if s in specials), None)
        eos = FORMATS[self.chat_format][2] or next((s for s in END_OF_TEXT if s in specials), END_OF_TEXT[0])
        self.eos_id = self.special_id(eos)
        self.stop_ids = frozenset({self.eos_id, *(specials[s] for s in STOP_NAMES if s in specials)})
        # Mistral's system message gets its own [SYSTEM_PROMPT] block where the template writes one (Small 3 on)
        self._system_blocks = "[SYSTEM_PROMPT]" in (template or "") and "[/SYSTEM_PROMPT]" in specials

    @classmethod
    def from_pretrained(cls, path, chat_format=None):
        """Load from a model directory or a tokenizer file (see the module docstring), with the chat template beside
        it (one folder up for original/): '' when a tokenizer_config.json has none, None when there is neither (a
        bare Meta/Mistral download)."""
        path, names = os.fspath(path), ("tekken.json", "tokenizer.json", "original/tokenizer.model", "tokenizer.model")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no tokenizer file or model directory at {path}")
        files = [os.path.join(path, n) for n in names] if os.path.isdir(path) else [path]
        if (file := next((f for f in files if os.path.isfile(f)), None)) is None:
            raise FileNotFoundError(f"no tokenizer in {path}: looked for {', '.join(names)}")
        if not file.endswith(".json"):
            source = _load_tiktoken_file(file)
        elif isinstance(d := _read_json(file), dict) and ("model" in d or "config" in d and "vocab" in d):
            source = _load_hf(file, d) if "model" in d else _load_tekken(file, d)
        else:
            raise ValueError(f"{file}: neither a Hugging Face tokenizer.json nor a Mistral tekken.json")
        folder = os.path.dirname(os.path.abspath(file)).removesuffix(os.sep + "original")
        jinja, config = (os.path.join(folder, n) for n in ("chat_template.jinja", "tokenizer_config.json"))
        template = (pathlib.Path(jinja).read_text(encoding="utf-8") if os.path.isfile(jinja) else
                    json.dumps(_read_json(config).get("chat_template", "")) if os.path.isfile(config) else None)
        return cls(os.path.basename(file), source, chat_format, template)

    def special_id(self, name):
        if name not in self.special_tokens:
            raise KeyError(f"{name!r} is not a special token of {self.name} (it has {len(self.special_tokens)}: "
                           f"{', '.join(list(self.special_tokens)[:8])}, ...)")
        return self.special_tokens[name]

    def encode(self, text, bos=False, allow_special=False, continuation=False):
        """Text -> ids; bos=True prepends BOS when the family has one (Llama 3, Mistral). A SentencePiece-style
        tokenizer puts a "▁" (a space) in front of the text where its file says so, as HF does, and decode
        drops it; continuation=True (the text continues a sequence, e.g. an answer after a delimiter) puts none."""
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")  # lone surrogates, as tiktoken
        parts = self._special_re.split(text) if allow_special and self._special_re else [text]
        ids = [self.bos_id] if bos and self.bos_id is not None else []
        for k, part in enumerate(parts):  # re.split puts the special tokens at odd positions
            ids += [self.special_tokens[part]] if k % 2 else self._encode_text(part, None if continuation else k == 0)
        return ids

    def _encode_byte_level(self, text, at_start):  # at_start: unused (SentencePieceBPE.encode's)
        """tiktoken's ids; but HF drops a byte with no token from its pre-token and merges the rest ("!\\x04!" -> "!!"):
        then (rare) `regex` (for \\p{L}; tiktoken's dependency) splits and tiktoken merges each pre-token alone."""
        ids = self._enc.encode_ordinary(text)
        if not self._drop or max(ids, default=0) < self.n_vocab:
            return ids
        import regex
        pieces = (p.encode("utf-8").translate(None, self._drop) for p in regex.findall(self._pattern, text))
        return [i for piece in pieces if piece for i in self._enc._encode_single_piece(piece)]  # since tiktoken 0.4

    def decode(self, ids, skip_special=False):
        """Ids (a list, numpy array or torch tensor) -> text; bytes that are not valid UTF-8 become U+FFFD."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        ids = [i for i in ids if i not in self._special_set] if skip_special else ids
        if bad := [i for i in ids if not 0 <= i < self.n_vocab]:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (n_vocab={self.n_vocab})")
        return self._enc.decode(ids, errors="replace")

    def encode_chat(self, messages, add_generation_prompt=True):
        """Messages [{'role': 'system'|'user'|'assistant', 'content': str}] -> prompt ids in the chat format, the
        text with allow_special=False (it cannot forge turn markers); add_generation_prompt opens an assistant turn.
        'mistral' ends in one anyway, and is [INST] as the official templates write it for each tokenizer:
          v0.1/v0.2 ([INST] is text):      <s> [INST] question [/INST] answer</s> [INST] next [/INST]
          v0.3 ([INST] a control token):   <s>[INST] question[/INST] answer</s>[INST] next[/INST]
          tekken (NeMo, Small 3, ...):     <s>[INST]question[/INST]answer</s>[INST]next[/INST]
        (v0.3 strips the answer.) A system message goes in its [SYSTEM_PROMPT] block, else before the first user
        message (v0.1/v0.2) or the last (v0.3, tekken). Text gets no "▁" in front, as with Mistral's own tokenizer."""
        if bad := [m for m in messages if m.get("role") not in ROLES or not isinstance(m.get("content"), str)]:
            raise ValueError(f"bad message {bad[0]!r}: need a role in {ROLES} and a str content")
        sid = self.special_id
        if self.chat_format == "chatml":  # <|im_start|>role\ncontent<|im_end|>\n
            ids, start, end = [], sid("<|im_start|>"), [sid("<|im_end|>"), *self.encode("\n")]
            for m in messages:
                ids += [start, *self.encode(f"{m['role']}\n{m['content']}"), *end]
            return ids + [start, *self.encode("assistant\n")] if add_generation_prompt else ids
        if self.chat_format == "llama3":  # content stripped, as Meta's code and HF's template do
            start, end = sid("<|start_header_id|>"), [sid("<|end_header_id|>"), *self.encode("\n\n")]
            ids = [sid("<|begin_of_text|>")]
            for m in messages:
                ids += [start, *self.encode(m["role"]), *end, *self.encode(m["content"].strip()), sid("<|eot_id|>")]
            return ids + [start, *self.encode("assistant"), *end] if add_generation_prompt else ids
        if self.chat_format == "plain":  # a base model continues the text
            return self.encode("\n".join(m["content"] for m in messages), bos=True)
        spm, control = isinstance(self._enc, SentencePieceBPE), "[INST]" in self.special_tokens  # 'mistral'
        space = " " if spm else ""
        system = [m["content"] for m in messages[:1] if m["role"] == "system"]
        turns = messages[len(system):]
        if not turns or [m["role"] for m in turns] != [("user", "assistant")[k % 2] for k in range(len(turns))]:
            raise ValueError("the 'mistral' format needs roles [system,] user, assistant, user, ... alternating")
        parts = [self.bos_id]  # ids and text, in order
        if system and self._system_blocks:
            parts += [sid("[SYSTEM_PROMPT]"), space + system[0], sid("[/SYSTEM_PROMPT]")]
        to = (len(turns) - 1) // 2 * 2 if control else 0  # the last user message (users are at even k), or the first
        for k, text in enumerate(m["content"] for m in turns):
            if k % 2 == 0:  # a user message (the roles alternate)
                text = f"{system[0]}\n\n{text}" if k == to and system and not self._system_blocks else text
                parts += [sid("[INST]"), space + text, sid("[/INST]")] if control else [f" [INST] {text} [/INST]"]
            else:  # v0.1/v0.2 keep the answer after a space, v0.3 strips it, tekken keeps it as it is
                parts += [text if control and not spm else " " + (text.strip() if control else text), self.eos_id]
        runs = itertools.groupby(parts, key=lambda p: isinstance(p, str))  # neighbouring text is encoded in one go
        return [i for is_text, run in runs for i in (self.encode("".join(run), continuation=True) if is_text else run)]
