"""train.py's safety rails: out_dir rules, the lock, checkpoints committed as one unit (kill -9 at every
point of a save, then resume), SIGTERM, flag and data validation, disk checks, non-finite weights."""
import json
import os
import shutil
import signal
import subprocess
import sys
import traceback

import pytest
import torch
from conftest import ROOT, tiny_model
from test_train import read_log, read_tensors, run_train, tiny_setup  # noqa: F401 - tiny_setup is a fixture

import checkpoint
import train
from cli import Config
from data import training_rows
from model import Transformer
from tokenizer import Tokenizer


def argv(setup, out, *args):
    """run_train's arguments for an in-process train.main; `args` replace those of the same flag."""
    root, model_dir, data = setup
    given = {a.split("=")[0] for a in args}
    base = [f"--model_dir={model_dir}", f"--data={data}", f"--out_dir={out}", "--questions_per_step=2",
            "--samples_per_question=2", "--max_think_tokens=4", "--eval_questions=0", "--device=cpu", "--lr=1e-3"]
    return [a for a in base if a.split("=")[0] not in given] + list(args)


@pytest.fixture
def nothing_loaded(monkeypatch):
    """Fail loudly if train.main gets as far as loading a tokenizer or a model."""
    def refuse(*a, **k):
        raise AssertionError("loaded something before the check")
    monkeypatch.setattr(Tokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(train, "load_for_training", refuse)


def main_error(args):
    with pytest.raises(SystemExit) as e:
        train.main(args)
    return str(e.value)


# ---- 1. out_dir: new, empty, or this trainer's own run; anything else refused before any loading ----

def test_out_dir_holding_a_model_or_foreign_files_is_refused_before_loading(tiny_setup, tmp_path, nothing_loaded):
    model_dir = tiny_setup[1]
    before = sorted(os.listdir(model_dir))
    assert "is the --model_dir" in main_error(argv(tiny_setup, model_dir, "--steps=1"))
    assert sorted(os.listdir(model_dir)) == before
    for name in ("config.json", "model.safetensors", "model-00001-of-00002.safetensors"):
        d = tmp_path / name.split(".")[0]
        d.mkdir()
        (d / name).write_text("{}")
        assert "holds a model" in main_error(argv(tiny_setup, d, "--steps=1"))
        assert os.listdir(d) == [name]  # no marker, no lock: untouched
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("x")
    assert "is not empty and is not an nrt run" in main_error(argv(tiny_setup, other, "--steps=1"))
    assert "is not a directory" in main_error(argv(tiny_setup, other / "todo.txt", "--steps=1"))
    assert "does not exist" in main_error(argv(tiny_setup, tmp_path / "new", "--steps=1", "--resume=True"))
    assert not (tmp_path / "new").exists()


def test_refusal_is_one_line_without_traceback(tiny_setup):
    run = run_train(tiny_setup, tiny_setup[1], "--steps=1")
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].endswith("a run never writes over its own starting model")


# ---- 5. every flag validated at start-up ----

