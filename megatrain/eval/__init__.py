"""Held-out evaluation, in training and standalone: loss / perplexity / bits per byte by length and by position,
passkey retrieval, plots. Below megatrain.train (the trainer calls it); launch/evaluate.py is its command line.

    heldout.py      the fixed held-out windows (+ positions in the document, target bytes)
    loss.py         evaluate_windows: the forward-only evaluation under any DP x SP layout; position bins
    in_training.py  the trainer's hook (config section ``eval``) and its console line
    passkey.py      passkey retrieval: prompts, greedy answers, accuracy by (length, depth)
    plots.py        loss-vs-position curves and the passkey heatmap (matplotlib)
"""
