"""Tasks: what a batch holds, the loss as sums, the metrics and the FLOPs of a training objective.

text.py: 'lm' (next-token pre-training), 'sft' (next-token loss on answers), 'classify' (a class
per sequence); images.py: 'image_classify'. base.py says what a task provides. Each registers
itself with foundation.registry under its name; `config.task` picks one.
"""
