"""Cal-DETR when fine-tuning: one confident pretrained detector, every method fine-tuned from it on a shifted task.

    python benchmarks/finetune.py --size smoke       # about 2 minutes on a 2-core CPU: checks the pipeline only
    python benchmarks/finetune.py --size cpu         # the real one: about 3 hours on a 2-core CPU (estimate below)
    python benchmarks/finetune.py --size cpu --arms baseline cal-detr --seeds 0 -- --learning_rate 5e-5

Every row of the report comes from this one command; rerun it after an interruption and it resumes.

Design (stated again in the report):

- **Pretraining.** One stock (``--method baseline``) detector trained from scratch on the embedded digits default
  (``examples/train.py``, ``--calibrator none``) into ``<work_dir>/pretrained/``, once: every arm and seed
  fine-tunes from that folder (``--model_name_or_path``), and a later invocation reuses it. cpu size: train.py's
  default model and data (small preset, 4000 scenes, batch 8, learning rate 1e-3) for 9000 steps, the budget at
  which ``benchmarks/results/calibration_cpu_long_diagnostics.md`` measured 60 % of the counted detections at
  score >= 0.5 (3000 steps: 11 %).
- **Confidence criterion.** The pretrained detector is *confident* when at least half (``CONFIDENT_SHARE``) of the
  detections D-ECE counts (post-processed detections with score >= 0.3 in images with ground truth, the Cal-DETR
  protocol) on its own in-domain validation scenes (the 500 source validation scenes; smoke: 16) score >= 0.5.
  Checked after pretraining and recorded (``<work_dir>/pretrained/confidence.json``, and the report). When it is
  not met the script says so, marks the report, and goes on (the smoke size never meets it: 40 steps of the tiny
  model detect nothing); ``--require_confident`` stops instead, and ``--pretrain_steps`` extends the schedule (a
  new pretraining, since the steps are part of the pretrained folder's recorded arguments).
- **Target task (the shift).** The same ten digit classes (so the pretrained head is kept whole and the arms differ
  only in the fine-tuning loss, not in a freshly initialised head), restyled by the generator's ``style="ink"``:
  coloured ink on light tinted paper, digits *darker* than the background where pretraining only saw bright digits
  on dark canvases, with new layouts (generation seed ``TARGET_SEED``, not the source's 0). Saved as a
  ``save_to_disk`` folder (``<work_dir>/target_.../``) with splits ``train`` (train-split source digits),
  ``validation`` (the evaluation scenes: validation-split source digits, none in any training scene) and
  ``heldout``; train.py reads it with ``--dataset_name``.
- **Evaluation.** The target ``validation`` scenes (in-domain) and their corrupted copy (out-of-domain: one of 15
  corruptions at severity 1-5 per scene, train.py's ``--corruption_seed`` 0), exactly as train.py measures them.
- **Held-out scenes.** ``heldout``: fresh target scenes from the train-split source digits with another generation
  seed (``HELDOUT_SEED``), neither training nor evaluation scenes. The post-hoc calibrators are fitted there, and
  the per-class LRP-optimal thresholds of the second protocol are found there, per row (with that row's scores);
  never on the evaluation scenes. The report's JSON records each split's generation (source-digit split, seed,
  count) and a fingerprint of every scene.
- **Fine-tuning.** Every arm (``baseline``, ``cal-detr``, ``released``, ``modulation-only``, ``mixing-only``) x seed
  runs train.py with identical arguments but ``--method`` and ``--seed`` (checked), ``--calibrator none`` (each arm
  measured as trained). cpu size: 1500 steps of batch 8 on 2000 target scenes (6 epochs), train.py's fine-tuning
  learning rate 1e-4 (cosine, 50 warm-up steps); smoke: 10 steps of batch 4 on 32 scenes.
- **Stacked rows.** Every fine-tuned model + temperature scaling, + Platt scaling, + isotonic regression (class-
  agnostic, fitted on the held-out scenes' counted detections), measured on the same evaluation scenes. The
  pretrained model itself, not fine-tuned (raw and with the same calibrators), is shown as a reference, outside
  the goal and the recommendation.

Resumability: the pretraining and each run go through ``benchmarks/calibration.py``'s ``ensure_run``: a folder with
a finished ``metrics.json`` is reused (refused if it was made with other arguments), an unfinished one is resumed
with train.py ``--resume_from_checkpoint latest`` (from its newest complete ``step_N`` checkpoint). Each run's
re-evaluation (the stacked rows and the LRP-threshold protocol) is kept in its ``posthoc.json`` next to the
``metrics.json`` it was made from (redone when that file changes). Seeds are the outer loop, and the report is
rewritten after each seed's runs, so a long benchmark has a (marked interim) report early.

Output: ``<results_dir>/<name>.md``, ``<name>.json`` (every number of the report, per seed, with the files it was
read from) and ``<name>_reliability.png``; ``<name>`` defaults to ``finetune_<size>``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibration as bench  # noqa: E402  (benchmarks/calibration.py: runs, aggregation, report helpers)

ROOT = bench.ROOT
ARMS = bench.ARMS
SPLITS = bench.SPLITS
SPLIT_NAMES = bench.SPLIT_NAMES
GOAL_D_ECE_RATIO = bench.GOAL_D_ECE_RATIO
GOAL_AP_DROP = bench.GOAL_AP_DROP

# The confidence criterion: at least this share of the counted detections (score >= 0.3) score >= CONFIDENT_SCORE.
CONFIDENT_SHARE = 0.5
CONFIDENT_SCORE = 0.5
# The target task: the generator's ink style, new layouts, and held-out scenes of their own seed.
TARGET_STYLE = "ink"
TARGET_SEED = 100
HELDOUT_SEED = 101
HELDOUT_SPLIT = "heldout"
# Rows stacked on every fine-tuned model (and on the pretrained reference), in this order; the metrics reported.
STACKED = bench.STACKED
REFERENCE = "pretrained, not fine-tuned"
REPORT_METRICS = bench.REPORT_METRICS
POSTHOC_FILE = bench.POSTHOC_FILE
POSTHOC_VERSION = 1  # bump when this re-evaluation changes, so every posthoc.json is redone


@dataclass(frozen=True)
class Target:
    """The target task's scenes: counts of each split and their side in pixels."""

    num_train: int
    num_validation: int
    num_heldout: int
    image_size: int = 96


