"""What a fine-tuning run trains: ``Tuning`` (``TrainConfig.tuning``) and ``apply_tuning``.

The official GLIP transfer study (``tools/finetune.py``, ``SOLVER.TUNING_HIGHLEVEL_OVERRIDE``)
compares full fine-tuning, prompt tuning and linear probing; ``head`` is ours. Each mode names
the tensors it trains; every other parameter gets ``requires_grad = False`` (the optimizer
never sees it, so it stays bit-identical):

- ``full``: every parameter the model config leaves trainable (``backbone.frozen_stages`` and
  ``language.freeze`` still apply), and a learnt prompt the initial checkpoint carries.
- ``prompt`` (official ``language_prompt_v2``): ``prompt_tuning.weight`` only, a zero-initialised
  ``[max_query_len, D]`` tensor added to the text features of the fixed class-name prompt
  (``model/prompt_tuning.py``); the official base lr is 0.05. Needs the fixed prompt
  (``PromptSampling.FIXED``): position t of the tensor must always meet the same token.
- ``linear_probe`` (official ``linear_prob``): the head's last layers, ``LINEAR_PROBE``: the box
  and centerness predictors, the text projection of the region-word dot product
  (``head.token_proj``, official ``dot_product_projection_text``), ``head.log_scale``,
  ``head.bias_lang`` and ``head.bias0``.
- ``head``: every tensor of the VL-DyHead (``head.*``: fusion, its BERT layers, the dynamic
  convolutions, the predictors); backbone, FPN and text encoder frozen.

Every mode but ``full`` also runs the text encoder frozen (``language.freeze``: no gradient,
no dropout), as the official overrides do (``trainer.config.model_config`` adds it).
"""
from __future__ import annotations

import enum

from torch import nn

__all__ = ["Tuning", "LINEAR_PROBE", "trains", "apply_tuning", "trainable_names"]


class Tuning(str, enum.Enum):
    FULL = "full"                    # every parameter the model config leaves trainable
    PROMPT = "prompt"                # prompt_tuning.weight only (official language_prompt_v2)
    LINEAR_PROBE = "linear_probe"    # the head's predictors (official linear_prob)
    HEAD = "head"                    # the whole VL-DyHead (head.*)


# official LINEAR_PROB list mapped to our names (cls_logits and cosine_scale have no counterpart)
LINEAR_PROBE = ("head.bbox_pred.", "head.centerness.", "head.token_proj.", "head.log_scale",
                "head.bias_lang", "head.bias0")


def trains(tuning: Tuning, name: str) -> bool | None:
    """Whether ``tuning`` trains the parameter ``name``; None for ``full`` (the model decides)."""
    tuning = Tuning(tuning)
    if tuning is Tuning.FULL:
        return None
    if tuning is Tuning.PROMPT:
        return name.startswith("prompt_tuning.")
    if tuning is Tuning.LINEAR_PROBE:
        return any(name == p or name.startswith(p) for p in LINEAR_PROBE)
    return name.startswith("head.")


def apply_tuning(model: nn.Module, tuning: Tuning) -> nn.Module:
    """Set ``requires_grad`` on ``model`` (a GLIP) as ``tuning`` says; ``prompt`` attaches a
    zero ``PromptTuning`` first. Returns the model."""
    from model.prompt_tuning import attach

    tuning = Tuning(tuning)
    if tuning is Tuning.PROMPT:
        attach(model)
    for name, p in model.named_parameters():
        wanted = trains(tuning, name)
        if wanted is not None:
            p.requires_grad_(wanted)
    if not trainable_names(model):
        raise ValueError(f"tuning={tuning.value} leaves no parameter of the model trainable")
    return model


def trainable_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]
