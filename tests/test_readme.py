"""The README's commands, as written: the quick start runs offline, the main job uses every core."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, flags=re.S | re.M)
    assert match, f"README has no section '## {title}'"
    return match.group(1)


def first_block(text: str, language: str) -> str:
    match = re.search(rf"```{language}\n(.*?)```", text, flags=re.S)
    assert match, f"no ```{language} block"
    return match.group(1)


def test_quick_start_runs_as_written_offline(tmp_path):
    code = first_block(section("Quick start"), "python")
    (tmp_path / "quick_start.py").write_text(code)
    result = subprocess.run([sys.executable, "quick_start.py"], cwd=tmp_path, env=OFFLINE, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    losses = eval(lines[0], {})  # the printed loss dict
    assert {"loss_ce", "loss_bbox", "loss_giou", "loss_logit_mixing"} <= losses.keys()
    assert losses["loss_bbox"] > 0 and losses["loss_logit_mixing"] > 0  # the scene has boxes: matching happened
    assert lines[1] == "torch.Size([1, 3, 20, 10])" and lines[2] == "torch.Size([1, 20, 10])"
    assert (tmp_path / "my-cal-detr" / "model.safetensors").is_file()
    detections = eval(lines[3], {})
    assert isinstance(detections, list) and all(d["score"] >= 0.3 for d in detections)


def main_job_command() -> list[str]:
    commands = [line for line in first_block(section("The two commands"), "bash").splitlines()
                if "examples/train.py" in line]
    assert len(commands) == 1
    command = commands[0].split("&&")[-1].strip()  # after `pip install -e . &&`
    assert command.startswith("HF_HUB_OFFLINE=1 accelerate launch examples/train.py")
    return shlex.split(command.removeprefix("HF_HUB_OFFLINE=1 "))


@pytest.mark.slow
def test_main_job_command_uses_every_core(tmp_path):
    """The README's command, shortened, on this machine: more than one thread when there is more than one core."""
    command = main_job_command()
    output_dir = command[command.index("--output_dir") + 1]
    command[command.index("--output_dir") + 1] = str(tmp_path / Path(output_dir).name)
    command += ["--max_train_steps", "2", "--num_train_images", "16", "--num_validation_images", "8",
                "--num_calibration_images", "16", "--skip_out_of_domain", "--checkpointing_steps", "1"]
    result = subprocess.run(command, cwd=ROOT, env=OFFLINE, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    threads = int(re.search(r"running 1 process\(es\) on cpu, (\d+) thread\(s\) each", result.stderr).group(1))
    assert threads == os.cpu_count()
    if (os.cpu_count() or 1) > 1:
        assert threads > 1
    folder = tmp_path / Path(output_dir).name
    assert (folder / "config.json").is_file() and (folder / "metrics.json").is_file()
    assert sorted(path.name for path in folder.glob("step_*")) == ["step_1", "step_2"]
