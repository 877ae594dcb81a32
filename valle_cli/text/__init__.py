"""Text in: transcripts, English normalisation, espeak-ng phonemes and token ids (``valle phonemize``).

``transcripts`` reads a text file, an id|text table, a corpus folder or stdin into rows;
``normalize`` cleans and expands English text; ``tokenizers`` maps phonemes to ids (one id per
phoneme, or byte-level BPE over phonemes); ``phonemize`` ties them together into the phonemes
table that ``valle shard`` joins with the codes. Depends on the codecs package only to know
which files of a corpus folder are audio.
"""