@pytest.mark.parametrize("flag, message", [
    ("--grad_clip=0", "--grad_clip=0.0: must be > 0"), ("--steps=0", "--steps=0: must be ≥ 1"),
    ("--temperature=0", "--temperature=0.0: must be > 0"), ("--samples_per_question=1", "--samples_per_question=1"),
    ("--questions_per_step=0", "--questions_per_step=0: must be ≥ 1"), ("--max_think_tokens=0", "--max_think_tokens"),
    ("--rollout_questions=-1", "--rollout_questions=-1"), ("--minibatches=0", "--minibatches=0: must be ≥ 1"),
    ("--lora_rank=-1", "--lora_rank=-1"), ("--lr=0", "--lr=0.0: must be > 0"), ("--lr=nan", "--lr=nan"),
    ("--warmup_frac=1.5", "--warmup_frac=1.5: must be in [0, 1]"), ("--min_lr_frac=-0.1", "--min_lr_frac"),
    ("--clip_low=1.2", "--clip_low=1.2"), ("--clip_high=0.9", "--clip_high=0.9: must be ≥ 1"),
    ("--eval_questions=-1", "--eval_questions"), ("--save_every=-2", "--save_every"),
    ("--device=tpu", "--device='tpu': must be auto, cpu, cuda or cuda:N"), ("--delimiter=", "--delimiter='': must be"),
    ("--data=", "--data='': must be one or more JSONL files"), ("--steps=1", "--steps is given twice"),
])
def test_every_flag_is_checked_naming_it_and_its_range(flag, message):
    with pytest.raises(SystemExit, match=message.replace("[", r"\[").replace("]", r"\]")):
        train.resolve_config(["--steps=1", flag] if "twice" in message else [flag])
    for ok in ("--device=cuda:1", "--device=cuda", "--device=auto", "--method=sft", "--clip_low=1"):
        train.resolve_config([ok, "--samples_per_question=1"] if ok == "--method=sft" else [ok])


def test_missing_special_token_delimiter_is_an_error_before_the_model(tiny_setup, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "load_for_training", lambda *a: pytest.fail("loaded the model"))
    message = main_error(argv(tiny_setup, tmp_path / "o", "--delimiter=<|nonexistent|>"))
    assert "--delimiter='<|nonexistent|>' looks like a special token" in message and str(tiny_setup[1]) in message


def test_bad_data_is_a_one_line_error_naming_the_line(tiny_setup, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "load_for_training", lambda *a: pytest.fail("loaded the model"))
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"question": "a", "answer": "b"}\n{"question": "a", "answer": "b", "answer": "c"}\n')
    message = main_error(argv(tiny_setup, tmp_path / "o1", f"--data={dup}"))
    assert f"{dup}:2" in message and "'answer' appears twice" in message


def test_questions_too_long_for_the_context_are_named_or_skipped(tiny_setup, tmp_path, capsys):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps(dict(question="1+1", answer="2")) + "\n\n"
                    + json.dumps(dict(question="x" * 600, answer="y")) + "\n")
    tok = Tokenizer.from_pretrained(tiny_setup[1])
    cfg = train.resolve_config([f"--data={data}", "--max_think_tokens=4", "--instruction="])
    with pytest.raises(SystemExit, match=f"max_position_embeddings=512 with max_think_tokens=4: {data}:3"):
        training_rows(tok, [10], cfg, 512)
    rows = training_rows(tok, [10], Config(cfg, skip_too_long=True), 512)
    assert [r["question"] for r in rows] == ["1+1"] and "skipped 1 question(s)" in capsys.readouterr().out
    sft = Config(cfg, method="sft", max_think_tokens=500)  # SFT writes no trace: the think budget does not count
    assert len(training_rows(tok, [10], Config(sft, skip_too_long=True), 512)) == 1
    with pytest.raises(SystemExit, match="max_think_tokens=500"):  # NRT does count it
        training_rows(tok, [10], Config(cfg, max_think_tokens=500), 512)


# ---- 4. one lock per out_dir; 7. writable, room for a checkpoint ----