@dataclass(frozen=True)
class Size:
    pretrain_args: tuple[str, ...]
    finetune_args: tuple[str, ...]
    target: Target
    seeds: tuple[int, ...]
    expected: str


SIZES = {
    # The pipeline only: the tiny model after 40 steps detects nothing, so no number here means anything.
    "smoke": Size(("--model_preset", "tiny", "--max_train_steps", "40", "--num_warmup_steps", "5",
                   "--num_train_images", "64", "--num_validation_images", "16", "--per_device_train_batch_size", "4",
                   "--per_device_eval_batch_size", "16", "--checkpointing_steps", "20"),
                  ("--max_train_steps", "10", "--num_warmup_steps", "2", "--per_device_train_batch_size", "4",
                   "--per_device_eval_batch_size", "16", "--checkpointing_steps", "5"),
                  Target(32, 16, 16), (0,), "about 2 minutes on a 2-core CPU"),
    # Pretraining: train.py's defaults for 9000 steps; fine-tuning: 1500 steps at train.py's fine-tuning rate.
    "cpu": Size(("--max_train_steps", "9000"),
                ("--max_train_steps", "1500", "--num_warmup_steps", "50"),
                Target(2000, 500, 500), (0, 1, 2),
                "about 3 hours on a 2-core CPU (not yet run; estimated from benchmarks/results/calibration_cpu*.md: "
                "pretraining 9000 steps about 40 min, 15 fine-tunings of 1500 steps about 5-10 min each, the "
                "re-evaluations about 15 min)"),
}


# ------------------------------------------------------------------------------------------------ target data


def fingerprint(image: np.ndarray) -> str:
    """A scene's identity: the first 16 hex digits of the SHA-1 of its pixels."""
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()[:16]


def target_splits(target: Target) -> dict[str, dict]:
    """How each split of the target task is generated: source-digit split, generation seed, count, style."""
    common = {"style": TARGET_STYLE, "image_size": target.image_size}
    return {"train": {"digits": "train", "seed": TARGET_SEED, "num_images": target.num_train, **common},
            "validation": {"digits": "validation", "seed": TARGET_SEED, "num_images": target.num_validation, **common},
            HELDOUT_SPLIT: {"digits": "train", "seed": HELDOUT_SEED, "num_images": target.num_heldout, **common}}


def target_folder(work_dir: Path, target: Target) -> Path:
    """A folder named by everything that makes the target data, so runs on other data never share arguments."""
    return work_dir / (f"target_{TARGET_STYLE}_{target.image_size}px_{target.num_train}-{target.num_validation}-"
                       f"{target.num_heldout}_seeds{TARGET_SEED}-{HELDOUT_SEED}")


