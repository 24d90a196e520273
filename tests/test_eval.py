"""eval.py: answer matching, multiple-choice options, pass@k, the likelihood metric against the scoring
code, an end-to-end run of main() on a tiny random model, and bad inputs. The real default model is
used by one test only, skipped when it is not prepared."""
import itertools
import json
import math
import os

import pytest
import torch
from conftest import tiny_model

import eval as ev
from data import answer_ids, encode_delimiter, extract_answer, is_correct, prompt_ids
from reward import sample_traces, score_answers
from tokenizer import Tokenizer, _byte_decoder

SPECIALS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}


def write_tokenizer(folder):
    """A byte-level tokenizer.json: the 3 ChatML specials and the 256 bytes (ids 3..258), no merges."""
    chars = {b: c for c, b in _byte_decoder().items()}
    vocab = {chars[b]: 3 + b for b in range(256)}
    vocab.update(SPECIALS)
    d = {"model": {"type": "BPE", "vocab": vocab, "merges": []}, "normalizer": None,
         "added_tokens": [{"id": i, "content": t, "special": True} for t, i in SPECIALS.items()],
         "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump(d, f)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny"))
    tiny_model(vocab_size=259).save_pretrained(folder)
    write_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return tiny_model(vocab_size=259), Tokenizer.from_pretrained(tiny_dir)


def write_rows(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


ROWS = [{"question": "What is 2 plus 2?", "answer": "4", "aliases": ["four"]},
        {"question": "Is ice cold?", "answer": "Yes"},
        {"question": "Pick one: (A) red (B) blue", "answer": "(B)"},
        {"question": "Capital of France?", "answer": "Paris"},
        {"question": "Long one", "answer": "x" * 300}]  # longer than the tiny model's 256 positions


# ---- answer matching and options ----

@pytest.mark.parametrize("raw, row, correct", [
    (" 4", {"answer": "4"}, True),
    ("\n\n Answer: 4\nbecause 2 + 2", {"answer": "4"}, True),       # a restated delimiter is dropped
    ("The answer is 1,000.", {"answer": "1000"}, True),
    ("The final answer is: four", {"answer": "4", "aliases": ["four"]}, True),
    ("No, it was built of stone.", {"answer": "No"}, True),          # yes/no: the first word decides
    ("Yes and no", {"answer": "No"}, False),
    ("4 apples", {"answer": "4"}, False),                             # others stay exact
    ("Answers vary", {"answer": "vary"}, False),
    ("", {"answer": "0"}, False),
    (" -3.0", {"answer": "-3"}, True),
])
def test_extraction_and_normalisation(raw, row, correct):
    assert is_correct(extract_answer(raw), row) is correct


@pytest.mark.parametrize("row, options", [
    ({"question": "Is ice cold?", "answer": "No"}, ["Yes", "No"]),
    ({"question": "Is it?", "answer": "true"}, ["true", "false"]),
    ({"question": "q", "answer": "b", "options": ["a", "b", "c"]}, ["a", "b", "c"]),
    ({"question": "q", "answer": "d", "options": ["a", "b"]}, ["a", "b", "d"]),
    ({"question": "Pick: (A) red (B) blue (C) green", "answer": "(B)"}, ["(A)", "(B)", "(C)"]),
    ({"question": "Pick: (a) red (b) blue", "answer": "a"}, ["a", "b"]),
    ({"question": "Pick: (A) red (B) blue", "answer": "blue"}, ["red", "blue"]),
    ({"question": "What is 2 plus 2?", "answer": "4"}, None),
    ({"question": "Pick: (A) red (B) blue", "answer": "green"}, None),
])
def test_multiple_choice_options(row, options):
    assert ev.mc_options(row) == options


def test_pass_at_k_equals_brute_force_over_k_subsets():
    for n in range(1, 7):
        for c in range(n + 1):
            samples = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                assert ev.pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


# ---- the metrics against the scoring code ----

def test_likelihood_metric_equals_score_answers(tiny):
    model, tok = tiny
    rows = ROWS[:4]
    opt = dict(instruction="", system="", delimiter="\nAnswer:", max_think_tokens=6)
    summary, examples = ev.evaluate(model, tok, rows, **opt, max_answer_tokens=3, batch_size=4)
    prompts = [prompt_ids(tok, r["question"], "") for r in rows]
    zs, emitted, _ = sample_traces(model, tok, prompts, "\nAnswer:", 6, temperature=0)  # the same greedy traces
    delimiter_ids = encode_delimiter(tok, "\nAnswer:")
    for e, p, z, em, row in zip(examples, prompts, zs, emitted, rows):
        a = answer_ids(tok, row["answer"])
        with torch.no_grad():
            _, _, logc, _ = score_answers(model, [(p, z, em, a), (p, [], False, a)], delimiter_ids)
        assert e["logc"] == pytest.approx(logc[0].tolist(), abs=1e-5)
        assert e["logc_direct"] == pytest.approx(logc[1].tolist(), abs=1e-5)
        assert e["answer_logprob"] == pytest.approx(logc[0].sum().item(), abs=1e-4)
        assert e["trace_len"] == len(z) and e["emitted"] == em
    assert summary["answer_logprob_direct"] == pytest.approx(sum(sum(e["logc_direct"]) for e in examples) / 4)
    hard = [(x, x0) for e in examples for x, x0 in zip(e["logc"], e["logc_direct"]) if x0 < math.log(0.5)]
    assert summary["hard_token_logprob"] == pytest.approx(sum(x for x, _ in hard) / len(hard))
    mc = examples[1]  # yes/no: the pick is the option with the larger Σ log c, the reference's own included
    assert mc["option_logprobs_direct"]["Yes"] == mc["answer_logprob_direct"]
    assert mc["mc_pred_direct"] == max(mc["option_logprobs_direct"], key=mc["option_logprobs_direct"].get)
    assert summary["n_mc"] == 2 and summary["n"] == 4 and summary["skipped"] == 0


def test_batching_does_not_change_greedy_results(tiny):
    model, tok = tiny
    opt = dict(instruction="", delimiter="\nAnswer:", max_think_tokens=5, max_answer_tokens=3)
    _, one = ev.evaluate(model, tok, ROWS[:3], **opt, batch_size=1)
    _, three = ev.evaluate(model, tok, ROWS[:3], **opt, batch_size=3)
    for a, b in zip(one, three):
        assert a["trace"] == b["trace"] and a["pred"] == b["pred"] and a["pred_direct"] == b["pred_direct"]
        assert a["logc"] == pytest.approx(b["logc"], abs=1e-4)


# ---- the command line, end to end ----

def run_main(capsys, argv):
    ev.main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1]), lines


