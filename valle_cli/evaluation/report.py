"""The report folder of ``valle evaluate``: scores.csv, summary.json, index.html, audio/ and img/.

The page explains itself from top to bottom: what was evaluated (run, step, minutes of training), how to
read each figure and which way is better, the goals and whether they are met (overall and per voice
group), the judge's settings and its separation check, the means, floors and shares, each output's
duration beside its reference's (early stops and capped outputs flagged), the learning curve of earlier
reports (``--curve``) and the run's training curves, then per item its text, players, spectrograms and
scores. Every text is HTML-escaped; audio and images are linked relative to the page.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from valle_cli import formats
from valle_cli.errors import InputError
from valle_cli.evaluation.evaluate import AUDIO_RATE, EARLY_STOP, ROLES, SCORED, Item, Report, duration_ratio, is_capped

_COLUMN_PREFIX = {"output": "", "reference": "ref_", "codec_reference": "codec_ref_"}


def duration_flag(item: Item, max_seconds: float | None) -> str:
    """'capped' (the output ran to the length cap), 'early' (shorter than 0.75x its reference) or ''."""
    if is_capped(item, max_seconds):
        return "capped"
    ratio = duration_ratio(item)
    return "early" if ratio is not None and ratio < EARLY_STOP else ""


def scores_table(items: Sequence[Item], max_seconds: float | None = None) -> list[dict[str, Any]]:
    """One row per item: id, text, hypothesis, wer, cer, sim of the output and of each ceiling, then the
    floors of the item (wrong-sentence WER, different-voice SIM) and the durations."""
    roles = [r for r in SCORED if any(r in item.scores for item in items)]
    table = []
    for item in items:
        row: dict[str, Any] = {"id": item.id, "text": item.text}
        for role in roles:
            score = item.scores.get(role)
            prefix = _COLUMN_PREFIX[role]
            row[f"{prefix}hypothesis"] = score.hypothesis if score else ""
            for metric in ("wer", "cer", "sim"):
                row[f"{prefix}{metric}"] = "" if score is None else round(getattr(score, metric), 6)
        ratio = duration_ratio(item)
        row.update(wrong_sentence_wer=_rounded(item.wrong_wer), different_voice_sim=_rounded(item.other_voice_sim),
                   seconds=_rounded(item.seconds.get("output")), ref_seconds=_rounded(item.seconds.get("reference")),
                   duration_ratio=_rounded(ratio), duration_flag=duration_flag(item, max_seconds))
        table.append(row)
    return table


def _rounded(value: float | None) -> float | str:
    return "" if value is None else round(value, 6)


def _csv_bytes(rows: list[dict[str, Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def spectrogram_png(wav: np.ndarray, path: Path, sample_rate: int = AUDIO_RATE) -> None:
    """A log-magnitude spectrogram (0-8 kHz) of ``wav``, written atomically as a small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_fft, hop = 512, 128
    wav = np.pad(np.asarray(wav, np.float32), (0, max(0, n_fft - len(wav))))
    frames = np.lib.stride_tricks.sliding_window_view(wav, n_fft)[::hop] * np.hanning(n_fft)  # (F, n_fft)
    db = 20 * np.log10(np.abs(np.fft.rfft(frames, axis=1)).T + 1e-5)  # (n_fft/2+1, F)
    top = int(8000 / (sample_rate / n_fft))
    fig, ax = plt.subplots(figsize=(3.6, 1.4), dpi=80)
    ax.imshow(db[:top], origin="lower", aspect="auto", cmap="magma", vmin=db.max() - 80, vmax=db.max(),
              extent=(0, len(wav) / sample_rate, 0, 8))
    ax.set(xlabel="s", ylabel="kHz")
    ax.tick_params(labelsize=6)
    ax.xaxis.label.set_size(6)
    ax.yaxis.label.set_size(6)
    fig.tight_layout(pad=0.2)
    with formats.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def training_curves(run: str | os.PathLike[str], path: Path) -> bool:
    """run/curves.png copied to ``path``, or redrawn from run/log.jsonl (run/ is not written); False if neither."""
    from valle_cli.formats import CURVES_FILE, LOG_FILE
    from valle_cli.training.curves import plot_curves

    run = Path(run)
    if not run.is_dir():
        raise InputError(f"{run}: no such run folder")
    if (run / CURVES_FILE).is_file():
        with formats.atomic_path(path) as tmp:
            shutil.copyfile(run / CURVES_FILE, tmp)
        return True
    if not (run / LOG_FILE).is_file():
        return False
    with tempfile.TemporaryDirectory(prefix="valle-curves-") as tmp:
        shutil.copyfile(run / LOG_FILE, Path(tmp) / LOG_FILE)
        drawn = plot_curves(Path(tmp))
        if drawn is None:
            return False
        with formats.atomic_path(path) as out:
            shutil.copyfile(drawn, out)
    return True


