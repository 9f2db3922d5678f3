"""``cop``: errors are one line with a hint (exit status 1), help shows no raw type names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from stages.cli import STAGES, main


def _cop(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        main(args)
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


def test_version(capsys):
    code, out, _ = _cop(["--version"], capsys)
    assert code == 0 and re.fullmatch(r"cop \d+\.\d+\.\d+\n", out)


@pytest.mark.parametrize("command", [s.command for s in STAGES] + ["params"])
def test_help_has_examples_and_no_raw_type_names(command, capsys):
    code, out, _ = _cop([command, "--help"], capsys)
    assert code == 0
    assert not re.search(r"<(str|int|bool|path|list\[str\])>", out), out
    assert "Examples:" in out and f" {command}" in out.split("Examples:")[1]


def test_bad_variant_is_one_line_with_the_choices(capsys):
    code, out, err = _cop(["train-cvit", "--variant", "dvit"], capsys)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "'dvit'" in err and "'rvit'" in err and "hint:" in err


def test_bad_param_is_one_line_naming_the_key(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.delenv("COP_DEBUG", raising=False)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"seed": 0}))
    code, _, err = _cop(["train-comae", "-p", str(params), "-S", "comae.lambda=-1"], capsys)
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("error: invalid parameters in") and "comae.lambda" in err
    assert "Traceback" not in err and "hint:" in err


def test_missing_input_is_one_line_and_debug_shows_the_traceback(tmp_path: Path, capsys,
                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/: the stage cannot find its inputs
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"seed": 0}))
    monkeypatch.delenv("COP_DEBUG", raising=False)
    code, _, err = _cop(["train-comae"], capsys)
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: ")
    with pytest.raises(Exception):  # --debug: the exception itself, with its traceback
        main(["--debug", "train-comae"])
    monkeypatch.delenv("COP_DEBUG", raising=False)  # --debug sets it for subprocesses
    monkeypatch.setenv("COP_DEBUG", "1")
    with pytest.raises(Exception):
        main(["train-comae"])
