"""pipelines/Makefile with each corpus layout: one valle call per recipe line, files as targets."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from conftest import REPO

VALLE = f"{sys.executable} -m valle_cli"
# A stand-in for valle that prints the arguments it was given, one JSON list a call.
ARGV_PRINTER = f"{sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))'"


def make(*args: str, dry: bool = False, cwd: Path | None = None, valle: str = VALLE) -> subprocess.CompletedProcess:
    """pipelines/Makefile; with cwd, make runs there (-f), so recipes run there too."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    where = ["-f", str(REPO / "pipelines" / "Makefile")] if cwd else ["-C", str(REPO / "pipelines")]
    cmd = ["make", *where, *(["-n"] if dry else []), f"VALLE={valle}", f"PYTHON={sys.executable}", *args]
    return subprocess.run(cmd, capture_output=True, env=env, cwd=cwd, timeout=900)


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


def test_quality_is_the_demo_at_scale_on_a_gpu(tmp_path):
    res = make("quality", f"WORK={tmp_path}", dry=True)
    assert res.returncode == 0, res.stderr.decode()
    out = res.stdout.decode()
    train = next(line for line in out.splitlines() if " train " in line)
    for flag in ("--preset base", "--device cuda", "--max-steps 20000", "--batch-tokens 32000", "--lr 5e-4"):
        assert flag in train, (flag, train)
    assert "--speakers 40 --per-speaker 100" in out and "evaluate" in out and f"{tmp_path}/quality/" in out
    res = make("quality", f"WORK={tmp_path}", "STEPS=50000", "TEXT=It's `here`.", dry=True)  # still overridable
    assert "--max-steps 50000" in res.stdout.decode()
    sample = shlex.split(next(line for line in res.stdout.decode().splitlines() if " sample " in line))
    assert sample[sample.index("--text") + 1] == "It's `here`."  # settings reach the inner make as data


def _train_line(work) -> str:
    res = make("model", f"WORK={work}", dry=True)
    assert res.returncode == 0, res.stderr.decode()
    return next(line for line in res.stdout.decode().splitlines() if " train " in line)


def test_an_interrupted_training_resumes_and_new_shards_start_over(tmp_path):
    work = tmp_path / "w"
    for target in ("corpus/speakers.tsv", "codec.safetensors", "phonemes.parquet", "codes/manifest.parquet",
                   "chunks.parquet", "shards/index.parquet"):
        (work / target).parent.mkdir(parents=True, exist_ok=True)
        (work / target).touch()
    assert _train_line(work).endswith("--overwrite")  # nothing trained yet
    (work / "run" / "checkpoints" / "step-100").mkdir(parents=True)
    assert _train_line(work).endswith("--resume")  # stopped before run/.done: go on from step 100
    (work / "run" / ".done").touch()
    os.utime(work / "run" / ".done", (1, 1))  # older than the shards: a new corpus, a new run
    assert _train_line(work).endswith("--overwrite")


def test_a_rerun_with_nothing_changed_remakes_nothing(tmp_path):
    # the held-out set is written into the corpus folder too: it must not make the corpus look newer
    settings = (f"WORK={tmp_path}", "SPEAKERS=1", "PER_SPEAKER=1", "EVAL_PER_SPEAKER=1")
    rows = str(tmp_path / "eval" / "rows.csv")
    res = make(rows, *settings)
    assert res.returncode == 0, res.stderr.decode()
    assert make("-q", rows, *settings).returncode == 0  # 0: up to date


