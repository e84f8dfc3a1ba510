"""Prompt tuning: a learnt additive tensor on the language features of a fixed prompt.

The official GLIP ``language_prompt_v2`` tuning (``DYHEAD.FUSE_CONFIG.ADD_LINEAR_LAYER``) keeps
every weight of the model and learns one zero-initialised tensor ``[max_query_len, D]`` that is
added to the text encoder's last hidden state, position by position, before the fusion:
``hidden[b, t] += weight[t]``. It is trained and used with one fixed prompt (the class names
of a data set in their order, ``"a. b. c"``), so position ``t`` always holds the same token.

Here it is ``GLIP.prompt_tuning`` (``None`` on a model without it; ``attach`` adds it). Its
tensor is part of the model's state dict (``prompt_tuning.weight``), so ``save_pretrained``
stores it in ``model.safetensors`` next to the other weights and ``model.load.load_glip``
re-attaches it when a checkpoint carries it: ``pipeline eval`` / ``predict`` use it.
At zero (its initial value) the model's outputs are exactly those without it.

The class names it was learnt for (in their order) travel next to the weights as
``prompt_names.json`` (``save_names``); a model loaded with them refuses to detect other classes
(``Predictor.detect``), since position t of the tensor would then meet another token.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

__all__ = ["PromptTuning", "WEIGHT_KEY", "NAMES_FILE", "attach", "has_prompt", "save_names", "read_names"]

WEIGHT_KEY = "prompt_tuning.weight"
NAMES_FILE = "prompt_names.json"


class PromptTuning(nn.Module):
    """``weight`` [max_tokens, dim], zero-initialised; ``forward(hidden [B, T, D]) -> [B, T, D]``."""

    def __init__(self, max_tokens: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(max_tokens, dim))
        self.names: list[str] | None = None      # the classes (in order) of the prompt it was learnt on

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        tokens = hidden.shape[1]
        if tokens > self.weight.shape[0]:
            raise ValueError(f"prompt of {tokens} tokens, but the prompt tuning holds {self.weight.shape[0]}")
        return hidden + self.weight[:tokens].unsqueeze(0).to(hidden.dtype)


def attach(model: nn.Module) -> PromptTuning:
    """``model.prompt_tuning`` (a GLIP), added at zero when the model has none."""
    if getattr(model, "prompt_tuning", None) is None:
        device = next(model.parameters()).device
        model.prompt_tuning = PromptTuning(model.cfg.language.max_query_len,
                                           model.language.hidden_size).to(device)
    return model.prompt_tuning


def has_prompt(state_dict_keys) -> bool:
    """Whether a state dict (its keys) carries a learnt prompt."""
    return WEIGHT_KEY in set(state_dict_keys)


def save_names(directory: str | Path, names: list[str]) -> None:
    """Record the class names a checkpoint's learnt prompt belongs to (next to its weights)."""
    (Path(directory) / NAMES_FILE).write_text(json.dumps(list(names)) + "\n")


def read_names(directory: str | Path) -> list[str] | None:
    path = Path(directory) / NAMES_FILE
    return json.loads(path.read_text()) if path.is_file() else None
