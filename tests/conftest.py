"""Shared fixtures: the committed Fashion-MNIST sample and one small shard set built from it.

Every test runs on the CPU, whatever the machine has, except those marked ``gpu``: for the others
CUDA is hidden (``torch.cuda.is_available()`` is False in the process and
``CUDA_VISIBLE_DEVICES`` is empty for the processes it starts), so ``--device auto`` means the CPU
and a result compared with a CPU computation is computed on the CPU. Tests marked ``gpu`` see
CUDA and are skipped where there is none.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rela_pipeline.cli import main
from rela_pipeline.stages.embed import EmbedConfig, run_embed

FIXTURE_ROOT = Path(__file__).parent / "fixtures" / "fashion_mnist_mini"
TRAIN_DIR = FIXTURE_ROOT / "train"
TEST_DIR = FIXTURE_ROOT / "test"

logging.getLogger("faiss.loader").setLevel(logging.WARNING)

#: Whether this machine has a CUDA device (read once, before any test hides it).
CUDA_AVAILABLE = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """Skip the tests marked ``gpu`` where there is no CUDA device."""
    if CUDA_AVAILABLE:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def cpu_unless_marked_gpu(request, monkeypatch):
    """Pin every test not marked ``gpu`` to the CPU (see the module docstring)."""
    if "gpu" in request.keywords:
        return
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def run_cli(*args: str) -> tuple[int, str, str]:
    """Invoke the CLI quietly in-process: ``(exit code, stdout, stderr)``."""
    result = CliRunner().invoke(main, ["-q", *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def assert_one_line_error(code: int, stderr: str, fragment: str) -> None:
    """A failed command printed exactly one ``error: ...`` line containing ``fragment``."""
    assert code != 0
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in stderr


def journal_rows(out: Path) -> int:
    """Rows an ``embed`` run into ``out`` has journalled as embedded (0 before its first record)."""
    try:
        chunks = json.loads((out / ".work" / "journal.json").read_text())["state"]["embed"]["chunks"]
    except (OSError, ValueError, KeyError):
        return 0
    return chunks[-1][1] if chunks else 0


def small_embed_config(data_dir: Path, out_dir: Path, **overrides) -> EmbedConfig:
    """A fast CPU configuration: random ResNet-18 prior at 32 px, no worker processes."""
    settings = dict(
        data_dir=data_dir,
        prior="random:resnet18",
        out_dir=out_dir,
        image_size=32,
        batch_size=64,
        num_workers=0,
        shard_size=64,
        progress=False,
        device="cpu",
    )
    settings.update(overrides)
    return EmbedConfig(**settings)


@pytest.fixture(scope="session")
def shard_set(tmp_path_factory) -> tuple[Path, dict]:
    """Stage one on the 300-image real fixture, raw embeddings kept: ``(OUT, manifest)``."""
    out = tmp_path_factory.mktemp("shards") / "out"
    manifest = run_embed(small_embed_config(TRAIN_DIR, out, keep_embeddings=True))
    return out, manifest


@pytest.fixture()
def shard_copy(shard_set, tmp_path) -> Path:
    """A private copy of the session's shard set that a test may damage."""
    out, _ = shard_set
    copy = tmp_path / "shards"
    shutil.copytree(out, copy)
    return copy
