#!/usr/bin/env bash
# The parity tests of the original codec packages (encodec, descript-audio-codec) against the
# transformers models valle uses, in a side venv where they import: both need torchaudio, and no
# torchaudio matches the project's torch 2.13 CPU build, so in the project's venv they skip.
#
#   benchmarks/original_parity.sh [VENV]        # default /tmp/valle-parity; about 7 GB (a CUDA torch 2.9.1)
#
# Last run 2026-12-02 (torch 2.9.1, torchaudio 2.9.1, encodec 0.1.1, descript-audio-codec 1.0.0,
# transformers 5.24): all parity tests pass; with the same random weights the codes of EnCodec
# (1.5-24 kbps) and DAC (44/24/16 kHz) are identical in both implementations and decoded audio
# agrees within 1.2e-7, weights copied either way.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-/tmp/valle-parity}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.9.1 'torchaudio==2.9.*'
    # the project's own dependencies (torch stays 2.9.1: the ranges admit it), without installing
    # the project into the venv: PYTHONPATH below finds it
    deps=$("$VENV/bin/python" -c "import tomllib; print(' '.join(d for d in tomllib.load(open('$REPO/pyproject.toml', 'rb'))['project']['dependencies'] if not d.startswith('torch')))")
    # shellcheck disable=SC2086
    "$VENV/bin/pip" install -q $deps pytest encodec descript-audio-codec
fi
"$VENV/bin/python" -c "import torch, torchaudio, encodec, dac; print('torch', torch.__version__, 'torchaudio', torchaudio.__version__)"
cd "$REPO"
PYTHONPATH="$REPO" HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_codec_hf.py -rs
