"""The CLI contract of every verb: help, exit codes, one-line errors, stdout purity, '-' piping."""

from __future__ import annotations

import errno
import os
import pty
import subprocess
import sys

import pytest
from conftest import REPO, run_valle

VERBS = ["phonemize", "quantize", "decode"]


def test_help_is_fast_and_lists_only_real_verbs():
    code = ("import sys, valle_cli.cli as c\n"
            "try:\n    c.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "heavy = [m for m in ('torch', 'transformers', 'polars', 'phonemizer', 'librosa') if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert "HEAVY []" in out.stdout
    for verb in VERBS:
        assert verb in out.stdout


@pytest.mark.parametrize("verb", VERBS)
def test_verb_help_starts_with_an_example(verb):
    res = run_valle(verb, "--help")
    assert res.returncode == 0
    paragraphs = [p.strip() for p in res.stdout.decode().split("\n\n") if p.strip()]
    assert paragraphs[0].startswith(f"Usage: valle {verb}")
    assert paragraphs[1].startswith("Example: valle ")
    assert b"--quiet" in res.stdout and b"--verbose" in res.stdout


def test_version_and_usage_errors():
    assert run_valle("--version").stdout.decode().startswith("valle ")
    res = run_valle("quantize", "x", "-o", "y", "--no-such-flag")
    assert res.returncode == 2 and b"No such option" in res.stderr and res.stdout == b""
    assert run_valle("frobnicate").returncode == 2
    res = run_valle("quantize", "a", "-o", "b", "--shard", "5/2")
    assert res.returncode == 2


def _one_error_line(res: subprocess.CompletedProcess) -> str:
    lines = res.stderr.decode().strip().splitlines()
    assert res.returncode == 1, res.stderr.decode()
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    assert res.stdout == b""
    return lines[0]


def test_missing_input_is_one_line(tmp_path):
    line = _one_error_line(run_valle("quantize", tmp_path / "nope", "-o", tmp_path / "codes"))
    assert "nope" in line
    line = _one_error_line(run_valle("decode", tmp_path / "nope.npz", "-o", tmp_path / "x.wav"))
    assert "nope.npz" in line


def test_empty_folder_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no audio files" in _one_error_line(run_valle("quantize", tmp_path / "empty", "-o", tmp_path / "c"))


def test_dash_with_terminal_stdin_fails_fast(tmp_path):
    parent, child = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "valle_cli", "decode", "-", "-o", str(tmp_path / "x.wav")],
                         stdin=child, capture_output=True, env=env, timeout=60)
    os.close(parent), os.close(child)
    assert "stdin is a terminal" in _one_error_line(res)


def test_debug_env_shows_traceback(tmp_path):
    res = run_valle("decode", tmp_path / "nope.npz", "-o", tmp_path / "x.wav", env={"VALLE_DEBUG": "1"})
    assert res.returncode == 1 and b"Traceback" in res.stderr


def test_unwritable_output_is_one_line(tmp_path, espeak_corpus):
    # root ignores permission bits, so use a place nobody can create files in
    line = _one_error_line(run_valle("quantize", espeak_corpus, "-o", "/proc/valle-test/codes",
                                     "--fit-codec"))
    assert "/proc/valle-test" in line


def test_disk_full_keeps_earlier_output(tmp_path, monkeypatch, capsys):
    from valle_cli import formats
    from valle_cli.cli import main

    target = tmp_path / "p.parquet"
    target.write_bytes(b"earlier output")

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(formats, "atomic_write_bytes", full)
    (tmp_path / "t.txt").write_text("Hello there.\n")
    with pytest.raises(SystemExit) as info:
        main(["phonemize", str(tmp_path / "t.txt"), "-o", str(target), "--overwrite", "-q"])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left" in err[0] and str(target) in err[0]
    assert target.read_bytes() == b"earlier output"


def test_broken_pipe_exits_quietly(tmp_path):
    (tmp_path / "t.txt").write_text("\n".join(f"Sentence number {i}." for i in range(200)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    shell = f"{sys.executable} -m valle_cli phonemize {tmp_path / 't.txt'} -o - | head -c 10 >/dev/null"
    res = subprocess.run(["bash", "-o", "pipefail", "-c", shell], capture_output=True, env=env, timeout=120)
    assert b"Traceback" not in res.stderr and b"BrokenPipe" not in res.stderr
