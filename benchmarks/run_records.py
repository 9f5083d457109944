"""Keep a long benchmark's finished runs across machines: save their small record files, restore them later.

A benchmark run folder (``<work_dir>/<...>/<arm>/seed_<s>/``) holds the trained model and its checkpoints (megabytes)
and the few files a report is made from: ``metrics.json`` (train.py's numbers), ``posthoc.json`` (the benchmark's
re-evaluation), ``diagnostics.json`` (``benchmarks/calibration_diagnostics.py``'s statistics),
``benchmark_arguments.json`` (the train.py arguments it was made with) and ``config.json`` (the model's
configuration: the reports state each arm's Cal settings from it). ``save`` copies those
files of every finished run (one with a ``metrics.json``) under ``<records>``, keeping the layout; ``restore`` puts
them back into a work dir, so that ``benchmarks/finetune.py`` / ``benchmarks/calibration.py`` reuse those runs
(they skip a folder whose ``metrics.json`` exists and was made with the same arguments, and keep a ``posthoc.json``
or ``diagnostics.json`` whose sources are unchanged) and train only the missing ones.

    python benchmarks/run_records.py save outputs/benchmarks/finetune_cpu benchmarks/results/finetune_cpu_runs
    python benchmarks/run_records.py restore benchmarks/results/finetune_cpu_runs outputs/benchmarks/finetune_cpu
    python benchmarks/run_records.py save outputs/benchmarks/calibration_cpu_long \
        benchmarks/results/calibration_cpu_long_runs

Restore into the same work dir path (the recorded arguments name it), with the same code version (the report states
its commit), and let the benchmark recreate what the restored runs were trained from (the pretrained detector of
``finetune.py`` is retrained when absent: its training is deterministic on the CPU; the reused runs' numbers do not
depend on it again). A pretraining folder is never restored (its model is needed, not only its numbers): ``save``
skips folders without ``seed_<s>`` in their name.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

RECORD_FILES = ("metrics.json", "posthoc.json", "diagnostics.json", "benchmark_arguments.json", "config.json")


def finished_runs(root: Path) -> list[Path]:
    """Run folders under ``root`` (``.../seed_<s>``) with a ``metrics.json``, relative to ``root``, sorted."""
    return sorted(path.parent.relative_to(root) for path in root.rglob("metrics.json")
                  if path.parent.name.startswith("seed_"))


def copy_records(source: Path, destination: Path, overwrite: bool) -> list[Path]:
    """Copy the record files of every finished run of ``source`` into the same layout under ``destination``."""
    copied = []
    for run in finished_runs(source):
        target = destination / run
        if (target / "metrics.json").is_file() and not overwrite:
            if (target / "metrics.json").read_bytes() != (source / run / "metrics.json").read_bytes():
                raise SystemExit(f"{target} holds another run's metrics.json than {source / run}; pass --overwrite "
                                 "to replace it, or restore into a fresh work dir")
        target.mkdir(parents=True, exist_ok=True)
        for name in RECORD_FILES:
            if (source / run / name).is_file():
                shutil.copy2(source / run / name, target / name)
        copied.append(run)
    return copied


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["save", "restore"],
                        help="save: work dir -> records; restore: records -> work dir (required)")
    parser.add_argument("source", type=Path, help="save: the benchmark's work dir; restore: the records folder (required)")
    parser.add_argument("destination", type=Path, help="save: the records folder; restore: the work dir (required)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a destination run whose metrics.json differs (default: refuse)")
    args = parser.parse_args(argv)
    if not args.source.is_dir():
        raise SystemExit(f"{args.source} is not a folder")
    copied = copy_records(args.source, args.destination, args.overwrite)
    print(f"{args.action}: {len(copied)} finished run(s) from {args.source} to {args.destination}")
    for run in copied:
        print(f"  {run}")


if __name__ == "__main__":
    main()
