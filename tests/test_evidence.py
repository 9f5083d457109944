"""benchmarks/evidence.py: one report over the regimes, from run records alone. Oracles: the fine-tuning benchmark's
own aggregation of the committed records (finetune_cpu.json), and hand-made records with hand-computed verdicts,
recommendation and confidence shares."""

import dataclasses
import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("evidence_report", ROOT / "benchmarks" / "evidence.py")
evidence = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = evidence  # dataclasses look their module up there
spec.loader.exec_module(evidence)
bench, finetune = evidence.bench, evidence.finetune

FINETUNE = next(regime for regime in evidence.REGIMES if regime.key == "finetune")


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def test_the_finetune_regime_reproduces_the_benchmarks_own_report():
    """Read from the committed run records, every row's mean, std and range, the verdicts and the recommendation equal
    what benchmarks/finetune.py wrote when it measured them (finetune_cpu.json)."""
    recorded = json.loads((evidence.RESULTS / "finetune_cpu.json").read_text())
    measured = evidence.measure_regime(FINETUNE)
    assert measured["seeds"] == recorded["seeds"] and measured["arms"] == recorded["arms"]
    own_rows = {row: entry for row, entry in recorded["rows"].items() if not row.startswith(finetune.REFERENCE)}
    assert list(measured["summary"]) == list(own_rows)
    for row, entry in own_rows.items():
        for split, by_metric in entry["summary"].items():
            for metric, stat in by_metric.items():
                got = finetune.spread_dict(measured["summary"][row][split][metric])
                assert all(same(got[key], stat[key]) for key in stat), (row, split, metric)
    for verdict in measured["verdicts"]:
        assert verdict.verdict == recorded["goal"][verdict.split]["verdict"]
        assert [list(check) for check in verdict.checks] == recorded["goal"][verdict.split]["checks"]
    assert measured["recommended"] == recorded["recommendation"]["row"]
    # The criterion is the pretrained detector's, as recorded by the benchmark that checked it.
    assert measured["confidence"]["shares"] == [recorded["pretrained"]["confidence"]["share_confident"]]
    assert measured["confidence"]["met"] is recorded["pretrained"]["confidence"]["met"]


# ------------------------------------------------------------------------------------ hand-made run records

ARGUMENTS = {"model_preset": "tiny", "max_train_steps": 50, "learning_rate": 5e-4, "image_size": 96}


