"""benchmarks/train_step.py as a user runs it: its rows hold what it measured, one round or several."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_rows(tmp_path, *options) -> list[list[str]]:
    output = tmp_path / "rows.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.run([sys.executable, "benchmarks/train_step.py", "--model", "detr", "--size", "tiny",
                              "--steps", "2", "--warmup", "1", "--device", "cpu", "--output", str(output), *options],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    return [[cell.strip() for cell in line.strip("|\n").split("|")] for line in output.read_text().splitlines()]


def test_one_round_reports_the_ratio_of_its_medians(tmp_path):
    (row,) = run_rows(tmp_path)
    model, size, batch, dtype, plain_ms, cal_ms, ratio = row[:7]
    assert (model, size, batch, dtype) == ("detr", "tiny", "4x64x64", "fp32")
    plain_ms, cal_ms, ratio = float(plain_ms), float(cal_ms), float(ratio)
    assert plain_ms > 0 and cal_ms > 0
    # The ratio of the unrounded medians; the milliseconds are printed to 0.1.
    assert ratio == pytest.approx(cal_ms / plain_ms, abs=0.001 + 0.1 / plain_ms)


def test_rounds_report_the_median_ratio_and_its_range(tmp_path):
    (row,) = run_rows(tmp_path, "--rounds", "2")
    median, spread = row[6].split(" ", 1)
    low, high = (float(value) for value in spread.strip("()").split("-"))
    # Two rounds: the median is the mean of the two round ratios, the lowest and the highest.
    assert low <= float(median) <= high
    assert float(median) == pytest.approx((low + high) / 2, abs=0.0011)


def test_config_overrides_reach_both_models_and_show_in_the_row(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_step", ROOT / "benchmarks" / "train_step.py")
    train_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_step)
    _, plain_config, _, cal_config = train_step.build_pair("detr", "tiny", 10,
                                                           {"auxiliary_loss": True, "use_logit_mixing": False})
    assert plain_config.auxiliary_loss is True and cal_config.auxiliary_loss is True
    # A Cal field goes to the Cal model only; the rest of the method keeps the paper's settings.
    assert cal_config.use_logit_mixing is False and cal_config.uncertainty_modulation == "multiplicative"
    assert not hasattr(plain_config, "use_logit_mixing")

    (row,) = run_rows(tmp_path, "--config_overrides", "auxiliary_loss=true")
    assert row[1] == "tiny (auxiliary_loss=true)"
    assert float(row[6]) > 0


@pytest.mark.parametrize("override, message", [
    ("auxilary_loss=true", "['auxilary_loss'] are not fields of DetrConfig"),
    ("uncertainty_modulation=bogus", "uncertainty_modulation must be one of"),
])
def test_a_wrong_config_override_is_refused_before_timing(override, message):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # Refused while the configs are built, before the first family is timed.
    process = subprocess.run([sys.executable, "benchmarks/train_step.py", "--model", "detr", "conditional_detr",
                              "--size", "tiny", "--config_overrides", override],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert process.returncode != 0
    assert message in process.stderr
    assert "plain" not in process.stdout