def ensure_target_data(work_dir: Path, target: Target) -> tuple[Path, dict]:
    """Generate (once) and save the target task; returns its folder and its manifest (``target.json``: each
    split's generation and the fingerprint of every scene, in image-id order)."""
    from datasets import DatasetDict

    from hf_caldetr.data.digits import generate_digit_scenes, scenes_to_dataset

    folder = target_folder(work_dir, target)
    manifest_path = folder / "target.json"
    specs = target_splits(target)
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("splits") == {name: {**spec, "fingerprints": manifest["splits"].get(name, {}).get("fingerprints")}
                                      for name, spec in specs.items()}:
            return folder, manifest
        raise SystemExit(f"{folder} holds other target data than this version of the script makes; delete it")
    splits, manifest = {}, {"splits": {}}
    for name, spec in specs.items():
        scenes = generate_digit_scenes(spec["num_images"], spec["digits"], spec["image_size"], spec["seed"],
                                       style=spec["style"])
        splits[name] = scenes_to_dataset(scenes)
        manifest["splits"][name] = {**spec, "fingerprints": [fingerprint(image) for image in scenes.images]}
    overlap = set(manifest["splits"][HELDOUT_SPLIT]["fingerprints"]) & set(
        manifest["splits"]["validation"]["fingerprints"] + manifest["splits"]["train"]["fingerprints"])
    if overlap:
        raise SystemExit(f"held-out scenes that are also training or evaluation scenes: {sorted(overlap)[:5]}")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    DatasetDict(splits).save_to_disk(str(partial))
    (partial / "target.json").write_text(json.dumps(manifest))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder, manifest


# ---------------------------------------------------------------------------------------------------- training


def pretrain_arguments(args) -> list[str]:
    return [*args.size.pretrain_args, *(["--max_train_steps", str(args.pretrain_steps)] if args.pretrain_steps else [])]


def finetune_arguments(args, target_dir: Path, pretrained: Path) -> list[str]:
    """train.py arguments shared by every fine-tuning run (method, seed and folder are added per run)."""
    steps = ["--max_train_steps", str(args.finetune_steps)] if args.finetune_steps else []
    return [*args.size.finetune_args, *steps, *args.passthrough, "--dataset_name", str(target_dir.resolve()),
            "--image_size", str(args.size.target.image_size), "--model_name_or_path", str(pretrained.resolve())]


def check_confidence(pretrained: Path, batch_size: int) -> dict:
    """The confidence criterion on the pretrained model's in-domain (source validation) scenes; cached in
    ``confidence.json`` next to the ``metrics.json`` it belongs to (redone when that changes)."""
    source = {"metrics_sha256": bench.sha256(pretrained / "metrics.json")}
    return bench.cached_record(pretrained / "confidence.json", source,
                               lambda: measure_confidence(pretrained, batch_size, source))