def _top(*args: str) -> str:
    """The dry-run recipe lines of the top-level Makefile (a venv that does not exist: every step shows)."""
    res = subprocess.run(["make", "-n", "-C", str(REPO), *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_torch_comes_from_pypi_unless_an_index_is_given(tmp_path):
    venv = f"VENV={tmp_path / 'venv'}"
    torch = next(line for line in _top("install", venv).splitlines() if "torch==" in line)
    assert "--index-url" not in torch
    cpu = "https://download.pytorch.org/whl/cpu"
    torch = next(line for line in _top("install", venv, f"TORCH_INDEX_URL={cpu}").splitlines() if "torch==" in line)
    assert shlex.split(torch)[-3:] == ["torch==2.13.0", "--index-url", cpu]


def test_install_says_how_to_put_valle_on_path_and_lint_checks_the_layers(tmp_path):
    venv = tmp_path / "venv"
    echo = next(line for line in _top("install", f"VENV={venv}").splitlines() if line.startswith("echo "))
    assert f"'. {venv}/bin/activate'" in shlex.split(echo)[1]
    assert f"{venv}/bin/lint-imports" in _top("lint", f"VENV={venv}")


def test_a_venv_path_with_spaces_is_one_word_in_every_recipe(tmp_path):
    venv = tmp_path / "my venv"
    pip = [shlex.split(line) for line in _top("install", f"VENV={venv}").splitlines() if "/pip" in line]
    assert pip and all(words[0] == f"{venv}/bin/pip" for words in pip)
    # the inner make gets valle as one quoted word, and uses it so
    calls = [shlex.split(line) for line in _top("demo", f"VENV={venv}").splitlines() if "/bin/valle" in line]
    inner = [words for words in calls if words[0] not in ("make", "echo")]
    assert inner and all(words[0] == f"{venv}/bin/valle" for words in inner)


def _hostile_corpus(root: Path, layout: str, name: str) -> tuple[list[str], Path]:
    """A corpus whose first .wav (the pipeline's prompt) is called `name`: the make arguments for it,
    and the prompt's path. Every target up to the model is made up to date, so `make sample` runs
    only the sample and decode steps."""
    if layout == "folder":
        corpus = root / "corpus"
        (corpus / "spk").mkdir(parents=True)
        (corpus / "spk" / "z.wav").touch()
        prompt, ready, args = corpus / "spk" / name, corpus, [f"CORPUS={corpus}"]
    else:
        lj = root / "LJ"
        (lj / "wavs").mkdir(parents=True)
        (lj / "wavs" / "z.wav").touch()
        prompt, ready, args = lj / "wavs" / name, lj / "metadata.csv", [f"LJSPEECH={lj}"]
        ready.write_text("z|b|b\n")
    prompt.touch()
    os.utime(ready, (1000, 1000))
    work = root / "work"
    for i, target in enumerate(("codec.safetensors", "phonemes.parquet", "codes/manifest.parquet", "chunks.parquet",
                                "shards/index.parquet", "run/.done")):
        (work / target).parent.mkdir(parents=True, exist_ok=True)
        (work / target).touch()
        os.utime(work / target, (2000 + i, 2000 + i))
    return [f"LAYOUT={layout}", f"WORK={work}", *args], prompt


@pytest.mark.parametrize("layout", ["folder", "ljspeech"])
@pytest.mark.parametrize("name", ["$(touch${IFS}PWNED).wav", "`touch${IFS}PWNED`.wav", "a;touch${IFS}PWNED;.wav",
                                  "it's \"quoted\" & spaced.wav"])
def test_a_hostile_corpus_file_name_is_passed_as_data(layout, name, tmp_path):
    # ${IFS}: no space, so that make's old $(wildcard) kept the name whole and the shell ran it
    args, prompt = _hostile_corpus(tmp_path, layout, name)
    res = make("sample", *args, dry=True)
    assert res.returncode == 0, res.stderr.decode()
    line = next(line for line in res.stdout.decode().splitlines() if " sample " in line)
    words = shlex.split(line)  # the recipe line as the shell reads it
    assert words[words.index("--prompt") + 1] == str(prompt), line
    # run the step for real, in tmp_path (where an injected `touch PWNED` would leave its mark)
    res = make("sample", *args, cwd=tmp_path, valle=ARGV_PRINTER)
    assert res.returncode == 0, res.stderr.decode()
    calls = [json.loads(line) for line in res.stdout.decode().splitlines() if line.startswith("[")]
    sample = next(argv for argv in calls if argv[0] == "sample")
    assert sample[sample.index("--prompt") + 1] == str(prompt)
    assert not list(tmp_path.rglob("PWNED")), "a file name ran as a command"


def test_work_and_corpus_paths_with_spaces(tmp_path):
    corpus, work = tmp_path / "my corpus", tmp_path / "my work"
    (corpus / "spk 1").mkdir(parents=True)
    (corpus / "spk 1" / "utt 1.wav").touch()
    (corpus / "spk 1" / "utt 1.txt").write_text("Hello there.\n")
    res = make("demo", "LAYOUT=folder", f"CORPUS={corpus}", f"WORK={work}", dry=True)
    assert res.returncode == 0, res.stderr.decode()
    calls = [shlex.split(line) for line in res.stdout.decode().splitlines() if line.startswith(VALLE)]
    quantize = next(words for words in calls if "quantize" in words and "--codec" in words)
    assert quantize[quantize.index("quantize") + 1] == str(corpus) and f"{work}/codes" in quantize
    sample = next(words for words in calls if "sample" in words)
    assert sample[sample.index("--prompt") + 1] == str(corpus / "spk 1" / "utt 1.wav")
    res = make("demo", f"WORK={work}", dry=True)  # espeak: the corpus is made inside WORK
    assert res.returncode == 0, res.stderr.decode()
    make_corpus = next(line for line in res.stdout.decode().splitlines() if "make_corpus.py" in line)
    assert f"{work}/corpus" in shlex.split(make_corpus)
    # one real step, then make sees it is up to date (targets with spaces compare their times)
    res = make("phonemes", "LAYOUT=folder", f"CORPUS={corpus}", f"WORK={work}")
    assert res.returncode == 0, res.stderr.decode()
    assert (work / "phonemes.parquet").is_file()
    assert make("-q", "phonemes", "LAYOUT=folder", f"CORPUS={corpus}", f"WORK={work}").returncode == 0


def test_a_path_make_cannot_use_as_a_target_is_refused_by_name(tmp_path):
    res = make("demo", f"WORK={tmp_path}/a;b", dry=True)
    assert res.returncode != 0 and b"WORK=" in res.stderr and b"cannot use a path with ';'" in res.stderr


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
    for wav in sorted(espeak_corpus.glob("spk0[01]/*.wav")):  # two voices: the codec needs ~14 s of audio
        shutil.copy(wav, lj / "wavs" / wav.name)
        text = wav.with_suffix(".txt").read_text().strip()
        rows.append(f"{wav.stem}|{text}|{text}")
    (lj / "metadata.csv").write_text("\n".join(rows) + "\n")
    res = make("shards", "LAYOUT=ljspeech", f"LJSPEECH={lj}", f"WORK={tmp_path / 'lj'}", "DEVICE=cpu",
               "VAL_FRACTION=0.25")
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    index = pl.read_parquet(tmp_path / "lj" / "shards" / "index.parquet")
    assert len(index) == len(rows) and (index["split"] == "val").sum() == 2


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
    unseen = summary["unseen_voices"]
    assert len(unseen) == 1 and set(summary["by_voice"]) == {"unseen", "seen"}
    assert summary["by_voice"]["unseen"]["means"]["output"]["n"] == 1
    assert summary["by_voice"]["seen"]["means"]["output"]["n"] == 2
    page = (work / "report" / "index.html").read_text()
    assert page.count("<audio") >= 9 and "<img" in page
    # a rerun with nothing changed has nothing to do
    res = make("demo", f"WORK={work}", "SPEAKERS=3", "PER_SPEAKER=4", "EVAL_PER_SPEAKER=1", "STEPS=2",
               "BATCH_TOKENS=2000", "DEVICE=cpu", "VAL_FRACTION=0.3", dry=True)
    assert [line for line in res.stdout.decode().splitlines() if line.startswith((VALLE, sys.executable))] == []

    # a stopped run (no run/.done) goes on from its last checkpoint, here to a longer schedule
    (work / "run" / ".done").unlink()
    res = make("model", f"WORK={work}", "SPEAKERS=3", "PER_SPEAKER=4", "EVAL_PER_SPEAKER=1", "STEPS=4",
               "BATCH_TOKENS=2000", "DEVICE=cpu", "VAL_FRACTION=0.3")
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    assert b"--resume" in res.stdout and (work / "run" / ".done").is_file()
    steps = [json.loads(line).get("step") for line in (work / "run" / "log.jsonl").read_text().splitlines()]
    assert max(s for s in steps if s is not None) == 4


@pytest.mark.slow
def test_a_tiny_make_speak_runs_with_its_learning_curve_and_the_recipe_settings(tmp_path):
    """`make speak` shrunk to a couple of CPU minutes (quality is not asserted here): unseen voices, the
    37.5 frames/s codec, the recipe's [sample] settings in the checkpoint, and a learning curve."""
    work = tmp_path / "sp"
    tiny = ["SPEAKERS=3", "PER_SPEAKER=8", "EVAL_SPEAKERS=2", "UNSEEN_SPEAKERS=1", "EVAL_PER_SPEAKER=1",
            "PRESET=tiny", "STEPS=4", "BATCH_TOKENS=2000", "EVAL_EVERY=2", "SAVE_EVERY=2", "CURVE_EVERY=2",
            "CODEBOOKS=4", "VAL_FRACTION=0.3", "DEVICE=cpu"]  # 4: speak.toml gives one level probability per codebook
    res = make("speak", f"SPEAK_WORK={work}", *tiny)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    assert b"speak done" in res.stderr and (work / "sample.wav").is_file()
    summary = json.loads((work / "report" / "summary.json").read_text())
    assert summary["counts"]["scored"] == 3  # 2 corpus voices + 1 unseen voice, one sentence each
    assert len(summary["unseen_voices"]) >= 1 and any(v.startswith("unseen") for v in summary["unseen_voices"])
    samples = json.loads((work / "samples" / "samples.json").read_text())
    assert samples["step"] == 4 and samples["params"]["mode"] == "ar+nar" and samples["params"]["ar"]["min_p"] == 0.05
    assert samples["max_seconds"] == pytest.approx(10.0, abs=0.03)  # speak.toml's cap: MAX_SECONDS is empty
    assert (work / "curve" / "step-0000002" / "report" / "summary.json").is_file()
    assert "step-0000002/report" in (work / "report" / "index.html").read_text()  # a point of the curve
    assert json.loads((work / "run" / "config.json").read_text())["frame_rate"] == 37.5
