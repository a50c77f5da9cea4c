"""Fine-tuning and evaluation on CLUE-format classification tasks, with built-in Chinese tasks.

Modules, one concern each: ``formats`` (CLUE 1.1 and generic JSONL/CSV readers, label maps),
``builtin`` (zh-sentiment, zh-nextsent), ``tasks`` (``--task`` -> a loaded task), ``encode``
(tokens and batches), ``heads`` (classifier on a checkpoint), ``finetune`` (the loop),
``outputs`` (atomic files), ``metrics``, ``baselines`` (TF-IDF + logistic regression),
``suite`` (the report), ``args`` (the command-line flags, importable without torch).

Nothing is imported here, so that ``myriad --help`` stays fast.
"""
