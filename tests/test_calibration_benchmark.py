"""benchmarks/calibration.py: aggregation, goal and report on hand-made runs; one smoke run end to end."""

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "calibration.py"

spec = importlib.util.spec_from_file_location("calibration_benchmark", SCRIPT)
bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench  # dataclasses look their module up there
spec.loader.exec_module(bench)

ARGUMENTS = {"model_preset": "tiny", "model_type": None, "config_overrides": None, "max_train_steps": 50,
             "per_device_train_batch_size": 4, "learning_rate": 5e-4, "image_size": 96, "num_train_images": 128,
             "num_validation_images": 32, "data_seed": 0, "corruption_seed": 0, "skip_out_of_domain": False,
             "dataset_name": None, "train_annotations": None}


def split_metrics(d_ece, ap, ap50=0.6, laece=0.2):
    return {"d_ece": d_ece, "map": ap, "map_50": ap50, "laece": laece}


def write_run(work_dir, arm, seed, in_domain, out_of_domain, **argument_changes):
    folder = bench.run_folder(work_dir, arm, seed)
    folder.mkdir(parents=True)
    arguments = {**ARGUMENTS, "method": arm, "seed": seed, "output_dir": str(folder), **argument_changes}
    metrics = {"in_domain": in_domain, "out_of_domain": out_of_domain,
               "run": {"method": arm, "train_steps": 50, "train_seconds": 30.0 + seed, "total_seconds": 40.0 + seed,
                       "num_processes": 1, "arguments": arguments}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    config = {} if arm == "baseline" else {"uncertainty_modulation": "multiplicative", "use_logit_mixing": True}
    (folder / "config.json").write_text(json.dumps(config))


NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?|n/a|nan")


def numbers(text: str) -> list[float]:
    """The numbers written in ``text``, in order (``n/a`` and ``nan`` as NaN): what the report states, read as floats.
    ``float("9.10") == 9.10``, so they compare exactly with the hand-computed values written to the report's precision."""
    return [float("nan") if token in ("n/a", "nan") else float(token) for token in NUMBER.findall(text)]


def table_rows(text: str, column: str) -> dict[str, list[str]]:
    """The markdown table of ``text`` with a column titled ``column``: ``{first cell: [the other cells]}``, without
    its header row and its ``|---|`` rule."""
    for block in re.findall(r"(?:^\|.*\|\n?)+", text, re.M):
        rows = [[cell.strip() for cell in line.strip()[1:-1].split("|")] for line in block.strip().splitlines()]
        if column in rows[0]:
            return {row[0]: row[1:] for row in rows[2:]}
    raise AssertionError(f"no table with a column {column!r}")


def table_numbers(text: str, column: str) -> dict[str, list[list[float]]]:
    """``table_rows`` with every cell read as its numbers (``12.00 ± 1.00`` -> ``[12.0, 1.0]``, ``0.76x`` -> ``[0.76]``)."""
    return {row: [numbers(cell) for cell in cells] for row, cells in table_rows(text, column).items()}


def bullets(text: str) -> dict[str, str]:
    """The report's ``- name: value`` lines as ``{name: value}``."""
    return dict(re.findall(r"^- ([^:\n]+): (.*)$", text, re.M))


def stated_goal(text: str) -> tuple[str, list[tuple[str, bool]]]:
    """What the report states before its first table: the value of its bold ``**...: <verdict>.**`` line and its
    ``- <check>: yes|no`` lines as ``(check, ok)``."""
    head = text.split("\n|", 1)[0]
    verdict = re.search(r"^\*\*[^*\n]*: ([^*\n]+)\.\*\*", head, re.M).group(1)
    return verdict, [(check, ok == "yes") for check, ok in re.findall(r"^- (.*): (yes|no)$", head, re.M)]


def make_runs(work_dir, cal_in=(0.07, 0.08, 0.09), cal_out=(0.08, 0.08, 0.08), cal_ap=(0.395, 0.40, 0.405)):
    """Baseline D-ECE in-domain 0.11/0.12/0.13 (mean 0.12, std 0.01), out-of-domain 0.10; AP 0.40."""
    for seed in range(3):
        write_run(work_dir, "baseline", seed, split_metrics(0.11 + 0.01 * seed, 0.40), split_metrics(0.10, 0.20))
        write_run(work_dir, "cal-detr", seed, split_metrics(cal_in[seed], cal_ap[seed]),
                  split_metrics(cal_out[seed], 0.20))


def test_spread_is_mean_sample_std_and_range():
    stat = bench.spread([0.11, 0.12, 0.13])
    assert stat.mean == pytest.approx(0.12) and stat.std == pytest.approx(0.01)
    assert (stat.low, stat.high, stat.count) == (0.11, 0.13, 3)
    assert math.isnan(bench.spread([0.5]).std)


def test_aggregate_and_ratios_from_metrics_files(tmp_path):
    make_runs(tmp_path)
    summary = bench.aggregate(bench.load_runs(tmp_path, ["baseline", "cal-detr"], [0, 1, 2]))
    assert summary["baseline"]["in_domain"]["d_ece"].mean == pytest.approx(0.12)
    assert summary["cal-detr"]["in_domain"]["d_ece"].std == pytest.approx(0.01)
    assert summary["cal-detr"]["in_domain"]["map"].mean == pytest.approx(0.40)
    assert bench.d_ece_ratio(summary, "cal-detr", "in_domain") == pytest.approx(0.08 / 0.12)
    assert bench.d_ece_ratio(summary, "cal-detr", "out_of_domain") == pytest.approx(0.8)
    assert bench.d_ece_ratio(summary, "baseline", "in_domain") == pytest.approx(1.0)


def test_goal_met_when_both_ratios_and_ap_hold(tmp_path):
    make_runs(tmp_path)
    goal = bench.judge_goal(bench.aggregate(bench.load_runs(tmp_path, ["baseline", "cal-detr"], [0, 1, 2])))
    assert goal.verdict == "met" and goal.baseline_meaningful
    assert [ok for _, ok in goal.checks] == [True, True, True, True]


@pytest.mark.parametrize("changes, verdict, failing_check", [
    (dict(cal_in=(0.079, 0.089, 0.099)), "met", None),         # 0.089 / 0.12 = 0.74x in-domain
    (dict(cal_in=(0.0815, 0.0915, 0.1015)), "not met", 0),     # 0.76x in-domain
    (dict(cal_out=(0.084, 0.084, 0.084)), "met", None),        # 0.84x out-of-domain
    (dict(cal_out=(0.086, 0.086, 0.086)), "not met", 2),       # 0.86x out-of-domain
    (dict(cal_ap=(0.386, 0.391, 0.396)), "met", None),         # AP 0.9 points lower
    (dict(cal_ap=(0.38, 0.385, 0.39)), "not met", 1),          # AP 1.5 points lower
])
def test_goal_bounds(tmp_path, changes, verdict, failing_check):
    make_runs(tmp_path, **changes)
    goal = bench.judge_goal(bench.aggregate(bench.load_runs(tmp_path, ["baseline", "cal-detr"], [0, 1, 2])))
    assert goal.verdict == verdict
    assert [index for index, (_, ok) in enumerate(goal.checks) if not ok] == (
        [] if failing_check is None else [failing_check])


def test_goal_needs_both_arms_and_flags_a_weak_baseline(tmp_path):
    for seed in range(2):
        write_run(tmp_path, "baseline", seed, split_metrics(0.12, 0.1, ap50=0.3), split_metrics(0.1, 0.05, ap50=0.2))
        write_run(tmp_path, "cal-detr", seed, split_metrics(0.05, 0.1, ap50=0.3), split_metrics(0.05, 0.05, ap50=0.2))
    assert bench.judge_goal(bench.aggregate(bench.load_runs(tmp_path, ["baseline"], [0, 1]))).verdict == "not evaluated"
    goal = bench.judge_goal(bench.aggregate(bench.load_runs(tmp_path, ["baseline", "cal-detr"], [0, 1])))
    assert goal.verdict == "met" and goal.baseline_meaningful is False


def test_runs_with_different_budgets_are_refused(tmp_path):
    write_run(tmp_path, "baseline", 0, split_metrics(0.1, 0.4), split_metrics(0.1, 0.2))
    write_run(tmp_path, "cal-detr", 0, split_metrics(0.1, 0.4), split_metrics(0.1, 0.2), max_train_steps=60)
    with pytest.raises(ValueError, match="max_train_steps"):
        bench.load_runs(tmp_path, ["baseline", "cal-detr"], [0])


def test_existing_runs_are_reused_only_with_the_same_arguments(tmp_path, monkeypatch):
    write_run(tmp_path, "baseline", 0, split_metrics(0.1, 0.4), split_metrics(0.1, 0.2))
    folder = bench.run_folder(tmp_path, "baseline", 0)
    assert bench.ensure_run("baseline", 0, tmp_path, ["--max_train_steps", "50"]) is False  # no record: reused
    (folder / "benchmark_arguments.json").write_text(json.dumps(
        bench.train_arguments("baseline", 0, folder, ["--max_train_steps", "50"])))
    assert bench.ensure_run("baseline", 0, tmp_path, ["--max_train_steps", "50"]) is False
    with pytest.raises(SystemExit, match="other train.py arguments"):
        bench.ensure_run("baseline", 0, tmp_path, ["--max_train_steps", "60"])
    # The same work dir spelt relative to the current directory is the same run.
    monkeypatch.chdir(tmp_path)
    assert bench.ensure_run("baseline", 0, Path("."), ["--max_train_steps", "50"]) is False


def test_arguments_sizes_and_passthrough(tmp_path):
    args = bench.parse_arguments(["--size", "smoke", "--arms", "cal-detr", "baseline", "--", "--max_train_steps", "4"])
    assert args.arms == ["baseline", "cal-detr"] and args.seeds == [0] and args.name == "calibration_smoke"
    # The passthrough comes after the size's own arguments, so it wins; method, seed and folder come last.
    assert args.train_args[-2:] == ["--max_train_steps", "4"] and "--model_preset" in args.train_args
    command = bench.train_arguments("cal-detr", 2, tmp_path, args.train_args)
    assert command[-6:] == ["--method", "cal-detr", "--seed", "2", "--output_dir", str(tmp_path)]
    assert bench.parse_arguments([]).seeds == [0, 1, 2] and bench.parse_arguments([]).train_args == []
    assert bench.parse_arguments(["--smoke"]).size == "smoke" and bench.parse_arguments(["--smoke"]).seeds == [0]


def test_report_holds_the_numbers_and_the_verdict(tmp_path):
    make_runs(tmp_path / "runs", cal_in=(0.081, 0.091, 0.101))
    runs = bench.load_runs(tmp_path / "runs", ["baseline", "cal-detr"], [0, 1, 2])
    summary = bench.aggregate(runs)
    goal = bench.judge_goal(summary)
    setup = bench.describe_setup(runs, tmp_path / "runs", [0, 1, 2], "smoke", "python benchmarks/calibration.py",
                                 "not run")
    text = bench.write_report(tmp_path / "report.md", summary, goal, setup, "diagram.png", ["a note"])
    assert text == (tmp_path / "report.md").read_text()
    # The goal: D-ECE in-domain 9.10 / 12.00 = 0.758 > 0.75 fails it; the other three checks hold.
    assert bench.d_ece_ratio(summary, "cal-detr", "in_domain") == pytest.approx(0.091 / 0.12)
    assert goal.verdict == "not met" and goal.baseline_meaningful is True
    assert [ok for _, ok in goal.checks] == [False, True, True, True]
    verdict, checks = stated_goal(text)
    assert verdict == goal.verdict and checks == list(goal.checks)
    # Each check: Cal-DETR, baseline, ratio and bound (D-ECE) or Cal-DETR, baseline, change and allowed drop (AP).
    assert [numbers(check) for check, _ in checks] == [
        [9.10, 12.00, 0.76, 0.75], [40.00, 40.00, 0.00, 1], [8.00, 10.00, 0.80, 0.85], [20.00, 20.00, 0.00, 1]]
    # Mean ± std over seeds, percent: D-ECE in, AP in, AP50 in, D-ECE out, AP out, LaECE in, LaECE out.
    results = table_numbers(text, "D-ECE in")
    assert list(results) == ["baseline", "cal-detr"]
    assert results["baseline"] == [[12.00, 1.00], [40.00, 0.00], [60.00, 0.00], [10.00, 0.00], [20.00, 0.00],
                                   [20.00, 0.00], [20.00, 0.00]]
    assert results["cal-detr"] == [[9.10, 1.00], [40.00, 0.50], [60.00, 0.00], [8.00, 0.00], [20.00, 0.00],
                                   [20.00, 0.00], [20.00, 0.00]]
    # Seeds, D-ECE ratios in and out, then the ranges of D-ECE in, D-ECE out, AP in, AP out.
    spreads = table_numbers(text, "D-ECE in range")
    assert spreads["baseline"] == [[3], [1.00], [1.00], [11.00, 13.00], [10.00, 10.00], [40.00, 40.00],
                                   [20.00, 20.00]]
    assert spreads["cal-detr"] == [[3], [0.76], [0.80], [8.10, 10.10], [8.00, 8.00], [39.50, 40.50], [20.00, 20.00]]
    # The analysis of cal-detr: baseline -> Cal-DETR D-ECE, ratio and AP change, in-domain then out-of-domain;
    # both gaps (2.90 > 1.00 + 1.00 in, 2.00 > 0 + 0 out) lie beyond the seed spread, which it says.
    (line,) = [line for line in text.splitlines() if line.startswith("- cal-detr:")]
    assert numbers(line) == [12.00, 9.10, 0.76, 0.00, 10.00, 8.00, 0.80, 0.00]
    judged = bench.compare(summary["cal-detr"]["in_domain"]["d_ece"], summary["baseline"]["in_domain"]["d_ece"])
    assert judged == bench.compare(summary["cal-detr"]["out_of_domain"]["d_ece"],
                                   summary["baseline"]["out_of_domain"]["d_ece"])
    assert judged != bench.compare(summary["baseline"]["in_domain"]["d_ece"], summary["baseline"]["in_domain"]["d_ece"])
    assert line.count(judged) == 2
    assert re.search(r"!\[[^]]*\]\(diagram\.png\)", text) and "- a note" in text.splitlines()
    # The budget: steps, batch, processes, learning rate, image size; the Cal arm's config.json and mean times.
    budget = next(value for name, value in bullets(text).items() if name.startswith("Budget"))
    assert numbers(budget) == [50, 4, 1, 5e-4, 96]
    arms = table_rows(text, "train s / run")
    assert dict(pair.split("=") for pair in arms["cal-detr"][0].split(", ")) == {
        "uncertainty_modulation": "multiplicative", "use_logit_mixing": "True"}
    assert "=" not in arms["baseline"][0]
    assert [numbers(cell) for cell in arms["cal-detr"][1:]] == [[31], [41]]  # 30 + seed, 40 + seed over seeds 0-2


@pytest.mark.slow
def test_smoke_run_writes_the_report_and_the_diagram(tmp_path):
    command = [sys.executable, str(SCRIPT), "--size", "smoke", "--arms", "baseline", "cal-detr", "--seeds", "0",
               "--work_dir", str(tmp_path / "runs"), "--results_dir", str(tmp_path / "results"), "--name", "smoke",
               "--num_calibration_images", "16", "--", "--max_train_steps", "4", "--num_train_images", "32",
               "--num_validation_images", "16"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    report = (tmp_path / "results" / "smoke.md").read_text()
    assert (tmp_path / "results" / "smoke_reliability.png").stat().st_size > 0
    for arm in ("baseline", "cal-detr"):
        assert (tmp_path / "runs" / arm / "seed_0" / "metrics.json").is_file()
    # The goal stated is the one judged on the runs' metrics.json files.
    summary = bench.aggregate(bench.load_runs(tmp_path / "runs", ["baseline", "cal-detr"], [0]))
    goal = bench.judge_goal(summary)
    verdict, checks = stated_goal(report)
    assert verdict == goal.verdict and checks == list(goal.checks)
    results = table_numbers(report, "D-ECE in")
    assert {"baseline", "cal-detr", "cal-detr + isotonic regression"} <= set(results)
    assert all(len(cells) == 7 for cells in results.values())
    for arm in ("baseline", "cal-detr"):  # one seed: the mean alone
        assert results[arm][0] == pytest.approx([100 * summary[arm]["in_domain"]["d_ece"].mean], abs=0.005,
                                                nan_ok=True)
        assert results[arm][1] == pytest.approx([100 * summary[arm]["in_domain"]["map"].mean], abs=0.005)
    # Resumed on another machine from the runs' record files alone (benchmarks/run_records.py save, a fresh work dir,
    # restore: no model, no checkpoint), the benchmark trains nothing, re-evaluates nothing (there is no model to
    # load) and states the same numbers.
    records = [sys.executable, str(ROOT / "benchmarks" / "run_records.py")]
    subprocess.run([*records, "save", str(tmp_path / "runs"), str(tmp_path / "records")], check=True, cwd=ROOT)
    shutil.rmtree(tmp_path / "runs")
    subprocess.run([*records, "restore", str(tmp_path / "records"), str(tmp_path / "runs")], check=True, cwd=ROOT)
    assert not list((tmp_path / "runs").rglob("*.safetensors"))
    again = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "trained" not in again.stdout
    resumed = (tmp_path / "results" / "smoke.md").read_text()
    for column in ("D-ECE in", "D-ECE in range", "LaECE_0 @LRP-opt in"):  # the cells as written (n/a included)
        assert table_rows(resumed, column) == table_rows(report, column)
    assert "cal-detr + Platt scaling" in table_rows(resumed, "LaECE_0 @LRP-opt in")


# ------------------------------------------------------------------------------- --cal_settings and the sweep

SWEEP_SCRIPT = ROOT / "benchmarks" / "calibration_sweep.py"
sweep_spec = importlib.util.spec_from_file_location("calibration_sweep", SWEEP_SCRIPT)
sweep = importlib.util.module_from_spec(sweep_spec)
sweep_spec.loader.exec_module(sweep)


def test_cal_settings_reach_the_cal_arms_only_and_get_their_own_folders(tmp_path):
    settings = bench.parse_cal_settings(["logit_mixing_loss_coefficient=2", "logit_mixing_alpha=0.7"])
    assert settings == {"logit_mixing_loss_coefficient": 2.0, "logit_mixing_alpha": 0.7}
    assert bench.run_folder(tmp_path, "baseline", 1, settings) == tmp_path / "baseline" / "seed_1"
    assert bench.run_folder(tmp_path, "cal-detr", 1, {}) == tmp_path / "cal-detr" / "seed_1"
    assert bench.run_folder(tmp_path, "cal-detr", 1, settings) == \
        tmp_path / "cal-detr@logit_mixing_alpha=0.7,logit_mixing_loss_coefficient=2" / "seed_1"
    assert "--logit_mixing_alpha" not in bench.train_arguments("baseline", 0, tmp_path, [], settings)
    command = bench.train_arguments("mixing-only", 0, tmp_path, ["--max_train_steps", "4"], settings)
    assert command[:6] == ["--max_train_steps", "4", "--logit_mixing_alpha", "0.7",
                           "--logit_mixing_loss_coefficient", "2"]
    for bad, match in ((["focal_alpha=0.5"], "NAME one of"), (["logit_mixing_alpha"], "NAME one of"),
                       (["logit_mixing_alpha=high"], "not a number")):
        with pytest.raises(ValueError, match=match):
            bench.parse_cal_settings(bad)
    with pytest.raises(SystemExit):
        bench.parse_arguments(["--cal_settings", "num_queries=3"])
    assert bench.parse_arguments(["--cal_settings", "logit_mixing_alpha=0.8"]).cal_settings == {"logit_mixing_alpha": 0.8}


def test_runs_with_different_cal_settings_still_compare(tmp_path):
    write_run(tmp_path, "baseline", 0, split_metrics(0.1, 0.4), split_metrics(0.1, 0.2))
    settings = {"logit_mixing_loss_coefficient": 2.0}
    folder = bench.run_folder(tmp_path, "cal-detr", 0, settings)
    folder.mkdir(parents=True)
    metrics = {"in_domain": split_metrics(0.05, 0.4), "out_of_domain": split_metrics(0.08, 0.2),
               "run": {"arguments": {**ARGUMENTS, "method": "cal-detr", "seed": 0, "output_dir": str(folder),
                                     "logit_mixing_loss_coefficient": 2.0}}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    runs = bench.load_runs(tmp_path, ["baseline", "cal-detr"], [0], settings)
    assert runs["cal-detr"][0]["in_domain"]["d_ece"] == 0.05  # the settings' folder, not cal-detr/seed_0


def rows_of(**measured):
    """``label=((ap_in, dece_in), (ap_out, dece_out))`` -> the sweep's rows."""
    return {label: {"in_domain": {"map": a, "d_ece": b}, "out_of_domain": {"map": c, "d_ece": d}}
            for label, ((a, b), (c, d)) in measured.items()}


def stated_choice(text: str) -> tuple[str, float, str, list[str]]:
    """The sweep report's bold ``**...: <chosen>** (... <score> ...)`` line as (chosen, score, "met" or "not met"), and
    the lines between it and the indented command."""
    lines = text.splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith("**"))
    chosen, rest = re.fullmatch(r"\*\*[^*]*: ([^*]+)\*\*(.*)", lines[index]).groups()
    command = next(i for i in range(index, len(lines)) if lines[i].startswith("    "))
    met = re.search(r"\b(not met|met)\b", rest).group(1)
    return chosen, numbers(rest)[0], met, [line for line in lines[index + 1:command] if line]


def test_sweep_selection_rule():
    rows = rows_of(baseline=((0.40, 0.20), (0.20, 0.20)),
                   default=((0.40, 0.18), (0.20, 0.17)),  # score max(0.9/0.75, 0.85/0.85) = 1.2
                   strong=((0.385, 0.10), (0.20, 0.10)),  # best ratios, but AP 1.5 points lower: not eligible
                   good=((0.392, 0.16), (0.21, 0.15)))  # AP 0.8 points lower: eligible; max(1.067, 0.882)
    assert sweep.select(rows) == "good"
    assert sweep.score({"in_domain": 0.8, "out_of_domain": 0.85}) == pytest.approx(1.0667, abs=1e-4)
    assert sweep.select(rows_of(baseline=((0.4, 0.2), (0.2, 0.2)), worse=((0.3, 0.1), (0.2, 0.1)))) is None
    assert sweep.parse_candidate("default") == {}
    assert sweep.parse_candidate("logit_mixing_alpha=0.7,logit_mixing_loss_coefficient=1") == {
        "logit_mixing_alpha": 0.7, "logit_mixing_loss_coefficient": 1.0}
    good_score = sweep.score({"in_domain": 0.16 / 0.20, "out_of_domain": 0.15 / 0.20})
    assert good_score == pytest.approx(max(0.8 / 0.75, 0.75 / 0.85)) and good_score > 1  # goal not met
    text = "\n".join(sweep.report(rows, "good", ["- setup"], "python benchmarks/calibration.py ..."))
    chosen, score, met, how = stated_choice(text)
    assert (chosen, score, met) == ("good", pytest.approx(1.07), "not met")
    # AP, D-ECE and ratio in-domain, then out-of-domain, then the score; the chosen row alone is tagged.
    table = table_rows(text, "score")
    labels = {re.sub(r" \(.*\)$", "", label): label for label in table}
    assert list(labels) == list(rows) and [label for label in rows if labels[label] != label] == ["good"]
    measured = {label: [numbers(cell) for cell in table[tagged]] for label, tagged in labels.items()}
    assert measured["good"] == [[39.20], [16.00], [0.80], [21.00], [15.00], [0.75], [1.07]]
    assert measured["strong"] == [[38.50], [10.00], [0.50], [20.00], [10.00], [0.50], [0.67]]
    assert measured["baseline"][:6] == [[40.00], [20.00], [1.00], [20.00], [20.00], [1.00]]
    assert measured["baseline"][6] == []  # no score: the reference
    assert "    python benchmarks/calibration.py ..." in text.splitlines()
    rows["library default"] = rows.pop("default")
    text = "\n".join(sweep.report(rows, "library default", ["- setup"], "python benchmarks/calibration.py"))
    chosen, score, met, default_how = stated_choice(text)
    assert (chosen, score, met) == ("library default", pytest.approx(1.20), "not met")  # max(0.9 / 0.75, 0.85 / 0.85)
    # The library default is what calibration.py measures already: the report says so instead of "measured by".
    assert how and default_how and default_how != how
    assert "    python benchmarks/calibration.py" in text.splitlines()


def test_sweep_refuses_the_calibration_seed_and_bad_candidates():
    with pytest.raises(SystemExit):
        sweep.parse_arguments(["--candidates", "default", "--tuning_seed", "1"])
    with pytest.raises(SystemExit):
        sweep.parse_arguments(["--candidates", "dropout=0.1"])
    args = sweep.parse_arguments(["--size", "smoke", "--candidates", "logit_mixing_alpha=0.7", "--",
                                  "--max_train_steps", "4"])
    assert args.train_args[-2:] == ["--max_train_steps", "4"] and args.num_tuning_images == 64


@pytest.mark.slow
def test_sweep_smoke_run_shares_runs_and_writes_the_report(tmp_path):
    runs = tmp_path / "runs"
    command = [sys.executable, str(SWEEP_SCRIPT), "--size", "smoke", "--work_dir", str(runs), "--results_dir",
               str(tmp_path / "results"), "--num_tuning_images", "8", "--candidates", "logit_mixing_loss_coefficient=2",
               "--", "--max_train_steps", "4", "--num_train_images", "32", "--num_validation_images", "16"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    for folder in ("baseline", "cal-detr", "cal-detr@logit_mixing_loss_coefficient=2"):
        assert (runs / folder / "seed_0" / "metrics.json").is_file()
    config = json.loads((runs / "cal-detr@logit_mixing_loss_coefficient=2" / "seed_0" / "config.json").read_text())
    assert config["logit_mixing_loss_coefficient"] == 2.0
    report = (tmp_path / "results" / "calibration_sweep_smoke.md").read_text()
    table = table_rows(report, "score")
    labels = {re.sub(r" \(.*\)$", "", label) for label in table}
    assert labels == {"baseline", "library default", "logit_mixing_loss_coefficient=2"}
    assert all(len(cells) == 7 for cells in table.values())
    # The tuning split: --num_tuning_images 8 scenes, generation seed 2 (the default --tuning_seed).
    tuning = next(value for name, value in bullets(report).items() if name.startswith("Tuning"))
    assert numbers(tuning) == [8, 2]
    assert "--work_dir" in report and "-- --max_train_steps 4" in report


DIAGNOSTICS_SCRIPT = ROOT / "benchmarks" / "calibration_diagnostics.py"
diagnostics_spec = importlib.util.spec_from_file_location("calibration_diagnostics", DIAGNOSTICS_SCRIPT)
diagnostics = importlib.util.module_from_spec(diagnostics_spec)
diagnostics_spec.loader.exec_module(diagnostics)


def test_diagnostic_statistics_by_hand(tmp_path):
    import torch

    logits = torch.tensor([[[0.0, -2.0], [1.0, -1.0]]])  # sigmoid 0.5, 0.119, 0.731, 0.269: two kept (>= 0.3)
    uncertainty = torch.tensor([[[0.1, 5.0], [0.3, 7.0]]])
    stats = diagnostics.detection_statistics(logits, uncertainty, num_images=2)
    assert stats["per_image"] == 1.0 and stats["share_over_half"] == 1.0
    assert stats["mean_score"] == pytest.approx((0.5 + 1 / (1 + math.exp(-1))) / 2)
    assert stats["top_score"] == pytest.approx(1 / (1 + math.exp(-1)))
    assert stats["mean_logit"] == pytest.approx(0.5) and stats["median_u"] == pytest.approx(0.2)
    assert stats["mean_k"] == pytest.approx(1 - (math.tanh(0.1) + math.tanh(0.3)) / 2)
    empty = diagnostics.detection_statistics(torch.full((1, 2, 2), -3.0), uncertainty, num_images=1)
    assert empty["per_image"] == 0.0 and math.isnan(empty["mean_k"])
    write_run(tmp_path, "baseline", 0, split_metrics(0.1, 0.4), split_metrics(0.1, 0.2))
    write_run(tmp_path, "baseline", 1, split_metrics(0.1, 0.4), split_metrics(0.1, 0.2))
    (tmp_path / "cal-detr" / "seed_0").mkdir(parents=True)  # no metrics.json: unfinished, left out
    assert diagnostics.run_folders(tmp_path) == {"baseline": [tmp_path / "baseline" / "seed_0",
                                                              tmp_path / "baseline" / "seed_1"]}


def fake_result(d_ece):
    """An ``evaluate_model``-style result: the summary metrics and the reliability bins a diagram needs."""
    return {"d_ece": d_ece, "map": 0.4, "map_50": 0.6, "laece": 0.2, "num_detections": 7,
            "bin_counts": [3, 4], "bin_precisions": [0.2, 0.5], "bin_confidences": [0.3, 0.6], "bin_edges": [0.0, 0.5, 1.0]}


def test_reevaluations_are_kept_in_the_run_folder_and_reused(tmp_path, monkeypatch):
    """ensure_posthoc: one re-evaluation per model and source; the record holds every row's numbers and bins, and a
    changed source (another run, other calibration scenes) re-evaluates."""
    write_run(tmp_path, "cal-detr", 0, split_metrics(0.1, 0.4), split_metrics(0.1, 0.2))
    folder = bench.run_folder(tmp_path, "cal-detr", 0)
    calls = []

    def reevaluate_rows(folder_, datasets, calibration, batch_size, calibrators=None, thresholds=False):
        calls.append((Path(folder_), datasets, calibration, sorted(calibrators)))
        return ({"raw": {"in_domain": fake_result(0.1), "out_of_domain": fake_result(0.1)},
                 "temperature scaling": {"in_domain": fake_result(0.05), "out_of_domain": fake_result(0.07)}},
                {"isotonic regression": "too few detections"}, {})

    monkeypatch.setattr(bench, "reevaluate_rows", reevaluate_rows)
    metrics = json.loads((folder / "metrics.json").read_text())
    source = {"version": bench.POSTHOC_VERSION, "calibration": {"seed": 1, "num_images": 3},
              "metrics_sha256": bench.sha256(folder / "metrics.json")}
    get_data = lambda: ({"in_domain": "in", "out_of_domain": "out"}, ["a", "b", "c"])  # noqa: E731
    calibrators = {"temperature scaling": None, "isotonic regression": None}
    record = bench.ensure_posthoc(folder, get_data, 8, metrics, source, calibrators=calibrators)
    assert calls == [(folder, {"in_domain": "in", "out_of_domain": "out"}, ["a", "b", "c"],
                      ["isotonic regression", "temperature scaling"])]
    assert json.loads((folder / bench.POSTHOC_FILE).read_text()) == record
    assert record["calibration"] == {"num_images": 3} and record["failures"] == {
        "isotonic regression": "too few detections"}
    assert record["rows"]["temperature scaling"]["out_of_domain"]["d_ece"] == 0.07
    assert record["reliability"]["raw"]["in_domain"] == {key: fake_result(0.1)[key] for key in bench.RELIABILITY_KEYS}
    # The raw row is checked against train.py's numbers: out-of-domain AP 0.4 re-evaluated, 0.2 in metrics.json.
    assert record["notes"] == ["cal-detr seed 0 out-of-domain: re-evaluated map 0.4000, train.py measured 0.2000"]
    # Reused while the source holds: no model is needed (none exists here).
    assert bench.ensure_posthoc(folder, lambda: pytest.fail("re-evaluated"), 8, metrics, source) == record
    assert len(calls) == 1
    bench.ensure_posthoc(folder, get_data, 8, metrics, {**source, "calibration": {"seed": 2, "num_images": 3}},
                         calibrators=calibrators)
    assert len(calls) == 2


def test_diagnostics_are_kept_in_the_run_folder_and_reused(tmp_path, monkeypatch):
    write_run(tmp_path, "baseline", 0, split_metrics(0.1, 0.4), split_metrics(0.1, 0.2))
    folder = bench.run_folder(tmp_path, "baseline", 0)
    measured = []
    monkeypatch.setattr(diagnostics, "measure", lambda folder_, dataset, batch_size: measured.append(dataset) or {
        "per_image": 2.0, "mean_k": float("nan")})
    first = diagnostics.ensure_statistics(folder, lambda: "scenes", 4, num_images=10, seed=3)
    assert measured == ["scenes"] and first["per_image"] == 2.0 and math.isnan(first["mean_k"])
    again = diagnostics.ensure_statistics(folder, lambda: pytest.fail("measured"), 4, num_images=10, seed=3)
    assert again["per_image"] == 2.0 and measured == ["scenes"]
    diagnostics.ensure_statistics(folder, lambda: "other scenes", 4, num_images=10, seed=4)
    assert measured == ["scenes", "other scenes"]


def test_report_quotes_the_sweep_and_names_the_chosen_settings(tmp_path):
    make_runs(tmp_path / "runs")
    runs = bench.load_runs(tmp_path / "runs", ["baseline", "cal-detr"], [0, 1, 2])
    summary = bench.aggregate(runs)
    sweep_report = tmp_path / "results" / "calibration_sweep_cpu.md"
    sweep_report.parent.mkdir()
    sweep_report.write_text("# title\n\n**Chosen: x**\n\nprose\n\n| run | AP |\n|---|---|\n| baseline | 40.00 |\n")
    sections = bench.embedded(sweep_report, "Hyper-parameters tried", tmp_path / "results")
    # The title, a link to the quoted report, then its bold lines and tables only.
    heading, link, *quoted = [line for line in sections if line]
    assert heading == "## Hyper-parameters tried" and sections[0] == ""
    assert re.search(r"\[calibration_sweep_cpu\.md\]\(calibration_sweep_cpu\.md\)", link)
    assert quoted == ["**Chosen: x**", "| run | AP |", "|---|---|", "| baseline | 40.00 |"]
    assert bench.embedded(tmp_path / "missing.md", "Diagnostics", tmp_path) == []
    text = bench.write_report(tmp_path / "results" / "r.md", summary, bench.judge_goal(summary), ["- setup"], None,
                              [], {"logit_mixing_loss_coefficient": 2.0}, sections)
    # The Cal settings run are named (name=value); without them the report names none.
    assert dict(re.findall(r"\b(\w+)=([-+\d.]+)", text)) == {"logit_mixing_loss_coefficient": "2"}
    plain = bench.write_report(tmp_path / "results" / "p.md", summary, bench.judge_goal(summary), ["- setup"], None,
                               [], None, sections)
    assert re.findall(r"\b(\w+)=([-+\d.]+)", plain) == []
    assert text.index("## Hyper-parameters tried") < text.index("## Setup")


def test_diagnostic_reading_is_read_off_the_numbers():
    means = {"a": {"share_over_half": 0.1, "mean_logit": -0.5, "mean_k": 0.9},
             "b": {"share_over_half": 0.4, "mean_logit": -0.1, "mean_k": 0.8}}
    # Ranges over the arms: share >= 0.5 (%), mean logit, mean K, what K moves a logit by (%, 1 - K).
    text = diagnostics.reading(means)
    assert stated_ranges(text) == pytest.approx([(10.0, 40.0), (-0.50, -0.10), (0.800, 0.900), (10, 20)])
    assert logit_sign(text) == "negative"
    means["b"]["mean_logit"] = 0.2
    mixed = diagnostics.reading(means)
    assert stated_ranges(mixed)[1] == pytest.approx((-0.50, 0.20)) and logit_sign(mixed) == "mixed"
    means["a"]["mean_logit"] = 0.1
    positive = diagnostics.reading(means)
    assert stated_ranges(positive)[1] == pytest.approx((0.10, 0.20)) and logit_sign(positive) == "positive"
    assert len({logit_sign_clause(t) for t in (text, mixed, positive)}) == 3


def stated_ranges(text: str) -> list[tuple[float, float]]:
    """Every ``<low> to <high>`` range of ``text``, as floats."""
    return [(float(low), float(high)) for low, high in re.findall(r"([-+]?\d+(?:\.\d+)?) to ([-+]?\d+(?:\.\d+)?)", text)]


def logit_sign_clause(text: str) -> str:
    """The parenthesis that follows the mean-logit range (the second range) of a diagnostics reading."""
    return re.findall(r"[-+]?\d+(?:\.\d+)? to [-+]?\d+(?:\.\d+)? \(([^)]*)\)", text)[0]


def logit_sign(text: str) -> str:
    """The sign the reading gives the mean logits: negative, positive (in every run) or mixed."""
    clause = logit_sign_clause(text)
    signs = [sign for sign in ("negative", "positive") if sign in clause]
    return signs[0] if len(signs) == 1 else "mixed"


def test_other_reports_are_quoted_by_default_under_the_default_name_only(tmp_path):
    args = bench.parse_arguments(["--results_dir", str(tmp_path)])
    assert args.sweep_report == tmp_path / "calibration_sweep_cpu.md"
    assert args.diagnostics_report == tmp_path / "calibration_cpu_diagnostics.md"
    other = bench.parse_arguments(["--results_dir", str(tmp_path), "--name", "calibration_cpu_long"])
    assert other.sweep_report is None and other.diagnostics_report is None  # another budget's reports
    (tmp_path / "mine.md").write_text("| a |\n")
    assert bench.parse_arguments(["--name", "x", "--diagnostics_report", str(tmp_path / "mine.md")]) \
        .diagnostics_report == tmp_path / "mine.md"
    with pytest.raises(SystemExit):
        bench.parse_arguments(["--sweep_report", str(tmp_path / "missing.md")])


def test_diagnostics_refuse_a_softmax_head(tmp_path):
    from transformers import DetrConfig, DetrForObjectDetection

    from tiny import tiny_detr_kwargs

    DetrForObjectDetection(DetrConfig(**tiny_detr_kwargs())).save_pretrained(tmp_path)
    with pytest.raises(SystemExit, match="softmax head"):
        diagnostics.measure(tmp_path, [], batch_size=4)


def test_run_records_carry_finished_runs_to_another_machine(tmp_path):
    """benchmarks/run_records.py: the record files of finished runs only (no model, no pretraining folder), and a
    restored run is one the benchmark reuses instead of training it again."""
    records_spec = importlib.util.spec_from_file_location("run_records", ROOT / "benchmarks" / "run_records.py")
    records = importlib.util.module_from_spec(records_spec)
    records_spec.loader.exec_module(records)
    work = tmp_path / "work"
    write_run(work, "baseline", 0, split_metrics(0.1, 0.4), split_metrics(0.1, 0.2))
    folder = bench.run_folder(work, "baseline", 0)
    arguments = bench.train_arguments("baseline", 0, folder, ["--max_train_steps", "50"])
    (folder / "benchmark_arguments.json").write_text(json.dumps(arguments))
    (folder / "posthoc.json").write_text('{"rows": {}}')
    (folder / "diagnostics.json").write_text('{"statistics": {}}')
    (folder / "model.safetensors").write_bytes(b"weights")
    (work / "baseline" / "seed_1").mkdir()  # unfinished: no metrics.json
    (work / "pretrained").mkdir()
    (work / "pretrained" / "metrics.json").write_text("{}")  # its model is needed, not only its numbers

    saved = tmp_path / "records"
    assert records.copy_records(work, saved, overwrite=False) == [Path("baseline/seed_0")]
    assert sorted(p.name for p in (saved / "baseline" / "seed_0").iterdir()) == sorted(records.RECORD_FILES)
    assert not (saved / "pretrained").exists()

    fresh = tmp_path / "fresh"
    assert records.copy_records(saved, fresh, overwrite=False) == [Path("baseline/seed_0")]
    restored = fresh / "baseline" / "seed_0"
    for name in records.RECORD_FILES:
        assert (restored / name).read_bytes() == (folder / name).read_bytes()
    # Restored where the arguments name it (the same work dir), the run is reused, not trained again.
    shutil.rmtree(work)
    shutil.copytree(fresh, work)
    assert bench.ensure_run("baseline", 0, work, ["--max_train_steps", "50"]) is False
    # A different run already there is not overwritten silently.
    (restored / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit, match="another run's metrics.json"):
        records.copy_records(saved, fresh, overwrite=False)
    assert records.copy_records(saved, fresh, overwrite=True) == [Path("baseline/seed_0")]