def test_end_to_end_writes_table_json_line_and_predictions(tiny_dir, tmp_path, capsys):
    data, out = write_rows(tmp_path / "mini.jsonl", ROWS), str(tmp_path / "preds.jsonl")
    line, lines = run_main(capsys, [f"--model_dir={tiny_dir}", f"--data={data}", f"--out={out}", "--instruction=",
                                    "--max_think_tokens=6", "--max_answer_tokens=3", "--batch_size=2", "--k=2", "--n_samples=3"])
    res = line["results"]["mini"]
    assert line["model_dir"] == tiny_dir and line["out"] == out
    assert res["n"] == 4 and res["skipped"] == 1 and res["n_mc"] == 2
    for key in ("accuracy", "accuracy_direct", "answer_logprob", "answer_logprob_direct", "token_logprob",
                "trace_len_mean", "frac_delimiter", "pass@2", "accuracy_sampled", "accuracy_mc", "accuracy_mc_direct"):
        assert key in res, key
    assert 0 <= res["pass@2"] <= 1 and res["trace_len_mean"] <= 6
    assert any(ln.startswith("accuracy_direct") for ln in lines)  # the table
    with open(out) as f:
        preds = [json.loads(x) for x in f]
    assert [p["index"] for p in preds] == [0, 1, 2, 3, 4] and "skipped" in preds[4] and preds[0]["n_samples"] == 3


def test_compare_gives_paired_deltas(tiny_dir, tmp_path, capsys):
    data = write_rows(tmp_path / "mini.jsonl", ROWS[:3])
    line, lines = run_main(capsys, [f"--model_dir={tiny_dir}", f"--compare={tiny_dir}", f"--data={data}", "--think=False",
                                    f"--out={tmp_path / 'p.jsonl'}", "--max_answer_tokens=2", "--instruction="])
    assert line["compare_results"]["mini"]["accuracy_direct"] == line["results"]["mini"]["accuracy_direct"]
    d = line["deltas"]["mini"]
    assert d["accuracy_direct"]["delta"] == 0 and d["accuracy_direct"]["ci95"] == [0, 0] and d["accuracy_direct"]["n"] == 3
    assert d["token_logprob_direct"] == {"delta": 0} and "accuracy" not in d
    assert any("paired 95% CI" in ln for ln in lines)


def test_paired_interval_by_hand():
    base = [dict(index=i, correct=c) for i, c in enumerate([0, 0, 1, 1])]
    other = [dict(index=i, correct=c) for i, c in enumerate([1, 0, 1, 0])][::-1]  # paired by index, not order
    d = ev.paired_delta(base, other, "correct")  # differences 1, 0, 0, −1: mean 0, sd √(2/3)
    assert d["delta"] == 0 and d["n"] == 4
    assert d["ci95"][1] == pytest.approx(1.96 * math.sqrt(2 / 3) / 2)


