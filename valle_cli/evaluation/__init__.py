"""Judging generated audio: speaker similarity (``valle similarity``) and ``valle evaluate``.

``similarity`` embeds audio with a speaker encoder (GE2E, MFCC, or a checkpoint's prompt
embeddings) and scores pairs, folders and all-vs-all matrices; ``evaluate`` scores generated
speech (WER/CER with pocketsphinx, speaker similarity) beside the references and their codec
resyntheses, and writes the HTML report.
"""
