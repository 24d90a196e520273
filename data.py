"""Questions and answers: reading them, writing them as prompts, and matching a model's answer.

JSONL rows {"question", "answer", "aliases"?, "options"?} (data/ holds the bundled sets); the one prompt format
train.py and eval.py share (a model is evaluated as it was trained); exact-match answer checking.
Choices: the prompt is the chat template's user turn, the question then an instruction to think and write the
delimiter (plain text a small model writes readily, "\nAnswer:", or a special token's name); the answer follows the
delimiter and ends with the end-of-turn token (the model learns where it stops); matching ignores case, articles and
punctuation, writes numbers one way, accepts aliases; the prediction's first word decides a yes/no reference.
Left out: fuzzy matching, LLM judges, per-task answer formats.
"""
import json
import math
import os
import re
import string

INSTRUCTION = "Think briefly, then write 'Answer:' followed by the final answer only."
DELIMITER = "\nAnswer:"  # the end-of-thinking delimiter
SUITES = {"default": ["arithmetic", "object_counting"],
          "all": ["arithmetic", "object_counting", "qa_wikidata", "strategyqa"]}
ANSWER_LEAD_IN = re.compile(r"^(the\s+)?(final\s+)?answer\b(\s+is\b)?\s*:?\s*", re.IGNORECASE)


def prompt_ids(tok, question, instruction=INSTRUCTION, system=""):
    """The chat-formatted prompt: optional system message, then the question and the instruction."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": f"{question}\n{instruction}".strip()})
    return tok.encode_chat(messages)


def encode_delimiter(tok, delimiter, model_dir=""):
    """The end-of-thinking delimiter as ids: a special token when it names one, else its text encoding. One shaped
    like a special token (<|...|>, <...>) must be one: as plain text it would be trained and scored as text."""
    try:
        return [tok.special_id(delimiter)]
    except KeyError:
        if re.fullmatch(r"<[^<>\s]+>", delimiter):
            raise SystemExit(f"--delimiter={delimiter!r} looks like a special token, but the vocabulary of "
                             f"{model_dir or 'the tokenizer'} has no such token") from None
        return tok.encode(delimiter, continuation=True)


def answer_ids(tok, answer):
    """y* followed by the end-of-turn id: the model must also learn where the answer stops."""
    return tok.encode(" " + answer.strip(), continuation=True) + [tok.eos_id]


def _no_duplicate_keys(pairs):
    """json.loads would silently keep the last of two equal keys."""
    keys = [k for k, _ in pairs]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup is not None:
        raise ValueError(f"key {dup!r} appears twice")
    return dict(pairs)


def load_qa(path, with_lines=False):
    """Rows {"question", "answer", "aliases"?} of a JSONL file (with_lines: (row, "file:line")); bad lines are named."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: not a file (expected JSONL with question/answer rows)")
    rows = []
    with open(path, encoding="utf-8") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, object_pairs_hook=_no_duplicate_keys)
        except ValueError as e:  # json.JSONDecodeError too
            raise ValueError(f"{path}:{n}: not valid JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) \
                or not isinstance(row.get("answer"), str) or not row["answer"].strip():
            raise ValueError(f"{path}:{n}: expected an object with string 'question' and non-empty 'answer'")
        aliases = row.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise ValueError(f"{path}:{n}: 'aliases' must be a list of strings")
        rows.append((row, f"{path}:{n}") if with_lines else row)
    if not rows:
        raise ValueError(f"{path}: no question/answer rows")
    return rows


def resolve_paths(spec, split="test"):
    """Comma-separated JSONL files, bundled names (arithmetic, strategyqa…) or suites (default, all)."""
    paths = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        for name in SUITES.get(item, [item]):
            bundled = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", f"{name}_{split}.jsonl")
            paths.append(bundled if not os.path.exists(name) and os.path.isfile(bundled) else name)
    return paths


def load_rows(spec, split="train", with_lines=False):
    """All rows of every data set in `spec`, in order (with_lines: (row, "file:line") pairs)."""
    return [row for path in resolve_paths(spec, split) for row in load_qa(path, with_lines)]


def training_rows(tok, delimiter_ids, cfg, max_len):
    """The training rows, each checked to fit: prompt + max_think_tokens (NRT; SFT writes no trace) + delimiter +
    answer ≤ max_len. A row too long is an error naming its file:line, or skipped with skip_too_long=True."""
    try:
        pairs = load_rows(cfg.data, with_lines=True)
    except ValueError as e:
        raise SystemExit(f"--data: {e}") from None
    think = cfg.max_think_tokens if cfg.method == "nrt" else 0
    rows, too_long = [], []
    for row, where in pairs:
        n = len(prompt_ids(tok, row["question"], cfg.instruction, cfg.system)) + think + len(delimiter_ids) \
            + len(answer_ids(tok, row["answer"]))
        (too_long if n > max_len else rows).append(f"{where} ({n} tokens)" if n > max_len else row)
    named = ", ".join(too_long[:5]) + (" …" if len(too_long) > 5 else "")
    if too_long and not cfg.skip_too_long:
        raise SystemExit(f"--data: {len(too_long)} question(s) do not fit max_position_embeddings={max_len} with "
                         f"max_think_tokens={think}: {named}; shorten them or pass --skip_too_long=True")
    if too_long:
        print(f"skipped {len(too_long)} question(s) longer than max_position_embeddings={max_len}: {named}", flush=True)
    if not rows:
        raise SystemExit(f"--data={cfg.data!r}: no training questions left")
    return rows


def json_safe(x):
    """NaN / inf → None (recursively), so that every line written is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    return [json_safe(v) for v in x] if isinstance(x, (list, tuple)) else x


def normalize_answer(text: str) -> str:
    """Lower case, no articles or punctuation, single spaces, numbers in one canonical form."""
    text = text.lower().strip()
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)  # 1,000 -> 1000
    text = "".join(" " if ch in string.punctuation and ch not in "-." else ch for ch in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    words = []
    for w in text.split():
        w = re.sub(r"^\.+(?!\d)", "", w).rstrip(".")  # a sentence's full stop, not a leading decimal point
        if re.fullmatch(r"-?(\d+(\.\d+)?|\.\d+)", w):
            w = str(float(w)).removesuffix(".0") if "." in w else str(int(w))
        if w:
            words.append(w)
    return " ".join(words)


def extract_answer(text: str) -> str:
    """The first non-empty line after the delimiter, less an "Answer:" / "The answer is" a model often restates."""
    lines = (ANSWER_LEAD_IN.sub("", line.strip(), count=1).strip() for line in text.splitlines())
    return next((line for line in lines if line), "")


def is_correct(prediction: str, row: dict) -> bool:
    """Exact match after normalisation against the answer or an alias; against yes/no (true/false) references
    the prediction's first word decides: "No, because ..." answers no."""
    pred = normalize_answer(prediction)
    refs = [normalize_answer(a) for a in [row["answer"], *row.get("aliases", [])]]
    if all(r in ("yes", "no", "true", "false") for r in refs):
        pred = pred.partition(" ")[0]
    return pred in refs


def step_questions(rows, step, B, seed):
    """Questions for `step`: consecutive slices of a per-epoch shuffle, a pure function of (seed, step)."""
    import torch  # its generator gives the same order on every platform

    def order(epoch):
        return torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return [rows[order(i // len(rows))[i % len(rows)]] for i in range(step * B, (step + 1) * B)]
