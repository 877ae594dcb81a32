"""The CLI contract of every verb: help, exit codes, one-line errors, stdout purity, '-' piping."""

from __future__ import annotations

import errno
import os
import pty
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, TINY_CODEC, run_valle

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

VERBS = ["phonemize", "quantize", "decode"]
ALL_VERBS = ["phonemize", "quantize", "score-chunks", "shard", "train", "sample", "decode", "similarity", "evaluate"]


def test_help_is_fast_and_lists_only_real_verbs():
    code = ("import sys, valle_cli, valle_cli.cli as c\n"
            "assert 'Synthesizer' in dir(valle_cli) and valle_cli.__version__\n"
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


def _help(verb: str, capsys) -> str:
    from valle_cli.cli import main

    with pytest.raises(SystemExit) as info:
        main([verb, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("verb", ALL_VERBS)
def test_help_placeholders_are_uppercase_names_not_python_types(verb, capsys):
    text = _help(verb, capsys)
    usage = text.splitlines()[0]
    assert re.fullmatch(rf"Usage: valle {verb} \[OPTIONS\]( [\[{{][A-Z ]+[\]}}](\.\.\.)?)*", usage), usage
    assert not re.search(r"<(str|int|float|bool|path|list\[[^>]*\]|\w+ range|[\w+-]+(\|[\w+-]+)+)>", text), text
    # every option that takes a value names it: PATH, TEXT, INTEGER, FLOAT or [a|b]
    for line in text.split("\nOptions:\n", 1)[1].splitlines():
        value = re.match(r"  (?:-\w, )?--[\w-]+ ([^\s/]\S*)", line)
        if value:
            assert re.fullmatch(r"[A-Z_=]+|\[[^\]]+\]", value.group(1)), line


def _usage_error(*args: str) -> str:
    res = run_valle(*args)
    err = res.stderr.decode()
    assert res.returncode == 2 and res.stdout == b"", err
    assert err.count(" for help.") == 1 and "(see valle" not in err, err  # the help hint once
    return err


def test_a_misspelled_option_gets_the_closest_suggestion(tmp_path):
    err = _usage_error("decode", tmp_path / "x.npz", "--outt", "y.wav")
    assert "Error: No such option: --outt Did you mean --out?" in err
    err = _usage_error("train", tmp_path, "--max-step", "3")
    assert "Error: No such option: --max-step Did you mean --max-steps?" in err
    assert "Did you mean" not in _usage_error("quantize", tmp_path, "-o", tmp_path / "c", "--zzzz")


def test_a_misspelled_option_of_sample_gets_the_closest_suggestion(tmp_path):
    # sample reads its sampler flags itself (--top-k, --ar-temperature, ...): an unknown one is still a usage error
    err = _usage_error("sample", tmp_path, "--promt", "x.wav", "--text", "Hi.", "-o", tmp_path / "y.npz")
    assert "Error: No such option: --promt Did you mean --prompt?" in err
    assert "Invalid value" not in err


def test_an_unrelated_flag_gets_no_suggestion(tmp_path):
    # compared with their dashes, every long option looks like --bogus ("--" in common): it must not suggest --out
    err = _usage_error("sample", tmp_path, "--bogus", "1", "-o", tmp_path / "y.npz")
    assert "No such option: --bogus" in err and "Did you mean" not in err


@pytest.mark.parametrize("verb", ["quantize", "score-chunks", "train", "sample", "decode", "similarity", "evaluate"])
def test_a_bad_device_is_a_usage_error_in_every_verb(verb, tmp_path):
    args = {"similarity": ["a.wav", "b.wav"], "evaluate": ["rows.csv", tmp_path, "-o", tmp_path / "r"],
            "train": [tmp_path, "-o", tmp_path / "run"], "sample": [tmp_path, "-o", "-"]}.get(
        verb, [tmp_path, "-o", tmp_path / "out"])
    err = _usage_error(verb, *args, "--device", "gpu")
    assert "Invalid value for '--device': 'gpu': expected auto, cpu, cuda or cuda:N" in err


def test_skip_existing_says_so_once_and_never_skips_stdout(tmp_path, capsys):
    from valle_cli.cli.options import Log, skip_existing

    Log.configure(quiet=False, verbose=0)
    out = tmp_path / "out.npz"
    assert not skip_existing(out, overwrite=False)  # nothing there yet
    out.touch()
    assert not skip_existing(out, overwrite=True)
    assert capsys.readouterr().err == ""
    assert skip_existing(out, overwrite=False, redo="refit")
    assert capsys.readouterr().err.strip() == f"{out} exists, skipping (--overwrite to refit)"
    assert not skip_existing(Path("-"), overwrite=False)


def test_every_public_name_resolves_lazily():
    code = ("import sys, valle_cli\n"
            "assert 'torch' not in sys.modules\n"
            "assert set(valle_cli.__all__) == {'__version__', *valle_cli._EXPORTS}\n"
            "missing = [n for n in valle_cli.__all__ if getattr(valle_cli, n, None) is None]\n"
            "assert not missing, missing\n"
            "assert valle_cli.Synthesizer.__module__ == 'valle_cli.generation.synthesizer'\n"
            "try:\n    valle_cli.no_such_name\nexcept AttributeError:\n    print('OK')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.stdout.strip() == "OK", res.stderr


def test_the_package_ships_py_typed_and_no_stale_data():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["valle_cli"]
    assert "py.typed" in patterns and (REPO / "valle_cli" / "py.typed").is_file()
    for pattern in patterns:  # every pattern ships a file that is not Python source
        assert [p for p in (REPO / "valle_cli").glob(pattern) if p.suffix != ".py"], pattern


# ----------------------------------------------------------------------------- Ctrl-C: exit 130, one line


def _start(*args: object) -> subprocess.Popen:
    """``python -m valle_cli ARGS`` in the background, stdin an open pipe (a verb reading '-' waits on it)."""
    env = {**{k: v for k, v in os.environ.items() if k != "VALLE_DEBUG"}, "PYTHONPATH": str(REPO),
           "HF_HUB_OFFLINE": "1", "VALLE_NO_PROGRESS": "1"}
    return subprocess.Popen([sys.executable, "-m", "valle_cli", *map(str, args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def _interrupt_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 240) -> tuple[int, str]:
    """Send SIGINT (Ctrl-C) once ``ready()``; the exit code and stderr."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"never got ready to interrupt: {proc.communicate()[1].decode()}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err.decode()


def _reading_stdin(proc: subprocess.Popen) -> Callable[[], bool]:
    """Whether the process sleeps in read(0, ...), from Linux's /proc/PID/syscall (read is syscall 0 on
    x86-64, 63 on arm64): the verb got past its imports and waits for data on stdin."""
    def ready() -> bool:
        try:
            number, fd = Path(f"/proc/{proc.pid}/syscall").read_text().split()[:2]
        except (OSError, ValueError):
            return False
        return number in ("0", "63") and fd == "0x0"

    return ready


def _assert_interrupted(code: int, err: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 130 and lines and lines[-1] == "Interrupted.", err
    assert "Traceback" not in err and sum("nterrupt" in line for line in lines) == 1, err


needs_proc = pytest.mark.skipif(not Path("/proc/self/syscall").is_file(), reason="needs Linux /proc/PID/syscall")


@needs_proc
@pytest.mark.parametrize("verb", ["phonemize", "decode"])
def test_ctrl_c_while_waiting_on_stdin_exits_130(verb, tmp_path):
    proc = _start(verb, "-", "-o", tmp_path / "out")
    _assert_interrupted(*_interrupt_when(proc, _reading_stdin(proc)))
    assert not (tmp_path / "out").exists()


def test_ctrl_c_mid_folder_quantize_exits_130_and_keeps_whole_files(espeak_corpus, tmp_path):
    codec = tmp_path / "codec.safetensors"
    assert run_valle("quantize", "--fit-codec", espeak_corpus, "-o", codec, *TINY_CODEC).returncode == 0
    audio = tmp_path / "audio"
    wavs = sorted(espeak_corpus.rglob("*.wav"))
    for copy in range(20):  # 240 hard links: long enough to land mid-folder
        (audio / f"copy{copy:02d}").mkdir(parents=True)
        for wav in wavs:
            os.link(wav, audio / f"copy{copy:02d}" / wav.name)
    out = tmp_path / "codes"
    proc = _start("quantize", audio, "-o", out, "--codec", codec, "--batch-seconds", "1", "--workers", "1",
                  "--encoders", "1")
    _assert_interrupted(*_interrupt_when(proc, lambda: len(list(out.rglob("*.npz"))) >= 2))
    written = list(out.rglob("*.npz"))
    assert 2 <= len(written) < 240
    from valle_cli import formats

    for npz in written:  # atomic writes: every file there is whole
        formats.read_codes(npz)
    res = run_valle("quantize", audio, "-o", out, "--codec", codec)  # the rerun finishes the folder
    assert res.returncode == 0 and f"{240 - len(written)} quantized, {len(written)} already done" in \
        " ".join(res.stderr.decode().split()), res.stderr.decode()


def test_ctrl_c_mid_train_exits_130_after_saving_a_checkpoint(tiny_run, tmp_path):
    from valle_cli import checkpoint as ckpt
    from valle_cli.formats import read_log

    run = tmp_path / "run"
    proc = _start("train", tiny_run / "shards", "-o", run, "--preset", "tiny", "--max-steps", "100000",
                  "--batch-tokens", "3000", "--log-every", "1", "--eval-every", "100000", "--save-every", "100000",
                  "--device", "cpu", "--set", "prompt_seconds=[0.5,1.0]")

    def three_steps_logged() -> bool:
        log = run / "log.jsonl"
        return log.is_file() and log.read_text().count("\n") >= 3

    _assert_interrupted(*_interrupt_when(proc, three_steps_logged))
    logged = max(r["step"] for r in read_log(run) if r["split"] == "train")
    saved = ckpt.list_checkpoints(run)
    assert saved and int(saved[-1].name.split("-")[1]) >= logged >= 3  # "Ctrl-C saves a checkpoint first"