def write_record(records: Path, arm: str, seed: int, raw: tuple, stacked: dict, counts: list[int]):
    """One run's record files: ``raw`` = (D-ECE in, AP in, D-ECE out, AP out) in metrics.json and the re-evaluation's
    raw row; ``stacked`` {calibrator: same tuple}; ``counts``: the raw in-domain reliability bins' counts."""
    folder = bench.run_folder(records, arm, seed)
    folder.mkdir(parents=True)

    def splits(values):
        d_in, ap_in, d_out, ap_out = values
        return {"in_domain": {"d_ece": d_in, "map": ap_in, "map_50": 0.8, "laece": 0.1},
                "out_of_domain": {"d_ece": d_out, "map": ap_out, "map_50": 0.5, "laece": 0.2}}

    metrics = {**splits(raw), "run": {"method": arm, "train_steps": 50, "train_seconds": 600.0 + 60 * seed,
                                      "total_seconds": 700.0, "num_processes": 1,
                                      "arguments": {**ARGUMENTS, "method": arm, "seed": seed,
                                                    "output_dir": str(folder)}}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    edges = [round(0.1 * i, 10) for i in range(11)]
    posthoc = {"rows": {"raw": splits(raw), **{name: splits(values) for name, values in stacked.items()}},
               "failures": {}, "notes": [],
               "reliability": {"raw": {"in_domain": {"bin_edges": edges, "bin_counts": counts}}}}
    (folder / "posthoc.json").write_text(json.dumps(posthoc))


def scratch_records(records: Path, cal_in=(0.10, 0.11, 0.12)):
    """Baseline D-ECE 0.20/0.21/0.22 in, 0.30 out; Cal-DETR ``cal_in`` in, 0.24 out; AP 0.5 / 0.3 everywhere but
    baseline + isotonic (AP 0.48 in: 2 points lower, so never recommended though its D-ECE is the lowest)."""
    for seed in range(3):
        write_record(records, "baseline", seed, (0.20 + 0.01 * seed, 0.5, 0.30, 0.3),
                     {"temperature scaling": (0.05, 0.5, 0.27, 0.3), "isotonic regression": (0.01, 0.48, 0.02, 0.3)},
                     counts=[0, 0, 0, 2, 2, 3, 3, 0, 0, 0] if seed else [0, 0, 0, 4, 2, 1, 1, 1, 1, 0])
        write_record(records, "cal-detr", seed, (cal_in[seed], 0.5, 0.24, 0.3),
                     {"temperature scaling": (0.04, 0.5, 0.06, 0.3)}, counts=[0, 0, 0, 1, 1, 1, 1, 0, 0, 0])


def test_a_regime_from_hand_made_records(tmp_path):
    scratch_records(tmp_path / "scratch")
    regime = evidence.Regime("scratch", "From scratch", tmp_path / "scratch", "python make.py", "r.md", "train",
                             "fresh scenes", "trained", "a setting")
    measured = evidence.measure_regime(regime)
    assert measured["arms"] == ["baseline", "cal-detr"] and measured["seeds"] == [0, 1, 2]
    summary = measured["summary"]
    assert list(summary) == ["baseline", "cal-detr", "baseline + temperature scaling",
                             "baseline + isotonic regression", "cal-detr + temperature scaling"]
    # Cal-DETR 0.11 / 0.21 = 0.524x in (beyond the spread: 0.10 > 0.01 + 0.01), 0.24 / 0.30 = 0.8x out (no spread).
    assert bench.d_ece_ratio(summary, "cal-detr", "in_domain") == pytest.approx(0.11 / 0.21)
    assert [v.verdict for v in measured["verdicts"]] == ["met", "met"] and measured["overall"] == "met"
    # Best stacked: baseline + isotonic in-domain (0.01) and out-of-domain (0.02), below every single method.
    assert all("best stacked recipe baseline + isotonic regression" in v.checks[3][0] for v in measured["verdicts"])
    # Recommended: cal-detr + temperature scaling, worst ratio max(0.04 / 0.21, 0.06 / 0.30) = 0.2x; isotonic's AP
    # is 2 points lower in-domain, so it is left out.
    assert measured["recommended"] == "cal-detr + temperature scaling"
    assert measured["recommendation"][0].startswith("**Recommendation (read off these numbers): train with "
                                                    "`--method cal-detr`, then fit temperature scaling on fresh scenes**")
    assert "0.20x" in measured["recommendation"][0]
    # Confidence: the baseline's bins from 0.5 up: seed 0 (1+1+1+1) / 10 = 0.4, seeds 1-2 6 / 10 = 0.6: not met.
    assert measured["confidence"]["shares"] == pytest.approx([0.4, 0.6, 0.6])
    assert measured["confidence"]["met"] is False
    assert measured["train_minutes"] == {arm: {"fastest": pytest.approx(10.0), "mean": pytest.approx(11.0)}
                                        for arm in ("baseline", "cal-detr")}
    # Cal-DETR 0.19 / 0.21 = 0.905x in-domain: not met there.
    scratch_records(tmp_path / "weak", cal_in=(0.18, 0.19, 0.20))
    weak = evidence.measure_regime(dataclasses.replace(regime, records=tmp_path / "weak"))
    assert [v.verdict for v in weak["verdicts"]] == ["not met", "met"]
    assert [ok for _, ok in weak["verdicts"][0].checks] == [False, False, True, True]


def test_the_report_states_each_regime_and_the_missing_ones(tmp_path, monkeypatch):
    scratch_records(tmp_path / "scratch")
    evidence.main(["--results_dir", str(tmp_path / "results"), "--scratch_long_records", str(tmp_path / "scratch"),
                   "--finetune_records", str(tmp_path / "nothing")])
    text = (tmp_path / "results" / "evidence_cpu.md").read_text()
    record = json.loads((tmp_path / "results" / "evidence_cpu.json").read_text())
    assert record["finetune"] is None and record["scratch_long"]["overall"] == "met"
    overview = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
                for line in text.splitlines() if line.startswith("| ") and "regime" not in line}
    assert overview["Fine-tuning a converged detector"][0] == "not measured"
    assert overview["From scratch until confident (9000 steps)"] == [
        "3", "0.52x / 0.80x", "met / met", "`cal-detr + temperature scaling`: 0.19x / 0.20x", "no"]
    assert record["scratch_long"]["rows"]["cal-detr"]["d_ece_ratio_to_baseline"]["out_of_domain"] == pytest.approx(0.8)
    assert "Interim" not in text
    # With one seed recorded, the regime's section says it is interim; the goal cannot hold without a spread.
    for arm in ("baseline", "cal-detr"):
        for seed in (1, 2):
            shutil.rmtree(bench.run_folder(tmp_path / "scratch", arm, seed))
    evidence.main(["--results_dir", str(tmp_path / "results"), "--scratch_long_records", str(tmp_path / "scratch"),
                   "--finetune_records", str(tmp_path / "nothing")])
    text = (tmp_path / "results" / "evidence_cpu.md").read_text()
    assert "**Interim: 1 of the 3 seeds" in text
    assert json.loads((tmp_path / "results" / "evidence_cpu.json").read_text())["scratch_long"]["overall"] == "not met"
    scratch_records(tmp_path / "again")
    # A recorded run without its re-evaluation is refused, naming the command that makes it.
    (bench.run_folder(tmp_path / "again", "cal-detr", 1) / "posthoc.json").unlink()
    with pytest.raises(SystemExit, match="benchmarks/calibration.py"):
        evidence.main(["--results_dir", str(tmp_path / "results"), "--scratch_long_records",
                       str(tmp_path / "again"), "--finetune_records", str(tmp_path / "nothing")])
