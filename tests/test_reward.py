"""reward.py: the six aggregations and their token weights, stabilisers, batch masks, scoring, data, matching."""
import json
import math
import types

import pytest
import torch
from conftest import tiny_model

import reward
import sample
from data import extract_answer, is_correct, load_qa, normalize_answer
from reward import (AGGREGATIONS, aggregate, answer_logc, build_batch, clip_to_baseline,
                    group_normalise, score_answers, token_weights)


# ---- the aggregations on a hand-computed example with padding ----

def padded_example():
    """Two rows, T_max = 3; row 1 has only 2 answer tokens. Padding holds junk that must be ignored."""
    c = torch.tensor([[0.5, 0.25, 0.8], [0.1, 0.4, 0.0]])
    c_empty = torch.tensor([[0.25, 0.5, 1.0], [0.2, 0.8, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    logc = torch.where(mask, c.clamp(min=1e-30).log(), torch.tensor(-7.0))
    logc_empty = torch.where(mask, c_empty.clamp(min=1e-30).log(), torch.tensor(-3.0))
    return logc, mask, logc_empty


# Worked by hand from the c and c^∅ above (row 0: T = 3, row 1: T = 2).
EXPECTED = {
    "logp": [math.log(0.5 * 0.25 * 0.8), math.log(0.1 * 0.4)],      # log 0.1, log 0.04
    "prob": [0.1, 0.04],
    "gm": [0.1 ** (1 / 3), 0.2],                                      # 0.4642, sqrt(0.04)
    "am": [1.55 / 3, 0.25],                                           # (0.5+0.25+0.8)/3, (0.1+0.4)/2
    "ws_inv": [1.1, 0.5],                                             # (4·0.5 + 2·0.25 + 1·0.8)/3, (5·0.1 + 1.25·0.4)/2
    "ws_nlog": [(math.log(4) * 0.5 + math.log(2) * 0.25 + 0.0) / 3,   # w = −log c^∅
                (math.log(5) * 0.1 - math.log(0.8) * 0.4) / 2],
}


@pytest.mark.parametrize("name", AGGREGATIONS)
def test_aggregation_matches_hand_computed_values_with_padding(name):
    logc, mask, logc_empty = padded_example()
    R = aggregate(name, logc, mask, logc_empty)
    assert R.shape == (2,)
    torch.testing.assert_close(R, torch.tensor(EXPECTED[name]), rtol=1e-5, atol=1e-6)


def test_unknown_aggregation_is_an_error():
    logc, mask, logc_empty = padded_example()
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate("mean", logc, mask, logc_empty)
    with pytest.raises(ValueError, match="unknown aggregation"):
        token_weights("mean", logc, mask, logc_empty)


def f_of_c(name, c, mask, c_empty):
    """Each f written directly as a function of the probabilities c (the NRT.md table), padding excluded."""
    m = mask.to(c.dtype)
    T = m.sum(-1)
    c1 = torch.where(mask, c, torch.ones_like(c))  # padding → c = 1 (log 1 = 0, neutral in a product)
    if name == "logp":
        return (c1.log() * m).sum(-1)
    if name == "prob":
        return c1.prod(-1)
    if name == "gm":
        return c1.prod(-1) ** (1 / T)
    if name == "am":
        return (c * m).sum(-1) / T
    if name == "ws_inv":
        return (c / c_empty * m).sum(-1) / T
    if name == "ws_nlog":
        return (-c_empty.log() * c * m).sum(-1) / T
    raise AssertionError(name)


@pytest.mark.parametrize("name", AGGREGATIONS)
def test_token_weights_equal_autograd_df_dc_times_c(name):
    torch.manual_seed(0)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False], [True, False, False, False, False]])
    logc = (torch.rand(3, 5, dtype=torch.float64) * -3 - 0.05)
    logc_empty = (torch.rand(3, 5, dtype=torch.float64) * -3 - 0.05)
    c = logc.exp().requires_grad_(True)
    f = f_of_c(name, c, mask, logc_empty.exp())
    (grad,) = torch.autograd.grad(f.sum(), c)
    expected = (grad * c).detach() * mask
    got = token_weights(name, logc, mask, logc_empty)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
    assert (got[~mask] == 0).all()
    # the independent f agrees with aggregate too, so the weights are those of the reward actually used
    torch.testing.assert_close(aggregate(name, logc, mask, logc_empty), f.detach(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", AGGREGATIONS)
def test_token_weights_carry_no_gradient(name):
    logc, mask, logc_empty = padded_example()
    logc = logc.clone().requires_grad_(True)
    assert not token_weights(name, logc, mask, logc_empty).requires_grad


# ---- numerical stability in log space ----

def test_prob_and_gm_over_many_tiny_tokens_are_finite():
    T = 5000
    logc = torch.full((2, T), -20.0)  # Π c = e^-100000: underflows, must give 0, not NaN
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, 10:] = False
    prob = aggregate("prob", logc, mask)
    assert torch.isfinite(prob).all()
    assert prob[0] == 0.0
    torch.testing.assert_close(prob[1], torch.tensor(math.exp(-200.0)))  # fp32 underflow to 0 is fine too
    torch.testing.assert_close(aggregate("gm", logc, mask), torch.full((2,), math.exp(-20.0)))
    torch.testing.assert_close(aggregate("logp", logc, mask), torch.tensor([-20.0 * T, -200.0]))
    w = token_weights("prob", logc, mask)
    assert torch.isfinite(w).all() and w[0].abs().max() == 0


@pytest.mark.parametrize("log_c_empty", [-100.0, -200.0])
def test_ws_inv_with_tiny_empty_trace_probability_is_finite(log_c_empty):
    """c^∅ tiny (1/c^∅ overflows fp32) but c/c^∅ moderate: w_i c_i = exp(log c_i − log c_i^∅) is finite.

    Computed as exp(−log c^∅) · exp(log c) it is inf·tiny = inf, or inf·0 = NaN."""
    logc_empty = torch.full((1, 2), log_c_empty)
    logc = logc_empty + torch.tensor([[0.0, 5.0]])  # c/c^∅ = 1 and e^5
    mask = torch.ones(1, 2, dtype=torch.bool)
    R = aggregate("ws_inv", logc, mask, logc_empty)
    w = token_weights("ws_inv", logc, mask, logc_empty)
    assert torch.isfinite(R).all() and torch.isfinite(w).all()
    torch.testing.assert_close(R, torch.tensor([(1 + math.exp(5.0)) / 2]))
    torch.testing.assert_close(w, torch.tensor([[0.5, math.exp(5.0) / 2]]))


def test_ws_nlog_with_tiny_empty_trace_probability_is_finite():
    logc_empty = torch.full((1, 2), -200.0)
    logc = torch.tensor([[-1.0, -300.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    R = aggregate("ws_nlog", logc, mask, logc_empty)
    torch.testing.assert_close(R, torch.tensor([200.0 * math.exp(-1.0) / 2]))


# ---- baseline clip and group normalisation ----

def test_clip_to_baseline():
    R = torch.tensor([0.5, 1.5, -1.0, 1.0])
    torch.testing.assert_close(clip_to_baseline(R, torch.tensor(1.0)), torch.tensor([0.0, 0.5, 0.0, 0.0]))
    torch.testing.assert_close(clip_to_baseline(R, torch.tensor([-2.0])), torch.tensor([2.5, 3.5, 1.0, 3.0]))


def test_group_normalise_known_values_equal_group_and_independence():
    R = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0, 10.0, 0.0, 10.0, 0.0])
    A, zero_std = group_normalise(R, 4)
    std1 = math.sqrt(1.25)  # population std of 1, 2, 3, 4
    expected = [(x - 2.5) / (std1 + 1e-6) for x in (1, 2, 3, 4)] + [0.0] * 4 + [5 / (5 + 1e-6), -5 / (5 + 1e-6)] * 2
    torch.testing.assert_close(A, torch.tensor(expected))
    assert zero_std.tolist() == [False, True, False]
    # a group's advantages do not depend on the other groups
    A_alone, _ = group_normalise(R[8:], 4)
    torch.testing.assert_close(A[8:], A_alone)
    A_shift, _ = group_normalise(torch.cat([R[:4] + 100.0, R[4:]]), 4)
    torch.testing.assert_close(A_shift[4:], A[4:])


def test_group_normalise_all_zero_and_nearly_equal_groups_get_zero_advantage():
    A, zero_std = group_normalise(torch.zeros(6), 3)
    assert A.tolist() == [0.0] * 6 and zero_std.tolist() == [True, True]
    # rounding noise (std far below 1e-8) is not a signal: exactly 0, not ±(noise / (noise + eps))
    x = torch.tensor(0.01)
    R = torch.stack([x, torch.nextafter(x, torch.tensor(1.0)), x, torch.tensor(0.5), torch.tensor(0.7), x])
    A, zero_std = group_normalise(R, 3)
    assert zero_std.tolist() == [True, False]
    assert A[:3].tolist() == [0.0, 0.0, 0.0] and (A[3:].abs() > 0.3).all()


# ---- batch construction: roles, padding, emitted vs appended delimiter ----

def test_build_batch_roles_padding_and_delimiter():
    delimiter_ids = [7, 8]
    rows = [([10, 11], [20, 21, 7, 8], True, [30, 1]),   # emitted: the delimiter is part of the trace
            ([10], [20], False, [30, 31, 1]),            # truncated: the delimiter is appended
            ([10, 11, 12], [], False, [30, 1])]          # empty trace
    b = build_batch(rows, delimiter_ids)
    assert b.tokens.tolist() == [[10, 11, 20, 21, 7, 8, 30, 1],
                                 [10, 20, 7, 8, 30, 31, 1, 0],
                                 [10, 11, 12, 7, 8, 30, 1, 0]]
    as_int = lambda m: m.int().tolist()  # noqa: E731
    assert as_int(b.trace_mask) == [[0, 0, 1, 1, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0], [0] * 8]
    assert as_int(b.format_mask) == [[0] * 8, [0, 0, 1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0, 0]]
    assert as_int(b.answer_mask) == [[0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1, 1, 0]]
    for m in (b.trace_mask, b.format_mask, b.answer_mask):
        assert m.dtype == torch.bool
    assert not (b.trace_mask & b.format_mask).any() and not (b.format_mask & b.answer_mask).any()


def test_answer_logc_left_aligns_rows_of_different_answer_lengths():
    rows = [([10, 11], [20, 21], False, [30, 1]), ([10], [20], False, [30, 31, 32, 1])]
    b = build_batch(rows, [7])
    logprobs = -torch.arange(1, 1 + b.tokens.numel(), dtype=torch.float32).view(b.tokens.shape) / 10
    logprobs.requires_grad_(True)
    logc, mask = answer_logc(logprobs, b.answer_mask)
    # row 0: [10 11 20 21 7 30 1] answer at 5, 6; row 1: [10 20 7 30 31 32 1] answer at 3..6
    L = b.tokens.shape[1]
    lp = logprobs.detach()
    expected = torch.tensor([[lp[0, 5], lp[0, 6], 0, 0], [lp[1, 3], lp[1, 4], lp[1, 5], lp[1, 6]]])
    assert L == 7 and logc.shape == (2, 4)
    torch.testing.assert_close(logc.detach(), expected)
    assert mask.tolist() == [[True, True, False, False], [True] * 4]
    logc.sum().backward()  # the gather is differentiable: gradient 1 exactly at the answer positions
    assert torch.equal(logprobs.grad, b.answer_mask.float())


# ---- score_answers against a direct per-row full-softmax computation ----

def direct_logprobs(model, seq):
    """log π(seq[t] | seq[:t]) for t ≥ 1 from the full forward and log_softmax (index t-1 → token t)."""
    with torch.no_grad():
        lsm = model(torch.tensor([seq]))[0].float().log_softmax(-1)
    return [lsm[t - 1, seq[t]].item() for t in range(1, len(seq))]


@pytest.mark.parametrize("trace_too", [False, True])
def test_score_answers_equals_direct_per_row_computation(trace_too):
    model = tiny_model(seed=1)
    prompt, delimiter_ids, answer = [5, 6, 7], [9], [20, 21, 1]
    traces = [[10, 11, 12], [13], [14, 15, 9], []]
    emitted = [False, False, True, False]
    rows = [(prompt, z, e, answer) for z, e in zip(traces, emitted)] + [(prompt, [], False, answer)]
    with torch.no_grad():
        batch, logprobs, logc, mask = score_answers(model, rows, delimiter_ids, trace_too=trace_too)
    assert logc.shape == (5, 3) and mask.all()
    for k, (z, e) in enumerate(zip(traces, emitted)):
        seq = prompt + z + ([] if e else delimiter_ids) + answer
        lp = direct_logprobs(model, seq)
        ans = [lp[t - 1] for t in range(len(seq) - len(answer), len(seq))]
        torch.testing.assert_close(logc[k], torch.tensor(ans), atol=1e-5, rtol=1e-5)
        trace_pos = list(range(len(prompt), len(prompt) + len(z)))
        expected = torch.tensor([lp[t - 1] for t in trace_pos]) if trace_too else torch.zeros(len(z))
        torch.testing.assert_close(logprobs[k, trace_pos], expected, atol=1e-5, rtol=1e-5)
        assert (logprobs[k, :len(prompt)] == 0).all()  # the prompt is never scored
        d = slice(len(prompt) + len(z), len(prompt) + len(z) + (0 if e else len(delimiter_ids)))
        assert torch.equal(batch.format_mask[k, d], torch.ones(d.stop - d.start, dtype=torch.bool))
        assert trace_too or (logprobs[k, d] == 0).all()
    # the empty-trace row equals trace 3 (an empty, non-emitted trace) exactly
    torch.testing.assert_close(logc[3], logc[4], atol=1e-6, rtol=1e-6)


# ---- data loading ----

def write(tmp_path, text, name="qa.jsonl"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_load_qa_reads_rows_and_skips_blank_lines(tmp_path):
    path = write(tmp_path, '{"question": "2+2?", "answer": "4"}\n\n'
                           '{"question": "Capital of France?", "answer": "Paris", "aliases": ["paris, france"]}\n')
    rows = load_qa(path)
    assert [r["answer"] for r in rows] == ["4", "Paris"]
    assert rows[1]["aliases"] == ["paris, france"]


@pytest.mark.parametrize("text, line, message", [
    ('{"question": "q", "answer": "a"}\n{"question": "q", "answer": \n', 2, "not valid JSON"),
    ('{"question": "q", "answer": "a"}\n\n{"question": "q"}\n', 3, "answer"),
    ('{"question": "q", "answer": "   "}\n', 1, "answer"),
    ('{"question": "q", "answer": 4}\n', 1, "answer"),
    ('["q", "a"]\n', 1, "expected an object"),
    ('{"question": "q", "answer": "a", "aliases": "b"}\n', 1, "aliases"),
    ('{"question": "q", "answer": "a", "aliases": ["b", 3]}\n', 1, "aliases"),
])
def test_load_qa_errors_name_file_and_line(tmp_path, text, line, message):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=message) as e:
        load_qa(path)
    assert f"{path}:{line}:" in str(e.value)


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_load_qa_empty_file_is_an_error(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match="no question/answer rows") as e:
        load_qa(path)
    assert path in str(e.value)


# ---- answer matching ----

@pytest.mark.parametrize("a, b", [
    ("1,000", "1000"), ("1,000,000", "1000000"), ("3.0", "3"), ("3.50", "3.5"), ("-7", "-7"), ("-7.0", "-7"),
    ("Paris", "paris"), ("The Eiffel Tower", "eiffel tower"), ("an apple", "Apple"), ("Paris!", "paris"),
    ("42.", "42"), ("  New   York ", "new york"), ("$1,000", "1000"), ("well-known", "Well-Known"),
])
def test_normalize_answer_equal(a, b):
    assert normalize_answer(a) == normalize_answer(b)


@pytest.mark.parametrize("a, b", [
    ("-7", "7"), ("3.5", "35"), ("1,5", "15"), ("12", "1 2"), ("there", "here"), ("theatre", "atre"),
    ("0.5", "5"), ("1000", "100"),
])
def test_normalize_answer_different(a, b):
    assert normalize_answer(a) != normalize_answer(b)


def test_normalize_answer_leading_decimal_point_is_kept():
    """'.5' means 0.5: stripping the dot as punctuation would make it equal to 5."""
    assert normalize_answer(".5") != normalize_answer("5")
    assert not is_correct(".5", {"answer": "5"})


def test_normalize_answer_canonical_forms():
    assert normalize_answer("The answer is 1,000.") == "answer is 1000"
    assert normalize_answer("-3.0") == "-3"
    assert normalize_answer("A") == ""  # only an article


def test_extract_answer_first_non_empty_line():
    assert extract_answer("\n\n  42  \nbecause 6*7") == "42"
    assert extract_answer("Paris") == "Paris"
    assert extract_answer("   \n\t\n") == ""


def test_is_correct_answer_and_aliases():
    row = {"question": "q", "answer": "New York City", "aliases": ["NYC", "New York"]}
    assert is_correct("new york city.", row)
    assert is_correct("nyc", row)
    assert is_correct("The New York", row)
    assert not is_correct("York", row)
    assert is_correct("1,000", {"answer": "1000"}) and is_correct("3.0", {"answer": "3"})
    assert is_correct("-12", {"answer": "-12"}) and not is_correct("12", {"answer": "-12"})
    assert not is_correct("", {"answer": "0"})


def test_load_qa_rows_work_with_is_correct(tmp_path):
    path = write(tmp_path, json.dumps({"question": "q", "answer": "4", "aliases": ["four"]}) + "\n")
    (row,) = load_qa(path)
    assert is_correct("Four", row) and is_correct("4.0", row) and not is_correct("5", row)


def test_a_trace_writing_the_delimiter_mid_line_counts_as_emitted(monkeypatch):
    """"… so 7. Answer:" has written "\nAnswer:" but for the newline: it stops there and is emitted."""
    seen = {}

    def scripted_generate(model, prompts, **kw):
        seen["stops"], ids = kw["stop_strings"], list(b"so it is 7. Answer:")
        seen["stopped"] = sample.matches_stop_string(ids, kw["stop_strings"], lambda t: bytes(t).decode())
        return sample.Generation([ids], [[-1.0] * len(ids)], ["stop_string"])

    monkeypatch.setattr(reward, "generate", scripted_generate)
    tok = types.SimpleNamespace(stop_ids={0}, decode=lambda t: bytes(t).decode())
    traces, emitted, _ = reward.sample_traces(None, tok, [[1]], "\nAnswer:", 48)
    assert seen["stops"] == ["\nAnswer:", "Answer:"] and seen["stopped"] and emitted == [True]
    assert bytes(traces[0]).endswith(b"Answer:")  # the trace keeps the delimiter it wrote
    reward.sample_traces(None, tok, [[1]], "<|response_start|>", 48)
    assert seen["stops"] == ["<|response_start|>"]