def measure_confidence(pretrained: Path, batch_size: int, source: dict) -> dict:
    """:func:`check_confidence`'s record, measured."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    from hf_caldetr.data import make_collate_fn
    from hf_caldetr.data.arguments import load_splits
    from hf_caldetr.evaluation import collect_matches

    arguments = json.loads((pretrained / "metrics.json").read_text())["run"]["arguments"]
    (validation,) = load_splits(bench.data_arguments(arguments), ("validation",))
    accelerator = Accelerator()
    model = accelerator.prepare_model(AutoModelForObjectDetection.from_pretrained(pretrained), evaluation_mode=True)
    processor = AutoImageProcessor.from_pretrained(pretrained)
    loader = accelerator.prepare(DataLoader(validation, batch_size=batch_size, collate_fn=make_collate_fn(processor)))
    scores = collect_matches(model, loader, processor, accelerator).scores
    share = float(np.mean(scores >= CONFIDENT_SCORE)) if len(scores) else float("nan")
    return {"source": source,
            "scenes": f"{len(validation)} source validation scenes (digits default, data seed "
                      f"{arguments['data_seed']}), the pretraining's in-domain split",
            "counted_detections": int(len(scores)), "share_confident": share,
            "mean_score": float(np.mean(scores)) if len(scores) else float("nan"),
            "criterion": f"at least {100 * CONFIDENT_SHARE:.0f} % of the counted detections (score >= 0.3, images "
                         f"with ground truth) score >= {CONFIDENT_SCORE}",
            "met": bool(share >= CONFIDENT_SHARE)}


# ------------------------------------------------------------------------------------------------ re-evaluation


class EvaluationData:
    """The target evaluation splits and the held-out scenes, loaded on first use (a resumed benchmark whose
    re-evaluations are all recorded never loads them)."""

    def __init__(self, arguments: dict, heldout_fingerprints: list[str]):
        self.arguments, self.heldout = arguments, heldout_fingerprints
        self._data = None

    def get(self):
        if self._data is None:
            self._data = bench.evaluation_data(self.arguments, 0, HELDOUT_SEED, HELDOUT_SPLIT)
        return self._data


def ensure_posthoc(folder: Path, data: EvaluationData, batch_size: int, metrics: dict | None) -> dict:
    """The re-evaluation of one saved model (``folder``): raw and stacked rows, each with the LRP-threshold protocol
    (thresholds found on the held-out scenes), kept in ``posthoc.json`` (``calibration.ensure_posthoc``); redone
    only when the model's ``metrics.json``, the held-out scenes or this re-evaluation changed. ``metrics``: train.py's
    numbers of the run, which the raw re-evaluation must reproduce (``notes`` says where it does not); None for the
    pretrained reference."""
    source = {"version": POSTHOC_VERSION, "metrics_sha256": bench.sha256(folder / "metrics.json"),
              "heldout_sha256": hashlib.sha256("".join(data.heldout).encode()).hexdigest(), "rows": list(STACKED)}
    return bench.ensure_posthoc(folder, data.get, batch_size, metrics, source, calibrators=bench.default_calibrators(),
                                thresholds=True, calibration_name=HELDOUT_SPLIT)


# ---------------------------------------------------------------------------------------------------- verdict


def is_stacked(row: str) -> bool:
    return " + " in row and not row.startswith(REFERENCE)


@dataclass(frozen=True)
class Verdict:
    split: str
    verdict: str  # met, not met, not evaluated
    checks: tuple[tuple[str, bool], ...]


def judge_split(summary: dict, split: str) -> Verdict:
    """Issue 15's goal in one domain: Cal-DETR's mean D-ECE at most 0.75x (in-domain) / 0.85x (out-of-domain) the
    baseline's and lower beyond the seed spread, its AP at most 1 point lower; the best stacked row's D-ECE lower
    than every single method's (the raw arms)."""
    name = SPLIT_NAMES[split]
    if any(split not in summary.get(arm, {}) for arm in ("baseline", "cal-detr")):
        return Verdict(split, "not evaluated", ((f"{name}: the baseline and cal-detr arms are both needed", False),))
    base, cal = summary["baseline"][split], summary["cal-detr"][split]
    ratio = bench.d_ece_ratio(summary, "cal-detr", split)
    spread = bench.compare(cal["d_ece"], base["d_ece"])
    ap_change = cal["map"].mean - base["map"].mean
    checks = [(f"D-ECE: Cal-DETR {bench.pct(cal['d_ece'].mean)} vs baseline {bench.pct(base['d_ece'].mean)} = "
               f"{ratio:.2f}x (goal <= {GOAL_D_ECE_RATIO[split]}x)", bool(ratio <= GOAL_D_ECE_RATIO[split])),
              (f"the D-ECE difference is {spread} (goal: lower beyond it, mean difference larger than the two "
               "standard deviations added)",
               spread == "beyond the seed spread" and cal["d_ece"].mean < base["d_ece"].mean),
              (f"AP: Cal-DETR {bench.pct(cal['map'].mean)} vs baseline {bench.pct(base['map'].mean)} "
               f"({100 * ap_change:+.2f} points; goal: at most 1 point lower)",
               bool(ap_change >= -GOAL_AP_DROP - 1e-12))]
    singles = {row: summary[row][split]["d_ece"].mean for row in ARMS if split in summary.get(row, {})}
    stacked = {row: values[split]["d_ece"].mean for row, values in summary.items()
               if is_stacked(row) and split in values and np.isfinite(values[split]["d_ece"].mean)}
    if stacked and singles:
        best = min(stacked, key=stacked.get)
        best_single = min(singles, key=lambda row: singles[row] if np.isfinite(singles[row]) else np.inf)
        checks.append((f"best stacked recipe {best} D-ECE {bench.pct(stacked[best])} vs the best single method "
                       f"{best_single} {bench.pct(singles[best_single])} (goal: lower than every single method)",
                       bool(all(stacked[best] < value for value in singles.values()))))
    else:
        checks.append(("no stacked row measured", False))
    return Verdict(split, "met" if all(ok for _, ok in checks) else "not met", tuple(checks))


