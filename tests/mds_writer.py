"""MosaicML streaming's own MDSWriter, from the venv's mds-writer folder (`make mds-writer`)."""

import importlib
import sys
import types
from pathlib import Path

import pytest

FOLDER = Path(sys.prefix) / "mds-writer"


def mds_writer():
    """streaming's MDSWriter class; the calling test skips where it is not installed."""
    if not (FOLDER / "streaming").is_dir():
        pytest.skip(f"MosaicML streaming is not installed in {FOLDER} (make mds-writer)")
    if str(FOLDER) not in sys.path:
        sys.path.append(str(FOLDER))
    # streaming's package __init__ imports its vision and text datasets (torchvision,
    # transformers<5); bare parent packages let the writer's modules load without them
    for name, sub in (
        ("streaming", ""),
        ("streaming.base", "base"),
        ("streaming.base.format", "base/format"),
    ):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [str(FOLDER / "streaming" / sub)]
            sys.modules[name] = module
    try:
        return importlib.import_module("streaming.base.format.mds.writer").MDSWriter
    except ImportError as e:  # the GPU-stack venv has no torch, which the writer imports
        pytest.skip(f"streaming's MDSWriter does not load here ({e})")
