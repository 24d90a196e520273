"""SentencePiece-style BPE, exact to Hugging Face `tokenizers`: the tokenizer.json of Mistral 7B v0.1-v0.3
(and Llama 2), which tiktoken cannot run: BPE over characters, each space written "▁" (SPACE), a character
missing from the vocabulary falling back to one "<0xHH>" token per UTF-8 byte, merges ranked per pair in
`merges` order, no regex split. tokenizer.py uses `SentencePieceBPE` in place of a tiktoken.Encoding.
Left out: Unigram models, BPE dropout, other normalizers.
"""
import heapq
import itertools
import json
import re


SPACE = "\u2581"  # SentencePiece's visible space


def _text_model(path, d):
    """How the file turns text into what BPE sees: (prefix, split). prefix: which pieces of text (between
    special tokens) get a "▁" in front: 'each' every one (normalizer Prepend "▁" + Replace " " -> "▁": Llama 2's
    file, SentencePiece itself); 'first' the first only, unless it starts with a space (Metaspace with
    prepend_scheme=first: the Mistral files on the Hub now, so " hi" gets one "▁", not two); 'always' every
    one not starting with a space; 'never' none (Replace alone). split: Metaspace merges each "▁"-word alone."""
    norm, pre = d.get("normalizer"), d.get("pre_tokenizer")
    steps = norm.get("normalizers", []) if norm and norm.get("type") == "Sequence" else [norm] if norm else []
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    if pre is None and steps == [{"type": "Prepend", "prepend": SPACE}, replace]:
        return "each", False
    if pre is None and steps == [replace]:
        return "never", False
    if not steps and (pre or {}).get("type") == "Metaspace" and pre.get("replacement") == SPACE:
        scheme = pre.get("prepend_scheme") or ("always" if pre.get("add_prefix_space", True) else "never")
        return scheme, pre.get("split", True)
    raise ValueError(f"{path}: unsupported text model for SentencePiece-style BPE: normalizer {str(norm)[:120]}, "
                     f"pre_tokenizer {str(pre)[:120]}; supported: Prepend + Replace, Replace, Metaspace")


def _decoder_strips(decoder):
    """How many leading spaces the decoder drops (Strip(' ', start=1) in Mistral's file: the "▁" put in front)."""
    steps = (decoder or {}).get("decoders", [decoder]) if decoder else []
    for s in steps:
        if s.get("type") == "Strip" and s.get("content") == " ":
            return s.get("start", 0)
        if s.get("type") == "Metaspace":
            return int(s.get("prepend_scheme", "always" if s.get("add_prefix_space", True) else "never") != "never")
    return 0


