"""The report folder of ``valle evaluate``: scores.csv, summary.json, index.html, audio/ and img/.

The page shows the summary table (means per role and the ratios output / ceiling), the training
curves of the run when given, then per item its text, audio players, spectrograms and scores.
Every text is HTML-escaped; audio and images are linked relative to the page.
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
from valle_cli.evaluation.evaluate import AUDIO_RATE, ROLES, SCORED, Item, Report

_COLUMN_PREFIX = {"output": "", "reference": "ref_", "codec_reference": "codec_ref_"}


def scores_table(items: Sequence[Item]) -> list[dict[str, Any]]:
    """One row per item: id, text, then hypothesis, wer, cer, sim of the output and of each ceiling."""
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
        table.append(row)
    return table


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
                 on_progress: Callable[[int], None] | None = None) -> Path:
    """``out/``: scores.csv, summary.json, index.html, audio/ (wav) and img/ (spectrograms); returns index.html."""
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
    summary = {**report.summary, "training_curves": curves}
    formats.atomic_write_bytes(out / "scores.csv", _csv_bytes(scores_table(report.items)))
    formats.atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    formats.atomic_write_bytes(out / "index.html", page(report.items, summary, out).encode())
    return out / "index.html"


# ----------------------------------------------------------------------------- the page

_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
th{background:#f3f3f3}.num{text-align:right;font-variant-numeric:tabular-nums}.hyp{color:#555;font-style:italic}
.item{border-top:2px solid #ddd;padding-top:0.6em;margin-top:1em}.audio{display:inline-block;margin:0 1em 0.5em 0}
audio{width:300px;display:block}img{display:block}"""


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _summary_table(summary: dict[str, Any]) -> str:
    e = html.escape
    rows = ["<tr><th></th><th>n</th><th>WER</th><th>CER</th><th>SIM</th></tr>"]
    for role, means in summary["means"].items():
        cells = "".join(f"<td class=num>{_fmt(means[m])}</td>" for m in ("wer", "cer", "sim"))
        rows.append(f"<tr><th>{e(role.replace('_', ' '))}</th><td class=num>{means['n']}</td>{cells}</tr>")
    for role, ratio in summary["ratios"].items():
        cells = "".join(f"<td class=num>{_fmt(ratio[m])}</td>" for m in ("wer", "cer", "sim"))
        rows.append(f"<tr><th>output / {e(role.replace('_', ' '))}</th><td></td>{cells}</tr>")
    for group, part in summary.get("by_voice", {}).items():
        label = "held-out voices" if group == "held_out" else "seen voices"
        output = part["means"].get("output")
        if output:
            cells = "".join(f"<td class=num>{_fmt(output[m])}</td>" for m in ("wer", "cer", "sim"))
            rows.append(f"<tr><th>output, {label}</th><td class=num>{output['n']}</td>{cells}</tr>")
        for role, ratio in part["ratios"].items():
            cells = "".join(f"<td class=num>{_fmt(ratio[m])}</td>" for m in ("wer", "cer", "sim"))
            rows.append(f"<tr><th>{label}: output / {e(role.replace('_', ' '))}</th><td></td>{cells}</tr>")
    return "<table>" + "".join(rows) + "</table>"


def page(items: Sequence[Item], summary: dict[str, Any], out: Path) -> str:
    """index.html: the summary table, the training curves, then per item its texts, players, spectrograms
    and scores. Every text is HTML-escaped; audio and images are linked relative to the page."""
    e = html.escape
    counts = summary["counts"]
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'><title>valle evaluate</title>",
             f"<style>{_STYLE}</style></head><body>", "<h1>valle evaluate</h1>",
             f"<p>{e(summary['recogniser'])}; speaker similarity: {e(summary['encoder'])} cosine to the prompt. "
             f"{counts['scored']} of {counts['rows']} rows scored, {counts['missing']} missing, "
             f"{counts['failed']} failed.</p>", _summary_table(summary)]
    if summary["missing"]:
        parts.append(f"<p>Missing outputs: {e(', '.join(summary['missing']))}</p>")
    if summary["failures"]:
        parts.append("<ul>" + "".join(f"<li>{e(k)}: {e(v)}</li>" for k, v in summary["failures"].items()) + "</ul>")
    if summary["out_of_vocabulary"]:
        parts.append(f"<p>Not in the pronouncing dictionary (never recognised): "
                     f"{e(', '.join(summary['out_of_vocabulary']))}</p>")
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
