"""Every Python block of README.md and docs/*.md runs, so a stale example fails CI.

Each block runs in a fresh interpreter, offline (``HF_HUB_OFFLINE=1``), from a scratch folder holding a copy of
``hub_cards/`` (the blocks that read or regenerate cards use the repository-root paths they document). Documented
substitutions, each keeping the example's meaning at test size or offline:

* ``input_size=(3, 224, 224)`` -> ``input_size=(3, 64, 64)``: converting resnet50 at 224x224 took 50 s on 2 CPUs;
* ``"hf-hub:lcnn-timm/`` -> ``"local-dir:hub_cards/``: the Hub cannot be reached here, and the folder holds the same
  repository in the same layout (docs/hub.md).
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBSTITUTIONS = [
    ("input_size=(3, 224, 224)", "input_size=(3, 64, 64)"),
    ('"hf-hub:lcnn-timm/', '"local-dir:hub_cards/'),
]


def _blocks():
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for index, code in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)):
            found.append(pytest.param(code, id=f"{path.relative_to(ROOT)}[{index}]"))
    return found


BLOCKS = _blocks()


def test_the_documents_have_python_blocks():
    assert len(BLOCKS) >= 5  # README 1, converter 1, hub 2, models 1: a broken extraction must not pass silently


@pytest.mark.parametrize("code", BLOCKS)
def test_documented_example_runs(code, tmp_path):
    for old, new in SUBSTITUTIONS:
        code = code.replace(old, new)
    shutil.copytree(ROOT / "hub_cards", tmp_path / "hub_cards")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # this checkout's package
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_config_keys_table_in_the_docs_is_generated_from_the_code():
    """docs/training.md's key table is keys_table()'s output: a changed default or a new key fails here until
    the docs are regenerated (docs once gave gradreg_fd_step's default three ways)."""
    from lcnn_timm.train.config import KEYS_TABLE_END, KEYS_TABLE_START, keys_table

    text = (ROOT / "docs" / "training.md").read_text()
    published = text[text.index(KEYS_TABLE_START) + len(KEYS_TABLE_START): text.index(KEYS_TABLE_END)].strip()
    assert published == keys_table()