def recommend(summary: dict, seeds_count: int, confident: bool, train: str = "fine-tune",
              heldout: str = "held-out target scenes", trained: str = "fine-tuned",
              unconfident: str = "The pretrained detector did not meet the confidence criterion: this is not the "
                                 "confident fine-tuning regime the benchmark is meant to measure.") -> tuple[str | None,
                                                                                                          list[str]]:
    """The recipe a user should follow, from the numbers: among the trained rows (each arm, alone or + a post-hoc
    calibrator) whose mean AP is at most 1 point below the baseline's in both domains, the one with the lowest
    worst-domain D-ECE ratio to the baseline. Returns the row and the report's lines. ``train``, ``heldout``,
    ``trained`` and ``unconfident``: the regime's words (how the models were trained, what the calibrators were
    fitted on, and what to say when the detector was not confident)."""
    if "baseline" not in summary or any(split not in summary["baseline"] for split in SPLITS):
        return None, ["No recommendation: the baseline was not measured in both domains."]
    base = summary["baseline"]
    scores = {}
    for row, values in summary.items():
        if row.startswith(REFERENCE) or any(split not in values for split in SPLITS):
            continue
        ratios = [bench.d_ece_ratio(summary, row, split) for split in SPLITS]
        keeps_ap = all(values[split]["map"].mean >= base[split]["map"].mean - GOAL_AP_DROP - 1e-12 for split in SPLITS)
        if keeps_ap and all(np.isfinite(ratios)):
            scores[row] = (max(ratios), float(np.mean(ratios)))
    if not scores:
        return None, ["No recommendation: no recipe kept its AP within 1 point of the baseline's with D-ECE measured "
                      "in both domains."]
    ranked = sorted(scores, key=scores.get)
    best = ranked[0]
    arm, _, calibrator = best.partition(" + ")
    recipe = f"{train} with `--method {arm}`" + (
        f", then fit {calibrator} on {heldout}" if calibrator else ", no post-hoc calibrator")
    lines = [f"**Recommendation (read off these numbers): {recipe}** (row `{best}`): the lowest worst-domain D-ECE "
             f"ratio to the baseline, {scores[best][0]:.2f}x, among the {len(scores)} {trained} recipes whose AP "
             "stays within 1 point of the baseline's in both domains."]
    for split in SPLITS:
        values = summary[best][split]
        lines.append(f"- {SPLIT_NAMES[split]}: D-ECE {bench.pct(base[split]['d_ece'].mean)} -> "
                     f"{bench.pct(values['d_ece'].mean)} ({bench.d_ece_ratio(summary, best, split):.2f}x, "
                     f"{bench.compare(values['d_ece'], base[split]['d_ece'])}), AP "
                     f"{100 * (values['map'].mean - base[split]['map'].mean):+.2f} points.")
    if len(ranked) > 1:
        second = ranked[1]
        against = "; ".join(
            f"{SPLIT_NAMES[split]} {bench.compare(summary[second][split]['d_ece'], summary[best][split]['d_ece'])}"
            for split in SPLITS)
        lines.append(f"- Runner-up `{second}` ({scores[second][0]:.2f}x); its D-ECE against the recommended one's: "
                     f"{against}.")
    if seeds_count < 2:
        lines.append("- One seed: no spread to judge by; rerun with 3 seeds before relying on this.")
    if not confident:
        lines.append(f"- {unconfident}")
    if base["in_domain"]["map_50"].mean < bench.MEANINGFUL_AP50:
        lines.append(f"- The {trained} baseline's AP50 in-domain is {bench.pct(base['in_domain']['map_50'].mean)} %, "
                     "below 50 %: not a meaningful detector, so the calibration differences say little.")
    return best, lines


# ------------------------------------------------------------------------------------------------------ report


def spread_dict(stat) -> dict:
    return asdict(stat)


def design_lines(args, manifest: dict, confidence: dict, pretrained_run: dict) -> list[str]:
    splits = manifest["splits"]

    def described(name):
        spec = splits[name]
        return (f"`{name}`: {spec['num_images']} scenes, {spec['digits']}-split source digits, generation seed "
                f"{spec['seed']}")

    pre = pretrained_run["arguments"]
    return [
        f"- Pretraining: one stock detector (`--method baseline`, seed {pre['seed']}) trained from scratch on the "
        f"embedded digits default ({pre['num_train_images']} scenes at {pre['image_size']} px, data seed "
        f"{pre['data_seed']}): {pretrained_run['train_steps']} steps of batch {pre['per_device_train_batch_size']}, "
        f"learning rate {pre['learning_rate']}, preset `{pre['model_preset']}`; saved once in "
        f"`{shown(args.pretrained)}` and fine-tuned from by every run.",
        f"- Confidence criterion: {confidence['criterion']}, on {confidence['scenes']}: "
        f"{bench.pct(confidence['share_confident'])} % of {confidence['counted_detections']} counted detections "
        f"(mean score {confidence['mean_score']:.3f}): **{'met' if confidence['met'] else 'NOT met'}**"
        + ("" if confidence["met"] else " (the script goes on; --require_confident stops, --pretrain_steps extends)")
        + ".",
        f"- Target task: the same ten digit classes in the generator's `{TARGET_STYLE}` style (coloured ink on "
        "light tinted paper: digits darker than the background, where pretraining saw bright digits on dark "
        f"canvases), new layouts; {described('train')} (fine-tuning), {described('validation')} (evaluation, "
        f"in-domain; none of its source digits in any training scene), {described(HELDOUT_SPLIT)} (held out).",
        "- Out-of-domain: the target validation scenes, each with one of 15 corruptions at severity 1-5 "
        "(train.py's corruption seed).",
        f"- Held out: the `{HELDOUT_SPLIT}` scenes fit the class-agnostic post-hoc calibrators (on their counted "
        "detections) and give the per-class LRP-optimal thresholds of the second protocol, per row; never the "
        "evaluation scenes (disjoint generation and source digits; the fingerprints of every split are in the "
        "JSON report).",
        "- Fine-tuning: every arm and seed with identical train.py arguments but `--method` and `--seed`, "
        "`--calibrator none`; schedule under Setup.",
        f"- Goal (issue 15), per domain: Cal-DETR's mean D-ECE <= {GOAL_D_ECE_RATIO['in_domain']}x the baseline's "
        f"in-domain and <= {GOAL_D_ECE_RATIO['out_of_domain']}x out-of-domain, lower beyond the seed spread (mean "
        "difference larger than the two standard deviations added), AP at most 1 point lower; and the best stacked "
        "recipe's mean D-ECE lower than every single method's.",
    ]