def test_a_crash_keeps_the_finished_chunks(tiny_dir, tmp_path, monkeypatch):
    data, out = write_rows(tmp_path / "mini.jsonl", ROWS[:4]), str(tmp_path / "preds.jsonl")
    calls = []
    real = ev.score_options

    def failing(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*args)
    monkeypatch.setattr(ev, "score_options", failing)
    with pytest.raises(RuntimeError, match="boom"):
        ev.main([f"--model_dir={tiny_dir}", f"--data={data}", f"--out={out}", "--batch_size=2", "--think=False",
                 "--max_answer_tokens=2", "--instruction="])
    with open(out) as f:
        assert [json.loads(x)["index"] for x in f] == [0, 1]


def test_an_existing_output_file_is_never_overwritten_silently(tiny_dir, tmp_path):
    data, out = write_rows(tmp_path / "mini.jsonl", ROWS[:1]), tmp_path / "preds.jsonl"
    out.write_text("precious\n")
    argv = [f"--model_dir={tiny_dir}", f"--data={data}", f"--out={out}", "--think=False", "--instruction="]
    with pytest.raises(SystemExit, match="--overwrite=True"):
        ev.main(argv)
    assert out.read_text() == "precious\n"
    ev.main(argv + ["--overwrite=True"])
    assert json.loads(out.read_text().splitlines()[0])["index"] == 0


# ---- bad input ----

@pytest.mark.parametrize("content, message", [
    (None, "not a file"),
    ('{"question": "q", "answer": "a", "answer": "b"}\n', "mini.jsonl:1: .*'answer' appears twice"),
    (b"\xff\xfe", "not UTF-8"),
    ("", "no question/answer rows"),
    ('{"question": "q", "answer": "a"}\nnot json\n', "mini.jsonl:2: not valid JSON"),
    ('{"question": "q"}\n', "non-empty 'answer'"),
])
def test_bad_data_is_a_clear_error(tiny_dir, tmp_path, content, message):
    path = tmp_path / "mini.jsonl"
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SystemExit, match=message):
        ev.main([f"--model_dir={tiny_dir}", f"--data={path}", f"--out={tmp_path / 'p.jsonl'}"])
    assert not (tmp_path / "p.jsonl").exists()  # stopped before any work


@pytest.mark.parametrize("args, message", [
    (["--model_dir=/nonexistent/model"], "cannot load a model from '/nonexistent/model'"),
    (["--compare=/nonexistent/other"], "cannot load a model from '/nonexistent/other'"),
    (["--data=no_such_set"], "no_such_set"),
    (["--data=,"], "no data set given"),
    (["--k=3", "--n_samples=2"], "n_samples"),
    (["--k=2", "--think=False"], "--think=True"),
    (["--limit=x"], "--limit: expected int"),
])
def test_bad_arguments_are_clear_errors(tiny_dir, tmp_path, args, message):
    data = write_rows(tmp_path / "mini.jsonl", ROWS[:1])
    base = [f"--model_dir={tiny_dir}", f"--data={data}", f"--out={tmp_path / 'p.jsonl'}"]
    argv = [a for a in base if a.split("=")[0] not in {x.split("=")[0] for x in args}] + args  # a flag once
    with pytest.raises(SystemExit, match=message):
        ev.main(argv)


def test_bundled_names_and_suites():
    sets = ev.data_sets("default,strategyqa", limit=3)
    assert list(sets) == ["arithmetic_test", "object_counting_test", "strategyqa_test"]
    assert all(len(rows) == 3 for rows in sets.values())
    assert len(ev.data_sets("all", 0)) == 4


# ---- the real default model (skipped when not prepared) ----

def test_default_model_prefers_the_right_answer(default_model_dir):
    """The starting point NRT needs: the reference is likelier than a wrong option, and greedy answers parse."""
    model, tok = ev.load(default_model_dir, torch.float32)
    rows = [{"question": "What is 2 plus 3?", "answer": "5", "options": ["9", "5"]},
            {"question": "What is the capital of France?", "answer": "Paris", "options": ["Berlin", "Paris"]}]
    summary, examples = ev.evaluate(model, tok, rows, ev.DEFAULTS["instruction"], "", ev.DEFAULTS["delimiter"],
                                    think=False, batch_size=2)
    assert [e["pred_direct"] for e in examples] == ["5", "Paris"] and summary["accuracy_direct"] == 1.0
    assert summary["accuracy_mc_direct"] == 1.0 and summary["n_mc"] == 2
    assert all(-10 < e["answer_logprob_direct"] < 0 for e in examples)
