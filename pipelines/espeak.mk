# LAYOUT=espeak: the corpus the project makes itself, several espeak-ng voices speaking generated
# sentences: corpus/<speaker>/<id>.wav + .txt (offline, no download).
CORPUS := $(WORK)/corpus
TRANSCRIPTS := $(CORPUS)
CORPUS_READY := $(CORPUS)/speakers.tsv
PROMPT ?= $(CORPUS)/spk00/spk00_0000.wav

$(call t,$(CORPUS_READY)):
	$(PYTHON) $(call q,$(HERE)../examples/make_corpus.py) -o $(call q,$(CORPUS)) --speakers $(SPEAKERS) --per-speaker $(PER_SPEAKER) --seed $(SEED)

# Held-out sentences of every voice (spoken too: the references) and their id|text|prompt rows.
EVAL_ROWS := $(WORK)/eval/rows.csv
EVAL_REFERENCES := $(WORK)/eval
$(call t,$(EVAL_ROWS)): $(call t,$(CORPUS_READY))
	$(PYTHON) $(call q,$(HERE)../examples/make_corpus.py) -o $(call q,$(CORPUS)) --speakers $(SPEAKERS) --per-speaker $(PER_SPEAKER) --seed $(SEED) --eval-out $(call q,$(WORK)/eval) --eval-per-speaker $(EVAL_PER_SPEAKER)
