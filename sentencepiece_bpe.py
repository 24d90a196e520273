"""SentencePiece-style BPE, exact to Hugging Face `tokenizers`: the tokenizer.json of Mistral 7B v0.1-v0.3
(and Llama 2), which tiktoken cannot run: BPE over characters with byte fallback (the rules: SentencePieceBPE),
each space written "▁" (SPACE), no regex split. tokenizer.py uses it in place of a tiktoken.Encoding, splitting
off special tokens itself. Left out: Unigram models, BPE dropout, other normalizers.
"""
import heapq
import itertools
import re

SPACE = "\u2581"  # SentencePiece's visible space


def _text_model(path, d):
    """How the file turns text into what BPE sees: (prefix, split). prefix, which texts between special tokens get a
    "▁" in front: 'each' all (normalizer Prepend "▁" + Replace " " -> "▁": Llama 2, SentencePiece); 'first' the first,
    unless it starts with a space (Metaspace, prepend_scheme=first: the Hub's Mistral files; " hi" gets one "▁");
    'always' all not starting with one; 'never' none (Replace alone). split: Metaspace merges each "▁"-word alone."""
    norm, pre = d.get("normalizer"), d.get("pre_tokenizer")
    steps = norm.get("normalizers", []) if norm and norm.get("type") == "Sequence" else [norm] if norm else []
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    if pre is None and steps in ([{"type": "Prepend", "prepend": SPACE}, replace], [replace]):
        return "each" if len(steps) == 2 else "never", False
    if not steps and (pre or {}).get("type") == "Metaspace" and pre.get("replacement") == SPACE:
        scheme = pre.get("prepend_scheme") or ("always" if pre.get("add_prefix_space", True) else "never")
        return scheme, pre.get("split", True)
    raise ValueError(f"{path}: unsupported text model for SentencePiece-style BPE: normalizer {str(norm)[:120]}, "
                     f"pre_tokenizer {str(pre)[:120]}; supported: Prepend + Replace, Replace, Metaspace")


def _decoder_strips(decoder):
    """How many leading spaces the decoder drops (Strip(' ', start=1) in Mistral's file: the "▁" put in front)."""
    for s in (decoder or {}).get("decoders", [decoder or {}]):
        if s.get("type") == "Strip" and s.get("content") == " ":
            return s.get("start", 0)
        if s.get("type") == "Metaspace":
            return int(s.get("prepend_scheme", "always" if s.get("add_prefix_space", True) else "never") != "never")
    return 0


