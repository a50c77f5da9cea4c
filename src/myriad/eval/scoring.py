"""``myriad evaluate --model FT_DIR``: score a fine-tuned folder again, on the same or new data.

The folder written by ``myriad finetune`` is self-describing: ``config.json`` holds the base
model config, the label set and the pooling, ``tokenizer.json`` the vocabulary, and
``model.safetensors`` the classifier. Scoring needs nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_model
from tokenizers import Tokenizer

from myriad.config import RunConfig, from_dict
from myriad.data.tokenizer import special_ids
from myriad.errors import UserError
from myriad.eval.encode import encode_examples
from myriad.eval.finetune import predict
from myriad.eval.heads import SequenceClassifier, read_tokenizer
from myriad.eval.outputs import write_text_atomic
from myriad.eval.tasks import Task
from myriad.model import MoETransformerLM
from myriad.train.device import resolve_device


def load_finetuned(folder: Path) -> tuple[SequenceClassifier, dict[str, Any], Tokenizer]:
    """The classifier, its ``config.json`` and its tokenizer; bad files are user errors."""
    folder = Path(folder)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / name).is_file():
            raise UserError(f"--model {folder}: missing {name} (not a myriad finetune folder)")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        run_cfg = from_dict(RunConfig, config["base"], where=str(folder / "config.json"))
        labels = list(config["labels"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{folder / 'config.json'}:1: not a finetune config ({exc})") from None
    model = SequenceClassifier(MoETransformerLM(run_cfg.model), len(labels))
    try:
        missing, unexpected = load_model(model, str(folder / "model.safetensors"), strict=False)
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        raise UserError(f"{folder / 'model.safetensors'}: corrupt weights ({exc})") from None
    if missing or unexpected:
        raise UserError(f"{folder / 'model.safetensors'}: weights do not match config.json")
    tokenizer = read_tokenizer(folder / "tokenizer.json")
    if tokenizer.get_vocab_size() > run_cfg.model.vocab_size:
        raise UserError(
            f"{folder / 'tokenizer.json'}:1: vocabulary mismatch: "
            f"{tokenizer.get_vocab_size()} tokens, model.vocab_size = {run_cfg.model.vocab_size}"
        )
    return model.eval(), config, tokenizer


def evaluate_finetuned(
    folder: Path, task: Task, out: Path | None, *, device: str = "auto", batch_size: int = 128
) -> dict[str, Any]:
    """Dev (and labelled test) metrics; test predictions in CLUE's format written to ``out``."""
    from myriad.eval.metrics import score

    model, config, tokenizer = load_finetuned(folder)
    if list(task.labels.labels) != config["labels"]:
        raise UserError(
            f"--task {task.name}: labels {list(task.labels.labels)[:10]} differ from those "
            f"{folder} was fine-tuned on {config['labels'][:10]}"
        )
    torch_device = resolve_device(device, "--device")
    model.to(torch_device)
    max_len = int(config["finetune"]["max_len"])
    max_len = min(max_len, model.backbone.cfg.max_seq_len)
    pad_id = special_ids(tokenizer)["pad"]
    result: dict[str, Any] = {"task": task.name, "model": str(folder)}
    for split, examples in task.splits.items():
        if split == "train":
            continue
        enc = encode_examples(tokenizer, examples, task.labels, max_len)
        pred = predict(model, enc, batch_size, pad_id, torch_device)
        if split != "test" or task.test_labelled:
            result[split] = score(enc.labels, pred, len(task.labels))
        if split == "test" and out is not None:
            rows = [
                {"id": ex.id, "label": task.labels.to_label(p)}
                for ex, p in zip(examples, pred, strict=True)
            ]
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            write_text_atomic(Path(out), text)
            result["predictions"] = str(out)
    return result
