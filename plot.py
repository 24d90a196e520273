"""Training curves of NRT / SFT runs: each run's <out_dir>/log.jsonl drawn into one PNG of small panels.

    python plot.py out/nrt                                    # writes out/nrt/curves.png
    python plot.py out/nrt out/sft --out=cmp.png --smooth=10  # runs overlaid, one colour per run

Panels: PANELS, and a table of each run's held-out evals. One colour per run, one line style per series;
a repeated step (resumed run) keeps the later line; nulls and NaN are skipped; --smooth=N is a trailing
moving average. A bare matplotlib Figure, no pyplot (no screen, no global state): train.py draws in-process.
Left out: error bands, log scales, per-question views, live updating.
"""
import json
import math
import os
import sys

import cli

DEFAULTS = dict(out="", smooth=1)  # the PNG ("" = <first run dir>/curves.png); moving-average window (1 = raw)
# (title, keys): the keys, or a key prefix meaning every key under it; line styles STYLES in that order
PANELS = [
    ("reward: traces (solid) vs empty trace (dashed)", ["reward", "nrt/reward_empty"]),
    ("answer log-likelihood (hard tokens dashed)", ["nrt/answer_logprob", "nrt/hard_answer_logprob"]),
    ("trace length (collapse signal)", ["completions/mean_length"]),
    ("trace entropy (collapse signal)", ["entropy"]),
    ("fraction of traces with the delimiter", ["nrt/frac_delimiter"]),
    ("fraction of zero-std reward groups", ["frac_reward_zero_std"]),
    ("loss terms", "loss/"),
    ("learning rate", ["learning_rate"]),
    ("time split of a step (s)", "time/"),
]
STYLES = ["-", "--", ":", "-."]
EVAL_KEYS = ["accuracy", "accuracy_direct", "answer_logprob", "answer_logprob_direct"]


def read_log(run_dir):
    """(step lines sorted by step, later line winning; {eval label: eval line}), or SystemExit naming the file."""
    path, steps, evals = os.path.join(run_dir, "log.jsonl"), {}, {}
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such file (is {run_dir!r} a run's out_dir?)")
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                entry = json.loads(line) if line.strip() else {}
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}, line {n}: invalid JSON ({e.msg})") from None
            if not isinstance(entry, dict):
                raise SystemExit(f"{path}, line {n}: expected a JSON object")
            if "eval" in entry:
                evals[str(entry["eval"])] = entry
            elif isinstance(entry.get("step"), int):
                steps[entry["step"]] = entry
    if not steps and not evals:
        raise SystemExit(f"{path}: no step or eval lines")
    return [steps[s] for s in sorted(steps)], evals


def number(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def moving_average(values, n):
    """Trailing mean of the non-null values among the last n (itself included); a null stays null."""
    windows = ([x for x in values[max(0, i - n + 1):i + 1] if x is not None] for i in range(len(values)))
    return [None if v is None else sum(w) / len(w) for v, w in zip(values, windows)]


def draw_panel(ax, title, keys, runs, n, xlabel=""):
    """One panel: every run's series of `keys` (PANELS), moving-averaged over n steps."""
    prefix = isinstance(keys, str)
    if prefix:  # every key under it that some run logged
        keys = sorted({k for r in runs for e in r["steps"] for k in e if k.startswith(keys)})
    drawn = {}
    for run in runs:
        for key, style in zip(keys, STYLES * len(keys)):
            ys = moving_average([number(e.get(key)) for e in run["steps"]], n)
            points = [(e["step"], y) for e, y in zip(run["steps"], ys) if y is not None]
            if points:
                ax.plot(*zip(*points), style, color=run["color"], lw=1.2)
                drawn[key, style] = True
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if not drawn:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set(xticks=[], yticks=[])
    elif prefix or len(drawn) > 1:  # legend for the line styles; the run colours are in the figure legend
        for key, style in drawn:
            ax.plot([], [], style, color="gray", label=key.split("/")[-1])
        ax.legend(fontsize=7, framealpha=0.7)


def draw_evals(ax, runs):
    """A table of every run's eval lines (EVAL_KEYS), each row label in its run's colour."""
    ax.set_title("held-out eval", fontsize=9)
    ax.axis("off")
    rows = [(run, label, e) for run in runs for label, e in run["evals"].items()]
    cols = [k for k in EVAL_KEYS if any(number(e.get(k)) is not None for _, _, e in rows)]
    if not cols:
        ax.text(0.5, 0.5, "no eval logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        return
    table = ax.table(cellText=[["-" if number(e.get(k)) is None else f"{e[k]:.3f}" for k in cols] for _, _, e in rows],
                     rowLabels=[f"{run['name']}  {label} (step {e.get('step')})" for run, label, e in rows],
                     colLabels=cols, loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    for i, (run, _, _) in enumerate(rows):
        table[i + 1, -1].get_text().set_color(run["color"])


def plot_runs(run_dirs, out="", smooth=1):
    """Draw the runs' log.jsonl into one PNG at `out` (default <first run dir>/curves.png); returns its path."""
    logs = [read_log(d) for d in run_dirs]  # every error before any drawing
    try:
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError:
        raise SystemExit("plot.py needs matplotlib: pip install matplotlib") from None
    runs = [dict(steps=s, evals=e, name=os.path.normpath(d), color=f"C{i % 10}")  # named after its out_dir
            for i, ((s, e), d) in enumerate(zip(logs, run_dirs))]
    n_eval = sum(len(r["evals"]) for r in runs)
    fig = Figure(figsize=(13, 10.5 + 0.25 * n_eval), layout="constrained")
    grid = fig.add_gridspec(4, 3, height_ratios=[3, 3, 3, 0.8 + 0.25 * n_eval])
    for i, (panel_title, keys) in enumerate(PANELS):  # "step" under the bottom row only
        draw_panel(fig.add_subplot(grid[i // 3, i % 3]), panel_title, keys, runs, smooth, "step" if i >= 6 else "")
    draw_evals(fig.add_subplot(grid[3, :]), runs)
    handles = [Line2D([], [], color=r["color"], lw=2) for r in runs]
    fig.legend(handles, [r["name"] for r in runs], loc="outside upper center", ncols=min(len(runs), 5), fontsize=9,
               title=f"moving average of {smooth} steps" if smooth > 1 else None, frameon=False)
    out = out or os.path.join(run_dirs[0], "curves.png")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = os.path.splitext(out)[0] + ".tmp.png"  # .png: the extension tells matplotlib the format
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, out)  # a reader never sees a half-written file
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    run_dirs = [a for a in argv if not a.startswith("--")]
    cfg = cli.parse_args(DEFAULTS, [a for a in argv if a.startswith("--")])
    cli.print_config(cfg)
    cli.check_ranges(cfg, smooth=(cfg.smooth >= 1, "a window ≥ 1"))
    if not run_dirs:
        raise SystemExit("usage: python plot.py RUN_DIR [RUN_DIR ...] [--out=FILE] [--smooth=N]")
    path = plot_runs(run_dirs, cfg.out, cfg.smooth)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
