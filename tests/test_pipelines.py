"""pipelines/Makefile with each corpus layout: one valle call per recipe line, files as targets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import polars as pl
import pytest
from conftest import REPO

VALLE = f"{sys.executable} -m valle_cli"


def make(*args: str, dry: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    cmd = ["make", "-C", str(REPO / "pipelines"), *(["-n"] if dry else []), f"VALLE={VALLE}",
           f"PYTHON={sys.executable}", *args]
    return subprocess.run(cmd, capture_output=True, env=env, timeout=900)


@pytest.mark.parametrize("layout, extra", [("espeak", []), ("folder", ["CORPUS=/data/voices"]),
                                           ("ljspeech", ["LJSPEECH=/data/LJ"])])
def test_every_recipe_line_is_one_command(layout, extra, tmp_path):
    if layout == "ljspeech":  # make -n still needs the inputs that are not made by a rule
        extra = [f"LJSPEECH={tmp_path}"]
        (tmp_path / "metadata.csv").write_text("a|b\n")
    elif layout == "folder":
        extra = [f"CORPUS={tmp_path}"]
    res = make("demo", f"LAYOUT={layout}", f"WORK={tmp_path / 'w'}", *extra, dry=True)
    assert res.returncode == 0, res.stderr.decode()
    lines = [line for line in res.stdout.decode().splitlines() if line.strip() and not line.startswith("make")]
    verbs = [line[len(VALLE):].split()[0] for line in lines if line.startswith(VALLE)]
    others = [line for line in lines if not line.startswith((VALLE, sys.executable, "touch ", "echo "))]
    assert not others, others  # nothing but valle calls (and the corpus script, stamps, the closing echo)
    for verb in ("quantize", "phonemize", "score-chunks", "shard", "train", "sample", "decode"):
        assert verb in verbs, (layout, verb)
    split = next(line for line in lines if " shard " in line)
    assert ("--split-by utterance" in split) == (layout == "ljspeech")


def test_a_layout_without_its_path_says_so():
    res = make("demo", "LAYOUT=folder", dry=True)
    assert res.returncode != 0 and b"LAYOUT=folder needs CORPUS=" in res.stderr


@pytest.mark.slow
def test_folder_and_ljspeech_layouts_build_shards(espeak_corpus, tmp_path):
    res = make("shards", "LAYOUT=folder", f"CORPUS={espeak_corpus}", f"WORK={tmp_path / 'folder'}", "DEVICE=cpu",
               "VAL_FRACTION=0.3")
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    index = pl.read_parquet(tmp_path / "folder" / "shards" / "index.parquet")
    assert index["speaker"].n_unique() == 3 and set(index["split"]) == {"train", "val"}

    lj = tmp_path / "LJ"
    (lj / "wavs").mkdir(parents=True)
    rows = []
    for wav in sorted(espeak_corpus.glob("spk00/*.wav")):
        shutil.copy(wav, lj / "wavs" / wav.name)
        text = wav.with_suffix(".txt").read_text().strip()
        rows.append(f"{wav.stem}|{text}|{text}")
    (lj / "metadata.csv").write_text("\n".join(rows) + "\n")
    res = make("shards", "LAYOUT=ljspeech", f"LJSPEECH={lj}", f"WORK={tmp_path / 'lj'}", "DEVICE=cpu",
               "VAL_FRACTION=0.25")
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    index = pl.read_parquet(tmp_path / "lj" / "shards" / "index.parquet")
    assert len(index) == len(rows) and (index["split"] == "val").sum() == 1


@pytest.mark.slow
def test_a_shortened_make_demo_runs_end_to_end(tmp_path):
    """The README's main job with tiny settings: corpus ... train ... sample ... evaluate, one make call."""
    work = tmp_path / "work"
    res = make("demo", f"WORK={work}", "SPEAKERS=3", "PER_SPEAKER=4", "EVAL_PER_SPEAKER=1", "STEPS=2",
               "BATCH_TOKENS=2000", "DEVICE=cpu", "VAL_FRACTION=0.3")
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    assert b"demo done" in res.stderr and (work / "sample.wav").is_file()
    summary = json.loads((work / "report" / "summary.json").read_text())
    assert summary["counts"]["scored"] == 3 and "codec_reference" in summary["ratios"]
    # one voice was held out of training (--split-by speaker): its items are reported apart
    held_out = summary["held_out_voices"]
    assert len(held_out) == 1 and set(summary["by_voice"]) == {"held_out", "seen"}
    assert summary["by_voice"]["held_out"]["means"]["output"]["n"] == 1
    assert summary["by_voice"]["seen"]["means"]["output"]["n"] == 2
    page = (work / "report" / "index.html").read_text()
    assert page.count("<audio") >= 9 and "<img" in page
