"""plot.py: a full NRT log, an SFT log, two runs overlaid, bad logs, and the moving average by hand."""
import json
import math
import os
import sys

import pytest
from conftest import ROOT  # noqa: F401 - puts the project root on sys.path

pytest.importorskip("matplotlib")
import plot  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def nrt_step(step):
    d = 1 - math.exp(-step / 10)
    return {"step": step, "learning_rate": 1e-6 * min(1, step / 5), "loss": 0.5 - 0.2 * d, "grad_norm": 1 + d,
            "loss/policy": -0.1 * d, "loss/format": 0.05 * (1 - d), "loss/answer_nll": 0.6 - 0.3 * d, "loss/kl": 0.01 * d,
            "reward": 0.3 + 0.4 * d, "reward_std": 0.1, "frac_reward_zero_std": 0.5 * (1 - d),
            "completions/mean_length": 60 - 20 * d, "completions/max_length": 128, "entropy": 1.5 - 0.5 * d,
            "nrt/reward_empty": 0.3 + 0.1 * d, "nrt/answer_logprob": -1.2 + 0.8 * d,
            "nrt/hard_answer_logprob": None if step % 7 == 0 else -3 + 2 * d, "nrt/frac_delimiter": 0.5 + 0.5 * d,
            "clip_ratio/region_mean": 0.0, "time/rollout": 2.0, "time/score_empty": 0.3, "time/update": 1.1,
            "tokens_per_s": 900.0}


def sft_step(step):
    return {"step": step, "learning_rate": 1e-5, "loss": 1 / step, "loss/answer_nll": 1 / step, "grad_norm": 2.0,
            "nrt/answer_logprob": -1 / step, "time/update": 0.4}


def write_log(folder, lines):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines)
    return str(folder)


def nrt_log(folder, steps=30):
    evals = dict(accuracy=0.4, accuracy_direct=0.3, answer_logprob=-1.1, answer_logprob_direct=-1.4,
                 hard_token_logprob=-3.0, trace_len_mean=55.0, frac_delimiter=0.8, n=64)
    lines = [dict(eval="before", step=0, **evals)] + [nrt_step(s) for s in range(1, steps + 1)]
    lines += [nrt_step(steps - 1) | {"reward": 0.99}, nrt_step(steps), dict(eval="after", step=steps, **evals)]
    return write_log(folder, lines)  # steps-1 repeated, as after a resume


def assert_png(path, min_bytes=20_000):
    with open(path, "rb") as f:
        data = f.read()
    assert data.startswith(PNG) and len(data) > min_bytes
    assert not any(name.endswith(".tmp.png") for name in os.listdir(os.path.dirname(path)))


def test_full_log_plots_one_png(tmp_path):
    run = nrt_log(tmp_path / "nrt")
    out = plot.plot_runs([run], "", smooth=3)
    assert out == os.path.join(run, "curves.png")
    assert_png(out)


def test_repeated_step_keeps_the_later_line(tmp_path):
    steps, evals = plot.read_log(nrt_log(tmp_path / "nrt", steps=30))
    assert [e["step"] for e in steps] == list(range(1, 31))
    assert steps[28]["reward"] == 0.99 and set(evals) == {"before", "after"}


def test_sft_log_missing_keys_still_plots(tmp_path):
    run = write_log(tmp_path / "sft", [sft_step(s) for s in range(1, 21)]
                    + [dict(eval="after", step=20, accuracy_direct=0.2, answer_logprob_direct=-0.9)])
    assert_png(plot.plot_runs([run], str(tmp_path / "sft.png")))


def test_two_runs_overlay_through_main(tmp_path, capsys):
    a = nrt_log(tmp_path / "a" / "run")
    b = write_log(tmp_path / "b" / "run", [sft_step(s) for s in range(1, 11)])  # same basename
    out = str(tmp_path / "cmp.png")
    assert plot.main([a, b, f"--out={out}", "--smooth=5"]) == out
    assert out in capsys.readouterr().out
    assert_png(out)


def test_missing_or_bad_log_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(SystemExit, match=r"log\.jsonl: no such file"):
        plot.plot_runs([str(tmp_path / "nope")], str(tmp_path / "x.png"))
    empty = write_log(tmp_path / "empty", [])
    with pytest.raises(SystemExit, match=r"empty.log\.jsonl: no step or eval lines"):
        plot.main([empty])
    with open(os.path.join(write_log(tmp_path / "bad", [sft_step(1)]), "log.jsonl"), "a") as f:
        f.write('{"step": 2, "loss"\n')
    with pytest.raises(SystemExit, match=r"bad.log\.jsonl, line 2: invalid JSON"):
        plot.main([str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match="expected --key=value|unknown option"):
        plot.main([str(tmp_path / "bad"), "--nope=1"])
    assert not os.path.exists(tmp_path / "x.png")


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    run = write_log(tmp_path / "sft", [sft_step(1)])
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(SystemExit, match="plot.py needs matplotlib: pip install matplotlib"):
        plot.plot_runs([run])


def test_moving_average_by_hand():
    assert plot.moving_average([1.0, 2.0, 3.0, 4.0], 1) == [1.0, 2.0, 3.0, 4.0]
    # trailing window of 2: (1), (1+2)/2, (2+3)/2, null stays null, (5) alone since its neighbour is null
    assert plot.moving_average([1.0, 2.0, 3.0, None, 5.0], 2) == [1.0, 1.5, 2.5, None, 5.0]
    # window of 3: (1), (1+2)/2, (1+2+3)/3, (2+3+4)/3, (3+4+10)/3
    assert plot.moving_average([1.0, 2.0, 3.0, 4.0, 10.0], 3) == [1.0, 1.5, 2.0, 3.0, 17 / 3]
    assert plot.moving_average([], 4) == []
    assert plot.number(None) is None and plot.number(float("nan")) is None and plot.number(True) is None
