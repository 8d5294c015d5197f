"""The specialised demo fleet: a generalist and domain experts fine-tuned from it.

``domains``  task generators (train and held-out splits) and their automatic checkers
``sandbox``  runs generated code against tests in a locked-down subprocess
``train``    LoRA fine-tuning of the upper layers on CPU
``build``    builds the whole fleet into the data directory (cached, resumable)
"""
