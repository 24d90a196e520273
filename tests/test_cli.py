"""cli.py: --key=value overrides typed by their defaults; unknown keys and bad values are errors."""
import pytest
from conftest import ROOT  # noqa: F401 - puts the project root on sys.path

from cli import parse_args

DEFAULTS = dict(out_dir="out", steps=10, lr=1e-6, compile=False, note=None)


def test_overrides_take_the_type_of_the_default():
    assert parse_args(DEFAULTS, []) == DEFAULTS
    cfg = parse_args(DEFAULTS, ["--out_dir=x/y", "--steps=3", "--lr=2e-6", "--compile=True", "--note=hi"])
    assert cfg == dict(out_dir="x/y", steps=3, lr=2e-6, compile=True, note="hi")
    assert parse_args(DEFAULTS, ["--compile=false"])["compile"] is False
    assert parse_args(DEFAULTS, ["--lr=1"])["lr"] == 1.0 and isinstance(parse_args(DEFAULTS, ["--lr=1"])["lr"], float)


@pytest.mark.parametrize("arg, message", [
    ("--nope=1", "unknown option --nope"),
    ("--steps=2.5", "--steps: expected int"),
    ("--compile=maybe", "--compile: expected True or False"),
    ("steps=3", "expected --key=value"),
    ("--steps", "expected --key=value"),
])
def test_bad_arguments_are_errors_naming_the_key(arg, message):
    with pytest.raises(SystemExit, match=message):
        parse_args(DEFAULTS, [arg])


def test_a_flag_given_twice_is_an_error():
    with pytest.raises(SystemExit, match="--steps is given twice; give it once"):
        parse_args(DEFAULTS, ["--steps=2", "--steps=2"])


def test_check_ranges_names_the_flag_and_its_range_and_devices():
    from cli import DEVICES, check_ranges
    check_ranges(dict(steps=3), steps=(True, "≥ 1"))
    with pytest.raises(SystemExit, match=r"^--steps=0: must be ≥ 1$"):
        check_ranges(dict(steps=0), steps=(False, "≥ 1"))
    assert all(map(DEVICES.fullmatch, ["auto", "cpu", "cuda", "cuda:0", "cuda:12"]))
    assert not any(map(DEVICES.fullmatch, ["tpu", "cuda:", "cuda:x", "", "CPU", "mps"]))