def test_lock_live_refuses_stale_taken_over(tiny_setup, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    hold = "import sys, time, checkpoint; checkpoint.take_lock(sys.argv[1]); print(flush=True); time.sleep(60)"
    sleeper = subprocess.Popen([sys.executable, "-c", hold, str(out)], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        sleeper.stdout.readline()  # another process holds the lock now
        (out / checkpoint.MARKER).write_text(json.dumps(dict(step=0, files={}, config={})))
        cfg = train.resolve_config(argv(tiny_setup, out, "--steps=1"))
        with pytest.raises(SystemExit, match=f"is in use by another run \\(pid {sleeper.pid}"):
            checkpoint.prepare_out_dir(cfg)
    finally:
        sleeper.kill()  # like kill -9: its lock file stays behind
        sleeper.communicate()
    assert (out / checkpoint.LOCK).read_text().strip() == str(sleeper.pid)
    assert checkpoint.prepare_out_dir(cfg) == 0  # its process is gone: the lock is stale and taken over
    assert (out / checkpoint.LOCK).read_text().strip() == str(os.getpid())
    checkpoint._release_lock(str(out / checkpoint.LOCK), os.getpid())
    assert not (out / checkpoint.LOCK).exists()


def test_unwritable_out_dir_and_no_room_fail_at_start(tiny_setup, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="not writable"):
        checkpoint.prepare_out_dir(train.resolve_config(argv(tiny_setup, blocker / "out")))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(SystemExit, match="0.00 GB free, a checkpoint needs about"):
        checkpoint.prepare_out_dir(train.resolve_config(argv(tiny_setup, tmp_path / "out")))


def saved_run(setup, out, steps=1):
    """A tiny checkpoint written in-process (no subprocess): out_dir prepared, one save at `steps`."""
    cfg = train.resolve_config(argv(setup, out, f"--steps={steps}"))
    checkpoint.prepare_out_dir(cfg)
    model = Transformer.from_pretrained(setup[1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    checkpoint.save_checkpoint(model, optimizer, steps, cfg, cfg.model_dir)
    checkpoint._release_lock(os.path.join(out, checkpoint.LOCK), os.getpid())
    return cfg, model, optimizer


def test_failed_save_names_the_file_and_keeps_the_previous_checkpoint(tiny_setup, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg, model, optimizer = saved_run(tiny_setup, out)
    files = {n: (out / n).read_bytes() for n in os.listdir(out)}
    with torch.no_grad():
        next(model.parameters()).add_(1.0)

    def disk_full(obj, path, *a, **k):
        raise OSError(28, "No space left on device", str(path))
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit, match="failed writing .*train_state.pt: No space left on device; the previous"):
        checkpoint.save_checkpoint(model, optimizer, 2, cfg, cfg.model_dir)
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == files  # nothing changed, no staging left
    assert checkpoint.read_manifest(out)["step"] == 1


# ---- 8. non-finite weights: refused at load, never saved; training stops after 3 skipped updates ----

def test_non_finite_weights_are_refused_at_load_and_never_saved(tiny_setup, tmp_path):
    broken = tmp_path / "broken"
    model = Transformer.from_pretrained(tiny_setup[1])
    with torch.no_grad():
        model.layers[0].attn.wq.weight[0, 0] = float("nan")
    model.save_pretrained(broken)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_setup[1] / name, broken / name)
    message = main_error(argv(tiny_setup, tmp_path / "o", f"--model_dir={broken}"))
    assert str(broken) in message and "1 non-finite values (NaN or inf) in layers.0.attn.wq.weight" in message
    with pytest.raises(SystemExit, match="the weights at step 3: 1 non-finite"):
        checkpoint.save_checkpoint(model, None, 3, Config(out_dir=str(tmp_path / "x")), "")
    for script, args in (("eval.py", ["--think=False", f"--out={tmp_path / 'e.jsonl'}"]), ("sample.py", [])):
        run = subprocess.run([sys.executable, os.path.join(ROOT, script), f"--model_dir={broken}", "--device=cpu",
                              *args], capture_output=True, text=True, timeout=120)
        assert run.returncode != 0 and "non-finite values (NaN or inf)" in run.stderr, (script, run.stderr[-500:])
    with pytest.raises(SystemExit, match="my.ckpt: the weights are finite but give non-finite logits"):
        huge = tiny_model()
        with torch.no_grad():
            huge.lm_head.weight.fill_(3e38)
        checkpoint.check_finite(huge, "my.ckpt")


def test_training_stops_after_three_skipped_updates_without_saving(tiny_setup, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "child.log"  # lr = 1e30: step 1's update blows the weights up, later gradients are NaN
    code = run_forked(argv(tiny_setup, out, "--steps=20", "--method=sft", "--lr=1e30"), log)
    assert code == 1 and "stopped at step 4: 3 updates in a row skipped" in log.read_text(), log.read_text()
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4]
    assert checkpoint.read_manifest(out)["step"] == 0 and not (out / "model.safetensors").exists()  # nothing saved
    out = tmp_path / "run2"
    code = run_forked(argv(tiny_setup, out, "--steps=20", "--method=sft", "--lr=1e30", "--save_every=1"), log)
    assert code == 1 and "the weights at step 1: the weights are finite but give non-finite logits" in log.read_text()
    assert checkpoint.read_manifest(out)["step"] == 0 and not (out / "model.safetensors").exists()


# ---- 2. a checkpoint is one unit: kill -9 at every point of a save, then resume, bitwise ----

def dying_after(n, finish):
    """checkpoint._finish, then os._exit(9) (as kill -9: no clean-up runs) once it has finished the n-th file."""
    done = []

    def wrapper(*args, **kwargs):
        finish(*args, **kwargs)
        done.append(1)
        if len(done) == n:
            os._exit(9)
    return wrapper


def run_forked(args, log_file, die_after=0):
    """train.main(args) in a forked child (no interpreter start-up: fast); returns its exit status."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 1
        try:
            sys.stdout = sys.stderr = open(log_file, "a")
            sys.modules["matplotlib"] = None  # no curves.png: not what is tested, and slow
            if die_after:  # die like kill -9 right after the die_after-th file a save finishes
                checkpoint._finish = dying_after(die_after, checkpoint._finish)
            torch.set_num_threads(1)
            train.main(args)
            code = 0
        except SystemExit as e:
            print(e, flush=True)
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def comparable(log):
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "tokens_per_s"} for r in log]


def test_kill_at_every_point_of_a_save_then_resume_is_bitwise_an_uninterrupted_run(tiny_setup, tmp_path):
    run = lambda out, *a: argv(tiny_setup, out, "--steps=2", "--save_every=1", *a)  # noqa: E731 - saves at 1 and 2
    log = tmp_path / "child.log"
    assert run_forked(run(tmp_path / "ref"), log) == 0, log.read_text()[-3000:]
    ref, ref_log = read_tensors(tmp_path / "ref"), comparable(read_log(tmp_path / "ref"))
    outcomes = set()
    for n in range(1, 100):
        out = tmp_path / f"kill{n}"
        code = run_forked(run(out), log, die_after=n)
        if code == 0:  # n is past the last file written: every point has been tried
            break
        assert code == 9, log.read_text()[-3000:]
        if (out / "model.safetensors").exists():  # whatever instant it died at, out_dir loads as a model
            Transformer.from_pretrained(out)
        staged = checkpoint.read_manifest(out / checkpoint.STAGING)
        committed = (staged or checkpoint.read_manifest(out) or {}).get("step", 0)
        outcomes.add(committed)
        assert run_forked(run(out, *(["--resume=True"] if committed else [])), log) == 0, log.read_text()[-3000:]
        got = read_tensors(out)
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), n
        assert comparable(read_log(out)) == ref_log, n
        assert not (out / checkpoint.STAGING).exists() and not [f for f in os.listdir(out) if f.endswith(".tmp")]
        assert checkpoint.read_manifest(out)["step"] == 2
    assert n > 20 and outcomes == {0, 1, 2}, (n, outcomes)


def test_resume_verifies_truncates_the_log_and_refuses_changed_settings(tiny_setup, tmp_path):
    out = tmp_path / "run"
    saved_run(tiny_setup, out, steps=2)
    lines = [dict(eval="before", step=0, acc=0.1), dict(step=1), dict(step=2), dict(step=3), dict(eval="after", step=3)]
    (out / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 4, "tor')
    resume = lambda *a: train.resolve_config(argv(tiny_setup, out, "--steps=4", "--resume=True", *a))  # noqa: E731
    for args, message in [(["--lr=2e-3"], "--lr=0.002 \\(the run used 0.001\\)"),
                          (["--seed=1", "--aggregation=gm"], "--aggregation='gm' .*--seed=1 .*--resume_override=True"),
                          (["--lora_rank=4"], "LoRA cannot be switched on on --resume")]:
        with pytest.raises(SystemExit, match=message):
            checkpoint.prepare_out_dir(resume(*args))
    assert checkpoint.prepare_out_dir(resume("--lr=2e-3", "--resume_override=True", "--eval_questions=3")) == 2
    assert read_log(out) == lines[:3]  # step lines after the checkpoint, "after" evals, a torn line: gone
    with pytest.raises(SystemExit, match="already holds a checkpoint \\(step 2\\); pass --resume=True"):
        checkpoint.prepare_out_dir(train.resolve_config(argv(tiny_setup, out)))
    with open(out / "model.safetensors", "ab") as f:
        f.write(b"x")
    with pytest.raises(SystemExit, match="inconsistent: model.safetensors is .* bytes, its manifest says"):
        checkpoint.prepare_out_dir(resume())


def test_fresh_run_in_its_own_directory_starts_a_new_log(tiny_setup, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / checkpoint.MARKER).write_text(json.dumps(dict(step=0, files={}, config={})))
    (out / "log.jsonl").write_text('{"step": 7, "loss": 1.0}\n')
    (out / "stale.safetensors.tmp").write_text("half")
    (out / checkpoint.STAGING).mkdir()
    (out / checkpoint.STAGING / "model.safetensors").write_text("half")  # a save cut short: no manifest
    assert checkpoint.prepare_out_dir(train.resolve_config(argv(tiny_setup, out))) == 0
    assert not (out / "log.jsonl").exists() and sorted(os.listdir(out)) == [checkpoint.LOCK, checkpoint.MARKER]


# ---- 3. SIGTERM = Ctrl-C: finish the step, save, exit 143; 10. weights saved 0644 ----

def test_sigterm_saves_and_exits_143_then_resumes(tiny_setup, tmp_path):
    root, model_dir, data = tiny_setup
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *argv(tiny_setup, out, "--steps=1000", "--save_every=0")]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 1/1000"):
            proc.send_signal(signal.SIGTERM)
            break
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=120) == 143, "".join(lines)[-3000:]
    assert any("SIGTERM: finishing this step, then saving" in x for x in lines)
    step = checkpoint.read_manifest(out)["step"]
    assert step >= 1 and [r["step"] for r in read_log(out)] == list(range(1, step + 1))
    assert not (out / checkpoint.LOCK).exists()  # released on exit
    for name in checkpoint.read_manifest(out)["files"]:
        assert os.stat(out / name).st_mode & 0o777 == 0o644, name
    resumed = run_train(tiny_setup, out, f"--steps={step + 1}", "--resume=True")
    assert resumed.returncode == 0 and f"resumed from {out} at step {step}" in resumed.stdout, resumed.stderr[-2000:]
    assert [r["step"] for r in read_log(out)] == list(range(1, step + 2))


@pytest.mark.parametrize("flag, message", [("--max_new_tokens=-1", "--max_new_tokens=-1: must be ≥ 1"),
                                           ("--temperature=-0.5", "--temperature=-0.5: must be ≥ 0"),
                                           ("--top_p=0", "--top_p=0.0: must be in (0, 1]")])
def test_sample_py_checks_its_flags_before_loading(flag, message):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--model_dir=/nonexistent", flag],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and message in run.stderr and "Traceback" not in run.stderr


def test_a_config_without_kv_heads_says_so_when_the_shapes_disagree(tmp_path):
    model = tiny_model()  # 4 query heads, 2 KV heads
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["num_key_value_heads"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="k_proj.*config.json has no num_key_value_heads"):
        Transformer.from_pretrained(tmp_path)
