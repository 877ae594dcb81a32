"""Generation: logit filters and samplers, the AR / NAR / NAR-len loops, and the ``Synthesizer``.

``generate`` holds the sampling parameters (``SamplingParams``: temperature, top-k/p, min-p,
penalties, CFG), the AR loop with a KV cache, the NAR level passes and NAR-len demasking, on
batches of requests. ``synthesizer`` is the session behind ``valle sample``: it loads a
checkpoint, turns text and prompts (audio or codes) into requests, and returns codes items
(TTS, long-form, continuation, in-fill).
"""
