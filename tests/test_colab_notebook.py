"""The Colab notebook (colab/train_mamba_colab.ipynb) as far as a CPU can check it: every
train_mamba command it runs (or offers commented out) parses with the script's own parser, the
repository URL is a Colab form field, and a failed clone stops the notebook in its own cell
instead of letting later cells run in the wrong folder."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from intelligence import train_mamba as tm

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "colab" / "train_mamba_colab.ipynb"


def code_cells() -> list[str]:
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    return ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]


def training_commands() -> list[list[str]]:
    commands = []
    for source in code_cells():
        joined = source.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.strip().lstrip("#").strip()
            if line.startswith("!python intelligence/train_mamba.py"):
                commands.append(shlex.split(line)[2:])
    return commands


def test_every_training_command_in_the_notebook_parses():
    commands = training_commands()
    assert len(commands) >= 2                          # the training run and the sweep
    for argv in commands:
        args = tm.parse_args(argv)                     # exits 2 on a flag that does not exist
        assert args.device == "cuda"
        assert not tm._is_shipped(args.out) or args.replace_shipped


def test_the_notebook_reads_the_weights_it_wrote():
    out = next(tm.parse_args(argv).out for argv in training_commands() if "--sweep" not in argv)
    later = "\n".join(code_cells())
    assert f"{out}.eval.md" in later and f'"{out}"' in later


def clone_cell() -> str:
    return next(source for source in code_cells() if "REPO_URL" in source)


def test_the_repository_url_is_a_form_field():
    assert re.search(r'^REPO_URL = "[^"]+"\s+# @param \{type:"string"\}', clone_cell(), re.MULTILINE)


def test_a_failed_clone_stops_the_notebook_where_it_is(tmp_path, monkeypatch):
    if subprocess.run(["git", "--version"], capture_output=True).returncode != 0:
        pytest.skip("git is not installed")
    monkeypatch.chdir(tmp_path)
    source = clone_cell().replace("https://github.com/YOUR_ACCOUNT/condorbrain.git",
                                  str(tmp_path / "no-such-repository"))
    with pytest.raises(RuntimeError, match="git clone .*no-such-repository failed"):
        exec(compile(source, "clone cell", "exec"), {})
    assert Path.cwd() == tmp_path and not (tmp_path / "condorbrain").exists()
    # A folder that is not the project is refused too, rather than trained in.
    (tmp_path / "condorbrain").mkdir()
    with pytest.raises(RuntimeError, match="not a CondorBrain checkout"):
        exec(compile(source, "clone cell", "exec"), {})
    assert Path.cwd() == tmp_path


def test_a_good_clone_enters_the_project(tmp_path, monkeypatch):
    if subprocess.run(["git", "--version"], capture_output=True).returncode != 0:
        pytest.skip("git is not installed")
    origin = tmp_path / "origin"
    (origin / "core").mkdir(parents=True)
    (origin / "core" / "main.py").write_text("")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for command in (["git", "init", "-q"], ["git", "add", "."], ["git", "commit", "-q", "-m", "x"]):
        subprocess.run(command, cwd=origin, check=True, env=env, capture_output=True)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    source = clone_cell().replace("https://github.com/YOUR_ACCOUNT/condorbrain.git", f"file://{origin}")
    exec(compile(source, "clone cell", "exec"), {})
    assert Path.cwd() == work / "condorbrain" and (Path.cwd() / "core" / "main.py").exists()
