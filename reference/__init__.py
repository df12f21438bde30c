"""Tsuika's reference world: a procedural text-to-image world with held-out concepts.

``concepts`` holds the vocabulary (which values are held out), ``world`` renders scenes and
writes caption datasets, ``captions`` writes and parses captions and lists the evaluation
prompts, ``evaluator`` scores generated samples (concept fidelity, prompt fidelity,
retention), ``train_evaluator`` trains that evaluator. Importing this package imports
nothing heavy; ``evaluator`` and ``train_evaluator`` need torch.
"""