class SentencePieceBPE:
    """One such tokenizer.json, with the methods Tokenizer uses on a tiktoken.Encoding (encode_ordinary,
    encode with the special tokens parsed, decode), each exact to HF `tokenizers`:
    - symbols: one per character, its vocab id, else its bytes' "<0xHH>" ids, else <unk>; then merge,
      repeatedly, the adjacent pair listed first in `merges` (ties: leftmost).
    - speed: the text is cut before each "▁" that follows another character and each word merged on its
      own, with a cache. No id changes when no merge result has a character other than "▁" right before
      a "▁" (true for Mistral and Llama 2; checked at load, else no cut): no merge can join across a cut."""

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
        self._vocab, self._n, self._cache = vocab, n, {}
        # pair (a, b) as a * n + b -> rank << 20 | id of a+b: one int, and comparing two compares ranks;
        # a pair listed twice keeps its last rank, as in HF
        self._merges, results = {}, set()
        merges = [m for m in model.get("merges", []) if not (isinstance(m, str) and m.startswith("#version"))]
        for rank, m in enumerate(merges):
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            if a not in vocab or b not in vocab or a + b not in vocab:
                raise ValueError(f"{path}: merge #{rank} ({a!r} + {b!r}): a string not in the vocab")
            self._merges[vocab[a] * n + vocab[b]] = rank << 20 | vocab[a + b]
            results.add(a + b)
        self._byte_ids = [vocab.get(f"<0x{b:02X}>") if model.get("byte_fallback") else None for b in range(256)]
        self._unk, self._fuse_unk = vocab.get(model.get("unk_token") or ""), model.get("fuse_unk", False)
        self._text, tokens = [""] * n, [*vocab.items(), *self.specials.items()]  # for decode: id -> text, or byte
        for s, i in tokens:
            self._text[i] = s.replace(SPACE, " ")
        self._byte_of = {i: int(s[3:5], 16) for s, i in tokens if re.fullmatch("<0x[0-9A-Fa-f]{2}>", s)}
        self._strip = _decoder_strips(d.get("decoder"))
        cuttable = SPACE in vocab and not any(x != SPACE and y == SPACE for r in results for x, y in zip(r, r[1:]))
        words = f"{SPACE}[^{SPACE}]*|[^{SPACE}]+" if split else f"{SPACE}*[^{SPACE}]+|{SPACE}+"
        self._words = re.compile(words if split or cuttable else "(?s).+")
        names = sorted(self.specials, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def encode_ordinary(self, text):
        return self._piece(text, at_start=True)

    def encode(self, text, allowed_special="all"):  # always "all": Tokenizer.encode asks for nothing else
        parts = self._special_re.split(text) if self._special_re else [text]
        ids = []
        for k, part in enumerate(parts):  # re.split puts the special tokens at odd positions
            ids += [self.specials[part]] if k % 2 else self._piece(part, at_start=k == 0)
        return ids

    def encode_continuation(self, text):
        """Text continuing a sequence (after a control token; an answer): no "▁" in front, whatever the file says."""
        return self._piece(text, at_start=None)

    def _piece(self, text, at_start):
        """Ids of text between special tokens; at_start: it begins the input (for 'first'); None: no "▁" in front."""
        text = _valid_utf8(text).replace(" ", SPACE)
        if text and at_start is not None and (self.prefix == "each" or not text.startswith(SPACE) and (
                self.prefix == "always" or self.prefix == "first" and at_start)):
            text = SPACE + text
        ids, cache = [], self._cache
        for word in self._words.findall(text):
            got = cache.get(word)
            if got is None:
                got = self._bpe(self._symbols(word))
                if len(word) <= 64:
                    cache[word] = got
            ids += got
        if len(cache) > 200_000:
            cache.clear()
        return ids

    def _symbols(self, word):
        """One id per character: its own, else its bytes' "<0xHH>" ids, else <unk> (fused: a run of
        unknown characters is one <unk> when fuse_unk), else nothing (HF drops it)."""
        out, vocab, byte_ids = [], self._vocab, self._byte_ids
        for ch in word:
            ids = [vocab[ch]] if ch in vocab else [byte_ids[b] for b in ch.encode()]
            if None not in ids:
                out += ids
            elif self._unk is not None and not (self._fuse_unk and out and out[-1] == self._unk):
                out.append(self._unk)
        return out

    def _bpe(self, ids):
        """Merge the lowest-ranked adjacent pair (leftmost on ties) until none has a merge. A heap holds (merge,
        position) for each pair as it forms, skipped when popped if the pair has changed since; nxt/prv link the
        symbols still alive (-1 marks a merged-away one)."""
        merges, n, size = self._merges, self._n, len(ids)
        nxt, prv = list(range(1, size + 1)), list(range(-1, size - 1))
        heap = [(merges[ids[i] * n + ids[i + 1]], i) for i in range(size - 1) if ids[i] * n + ids[i + 1] in merges]
        heapq.heapify(heap)
        while heap:
            m, i = heapq.heappop(heap)
            j = nxt[i]
            if j >= size or ids[i] < 0 or merges.get(ids[i] * n + ids[j]) != m:
                continue  # stale: the pair at i changed after this entry was pushed
            ids[i], ids[j] = m & 0xFFFFF, -1
            nxt[i] = k = nxt[j]
            if k < size:
                prv[k] = i
            for a, b in ((prv[i], i), (i, k)):  # the two pairs the merged symbol now forms
                if a >= 0 and b < size and (m := merges.get(ids[a] * n + ids[b])) is not None:
                    heapq.heappush(heap, (m, a))
        return [i for i in ids if i >= 0]

    def decode(self, ids, errors="replace"):  # errors: tiktoken's signature; HF's rules apply
        """Ids -> text: "▁" back to spaces, runs of byte tokens to UTF-8, the decoder's Strip ("▁hi" -> "hi")."""
        parts = []
        for is_byte, run in itertools.groupby(ids, key=self._byte_of.__contains__):
            if is_byte:  # HF's ByteFallback: the run's text if it is valid UTF-8, else one U+FFFD per byte
                raw = bytes(self._byte_of[i] for i in run)
                try:
                    parts.append(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    parts.append("\ufffd" * len(raw))
            else:
                parts += (self._text[i] for i in run)
        text = "".join(parts)
        return text[min(self._strip, len(text) - len(text.lstrip(" "))):]


def _valid_utf8(text):
    """A lone surrogate cannot be encoded: replace it with U+FFFD, as tiktoken does."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def is_sentencepiece_style(d):
    """A BPE tokenizer.json without GPT-2's byte-level alphabet: the text is written with "▁"."""
    pre, model = d.get("pre_tokenizer") or {}, d.get("model") or {}
    return model.get("type") == "BPE" and (model.get("byte_fallback") or pre.get("type") == "Metaspace"
                                            or SPACE in json.dumps(d.get("normalizer"), ensure_ascii=False))