class SentencePieceBPE:
    """One such tokenizer.json: encode (text between special tokens) and decode, each exact to HF `tokenizers`:
    - symbols: one per character, its vocab id, else its bytes' "<0xHH>" ids, else <unk> (one per run with fuse_unk,
      none if there is no <unk>); then merge, repeatedly, the adjacent pair listed first in `merges` (ties: leftmost).
    - speed: words, cut before each "▁" after another character, are merged alone, with a cache: the same ids when
      no vocab string has a non-"▁" character before a "▁" (Mistral, Llama 2; checked at load, else no cut)."""

    def __init__(self, path, d):
        model = d["model"]
        if any(model.get(k) for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "ignore_merges")):
            raise ValueError(f"{path}: BPE dropout, continuing_subword_prefix, end_of_word_suffix and "
                             "ignore_merges are not supported for SentencePiece-style BPE")
        self.prefix, split = _text_model(path, d)
        vocab, self.specials = model["vocab"], {t["content"]: t["id"] for t in d.get("added_tokens", [])}
        self.n_vocab = n = max(*vocab.values(), *self.specials.values()) + 1
        if len(set(vocab.values())) != len(vocab) or n > 2**20:
            raise ValueError(f"{path}: two vocab strings share an id, or more than 2**20 ids")
        self._vocab, self._cache = vocab, {}  # word -> ids
        # pair (a, b) as a * n + b -> rank << 20 | id of a+b, ordered by rank; a repeated pair keeps its last rank (HF)
        self._merges = {}
        for rank, m in enumerate(model.get("merges", [])):
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            if a not in vocab or b not in vocab or a + b not in vocab:
                raise ValueError(f"{path}: merge #{rank} ({a!r} + {b!r}): a string not in the vocab")
            self._merges[vocab[a] * n + vocab[b]] = rank << 20 | vocab[a + b]
        self._byte_ids = [vocab.get(f"<0x{b:02X}>") if model.get("byte_fallback") else None for b in range(256)]
        self._unk, self._fuse_unk = vocab.get(model.get("unk_token") or ""), model.get("fuse_unk", False)
        tokens = [*vocab.items(), *self.specials.items()]
        self._text = {i: s.replace(SPACE, " ") for s, i in tokens}  # for decode: id -> text, or byte
        self._byte_of = {i: int(s[3:5], 16) for s, i in tokens if re.fullmatch("<0x[0-9A-Fa-f]{2}>", s)}
        self._strip = _decoder_strips(d.get("decoder"))
        cuttable = SPACE in vocab and not any(x != SPACE and y == SPACE for s in vocab for x, y in zip(s, s[1:]))
        words = f"{SPACE}[^{SPACE}]*|[^{SPACE}]+" if split else f"{SPACE}*[^{SPACE}]+|{SPACE}+"
        self._words = re.compile(words if split or cuttable else "(?s).+")

    def encode(self, text, at_start):
        """Ids of text between special tokens (Tokenizer.encode has replaced lone surrogates); at_start: it begins the
        input (for 'first'); None: it continues a sequence (an answer), so no "▁" in front, whatever the file says."""
        text = text.replace(" ", SPACE)
        if text and at_start is not None and (self.prefix == "each" or not text.startswith(SPACE) and (
                self.prefix == "always" or self.prefix == "first" and at_start)):
            text = SPACE + text
        ids, cache = [], self._cache
        for word in self._words.findall(text):  # merged when new (or the rare []), cached if of up to 64 characters
            ids += cache.get(word) or (cache if len(word) <= 64 else {}).setdefault(word, self._bpe(word))
        if len(cache) > 200_000:  # bound the memory: start afresh
            cache.clear()
        return ids

    def _bpe(self, word):
        """One word's ids (class docstring). The merging: a heap holds (merge, position) for each pair as it forms,
        skipped when popped if the pair has changed since; nxt/prv link the symbols still alive (-1: merged away)."""
        ids, vocab, byte_ids = [], self._vocab, self._byte_ids
        for ch in word:
            symbols = [vocab[ch]] if ch in vocab else [byte_ids[b] for b in ch.encode()]
            if None not in symbols:
                ids += symbols
            elif self._unk is not None and not (self._fuse_unk and ids and ids[-1] == self._unk):
                ids.append(self._unk)
        merges, n, size = self._merges, self.n_vocab, len(ids)
        nxt, prv = list(range(1, size + 1)), list(range(-1, size))  # prv[size]: a spare slot for the end
        heap = [(merges[ids[i] * n + ids[i + 1]], i) for i in range(size - 1) if ids[i] * n + ids[i + 1] in merges]
        heapq.heapify(heap)
        while heap:
            m, i = heapq.heappop(heap)
            j = nxt[i]
            if j >= size or ids[i] < 0 or merges.get(ids[i] * n + ids[j]) != m:
                continue  # stale: the pair at i changed after this entry was pushed
            ids[i], ids[j] = m & 0xFFFFF, -1
            nxt[i] = k = nxt[j]
            prv[k] = i
            for a, b in ((prv[i], i), (i, k)):  # the two pairs the merged symbol now forms
                if a >= 0 and b < size and (m := merges.get(ids[a] * n + ids[b])) is not None:
                    heapq.heappush(heap, (m, a))
        return [i for i in ids if i >= 0]

    def decode(self, ids, errors="replace"):  # errors: tiktoken's signature; HF's rules apply
        """Ids -> text: "▁" back to spaces, runs of byte tokens to UTF-8, the decoder's Strip ("▁hi" -> "hi")."""
        parts = []
        for is_byte, run in itertools.groupby(ids, key=self._byte_of.__contains__):
            if is_byte:  # HF's ByteFallback: the run's text if valid UTF-8 (it round-trips), else one U+FFFD per byte
                raw = bytes(self._byte_of[i] for i in run)
                text = raw.decode("utf-8", "replace")
                parts.append(text if text.encode() == raw else "\ufffd" * len(raw))
            else:
                parts += (self._text.get(i, "") for i in run)  # an id with no string: nothing
        text = "".join(parts)
        return text[min(self._strip, len(text) - len(text.lstrip(" "))):]
