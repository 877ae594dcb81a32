"""The examples run as documented (tiny settings): the shell quickstart with pipes, and the library API."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import soundfile as sf
from conftest import REPO


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_quickstart_script_runs_the_pipeline_with_pipes(tmp_path):
    valle = f"{sys.executable} -m valle_cli"
    env = {**_env(), "STEPS": "2", "SPEAKERS": "3", "PER_SPEAKER": "3", "VALLE": valle, "PYTHON": sys.executable,
           "DEVICE": "cpu"}
    res = subprocess.run(["bash", str(REPO / "examples" / "quickstart.sh"), str(tmp_path / "qs")], env=env,
                         capture_output=True, timeout=600)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    for name in ("hello.wav", "prompt_resynth.wav"):
        wav, rate = sf.read(tmp_path / "qs" / name)
        assert rate == 24000 and len(wav) > 0
    assert b"<stdout>" in res.stderr  # piped stages say where their data went


@pytest.mark.slow
def test_library_api_example_runs(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "examples" / "library_api.py"), "--out", str(tmp_path / "api"),
                          "--speakers", "3", "--per-speaker", "3", "--steps", "2", "--codebooks", "2"],
                         env=_env(), capture_output=True, timeout=600)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    wav, rate = sf.read(tmp_path / "api" / "out.wav")
    assert rate == 24000 and len(wav) > 0
    assert (tmp_path / "api" / "run" / "checkpoints").is_dir() and (tmp_path / "api" / "chunks.parquet").is_file()
