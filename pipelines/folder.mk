# LAYOUT=folder: your own recordings, CORPUS=/path with <speaker>/<utterance>.wav (any audio format)
# and a .txt (or .lab) transcript beside each file. The speaker is the first folder of each id.
ifndef CORPUS
$(error LAYOUT=folder needs CORPUS=/path/to/speaker/folders)
endif
TRANSCRIPTS := $(CORPUS)
CORPUS_READY := $(CORPUS)
PROMPT ?= $(firstword $(sort $(wildcard $(CORPUS)/*/*.wav)))
