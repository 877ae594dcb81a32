# LAYOUT=ljspeech: LJSPEECH=/path with metadata.csv (id|text|normalized) and wavs/<id>.wav, one
# speaker: the validation split holds out utterances, not voices, and prompts are other utterances.
ifndef LJSPEECH
$(error LAYOUT=ljspeech needs LJSPEECH=/path/to/LJSpeech-1.1)
endif
CORPUS := $(LJSPEECH)/wavs
TRANSCRIPTS := $(LJSPEECH)/metadata.csv
CORPUS_READY := $(LJSPEECH)/metadata.csv
PROMPT ?= $(call first_wav,$(CORPUS),*.wav)
SPLIT_BY := utterance
VAL_FRACTION := 0.02
# Evaluation: give EVAL_ROWS=rows.csv (id|text|prompt) and EVAL_REFERENCES=folder of <id>.wav to score samples.
EVAL_ROWS ?=
EVAL_REFERENCES ?=
