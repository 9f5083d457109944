"""Every command-line script explains itself: ``--help`` has a description, and every option a help text that
states its default (or that the option is required).

Each script is run as a user runs it, ``python SCRIPT --help`` in a subprocess, and argparse's output is parsed:
scripts build their parsers inside ``main()``, so this is the one way that works for all of them alike.
"""

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The scripts with a command line. A script that may not exist yet is skipped, not failed, while it is absent.
SCRIPTS = [
    "examples/train.py",
    "examples/evaluate.py",
    "examples/push_to_hub.py",
    "examples/export.py",
    "benchmarks/calibration.py",
    "benchmarks/calibration_diagnostics.py",
    "benchmarks/calibration_sweep.py",
    "benchmarks/calibrator_choice.py",
    "benchmarks/finetune.py",
    "benchmarks/deployment.py",
    "benchmarks/evidence.py",
    "benchmarks/matching_scale.py",
    "benchmarks/metrics.py",
    "benchmarks/run_records.py",
    "benchmarks/train_step.py",
]
# Section titles argparse prints (3.10+ says "options:", older versions "optional arguments:").
SECTION = re.compile(r"^(positional arguments|options|optional arguments|[A-Za-z][\w ,'()-]*):$")
OPTION_NAME = re.compile(r"(?:^|[\s,])(--?[A-Za-z0-9][\w-]*)")


@functools.lru_cache(maxsize=None)
def help_output(script: str) -> str:
    """``python SCRIPT --help``'s standard output (run once per script)."""
    path = ROOT / script
    if not path.is_file():
        pytest.skip(f"{script} does not exist")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "120"}
    process = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, env=env,
                             cwd=ROOT, timeout=300)
    assert process.returncode == 0, f"{script} --help failed:\n{process.stderr[-3000:]}"
    assert process.stdout.startswith("usage:"), process.stdout[:500]
    return process.stdout


def parse_help(text: str) -> tuple[str, dict[str, str]]:
    """``(description, {invocation: help})`` of argparse's help output.

    The usage block runs to the first blank line; the description is everything from there to the first section
    title (``options:`` ...). In a section, an entry starts with exactly two spaces: its invocation (``--name
    METAVAR, --alias METAVAR`` or a positional's name), then its help after two or more spaces on the same line
    and/or on the following, more indented lines.
    """
    lines = text.splitlines()
    end_of_usage = next((i for i, line in enumerate(lines) if not line.strip()), len(lines))
    first_section = next((i for i in range(end_of_usage, len(lines)) if SECTION.match(lines[i])), len(lines))
    description = "\n".join(lines[end_of_usage:first_section]).strip()
    entries, current = {}, None
    for line in lines[first_section:]:
        if SECTION.match(line) or not line.strip():
            current = None
        elif re.match(r"^  \S", line):
            invocation, _, help_text = line.strip().partition("  ")
            current = invocation.strip()
            entries[current] = help_text.strip()
        elif current is not None and line.startswith("   "):
            entries[current] = f"{entries[current]} {line.strip()}".strip()
    return description, entries


def name_of(invocation: str) -> str:
    """``--name`` of ``--name METAVAR, --alias METAVAR``; a positional's name as it is."""
    return invocation.split(",")[0].split()[0]


def options_of(script: str) -> dict[str, str]:
    """``{invocation: help}`` of every entry of ``script`` but ``-h, --help``."""
    _, entries = parse_help(help_output(script))
    return {invocation: help_text for invocation, help_text in entries.items()
            if not {"-h", "--help"} & set(OPTION_NAME.findall(invocation))}


def test_parser_reads_argparse_layouts():
    # The two layouts of an entry (help on the same line, help on the next lines), an entry without help, a
    # positional, a description with an indented example line, a group title.
    text = """usage: tool.py [-h] [--short SHORT] [--a_rather_long_option_name A_RATHER_LONG_OPTION_NAME]
               [--bare] path

Does things.

    python tool.py --short 1      # an example line

positional arguments:
  path                  where it happens

options:
  -h, --help            show this help message and exit
  --short SHORT         a help on the same line
                        that wraps (default: 1)
  --a_rather_long_option_name A_RATHER_LONG_OPTION_NAME, --a-rather-long-option-name A_RATHER_LONG_OPTION_NAME
                        a help on the next line (default: None)
  --bare

my group:
  --grouped {x,y}       in a group (default: x)
"""
    description, entries = parse_help(text)
    assert description.startswith("Does things.") and "an example line" in description
    assert entries == {
        "path": "where it happens",
        "-h, --help": "show this help message and exit",
        "--short SHORT": "a help on the same line that wraps (default: 1)",
        "--a_rather_long_option_name A_RATHER_LONG_OPTION_NAME, --a-rather-long-option-name "
        "A_RATHER_LONG_OPTION_NAME": "a help on the next line (default: None)",
        "--bare": "",
        "--grouped {x,y}": "in a group (default: x)",
    }


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_has_a_description(script):
    description, _ = parse_help(help_output(script))
    # A paragraph, not a stray word: at least a few words saying what the script does.
    assert len(description.split()) >= 5, f"{script} --help has no description paragraph: {description!r}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_option_has_help(script):
    options = options_of(script)
    assert options, f"no options parsed from {script} --help"
    missing = sorted(name_of(invocation) for invocation, help_text in options.items() if not help_text)
    assert not missing, f"{script}: options without help text: {missing}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_option_states_its_default(script):
    # HfArgumentParser appends "(default: X)" to a field's help itself; argparse scripts write it in the help.
    options = options_of(script)
    silent = sorted(name_of(invocation) for invocation, help_text in options.items()
                    if help_text and not re.search(r"\bdefault\b|\brequired\b", help_text, re.IGNORECASE))
    assert not silent, f"{script}: options whose help states no default (nor 'required'): {silent}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_default_stated_twice(script):
    # HfArgumentParser appends "(default: X)" itself: a help text that also ends with it reads it twice.
    doubled = sorted(name_of(invocation) for invocation, help_text in options_of(script).items()
                     if re.search(r"(\(default: [^()]*\)).*\1", help_text, re.IGNORECASE))
    assert not doubled, f"{script}: options whose help repeats its '(default: ...)': {doubled}"


def test_every_benchmark_with_a_command_line_is_checked():
    with_cli = {f"benchmarks/{path.name}" for path in (ROOT / "benchmarks").glob("*.py")
                if re.search(r"ArgumentParser\(", path.read_text())}
    assert with_cli <= set(SCRIPTS), f"add to SCRIPTS: {sorted(with_cli - set(SCRIPTS))}"
