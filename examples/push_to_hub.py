"""Render (or refresh) the model card of a trained folder and upload the folder to the Hub.

    python examples/push_to_hub.py outputs/cal-detr-digits --hub_model_id me/cal-detr-digits --dry_run
    python examples/push_to_hub.py outputs/cal-detr-digits --hub_model_id me/cal-detr-digits --private

The folder is what ``examples/train.py`` writes. ``--dry_run`` checks the folder, writes the card and prints every
file with its destination, uploading nothing (no token needed). The upload needs a token: ``hf auth login`` or
``HF_TOKEN``. Checkpoint folders and tensorboard logs stay local unless ``--include_checkpoints`` /
``--include_logs``.
"""

from __future__ import annotations

import argparse
import sys

from huggingface_hub.errors import LocalTokenNotFoundError

from hf_caldetr.hub import HubExportError, classify_entries, push_folder

SKIPPED_BECAUSE = {"checkpoint": "checkpoint folder (--include_checkpoints)",
                   "partial checkpoint": "checkpoint cut short while being written (no progress.json): never uploaded",
                   "logs": "tracker logs (--include_logs)", "hidden": "hidden", "other folder": "not a model file"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="a folder written by examples/train.py (required)")
    parser.add_argument("--hub_model_id", required=True,
                        help="the Hub model repo to create or update, e.g. 'me/cal-detr-digits' (required)")
    parser.add_argument("--private", action="store_true",
                        help="create the repo private; an existing repo keeps its visibility (default: public)")
    parser.add_argument("--dry_run", action="store_true",
                        help="write the card and print what would be uploaded; upload nothing, need no token "
                             "(default: off)")
    parser.add_argument("--include_checkpoints", action="store_true",
                        help="also upload the step_N/ and epoch_N/ checkpoint folders (default: off)")
    parser.add_argument("--include_logs", action="store_true",
                        help="also upload the tensorboard event files (default: off)")
    parser.add_argument("--license", default="apache-2.0",
                        help="the license written in the model card's metadata (default: %(default)s)")
    parser.add_argument("--commit_message", default=None,
                        help="message of the upload commit (default: 'Upload Cal-DETR model folder (hf_caldetr)')")
    return parser.parse_args(argv)


def print_plan(result, args) -> None:
    visibility = "private" if result.private else "public"
    print(f"dry run: nothing uploaded. Would create (if missing, {visibility}) the model repo {result.repo_id} and "
          f"upload {len(result.files)} files:")
    for local, path_in_repo in result.files:
        print(f"  {local}  ->  hf://{result.repo_id}/{path_in_repo}")
    skipped = [(path, kind) for path, kind in classify_entries(args.model_dir) if kind != "file"]
    wanted = {"checkpoint": args.include_checkpoints, "logs": args.include_logs}
    skipped = [(path, kind) for path, kind in skipped if not wanted.get(kind)]
    if skipped:
        print("not uploaded:")
        for path, kind in skipped:
            print(f"  {path}{'/' if path.is_dir() else ''}  ({SKIPPED_BECAUSE[kind]})")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = push_folder(args.model_dir, args.hub_model_id, private=args.private, dry_run=args.dry_run,
                             include_checkpoints=args.include_checkpoints, include_logs=args.include_logs,
                             commit_message=args.commit_message, license=args.license)
    except (HubExportError, LocalTokenNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.dry_run:
        print_plan(result, args)
    else:
        print(f"uploaded {len(result.files)} files to https://huggingface.co/{result.repo_id}: {result.commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
