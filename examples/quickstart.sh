#!/usr/bin/env bash
# The valle pipeline as shell commands, with pipes: corpus -> codes -> shards -> model -> speech.
#   bash examples/quickstart.sh [work folder]          # offline, CPU, a few minutes
#   STEPS=20000 PRESET=base DEVICE=cuda bash examples/quickstart.sh /data/run1
set -euo pipefail
WORK=${1:-quickstart}
STEPS=${STEPS:-200}
PRESET=${PRESET:-tiny}
DEVICE=${DEVICE:-auto}
SPEAKERS=${SPEAKERS:-4}
PER_SPEAKER=${PER_SPEAKER:-12}
VALLE=${VALLE:-valle}
PYTHON=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")" && pwd)

"$PYTHON" "$HERE/make_corpus.py" -o "$WORK/corpus" --speakers "$SPEAKERS" --per-speaker "$PER_SPEAKER"
$VALLE quantize "$WORK/corpus" -o "$WORK/codes" --device "$DEVICE"          # fits codes/codec.safetensors first
$VALLE phonemize "$WORK/corpus" -o "$WORK/phonemes.parquet"
$VALLE score-chunks "$WORK/codes" -o "$WORK/chunks.parquet"
$VALLE shard "$WORK/codes" "$WORK/phonemes.parquet" --chunks "$WORK/chunks.parquet" -o "$WORK/shards" --overwrite
$VALLE train "$WORK/shards" -o "$WORK/run" --preset "$PRESET" --max-steps "$STEPS" --batch-tokens 4000 \
    --lr 2e-3 --warmup-steps 20 --device "$DEVICE" --overwrite
PROMPT=$(ls "$WORK"/corpus/*/*.wav | head -n 1)
# sample straight into decode: the npz travels through the pipe
$VALLE sample "$WORK/run" --text "The little girl opened the green door." --prompt "$PROMPT" -o - \
    --max-seconds 6 --seed 0 --device "$DEVICE" | $VALLE decode - -o "$WORK/hello.wav"
# audio in, audio out: the prompt's own codes, resynthesised, piped the same way
$VALLE quantize "$PROMPT" -o - --codec "$WORK/codes/codec.safetensors" | $VALLE decode - -o "$WORK/prompt_resynth.wav"
echo "speech in $WORK/hello.wav (the codec's own resynthesis of the prompt: $WORK/prompt_resynth.wav)" >&2
