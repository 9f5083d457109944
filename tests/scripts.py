"""The example scripts as importable modules, for tests that call their ``main()`` in process."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_example(name: str):
    """``examples/<name>.py`` as a module (registered in ``sys.modules``: its dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
