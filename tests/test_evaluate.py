"""valle evaluate: the closed-LM recogniser on espeak speech, the ceilings, the report folder and bad inputs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, ok, one_error_line, run_valle

from valle_cli.codecs.audio import load_audio
from valle_cli.evaluation import asr
from valle_cli.evaluation import evaluate as ev
from valle_cli.evaluation.report import write_report

pytest.importorskip("pocketsphinx")
pytest.importorskip("jiwer")

ODD_TEXT = '<b>"{text}"</b> & co'  # markup and quotes that the page must escape


def valle(*args: object, hide: str | None = None) -> subprocess.CompletedProcess:
    """``valle ARGS`` as a user runs it; ``hide`` makes one module unimportable (a missing package)."""
    if hide is None:
        return run_valle(*map(str, args))
    code = f"import sys; sys.modules[{hide!r}] = None; from valle_cli.cli import main; main(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})




def text_of(wav: Path) -> str:
    return wav.with_suffix(".txt").read_text().strip()


# ----------------------------------------------------------------------------- the recogniser


def test_closed_language_models_recognise_espeak_speech(espeak_corpus):
    wavs = sorted(espeak_corpus.rglob("*.wav"))  # 12 utterances, about 38 s
    texts = [text_of(p) for p in wavs]
    audio = [load_audio(p, asr.ASR_RATE)[0] for p in wavs]
    refs = [asr.normalise_text(t) for t in texts]
    wer = {}
    for lm in asr.LMS:
        hyps = asr.recognise(audio, asr.ASR_RATE, texts, lm)
        wer[lm] = np.mean([asr.error_rates(r, h)[0] for r, h in zip(refs, hyps, strict=True)])
    assert wer["unigram"] < 0.85  # measured 0.58 (pocketsphinx's own LM: nearly 1)
    assert wer["bigram"] < min(0.45, wer["unigram"])  # measured 0.36: the default


def test_text_normalisation_and_language_models():
    assert asr.normalise_text("Seven apples, at 10:30 -- Dr. Smith's 3 dogs!") == \
        "seven apples at ten thirty doctor smith's three dogs"
    arpa = asr.arpa_lm([["a", "b"], ["a", "c"]], "bigram")
    assert "ngram 1=5" in arpa and "ngram 2=5" in arpa and "\\2-grams:" in arpa
    p_ab = 10 ** float(next(line for line in arpa.splitlines() if line.endswith(" a b")).split()[0])
    assert np.isclose(p_ab, (1 - 0.5) / 2)  # seen once of twice after "a", less the discount
    unigram = asr.arpa_lm([["a", "b"], ["a", "c"]])
    assert "ngram 2" not in unigram and np.isclose(10 ** float(unigram.splitlines()[5].split()[0]), 2 / 6)


# ----------------------------------------------------------------------------- the report


@pytest.fixture(scope="module")
def same_files(espeak_corpus, tmp_path_factory) -> Path:
    """Two utterances of each voice copied as "outputs" and as references, prompted by a third of the voice;
    one row without any output; one text with markup in it. Then the command run on it."""
    work = tmp_path_factory.mktemp("evaluate")
    rows = ["id|text|prompt"]
    for spk in ("spk00", "spk01", "spk02"):
        wavs = sorted((espeak_corpus / spk).glob("*.wav"))
        for wav in wavs[:2]:
            for folder in ("samples", "refs"):
                (work / folder).mkdir(exist_ok=True)
                shutil.copy(wav, work / folder / wav.name)
            text = ODD_TEXT.format(text=text_of(wav)) if len(rows) == 1 else text_of(wav)
            rows.append(f"{wav.stem}|{text}|{wavs[3]}")
    rows.append(f"ghost|nobody said this|{wavs[3]}")
    (work / "rows.csv").write_text("\n".join(rows) + "\n")
    (work / "run").mkdir()
    with open(work / "run" / "log.jsonl", "w") as f:  # curves to redraw: no curves.png in this run
        for step in range(1, 4):
            f.write(json.dumps({"split": "train", "step": step, "tasks": {"tts": {"loss": 3 / step,
                                                                                  "acc": 0.2 * step}}}) + "\n")
    work.joinpath("stderr.txt").write_text(ok(valle("evaluate", work / "rows.csv", work / "samples", "-o",
                                                    work / "report", "--references", work / "refs", "--run",
                                                    work / "run", "--device", "cpu")))
    return work


def test_outputs_that_are_the_references_score_ratio_one(same_files):
    summary = json.loads((same_files / "report" / "summary.json").read_text())
    assert summary["lm"] == "bigram" and summary["encoder"] == "ge2e" and "bigram" in summary["recogniser"]
    assert summary["judge"]["settings"]["lm"] == "bigram" and summary["judge"]["separation"]["role"] == "reference"
    assert summary["counts"] == {"rows": 7, "scored": 6, "missing": 1, "failed": 0}
    assert summary["missing"] == ["ghost"]
    assert summary["ratios"]["reference"]["wer"] == 1.0 and np.isclose(summary["ratios"]["reference"]["sim"], 1.0)
    out, ref = summary["means"]["output"], summary["means"]["reference"]
    assert 0 < out["wer"] < 1 and 0.5 < out["sim"] < 1 and out == ref
    err = (same_files / "stderr.txt").read_text()
    assert "no output" in err and "ghost" in err and "bigram" in err and "output / reference: WER x1.000" in err
    # the floors on the same items: wrong sentences score worse than the right ones, other voices less alike
    floors = summary["floors"]
    assert floors["wrong_sentence_wer"] > ref["wer"] and floors["different_voice_sim"] < ref["sim"]
    assert summary["shares"]["wer"] == 1.0 and np.isclose(summary["shares"]["sim"], 1.0)
    assert summary["durations"]["within"] == 6 and summary["durations"]["early_stops"] == []
    assert summary["step"] is None and summary["samples"] is None and "judge separation" in err


def test_scores_table_and_page(same_files):
    report = same_files / "report"
    with open(report / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and list(rows[0]) == ["id", "text", "hypothesis", "wer", "cer", "sim", "ref_hypothesis",
                                                "ref_wer", "ref_cer", "ref_sim", "wrong_sentence_wer",
                                                "different_voice_sim", "seconds", "ref_seconds", "duration_ratio",
                                                "duration_flag"]
    assert all(r["hypothesis"] == r["ref_hypothesis"] and r["wer"] == r["ref_wer"] for r in rows)
    assert rows[0]["text"].startswith('<b>"')
    page = (report / "index.html").read_text()
    assert page.count("<audio controls") == 6 * 3  # prompt, reference, output
    assert "&lt;b&gt;&quot;" in page and "&amp; co" in page and "<b>\"" not in page
    assert "img/curves.png" in page and (report / "img" / "curves.png").is_file()
    for src in [s.split("'")[0] for s in page.split("src='")[1:]]:
        assert (report / src).is_file(), src
    assert len(list((report / "img").glob("*.png"))) == 6 * 3 + 1
    assert len(list((report / "audio").glob("*.wav"))) == 6 * 3


def test_rerun_skips_unless_overwrite(same_files, tmp_path):
    report = tmp_path / "report"  # a copy: the shared report stays as the fixture made it
    shutil.copytree(same_files / "report", report)
    args = ["evaluate", same_files / "rows.csv", same_files / "samples", "-o", report]
    before = (report / "summary.json").read_text()
    assert "skipping" in ok(valle(*args))
    assert (report / "summary.json").read_text() == before
    ok(valle(*args, "--overwrite", "--lm", "unigram", "-e", "mfcc", "-q"))
    summary = json.loads((report / "summary.json").read_text())
    assert summary["lm"] == "unigram" and summary["encoder"] == "mfcc" and "reference" not in summary["means"]


def test_library_report_of_wav_outputs(same_files, tmp_path):
    report = ev.evaluate(same_files / "rows.csv", same_files / "samples", lm="bigram", encoder="mfcc")
    assert [i.id for i in report.items][:2] == ["spk00_0000", "spk00_0001"]
    assert set(report.items[0].audio) == {"prompt", "output"} and report.summary["ratios"] == {}
    index = write_report(report, tmp_path / "r")
    assert index.is_file() and (tmp_path / "r" / "scores.csv").is_file()


# ----------------------------------------------------------------------------- bad inputs


def test_help_starts_with_the_example():
    res = valle("evaluate", "--help")
    text = " ".join(res.stdout.decode().split())
    assert res.returncode == 0 and text.startswith("Usage: valle evaluate")
    usage, rest = text.split(" Example: ", 1)  # the usage line, then at once the example
    assert "OUTPUTS" in usage and len(usage) < 60 and rest.startswith("valle evaluate rows.csv samples/ -o report/")
    for flag in ("--references", "--codec-references", "--lm", "--similarity-encoder", "--run", "bigram|unigram",
                 "--voices-from", "--curve", "wrong-sentence WER", "unseen"):
        assert flag in text


def test_bad_inputs_are_one_line_errors(same_files, tmp_path):
    rows, samples = same_files / "rows.csv", same_files / "samples"
    (tmp_path / "empty.csv").write_text("\n# nothing\n")
    assert "empty manifest" in one_error_line(valle("evaluate", tmp_path / "empty.csv", samples, "-o", tmp_path / "a"))
    (tmp_path / "none").mkdir()
    assert "nothing to evaluate" in one_error_line(valle("evaluate", rows, tmp_path / "none", "-o", tmp_path / "b"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "spk00_0000.wav").write_text("not audio")
    line = one_error_line(valle("evaluate", rows, bad, "-o", tmp_path / "c"))
    assert "nothing to evaluate" in line and "not a readable audio file" in line
    line = one_error_line(valle("evaluate", rows, samples, "-o", tmp_path / "d", hide="pocketsphinx"))
    assert "pip install pocketsphinx jiwer" in line
    # usage errors: exit 2
    assert valle("evaluate", rows, samples, "-o", tmp_path / "e", "--codec-references").returncode == 2
    assert valle("evaluate", rows, samples, "-o", tmp_path / "e", "--lm", "trigram").returncode == 2
    assert valle("evaluate", rows, samples, "-o", tmp_path / "e", "--run", tmp_path / "norun").returncode == 2


def test_unreadable_output_is_listed_not_fatal(same_files, tmp_path):
    samples = tmp_path / "samples"
    shutil.copytree(same_files / "samples", samples)
    (samples / "spk01_0000.wav").write_bytes(b"RIFF junk")
    report = ev.evaluate(same_files / "rows.csv", samples, encoder="mfcc")
    assert report.summary["counts"]["failed"] == 1 and "spk01_0000" in report.summary["failures"]
    assert "not a readable audio file" in report.summary["failures"]["spk01_0000"]
    assert len(report.items) == 5


def test_an_output_of_a_few_frames_is_scored_not_refused(same_files, tmp_path):
    """A model that stops after a frame or two gives a 40 ms output: it scores badly, it does not end the run."""
    import soundfile as sf

    samples = tmp_path / "samples"
    shutil.copytree(same_files / "samples", samples)
    wav, rate = sf.read(samples / "spk01_0000.wav", dtype="float32")
    sf.write(samples / "spk01_0000.wav", wav[: int(0.04 * rate)], rate)
    report = ev.evaluate(same_files / "rows.csv", samples, encoder="mfcc")
    assert report.summary["counts"] == {"rows": 7, "scored": 6, "missing": 1, "failed": 0}
    short = next(i for i in report.items if i.id == "spk01_0000")
    assert short.scores["output"].wer >= 0.8 and np.isfinite(short.scores["output"].sim)
    index = write_report(report, tmp_path / "report")
    assert index.is_file() and len(list((tmp_path / "report" / "img").glob("*spk01_0000*.png"))) == 2


@pytest.mark.slow  # about 20 s: fits a tiny codec, Griffin-Lim decodes
def test_codes_outputs_and_codec_references(espeak_corpus, tmp_path):
    """Outputs that are the codes of the references decode to exactly their codec resynthesis: ratio 1 to it."""
    corpus = tmp_path / "corpus"
    shutil.copytree(espeak_corpus / "spk00", corpus / "spk00")
    ok(run_valle("quantize", corpus, "-o", tmp_path / "codes", "--codebooks", "2", "--codebook-size", "16",
                 "--fit-seconds", "8", "-q"))
    wavs = sorted((corpus / "spk00").glob("*.wav"))
    (tmp_path / "rows.csv").write_text("".join(f"spk00/{w.stem}|{text_of(w)}|{wavs[3]}\n" for w in wavs[:2]))
    report = ev.evaluate(tmp_path / "rows.csv", tmp_path / "codes", references=corpus, codec_references=True,
                         encoder="mfcc")
    assert set(report.items[0].audio) == {"prompt", "reference", "codec_reference", "output"}
    ratios = report.summary["ratios"]
    assert ratios["codec_reference"]["wer"] in (1.0, None) and np.isclose(ratios["codec_reference"]["sim"], 1.0)
    assert set(ratios) == {"reference", "codec_reference"}


# ----------------------------------------------------------------------------- the page in a browser

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]  # no calls home offline


def _chromium() -> str:
    """Path of a Chromium for playwright to drive; skip where there is none (CI installs one and sets
    VALLE_REQUIRE_BROWSER=1, so there a missing browser fails instead of skipping)."""
    required = os.environ.get("VALLE_REQUIRE_BROWSER") == "1"
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        exe = None
    if exe is None:
        if required:
            pytest.fail("VALLE_REQUIRE_BROWSER=1 but chromium or playwright is missing")
        pytest.skip("needs chromium and playwright (pip install playwright; apt-get install chromium)")
    return exe


def test_report_opens_in_a_browser_with_audio_and_pictures(same_files, tmp_path):
    from playwright.sync_api import sync_playwright

    report = same_files / "report"
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        # A media request that Chromium aborts and reissues (net::ERR_ABORTED) is not a failure; a missing
        # file is (net::ERR_FILE_NOT_FOUND), and its player's error code says so too.
        page.on("requestfailed", lambda r: None if r.failure == "net::ERR_ABORTED" else
                problems.append(f"failed: {r.url} {r.failure}"))
        page.goto((report / "index.html").as_uri())
        page.wait_for_load_state("load")
        seen = page.evaluate("""async () => {
            const audios = [...document.querySelectorAll('audio')];  // preload=none: load each, one by one
            for (const a of audios) {
                if (a.readyState >= 1) continue;
                await new Promise(done => {
                    a.addEventListener('loadedmetadata', done); a.addEventListener('error', done); a.load(); });
            }
            return {
                audio: audios.map(a => ({src: decodeURIComponent(a.currentSrc), ready: a.readyState,
                                         duration: a.duration, error: a.error ? a.error.code : 0})),
                images: [...document.images].map(i => ({src: decodeURIComponent(i.src), done: i.complete,
                                                        width: i.naturalWidth, height: i.naturalHeight})),
                text: document.body.innerText,
            };
        }""")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert problems == []
    assert len(seen["audio"]) == 6 * 3
    for a in seen["audio"]:  # every player has its file, and the browser reads the same length as we wrote
        assert a["error"] == 0 and a["ready"] >= 1, a
        wav, _ = load_audio(Path(a["src"].removeprefix("file://")), 16000)
        assert a["duration"] == pytest.approx(len(wav) / 16000, abs=0.05), a
    assert len(seen["images"]) == 6 * 3 + 1
    assert all(i["done"] and i["width"] > 100 and i["height"] > 50 for i in seen["images"]), seen["images"]
    assert any(i["src"].endswith("img/curves.png") and i["width"] > 600 for i in seen["images"])
    text = seen["text"]
    assert '<b>"' in text and "& co" in text  # the markup in a transcript shows as text, not as markup
    assert "output / reference" in text and "ghost" in text
    assert (tmp_path / "report.png").stat().st_size > 10_000
