# LAYOUT=espeak: the corpus the project makes itself, many espeak-ng voices speaking generated
# sentences: corpus/<speaker>/<id>.wav + .txt (offline, no download).
# UNSEEN_SPEAKERS voices of variants the corpus never uses speak held-out sentences too (prompted by
# eval/prompts/<speaker>/); EVAL_SPEAKERS corpus voices (empty: all) get held-out sentences.
# EVAL_VOICES=heard: only voices whose accent and variant the judge's recogniser hears well speak them.
UNSEEN_SPEAKERS ?= 0
EVAL_SPEAKERS ?=
EVAL_VOICES ?= any
CORPUS := $(WORK)/corpus
TRANSCRIPTS := $(CORPUS)
CORPUS_READY := $(CORPUS)/speakers.tsv
# the first voice: spk00 up to 100 voices, spk000 beyond (make_corpus.py's names)
FIRST_SPEAKER := spk$(shell [ '$(SPEAKERS)' -gt 100 ] 2>/dev/null && echo 000 || echo 00)
PROMPT ?= $(CORPUS)/$(FIRST_SPEAKER)/$(FIRST_SPEAKER)_0000.wav

$(call t,$(CORPUS_READY)):
	$(PYTHON) $(call q,$(HERE)../examples/make_corpus.py) -o $(call q,$(CORPUS)) --speakers $(SPEAKERS) --per-speaker $(PER_SPEAKER) --seed $(SEED)

# Held-out sentences (spoken too: the references) and their id|text|prompt rows; each has a word the
# corpus never speaks.
EVAL_ROWS := $(WORK)/eval/rows.csv
EVAL_REFERENCES := $(WORK)/eval
$(call t,$(EVAL_ROWS)): $(call t,$(CORPUS_READY))
	$(PYTHON) $(call q,$(HERE)../examples/make_corpus.py) -o $(call q,$(CORPUS)) --speakers $(SPEAKERS) --per-speaker $(PER_SPEAKER) --seed $(SEED) --eval-out $(call q,$(WORK)/eval) --eval-per-speaker $(EVAL_PER_SPEAKER) --unseen-speakers $(UNSEEN_SPEAKERS) --eval-voices $(EVAL_VOICES)$(if $(EVAL_SPEAKERS), --eval-speakers $(EVAL_SPEAKERS))
