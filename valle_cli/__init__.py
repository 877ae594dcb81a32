"""valle: small command-line stages for neural-codec language models of audio.

Importing this package must stay cheap: no torch, no transformers (``valle --help`` is fast).
"""

__version__ = "0.1.0"
