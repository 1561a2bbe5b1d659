"""Synthetic training data: `ldmkit synth` (export.py) and the small classifier that gates and measures it
(classifier.py)."""