def shown(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def setup_lines(args, runs: dict, command: str, seeds_done: list[int]) -> list[str]:
    first = next(iter(runs.values()))[0]["run"]
    arguments = first["arguments"]
    lines = [f"- Machine: {bench.machine()}",
             f"- Size: {args.size_name} (expected run time: {args.size.expected})",
             f"- Fine-tuning: {first['train_steps']} optimizer steps, batch {arguments['per_device_train_batch_size']}"
             f" x {first['num_processes']} process(es), learning rate {arguments['learning_rate']} "
             f"({arguments['lr_scheduler_type']}, {arguments['num_warmup_steps']} warm-up steps), images "
             f"{arguments['image_size']} px, from `{shown(Path(arguments['model_name_or_path']))}`",
             f"- Seeds: {', '.join(map(str, seeds_done))}" + (
                 f" (interim: {', '.join(map(str, args.seeds))} asked)" if seeds_done != args.seeds else ""),
             f"- Commit: `{bench.git_commit()}`", f"- Command: `{command}`",
             f"- Runs: `{shown(args.work_dir / 'runs')}/<arm>/seed_<s>/` (metrics.json: train.py; posthoc.json: the "
             "stacked rows and the LRP-threshold protocol)", "",
             "| arm | Cal settings (config.json) | train s / run | total s / run |", "|---|---|---|---|"]
    for arm, arm_runs in runs.items():
        config = json.loads((bench.run_folder(args.work_dir / "runs", arm, seeds_done[0]) / "config.json").read_text())
        settings = bench.settings_text(config)
        times = [np.mean([m["run"][key] for m in arm_runs]) for key in ("train_seconds", "total_seconds")]
        lines.append(f"| {arm} | {settings} | {times[0]:.0f} | {times[1]:.0f} |")
    return lines


def write_outputs(args, command: str, seeds_done: list[int], manifest: dict, confidence: dict,
                  pretrained_run: dict, reference: dict) -> dict:
    """Aggregate the recorded runs of ``seeds_done`` and write the markdown, JSON and diagram; returns the JSON."""
    runs_dir = args.work_dir / "runs"
    runs = bench.load_runs(runs_dir, args.arms, seeds_done)  # also checks that only method and seed differ
    rows, notes, _ = bench.recorded_rows(runs_dir, args.arms, seeds_done, runs)
    per_row = {row: [{"seed": seed, "folder": shown(folder), "values": values,
                      "sources": {"metrics.json": shown(folder / "metrics.json"),
                                  "posthoc.json": shown(folder / POSTHOC_FILE)}}
                     for seed, folder, values in entries]
               for row, entries in rows.items()}
    for row in ("raw", *STACKED):  # the reference after the arms' rows
        if row in reference["rows"]:
            per_row[REFERENCE + ("" if row == "raw" else f" + {row}")] = [{
                "seed": None, "folder": shown(args.pretrained), "values": bench.row_values(None, reference, row),
                "sources": {"posthoc.json": shown(args.pretrained / POSTHOC_FILE)}}]
    notes += [f"{REFERENCE}: {name} not fitted: {why}" for name, why in reference["failures"].items()]
    summary = bench.aggregate({row: [entry["values"] for entry in entries] for row, entries in per_row.items()},
                              metrics=REPORT_METRICS)
    verdicts = [judge_split(summary, split) for split in SPLITS]
    overall = ("not evaluated" if any(v.verdict == "not evaluated" for v in verdicts) else
               "met" if all(v.verdict == "met" for v in verdicts) else "not met")
    recommended, recommendation = recommend(summary, len(seeds_done), confidence["met"])

    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    diagram = f"{args.name}_reliability.png"
    panels = []
    for split in SPLITS:
        for arm in dict.fromkeys(["baseline", "cal-detr", *([recommended] if recommended else [])]):
            model_arm, _, row = arm.partition(" + ")
            if model_arm not in args.arms:
                continue
            posthoc = json.loads((bench.run_folder(runs_dir, model_arm, seeds_done[0]) / POSTHOC_FILE).read_text())
            bins = posthoc["reliability"].get(row or "raw", {}).get(split)
            if bins:
                panels.append((bins, f"{arm}, {SPLIT_NAMES[split]} (seed {seeds_done[0]})"))
    if panels:
        from hf_caldetr.metrics import plot_reliability_diagram

        plot_reliability_diagram([bins for bins, _ in panels], results_dir / diagram, titles=[t for _, t in panels])

    interim = seeds_done != args.seeds
    heading = "**Goal (issue 15), fine-tuning from a pretrained detector: " + overall + ".**" + (
        f" Interim report: seeds {seeds_done} of {args.seeds}." if interim else "")
    lines = [f"# Cal-DETR fine-tuning benchmark: {args.name}", "", heading, ""]
    for verdict in verdicts:
        scenes = "target validation scenes" if verdict.split == "in_domain" else "their corrupted copy"
        lines.append(f"- {SPLIT_NAMES[verdict.split]} ({scenes}): **{verdict.verdict}**")
        lines += [f"  - {text}: {'yes' if ok else 'no'}" for text, ok in verdict.checks]
    lines += ["", f"- Pretrained detector confident ({confidence['criterion']}): "
                  f"{'yes' if confidence['met'] else 'no'}, {bench.pct(confidence['share_confident'])} %.", "",
              *recommendation, "",
              "Percent, mean ± standard deviation over seeds (D-ECE: 10 bins, detections with score >= 0.3; AP: COCO "
              "AP@[.5:.95]). Rows with `+` stack a post-hoc calibrator fitted on the held-out target scenes on the "
              f"fine-tuned model; `{REFERENCE}` rows measure the pretrained detector itself (context only).", "",
              *bench.results_table(summary), "",
              *bench.metric_section(summary, "the held-out scenes"), "",
              "## Spread over seeds and ratio to the baseline", "", *bench.spread_table(summary), "",
              "## Analysis", "", *bench.analysis(summary, bench.judge_goal(summary)), ""]
    if panels:
        lines += ["## Reliability diagram", "", f"![baseline, Cal-DETR and the recommended recipe]({diagram})", ""]
    lines += ["## Design", "", *design_lines(args, manifest, confidence, pretrained_run), "",
              "## Setup", "", *setup_lines(args, runs, command, seeds_done)]
    if notes:
        lines += ["", "## Notes", "", *[f"- {note}" for note in notes]]
    (results_dir / f"{args.name}.md").write_text("\n".join(lines) + "\n")

    record = {
        "name": args.name, "size": args.size_name, "command": command, "commit": bench.git_commit(),
        "seeds": seeds_done, "seeds_asked": args.seeds, "interim": interim, "arms": args.arms,
        "goal": {"overall": overall, **{v.split: {"verdict": v.verdict, "checks": [list(c) for c in v.checks]}
                                       for v in verdicts}},
        "recommendation": {"row": recommended, "text": recommendation},
        "pretrained": {"folder": str(args.pretrained.resolve()), "confidence": confidence,
                       "train_steps": pretrained_run["train_steps"], "arguments": pretrained_run["arguments"]},
        "target": {"folder": str(target_folder(args.work_dir, args.size.target).resolve()), **manifest},
        "rows": {row: {"runs": entries, "summary": {split: {metric: spread_dict(stat) for metric, stat in by.items()}
                                                    for split, by in summary[row].items()},
                       "d_ece_ratio_to_baseline": {split: bench.d_ece_ratio(summary, row, split) for split in SPLITS}}
                 for row, entries in per_row.items()},
        "notes": notes, "diagram": diagram if panels else None,
    }
    (results_dir / f"{args.name}.json").write_text(json.dumps(record, indent=2))
    return record


# -------------------------------------------------------------------------------------------------------- main


def parse_arguments(argv: list[str]):
    own, passthrough = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu",
                        help="the budget: smoke (about 2 minutes on a CPU; checks the pipeline, detects nothing) or "
                             "cpu (about 3 hours on a 2-core CPU) (default: %(default)s)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                        help="the train.py --method of each fine-tuning arm (default: all five)")
    parser.add_argument("--seeds", nargs="+", type=int,
                        help="train.py --seed of the fine-tuning runs of every arm (default: the size's: smoke 0; "
                             "cpu 0 1 2)")
    parser.add_argument("--pretrain_seed", type=int, default=0,
                        help="train.py --seed of the one pretraining run (default: %(default)s)")
    parser.add_argument("--pretrain_steps", type=int,
                        help="optimizer steps of the pretraining (default: the size's: smoke 40, cpu 9000); another "
                             "value is another pretraining (a new --work_dir, or the old runs are refused)")
    parser.add_argument("--finetune_steps", type=int,
                        help="optimizer steps of each fine-tuning run (default: the size's: smoke 10, cpu 1500)")
    parser.add_argument("--require_confident", action="store_true",
                        help="stop after pretraining when the pretrained detector does not meet the confidence "
                             "criterion, instead of going on and marking the report (default: off)")
    parser.add_argument("--name", help="report name: <results_dir>/<name>.md, .json and _reliability.png "
                                       "(default: finetune_<size>)")
    parser.add_argument("--work_dir", type=Path,
                        help="the folder of the target data, the pretrained model (pretrained/) and the runs "
                             "(runs/<arm>/seed_<s>/); what is there with the same arguments is reused "
                             "(default: outputs/benchmarks/<name>)")
    parser.add_argument("--results_dir", default=str(ROOT / "benchmarks" / "results"),
                        help="the folder the report is written to (default: the repository's benchmarks/results)")
    parser.add_argument("--eval_batch_size", type=int, default=32,
                        help="batch size of the re-evaluations (the stacked rows, the confidence check) "
                             "(default: %(default)s)")
    args = parser.parse_args(own)
    args.size_name, args.size = args.size, SIZES[args.size]
    args.arms = [arm for arm in ARMS if arm in args.arms]
    args.seeds = args.seeds or list(args.size.seeds)
    args.name = args.name or f"finetune_{args.size_name}"
    args.work_dir = Path(args.work_dir or ROOT / "outputs" / "benchmarks" / args.name)
    args.pretrained = args.work_dir / "pretrained"
    args.passthrough = passthrough
    for option in ("pretrain_steps", "finetune_steps"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_arguments(argv)
    command = shlex.join(["python", "benchmarks/finetune.py", *argv])
    args.work_dir.mkdir(parents=True, exist_ok=True)

    # 1. The target task, generated once.
    target_dir, manifest = ensure_target_data(args.work_dir, args.size.target)

    # 2. The pretrained detector, trained once (resumed when interrupted), and its confidence.
    started = time.time()
    if bench.ensure_run("baseline", args.pretrain_seed, None, pretrain_arguments(args), folder=args.pretrained,
                        resume=True):
        print(f"pretrained {args.pretrained} in {time.time() - started:.0f} s", flush=True)
    pretrained_run = json.loads((args.pretrained / "metrics.json").read_text())["run"]
    confidence = check_confidence(args.pretrained, args.eval_batch_size)
    print(f"confidence criterion ({confidence['criterion']}): {'met' if confidence['met'] else 'NOT met'}, "
          f"{bench.pct(confidence['share_confident'])} % of {confidence['counted_detections']} counted detections",
          flush=True)
    if not confidence["met"] and args.require_confident:
        raise SystemExit("the pretrained detector is not confident (--require_confident): pretrain longer with "
                         "--pretrain_steps")

    # 3. Fine-tune every (arm, seed), seeds outermost; re-evaluate and rewrite the report after each seed.
    shared = finetune_arguments(args, target_dir, args.pretrained)
    runs_dir = args.work_dir / "runs"
    data, reference, record = None, None, None
    for index, seed in enumerate(args.seeds):
        for arm in args.arms:
            started = time.time()
            if bench.ensure_run(arm, seed, runs_dir, shared, resume=True):
                print(f"fine-tuned {arm} seed {seed} in {time.time() - started:.0f} s", flush=True)
        if data is None:
            arguments = json.loads((bench.run_folder(runs_dir, args.arms[0], seed) / "metrics.json").read_text())
            data = EvaluationData(arguments["run"]["arguments"], manifest["splits"][HELDOUT_SPLIT]["fingerprints"])
            reference = ensure_posthoc(args.pretrained, data, args.eval_batch_size, None)
        for arm in args.arms:
            folder = bench.run_folder(runs_dir, arm, seed)
            ensure_posthoc(folder, data, args.eval_batch_size, json.loads((folder / "metrics.json").read_text()))
        record = write_outputs(args, command, args.seeds[:index + 1], manifest, confidence, pretrained_run, reference)
    report = Path(args.results_dir) / f"{args.name}.md"
    print("\n".join(bench.results_table(bench.aggregate(
        {row: [entry["values"] for entry in entries["runs"]] for row, entries in record["rows"].items()}))))
    print(f"goal: {record['goal']['overall']}; recommendation: {record['recommendation']['row']}; wrote {report}")


if __name__ == "__main__":
    main()