def write_report(report: Report, out: str | os.PathLike[str], *, run: str | os.PathLike[str] | None = None,
                 curve: Sequence[str | os.PathLike[str]] = (),
                 on_progress: Callable[[int], None] | None = None) -> Path:
    """``out/``: scores.csv, summary.json, index.html, audio/ (wav) and img/ (spectrograms, the training curves
    of ``run``, curve.png of the earlier reports named by ``curve``); returns index.html."""
    import soundfile as sf

    out = Path(out)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    (out / "img").mkdir(exist_ok=True)
    for item in report.items:
        for role, path in list(item.audio.items()):
            target = out / "audio" / path.name
            if path.resolve() != target.resolve():
                with formats.atomic_path(target) as tmp:
                    shutil.copyfile(path, tmp)
                item.audio[role] = target
            wav, rate = sf.read(target, dtype="float32")
            spectrogram_png(wav, out / "img" / f"{path.stem}.png", rate)
        if on_progress:
            on_progress(1)
    curves = None
    if run is not None and training_curves(run, out / "img" / "curves.png"):
        curves = "img/curves.png"
    summary = {**report.summary, "training_curves": curves, "run": None if run is None else str(run)}
    points = [*read_curve(curve, skip=out), curve_point(summary, "this report")] if curve else []
    summary["curve"] = points
    if points:
        curve_png(points, out / "img" / "curve.png")
    max_seconds = summary["durations"]["max_seconds"]
    formats.atomic_write_bytes(out / "scores.csv", _csv_bytes(scores_table(report.items, max_seconds)))
    formats.atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    formats.atomic_write_bytes(out / "index.html", page(report.items, summary, out).encode())
    return out / "index.html"


# ----------------------------------------------------------------------------- the learning curve

CURVE_FIGURES = (("wer", "output WER", "lower"), ("sim", "output SIM", "higher"),
                 ("wer_share", "WER share recovered", "higher"), ("sim_share", "SIM share recovered", "higher"),
                 ("duration_within", "outputs within +-25 % duration", "higher"))


def curve_point(summary: dict[str, Any], label: str) -> dict[str, Any]:
    """One point of the learning curve: the step, minutes of training and the headline figures of a summary."""
    output = summary.get("means", {}).get("output", {})
    return {"label": label, "step": summary.get("step"), "minutes": summary.get("training_minutes"),
            "wer": output.get("wer"), "sim": output.get("sim"), "wer_share": summary["shares"]["wer"],
            "sim_share": summary["shares"]["sim"], "duration_within": summary["durations"]["fraction_within"]}


def read_curve(folders: Sequence[str | os.PathLike[str]], skip: Path | None = None) -> list[dict[str, Any]]:
    """Curve points of earlier reports: each folder is a report folder (it has summary.json) or a folder
    that holds report folders at any depth (``curve/step-N/report/``, as pipelines/Makefile writes them),
    less ``skip`` (the report being written, whose old summary would be a stale point). Points without a
    step are dropped; sorted by step."""
    summaries: list[tuple[Path, str]] = []  # (summary.json, its label)
    for folder in map(Path, folders):
        if (folder / "summary.json").is_file():
            summaries.append((folder / "summary.json", folder.name))
        elif folder.is_dir():
            summaries += [(p, str(p.parent.relative_to(folder))) for p in sorted(folder.rglob("summary.json"))]
        else:
            raise InputError(f"{folder}: no such report folder (--curve)")
    points = []
    for path, label in summaries:
        if skip is not None and path.parent.resolve() == skip.resolve():
            continue
        try:
            summary = json.loads(path.read_text())
            point = curve_point(summary, label)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{path}: not a valle evaluate summary of this version ({e})") from None
        if point["step"] is not None:
            points.append(point)
    return sorted(points, key=lambda p: p["step"])


