# LAYOUT=folder: your own recordings, CORPUS=/path with <speaker>/<utterance>.wav (any audio format)
# and a .txt (or .lab) transcript beside each file. The speaker is the first folder of each id.
ifndef CORPUS
$(error LAYOUT=folder needs CORPUS=/path/to/speaker/folders)
endif
TRANSCRIPTS := $(CORPUS)
CORPUS_READY := $(CORPUS)
PROMPT ?= $(call first_wav,$(CORPUS),*/*.wav)
# Evaluation: give EVAL_ROWS=rows.csv (id|text|prompt) and EVAL_REFERENCES=folder of <id>.wav to score samples.
EVAL_ROWS ?=
EVAL_REFERENCES ?=
