"""valle evaluate's figures on hand-made items: floors, shares, voice groups, durations, training minutes, the
learning curve and the page that explains them (no recogniser, no embeddings: fast)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from valle_cli.errors import InputError
from valle_cli.evaluation import evaluate as ev
from valle_cli.evaluation import report as rp

pytest.importorskip("jiwer")

TEXTS = ["the red kite flew", "a green map fell", "my old dog sat", "one blue car came"]


def item(i: int, voice: str, out_hyp: str, ref_hyp: str, *, out_sim: float = 0.8, ref_sim: float = 0.9,
         seconds: tuple[float, float] = (2.0, 2.0)) -> ev.Item:
    """An item of ``voice`` whose output and codec reference were heard as the given hypotheses."""
    text = TEXTS[i % len(TEXTS)]
    it = ev.Item(f"{voice}_{i}", text, [f"/eval/prompts/{voice}/p.wav"])
    for role, hyp, sim in (("output", out_hyp, out_sim), ("codec_reference", ref_hyp, ref_sim)):
        it.scores[role] = ev.Scores(hyp, ev.error_rates(text, hyp)[0], 0.0, sim)
    it.seconds = {"output": seconds[0], "reference": seconds[1]}
    return it


def test_wrong_sentence_floor_and_wer_share_from_hand_made_hypotheses():
    items = [item(i, f"v{i % 2}", out_hyp="", ref_hyp=TEXTS[i]) for i in range(4)]  # perfect ceiling, silent output
    for i, it in enumerate(items):  # the derangement: i -> i + n // 2, a text that differs
        k = ev.partner(4, i, lambda k, i=i: TEXTS[k] != TEXTS[i])
        assert k == (i + 2) % 4
        it.wrong_wer = ev.error_rates(TEXTS[k], it.scores["codec_reference"].hypothesis)[0]
    fig = ev.figures(items)
    assert fig["ceiling"] == "codec_reference" and fig["means"]["codec_reference"]["wer"] == 0.0
    assert fig["floors"]["wrong_sentence_wer"] == 1.0  # no word in common between the deranged sentences
    assert fig["means"]["output"]["wer"] == 1.0 and fig["shares"]["wer"] == 0.0  # nothing heard: no share
    for it in items:  # an output that is half right recovers half the range
        words = it.text.split()
        it.scores["output"] = ev.Scores(" ".join(words[:2]), ev.error_rates(it.text, " ".join(words[:2]))[0], 0, 0)
    assert ev.figures(items)["shares"]["wer"] == pytest.approx(0.5)
    check = ev.separation(items)
    assert check == {"role": "codec_reference", "own_text_wer": 0.0, "wrong_sentence_wer": 1.0, "limit": 0.5,
                     "holds": True}


def test_partner_skips_equal_texts_and_same_voices():
    voices = ["a", "a", "a", "b"]
    assert [ev.partner(4, i, lambda k, i=i: voices[k] != voices[i]) for i in range(4)] == [3, 3, 3, 1]
    assert ev.partner(3, 0, lambda k: False) is None and ev.partner(1, 0, lambda k: True) is None


def test_sim_share_and_goals():
    items = [item(i, "v", TEXTS[i], TEXTS[i], out_sim=0.75, ref_sim=0.9) for i in range(4)]
    for it in items:
        it.other_voice_sim, it.wrong_wer = 0.6, 1.0
    fig = ev.figures(items)
    assert fig["floors"]["different_voice_sim"] == pytest.approx(0.6)
    assert fig["shares"]["sim"] == pytest.approx((0.75 - 0.6) / (0.9 - 0.6))  # 0.5: half-way from floor to ceiling
    assert fig["goals"]["sim_share"] == {"value": pytest.approx(0.5), "goal": ">= 0.8", "met": False}
    assert fig["goals"]["sim_ratio"]["met"] is False and fig["goals"]["wer_ratio"]["met"] is None  # 0 / 0 WER
    assert fig["goals"]["wer_share"]["met"] is True and fig["goals"]["duration_within"]["met"] is True


def test_an_eval_only_voice_counts_as_unseen():
    items = [item(0, "spk00", "", ""), item(1, "spk01", "", ""), item(2, "evalonly", "", "")]
    groups = ev.by_voice_group(items, trained={"spk00", "spk05"}, max_seconds=None)  # spk01: validation only
    assert groups["seen_voices"] == ["spk00"] and groups["unseen_voices"] == ["evalonly", "spk01"]
    assert groups["by_voice"]["seen"]["means"]["output"]["n"] == 1
    assert groups["by_voice"]["unseen"]["means"]["output"]["n"] == 2


def test_duration_flags_early_stops_and_capped_outputs():
    items = [item(0, "v", "", "", seconds=(2.0, 2.0)), item(1, "v", "", "", seconds=(1.0, 2.0)),
             item(2, "v", "", "", seconds=(5.99, 2.0)), item(3, "v", "", "", seconds=(2.4, 2.0))]
    items[2].frame_rate = 75.0  # 5.99 s is within one frame (13 ms) of the 6 s cap
    check = ev.duration_check(items, max_seconds=6.0)
    assert check["n"] == 4 and check["within"] == 2 and check["fraction_within"] == 0.5
    assert check["early_stops"] == ["v_1"] and check["capped"] == ["v_2"]
    assert [rp.duration_flag(i, 6.0) for i in items] == ["", "early", "capped", ""]
    assert ev.duration_check(items, None)["capped"] == []  # no samples.json: the cap is unknown
    row = rp.scores_table(items, 6.0)[1]
    assert row["seconds"] == 1.0 and row["ref_seconds"] == 2.0 and row["duration_ratio"] == 0.5


def _log(run: Path, records: list[tuple[int, float]]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "log.jsonl").write_text("".join(json.dumps({"split": "train", "step": s, "time": t}) + "\n"
                                           for s, t in records))


def test_training_minutes_leave_out_a_resume_gap(tmp_path):
    # a record every 10 steps, 60 s apart, from unix time 1000; stopped 2 h after step 30, resumed
    records = [(10, 1000.0), (20, 1060.0), (30, 1120.0), (40, 1120.0 + 7200 + 60), (50, 1120.0 + 7200 + 120)]
    _log(tmp_path / "run", records)
    assert ev.training_minutes(tmp_path / "run", 30) == pytest.approx((120 + 60) / 60)  # first window: 10 x 6 s
    assert ev.training_minutes(tmp_path / "run", 50) == pytest.approx((120 + 60 + 60 + 60) / 60)
    assert ev.training_minutes(tmp_path / "run", None) is None
    assert ev.training_minutes(tmp_path / "empty", 10) is None


def _summary(step: int, minutes: float, wer: float) -> dict:
    return {"step": step, "training_minutes": minutes, "means": {"output": {"n": 4, "wer": wer, "sim": 0.7}},
            "shares": {"wer": 1 - wer, "sim": 0.4}, "durations": {"fraction_within": 0.5}}


def test_curve_from_two_hand_written_summaries(tmp_path):
    for name, step, wer in (("r2", 200, 0.5), ("r1", 100, 0.9)):
        (tmp_path / "reports" / name).mkdir(parents=True)
        (tmp_path / "reports" / name / "summary.json").write_text(json.dumps(_summary(step, step / 10, wer)))
    points = rp.read_curve([tmp_path / "reports"])  # a folder of report folders
    assert [(p["label"], p["step"], p["minutes"], p["wer"]) for p in points] == [("r1", 100, 10.0, 0.9),
                                                                                ("r2", 200, 20.0, 0.5)]
    assert rp.read_curve([tmp_path / "reports" / "r1"])[0]["wer_share"] == pytest.approx(0.1)  # one report folder
    assert [p["label"] for p in rp.read_curve([tmp_path / "reports"], skip=tmp_path / "reports" / "r2")] == ["r1"]
    deep = tmp_path / "curve" / "step-0000300" / "report"  # pipelines/Makefile: curve/step-N/{samples,report}
    deep.mkdir(parents=True)
    (deep / "summary.json").write_text(json.dumps(_summary(300, 30.0, 0.3)))
    (deep.parent / "samples").mkdir()
    assert [(p["label"], p["step"]) for p in rp.read_curve([tmp_path / "curve"])] == [("step-0000300/report", 300)]
    rp.curve_png(points, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 5000
    with pytest.raises(InputError, match="no such report folder"):
        rp.read_curve([tmp_path / "nowhere"])


def test_report_page_explains_goals_floors_shares_and_durations(tmp_path):
    items = [item(i, f"v{i % 2}", TEXTS[i], TEXTS[i], seconds=(1.0 if i == 0 else 2.0, 2.0)) for i in range(4)]
    for it in items:
        it.wrong_wer, it.other_voice_sim = 1.0, 0.5
    summary = ev.summarise(items, rows=4, missing=(), failures={}, lm="bigram", encoder="ge2e", oov=(),
                           max_seconds=6.0)
    summary.update(ev.by_voice_group(items, {"v0"}, 6.0), step=300, training_minutes=12.5,
                   samples={"checkpoint": "run/step300"})
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "summary.json").write_text(json.dumps(_summary(100, 4.0, 0.9)))
    report = ev.Report(items=items, summary=summary)
    index = rp.write_report(report, tmp_path / "report", curve=[tmp_path / "old"])
    page = index.read_text()
    for words in ("Goals", "WER ratio output / ceiling", "&lt;= 1.1", "&gt;= 0.8", "wrong-sentence WER",
                  "different-voice SIM", "Share recovered", "unseen voices (never in training)", "step 300",
                  "12.5 minutes of training", "Separation check", "holds", "Learning curve", "img/curve.png",
                  "lower is better", "higher is better", "<td class=early>early</td>", "cap 6 s",
                  "WER ratio &lt;= 1.1"):
        assert words in page, words
    saved = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert [p["step"] for p in saved["curve"]] == [100, 300] and (tmp_path / "report" / "img" / "curve.png").is_file()
    assert saved["durations"]["early_stops"] == ["v0_0"] and saved["goals"]["duration_within"]["met"] is False
    assert np.isclose(saved["by_voice"]["unseen"]["shares"]["sim"], (0.8 - 0.5) / (0.9 - 0.5))