def curve_png(points: Sequence[dict[str, Any]], path: Path) -> None:
    """curve.png: each headline figure against the training step (minutes of training on the top axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted((p for p in points if p["step"] is not None), key=lambda p: p["step"])
    fig, axes = plt.subplots(1, len(CURVE_FIGURES), figsize=(3.0 * len(CURVE_FIGURES), 2.6), dpi=80)
    for ax, (key, title, better) in zip(axes, CURVE_FIGURES, strict=True):
        shown = [p for p in points if p[key] is not None]
        ax.plot([p["step"] for p in shown], [p[key] for p in shown], "o-")
        ax.set_title(f"{title} ({better} is better)", fontsize=7)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=6)
        if shown and all(p["minutes"] is not None for p in shown):
            top = ax.secondary_xaxis("top")
            top.set_xticks([p["step"] for p in shown], [f"{p['minutes']:.0f}m" for p in shown], fontsize=6)
    fig.tight_layout(pad=0.3)
    with formats.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------- the page

_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
th{background:#f3f3f3}.num{text-align:right;font-variant-numeric:tabular-nums}.hyp{color:#555;font-style:italic}
.item{border-top:2px solid #ddd;padding-top:0.6em;margin-top:1em}.audio{display:inline-block;margin:0 1em 0.5em 0}
audio{width:300px;display:block}img{display:block}.yes{color:#176117}.no,.early,.capped{color:#a11}"""


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _summary_table(summary: dict[str, Any]) -> str:
    e = html.escape
    rows = ["<tr><th></th><th>n</th><th>WER (lower is better)</th><th>CER</th><th>SIM (higher is better)</th></tr>"]
    for role, means in summary["means"].items():
        cells = "".join(f"<td class=num>{_fmt(means[m])}</td>" for m in ("wer", "cer", "sim"))
        rows.append(f"<tr><th>{e(role.replace('_', ' '))}</th><td class=num>{means['n']}</td>{cells}</tr>")
    for role, ratio in summary["ratios"].items():
        cells = "".join(f"<td class=num>{_fmt(ratio[m])}</td>" for m in ("wer", "cer", "sim"))
        rows.append(f"<tr><th>output / {e(role.replace('_', ' '))}</th><td></td>{cells}</tr>")
    floors = summary["floors"]
    rows.append(f"<tr><th>floor: wrong sentence / different voice</th><td></td>"
                f"<td class=num>{_fmt(floors['wrong_sentence_wer'])}</td><td></td>"
                f"<td class=num>{_fmt(floors['different_voice_sim'])}</td></tr>")
    rows.append(f"<tr><th>share of the range recovered</th><td></td><td class=num>{_fmt(summary['shares']['wer'])}"
                f"</td><td></td><td class=num>{_fmt(summary['shares']['sim'])}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


_GOAL_NAMES = {"wer_ratio": "WER ratio output / ceiling", "sim_ratio": "SIM ratio output / ceiling",
               "wer_share": "WER share recovered", "sim_share": "SIM share recovered",
               "duration_within": "fraction of outputs within +-25 % of the reference's duration"}


def _met(met: bool | None) -> str:
    return "-" if met is None else ("<b class=yes>met</b>" if met else "<b class=no>not met</b>")


def _goals_table(summary: dict[str, Any]) -> str:
    groups = {"all voices": summary}
    labels = {"seen": "seen voices", "unseen": "unseen voices (never in training)"}
    groups.update({labels[name]: part for name, part in summary.get("by_voice", {}).items()})
    rows = ["<tr><th>goal</th><th>wanted</th>" + "".join(f"<th>{html.escape(g)}</th>" for g in groups) + "</tr>"]
    for key, name in _GOAL_NAMES.items():
        cells = "".join(f"<td class=num>{_fmt(part['goals'][key]['value'])} {_met(part['goals'][key]['met'])}</td>"
                        for part in groups.values())
        rows.append(f"<tr><th>{html.escape(name)}</th><td>{html.escape(summary['goals'][key]['goal'])}</td>{cells}</tr>")
    rows.append("<tr><th>n outputs, durations</th><td></td>" + "".join(
        f"<td class=num>{part['means'].get('output', {}).get('n', 0)}, {part['durations']['within']} of "
        f"{part['durations']['n']} within</td>" for part in groups.values()) + "</tr>")
    return "<table>" + "".join(rows) + "</table>"


def _explanation(summary: dict[str, Any]) -> str:
    ceiling = (summary.get("ceiling") or "reference").replace("_", " ")
    return (
        "<h2>How to read this report</h2><ul>"
        "<li><b>WER</b> (word error rate, lower is better): the words the recogniser heard against the text asked "
        "for. <b>CER</b> the same on characters.</li>"
        f"<li><b>SIM</b> (higher is better): cosine of the speaker embeddings ({html.escape(summary['encoder'])}) of "
        "the audio and its prompt.</li>"
        f"<li><b>Ceiling</b>: the {html.escape(ceiling)}s (ground truth through the outputs' codec when there are "
        "codec references): the best a model of this codec can do. <b>Ratios</b> are output / ceiling.</li>"
        "<li><b>Floors</b>, on the same items: the <i>wrong-sentence WER</i> is the ceiling's hypothesis scored "
        "against another item's text (what speech of the wrong words scores); the <i>different-voice SIM</i> is the "
        "reference against the prompt of an item of another voice.</li>"
        "<li><b>Share recovered</b> = (floor - output) / (floor - ceiling) for WER, (output - floor) / (ceiling - "
        "floor) for SIM: 0 = no better than wrong speech (babble scores about 0), 1 = as good as the ceiling.</li>"
        "<li><b>Durations</b>: each output's length beside its reference's; <i>early</i> = shorter than "
        f"{EARLY_STOP}x (the model stopped early), <i>capped</i> = it ran to the length cap (it never stopped).</li>"
        "<li><b>Goals</b>: WER ratio &lt;= 1.1, SIM ratio &gt;= 0.9, both shares &gt;= 0.8, every output within "
        "+-25 % of its "
        "reference's duration; for seen and unseen voices apart.</li></ul>")


def _judge(summary: dict[str, Any]) -> str:
    e = html.escape
    judge = summary["judge"]
    check = judge["separation"]
    settings = ", ".join(f"{k} {v}" for k, v in judge["settings"].items())
    verdict = {True: "<b class=yes>holds</b>: the judge tells right speech from wrong text",
               False: "<b class=no>does not hold</b>: WER differences here mean little",
               None: "cannot be checked without references"}[check["holds"]]
    role = (check["role"] or "ceiling").replace("_", " ")
    return (f"<h2>The judge</h2><p>{e(judge['recogniser'])}; settings: {e(settings)}. Separation check: the "
            f"{e(role)}s' WER against their own texts {_fmt(check['own_text_wer'])} vs against wrong sentences "
            f"{_fmt(check['wrong_sentence_wer'])}; it must be at most {check['limit']}x: {verdict}.</p>")


def _durations_table(items: Sequence[Item], summary: dict[str, Any]) -> str:
    e = html.escape
    d = summary["durations"]
    cap = "no samples.json: cap unknown" if d["max_seconds"] is None else f"cap {d['max_seconds']:g} s"
    rows = ["<tr><th>id</th><th>output s</th><th>reference s</th><th>ratio</th><th>flag</th></tr>"]
    for item in items:
        flag = duration_flag(item, d["max_seconds"])
        rows.append(f"<tr><td>{e(item.id)}</td><td class=num>{_fmt(item.seconds.get('output'), 2)}</td>"
                    f"<td class=num>{_fmt(item.seconds.get('reference'), 2)}</td>"
                    f"<td class=num>{_fmt(duration_ratio(item), 2)}</td><td class={flag or 'ok'}>{e(flag)}</td></tr>")
    return (f"<h2>Durations</h2><p>{d['within']} of {d['n']} outputs within +-25 % of their reference's duration; "
            f"{len(d['early_stops'])} early stop(s), {len(d['capped'])} capped ({e(cap)}).</p>"
            "<table>" + "".join(rows) + "</table>")


def _curve_section(summary: dict[str, Any]) -> str:
    points = summary.get("curve") or []
    if not points:
        return ""
    rows = ["<tr><th>report</th><th>step</th><th>minutes</th>" + "".join(
        f"<th>{html.escape(t)}</th>" for _, t, _ in CURVE_FIGURES) + "</tr>"]
    for p in points:
        rows.append(f"<tr><td>{html.escape(p['label'])}</td><td class=num>{p['step'] if p['step'] is not None else '-'}"
                    f"</td><td class=num>{_fmt(p['minutes'], 1)}</td>"
                    + "".join(f"<td class=num>{_fmt(p[k])}</td>" for k, _, _ in CURVE_FIGURES) + "</tr>")
    return ("<h2>Learning curve</h2><table>" + "".join(rows) + "</table>"
            "<img src='img/curve.png' alt='learning curve' width=1100>")


def _header(summary: dict[str, Any]) -> str:
    e = html.escape
    counts, info = summary["counts"], summary.get("samples") or {}
    what = [f"run {e(summary['run'])}" if summary.get("run") else "",
            f"checkpoint {e(str(info['checkpoint']))}" if info.get("checkpoint") else "",
            f"step {summary['step']}" if summary.get("step") is not None else "step unknown (no samples.json)",
            f"{summary['training_minutes']:.1f} minutes of training" if summary.get("training_minutes") else ""]
    return (f"<p>{'; '.join(w for w in what if w)}. {counts['scored']} of {counts['rows']} rows scored, "
            f"{counts['missing']} missing, {counts['failed']} failed.</p>")


def page(items: Sequence[Item], summary: dict[str, Any], out: Path) -> str:
    """index.html: what was evaluated, how to read it, the goals, the judge, the figures, the durations, the
    curves, then per item its texts, players, spectrograms and scores. Every text is HTML-escaped; audio and
    images are linked relative to the page."""
    e = html.escape
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'><title>valle evaluate</title>",
             f"<style>{_STYLE}</style></head><body>", "<h1>valle evaluate</h1>", _header(summary),
             "<h2>Goals</h2>", _goals_table(summary), _explanation(summary), _judge(summary),
             "<h2>Figures</h2>", _summary_table(summary)]
    if summary.get("unseen_voices") is not None:
        parts.append(f"<p>Seen voices: {e(', '.join(summary['seen_voices']) or 'none')}. Unseen voices (in no "
                     f"training shard): {e(', '.join(summary['unseen_voices']) or 'none')}.</p>")
    if summary["missing"]:
        parts.append(f"<p>Missing outputs: {e(', '.join(summary['missing']))}</p>")
    if summary["failures"]:
        parts.append("<ul>" + "".join(f"<li>{e(k)}: {e(v)}</li>" for k, v in summary["failures"].items()) + "</ul>")
    if summary["out_of_vocabulary"]:
        parts.append(f"<p>Not in the pronouncing dictionary (never recognised): "
                     f"{e(', '.join(summary['out_of_vocabulary']))}</p>")
    parts += [_durations_table(items, summary), _curve_section(summary)]
    if summary.get("training_curves"):
        parts.append(f"<h2>Training</h2><img src='{e(summary['training_curves'])}' alt='training curves' width=900>")
    parts.append("<h2>Items</h2>")
    for item in items:
        parts.append(f"<div class=item><h3>{e(item.id)}</h3><p>{e(item.text)}</p>")
        for role in ROLES:
            if role not in item.audio:
                continue
            rel = item.audio[role].relative_to(out).as_posix()
            img = f"img/{item.audio[role].stem}.png"
            parts.append(f"<div class=audio><b>{e(role.replace('_', ' '))}</b>"
                         f"<audio controls preload=none src='{e(rel)}'></audio>"
                         f"<img src='{e(img)}' alt='spectrogram of the {e(role)}'></div>")
        rows = ["<tr><th></th><th>heard</th><th>WER</th><th>CER</th><th>SIM</th></tr>"]
        for role in SCORED:
            if role in item.scores:
                s = item.scores[role]
                rows.append(f"<tr><th>{e(role.replace('_', ' '))}</th><td class=hyp>{e(s.hypothesis)}</td>"
                            f"<td class=num>{_fmt(s.wer)}</td><td class=num>{_fmt(s.cer)}</td>"
                            f"<td class=num>{_fmt(s.sim)}</td></tr>")
        parts.append("<table>" + "".join(rows) + "</table></div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
