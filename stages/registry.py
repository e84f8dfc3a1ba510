"""The stages a ``pipeline run`` DAG can hold: stage name -> (stage class, config class).

This table is the one place that knows them. A run config lists the stages it runs, in order,
under ``stages:`` by these names; the orchestrator builds each from its typed config and needs no
per-stage code. Entries are import paths, so reading a config imports only the stages it uses
(the teacher's module pulls in torch).

Adding a stage: write ``stages/<name>.py`` (a config dataclass with a ``resources`` field and a
``BaseStage`` subclass whose ``name`` is ``<name>``), add one line here, and list it in the run
config. ``docs/stage_contract.md`` walks through it; ``tests/stages/test_contract.py`` checks every
entry against the contract.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["STAGES", "StageSpec", "stage_spec", "DEFAULT_STAGES"]

# name -> "module:StageClass:ConfigClass"
STAGES: dict[str, str] = {
    "ingest": "stages.ingest:Ingest:IngestConfig",
    "noun_phrases": "stages.noun_phrases:NounPhrases:NounPhraseConfig",
    "pseudo_label": "stages.pseudo_label:PseudoLabel:PseudoLabelConfig",
}

# The DAG of a run config that lists no stages: validate, then noun phrases.
DEFAULT_STAGES: tuple[str, ...] = ("ingest", "noun_phrases")


@dataclass(frozen=True)
class StageSpec:
    name: str
    stage_class: type
    config_class: type


def stage_spec(name: str) -> StageSpec:
    """The registered stage ``name``; an unknown name raises ValueError listing the known ones."""
    entry = STAGES.get(name)
    if entry is None:
        raise ValueError(f"unknown stage {name!r}; registered stages: {', '.join(STAGES)} "
                         "(stages/registry.py)")
    module_name, stage_cls, config_cls = entry.split(":")
    module = importlib.import_module(module_name)
    return StageSpec(name=name, stage_class=getattr(module, stage_cls),
                     config_class=getattr(module, config_cls))
