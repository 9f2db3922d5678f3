"""The README's commands, run as a newcomer pastes them.

The blocks are read from README.md at test time (no copy of them here): every ```bash block
runs, verbatim, in a fresh ``bash`` at the root of a fresh copy of the repository, after the
Quick start's two set-up commands, in README order. Blocks that cannot run here are listed in
``CANNOT_RUN`` by a phrase of theirs, with the reason; a phrase that matches no block fails the
suite, so the list cannot go stale silently.

Two things differ from a user's machine, both so that the suite stays minutes long:
- the copy's ``params.yaml`` is the smoke profile (committed as the copy's default), so the
  Quick start's ``repro.sh`` and every later ``dvc`` command run all stages at smoke scale, and
  ``git checkout params.yaml`` returns to it;
- ``bash scripts/test.sh`` sets up the test extras and *collects* the suite
  (``PYTEST_ADDOPTS=--collect-only``): running it would run this test again.
The shell is fresh: the ``PATH`` has no virtual environment on it, ``HOME`` is a scratch folder
holding ``~/my-photos`` (the photos the "Use your own images" block names) and a git identity.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SETUP_COMMANDS = ("bash scripts/repro.sh", "bash scripts/test.sh")

# phrase of a block -> why it does not run here
CANNOT_RUN = {
    "torchrun --nproc-per-node": "the full profile: ImageNet, the KL-16 weights and GPUs (this "
                                 "route runs at miniature size with 2 gloo processes in "
                                 "test_full_profile)",
    "cop orders publish data/orders/train": "a placeholder web folder and DVC remote (both routes "
                                            "run in test_orders_reuse)",
    "cop orders fetch https://example.org": "placeholder addresses of a published set, and the "
                                            "network (fetch itself runs against a loopback "
                                            "server in test_orders_fetch)",
}


@dataclass(frozen=True)
class Block:
    lang: str
    text: str
    heading: str
    line: int

    @property
    def name(self) -> str:
        return f"README.md:{self.line} ({self.heading})"


def readme_blocks(readme: Path = REPO / "README.md") -> list[Block]:
    blocks, heading, lines = [], "", readme.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            blocks.append(Block(fence.group(1), "\n".join(lines[i + 1:end]) + "\n", heading, i + 1))
            i = end
        i += 1
    return blocks


def split_blocks(blocks: list[Block]) -> tuple[Block, list[Block], dict[str, Block]]:
    """(the set-up block, the blocks to run after it, the blocks that cannot run by phrase)."""
    bash = [b for b in blocks if b.lang == "bash"]
    setup = [b for b in bash if all(c in b.text for c in SETUP_COMMANDS)]
    assert len(setup) == 1, f"one block must hold the set-up commands {SETUP_COMMANDS}: {setup}"
    skipped = {}
    for phrase in CANNOT_RUN:
        hits = [b for b in bash if phrase in b.text]
        assert len(hits) == 1, f"CANNOT_RUN phrase {phrase!r} matches {len(hits)} README blocks"
        skipped[phrase] = hits[0]
    rest = [b for b in bash if b is not setup[0] and b not in skipped.values()]
    return setup[0], rest, skipped


def test_readme_blocks_are_accounted_for() -> None:
    blocks = readme_blocks()
    # commands are tagged bash, parameters yaml; untagged blocks are pictures and output
    assert {b.lang for b in blocks} <= {"bash", "yaml", ""}, [b.name for b in blocks]
    setup, rest, _ = split_blocks(blocks)
    assert rest, "no README command block would run"
    # CI runs exactly the README's test command
    ci = [ln for ln in (REPO / ".ci/run").read_text().splitlines() if ln and not ln.startswith(("#", "set ", "cd "))]
    assert ci == ["bash scripts/test.sh"] and "bash scripts/test.sh" in setup.text
    # a block after the set-up starts in a fresh shell: it must activate the environment
    for b in rest:
        if re.search(r"^(dvc|cop|python)\b", b.text, re.M):
            first = b.text.splitlines()[0].split("#")[0].strip()
            assert first == "source .venv/bin/activate", b.name


def test_readme_yaml_blocks_are_valid_params() -> None:
    """A params snippet of the README, merged into params.yaml, passes the schema."""
    from pipeline.config import parse_params

    base = yaml.safe_load((REPO / "params.yaml").read_text())
    snippets = [b for b in readme_blocks() if b.lang == "yaml"]
    assert snippets
    for b in snippets:
        merged = copy.deepcopy(base)
        for section, values in yaml.safe_load(b.text).items():
            merged[section] = {**merged.get(section, {}), **values} if isinstance(values, dict) else values
        parse_params(merged, b.name)  # raises naming the key


# ----------------------------------------------------------------------------- the fresh copy


def fresh_copy(dest: Path) -> Path:
    """The working tree as a clone has it (tracked and new files, nothing ignored), with the
    smoke profile committed as its params.yaml."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    shutil.copy(dest / "profiles/smoke.yaml", dest / "params.yaml")
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "fresh clone"]):
        subprocess.run(["git", *args], cwd=dest, check=True, capture_output=True)
    return dest


def fresh_home(home: Path) -> Path:
    (home / "my-photos" / "holiday").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(96, 128), (80, 80), (200, 150)]):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        img.save(home / "my-photos" / ("holiday" if i else "") / f"photo{i}.png")
    (home / ".gitconfig").write_text("[user]\n\tname = Newcomer\n\temail = newcomer@example.org\n")
    return home


def fresh_shell_env(home: Path) -> dict[str, str]:
    """The environment of a new terminal: no virtual environment on PATH."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTEST_ADDOPTS", "PYTEST_XDIST_WORKER",
                        "PYTEST_CURRENT_TEST", "COP_NO_PROGRESS")}
    venv = Path(os.environ["VIRTUAL_ENV"]) if "VIRTUAL_ENV" in os.environ else REPO / ".venv"
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                  if not Path(p).resolve().is_relative_to(venv.resolve()))
    env.update(HOME=str(home), DVC_NO_ANALYTICS="1", COP_NO_PROGRESS="1")
    return env


def run_block(block: Block, cwd: Path, env: dict[str, str], timeout: int = 900) -> str:
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.text], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode:
        raise AssertionError(f"{block.name} failed with exit status {proc.returncode}:\n"
                             f"{block.text}\n--- its output (last 6,000 characters) ---\n{out[-6000:]}")
    return out


@pytest.mark.slow
def test_readme_commands_work_in_a_fresh_clone(tmp_path: Path) -> None:
    clone = fresh_copy(tmp_path / "clone")
    env = fresh_shell_env(fresh_home(tmp_path / "home"))
    setup, rest, _ = split_blocks(readme_blocks(clone / "README.md"))

    out = run_block(setup, clone, {**env, "PYTEST_ADDOPTS": "--collect-only -q"})
    assert "collected" in out or "tests collected" in out, out[-2000:]
    assert (clone / "data/report.html").exists() and (clone / "dvc.lock").exists()
    for block in rest:
        run_block(block, clone, env)
    # what the blocks promise is there
    assert (clone / "my-orders/manifest.json").exists()
    assert any((clone / "orders-pictures").rglob("*.png"))
