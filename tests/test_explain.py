"""explain.py: one step in slow motion prints reward.py's numbers, is deterministic, and saves nothing."""
import re

import torch
from test_train import tiny_setup  # noqa: F401 - the tiny model directory and data, as a fixture

import explain
from reward import AGGREGATIONS, aggregate, group_normalise


def run(capsys, setup):
    _, model_dir, data = setup
    out = explain.main([f"--model_dir={model_dir}", f"--data={data}", "--max_think_tokens=4", "--device=cpu",
                        "--lr=1e-2", "--baseline_clip=False"])
    return out, capsys.readouterr().out


def printed(text, name):
    """The numbers on each 'R_k <name>' line, in order (before the update, then after)."""
    return [[float(x) for x in line.split()[3 if "*" in line else 2:]]
            for line in text.splitlines() if re.match(rf"\s+R_k {name}\b", line)]


def test_printed_rewards_equal_reward_py_on_the_same_numbers(capsys, tiny_setup):  # noqa: F811
    out, text = run(capsys, tiny_setup)
    for when, logc, logc_empty in (("before", out["logc"], out["logc_empty"]), ("after", out["logc_after"], None)):
        K = logc.shape[0]
        for name in AGGREGATIONS:
            expected = out["R" if when == "before" else "R_after"][name]
            row = printed(text, name)[0 if when == "before" else 1]
            assert row == [round(x, 4) for x in expected.tolist()] or torch.allclose(
                torch.tensor(row), expected, atol=6e-5), (name, when)
            if logc_empty is not None:  # recomputed from the very c's the table shows
                mask = torch.ones_like(logc, dtype=torch.bool)
                torch.testing.assert_close(expected, aggregate(name, logc, mask, logc_empty.expand(K, -1)))
    R = out["R"]["ws_nlog"]  # the default aggregation; no baseline clip in this run
    A, _ = group_normalise(R, R.numel())
    torch.testing.assert_close(out["A"], A, atol=1e-5, rtol=1e-5)
    for heading in ("== 1.", "== 2.", "== 3.", "== 4.", "== 5.", "== 6.", "policy", "format", "answer_nll"):
        assert heading in text


def test_deterministic_and_the_checkpoint_is_untouched(capsys, tiny_setup):  # noqa: F811
    weights = (tiny_setup[1] / "model.safetensors").read_bytes()
    _, first = run(capsys, tiny_setup)
    _, second = run(capsys, tiny_setup)
    assert first == second
    assert (tiny_setup[1] / "model.safetensors").read_bytes() == weights
