"""Classification heads on a Myriad backbone, and the checkpoint + tokenizer that feed them.

Encoder (masked-LM) checkpoints classify from the final hidden state of ``[CLS]`` (position 0,
which sees the whole input); decoder (causal) checkpoints from the last real token, the only
position that has seen every other one.

Shape legend: B batch, S sequence, D model dim, C classes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from myriad.config import RunConfig
from myriad.data.tokenizer import load_tokenizer
from myriad.errors import UserError
from myriad.model import MoETransformerLM
from myriad.train.checkpoint import load_model_from_checkpoint, resolve_checkpoint


class SequenceClassifier(nn.Module):
    """A backbone plus dropout and one linear layer over the pooled hidden state."""

    def __init__(self, backbone: MoETransformerLM, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = "cls" if backbone.cfg.objective == "mlm" else "last"
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.cfg.d_model, num_classes)
        nn.init.normal_(self.head.weight, std=backbone.cfg.init_std)
        nn.init.zeros_(self.head.bias)

    def forward(
        self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits and the MoE auxiliary loss (already weighted; 0 for a dense backbone)."""
        h_BSD, enc = self.backbone.encode(input_ids_BS, attention_mask_BS)
        if self.pooling == "cls":
            pooled_BD = h_BSD[:, 0]
        else:  # right padding: the last real token sits at length - 1
            last_B = attention_mask_BS.long().sum(dim=1) - 1
            pooled_BD = h_BSD[torch.arange(h_BSD.shape[0], device=h_BSD.device), last_B]
        logits_BC = self.head(self.dropout(pooled_BD))
        return logits_BC, self.backbone.weighted_aux_loss(*self.backbone.balancing_losses(enc))


def find_tokenizer(checkpoint: Path) -> Path:
    """``tokenizer.json`` of a checkpoint: in its step directory, else in its run directory."""
    step_dir = resolve_checkpoint(checkpoint)
    for folder in (step_dir, step_dir.parent.parent, Path(checkpoint)):
        if (folder / "tokenizer.json").is_file():
            return folder / "tokenizer.json"
    raise UserError(
        f"no tokenizer.json beside checkpoint {step_dir} or in its run directory; "
        "pass --tokenizer PATH"
    )


def load_backbone(
    checkpoint: Path, tokenizer_path: Path | None, *, from_scratch: bool, seed: int
) -> tuple[MoETransformerLM, RunConfig, Tokenizer, Path]:
    """The checkpoint's model (or the same architecture, freshly initialised) and tokenizer.

    Raises:
        UserError: no checkpoint or tokenizer, or a tokenizer whose ids do not fit the model's
            embedding table (a vocabulary mismatch).
    """
    model, cfg = load_model_from_checkpoint(checkpoint)
    if from_scratch:
        torch.manual_seed(seed)
        model = MoETransformerLM(cfg.model)
    tok_path = Path(tokenizer_path) if tokenizer_path else find_tokenizer(Path(checkpoint))
    size = _tokenizer_size(tok_path)
    if size > cfg.model.vocab_size:
        raise UserError(
            f"{tok_path}:1: vocabulary mismatch: the tokenizer has {size} tokens but checkpoint "
            f"{checkpoint} has model.vocab_size = {cfg.model.vocab_size}"
        )
    tokenizer = load_tokenizer(tok_path, cfg.model.vocab_size, key="--tokenizer")
    _check_same_vocab(tokenizer, tok_path, Path(checkpoint))
    return model.train(), cfg, tokenizer, tok_path


def _check_same_vocab(tokenizer: Tokenizer, tok_path: Path, checkpoint: Path) -> None:
    """A tokenizer given by hand must map tokens to the ids the checkpoint was trained with."""
    try:
        own = find_tokenizer(checkpoint)
    except UserError:
        return  # nothing to compare against: the size check above is all we can do
    if own.resolve() == tok_path.resolve():
        return
    if read_tokenizer(own).get_vocab() != tokenizer.get_vocab():
        raise UserError(
            f"{tok_path}:1: vocabulary mismatch: its token ids differ from {own}, the "
            f"tokenizer checkpoint {checkpoint} was trained with"
        )


def _tokenizer_size(path: Path) -> int:
    if not path.is_file():
        raise UserError(f"--tokenizer {path}: no such file")
    return read_tokenizer(path).get_vocab_size()


def read_tokenizer(path: Path) -> Tokenizer:
    """``Tokenizer.from_file``; a damaged file is a user error naming it."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise UserError(f"{path}:1: not a readable tokenizer.json ({exc})") from None
