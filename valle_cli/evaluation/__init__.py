"""Judging generated audio: speaker similarity (``valle similarity``) and ``valle evaluate``.

``similarity`` embeds audio with a speaker encoder (GE2E, MFCC, or a checkpoint's prompt
embeddings) and scores pairs, folders and all-vs-all matrices; ``asr`` is the offline recogniser
(pocketsphinx with a closed-vocabulary LM) behind word error rates; ``evaluate`` scores generated
speech (WER/CER, speaker similarity) beside the references and their codec resyntheses;
``report`` writes the report folder (scores.csv, summary.json, index.html).
"""
