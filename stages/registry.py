"""The stages a ``pipeline run`` DAG can hold, found by name: stage ``NAME`` is the module
``stages/NAME.py`` whose ``STAGE`` is its stage class (and ``STAGE.config_class`` its config).

A run config lists the stages it runs, in order, under ``stages:`` by these names; the
orchestrator builds each from its typed config and needs no per-stage code. Only the modules a
config names are imported (the teacher's pulls in torch).

Adding a stage is one module and one config entry: write ``stages/<name>.py`` with a config
dataclass (a ``resources`` field among its keys), a ``BaseStage`` subclass whose ``name`` is
``<name>`` and whose ``config_class`` is that dataclass, and ``STAGE = <the class>``; then list
``<name>`` under ``stages:`` in the run config. ``docs/stage_contract.md`` walks through it;
``tests/stages/test_contract.py`` checks every stage it finds against the contract.
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["StageSpec", "stage_spec", "registered_stages", "DEFAULT_STAGES", "DAG_ORDER"]

# The DAG of a run config that lists no stages: validate, then noun phrases.
DEFAULT_STAGES: tuple[str, ...] = ("ingest", "noun_phrases")
# The order the project's own stages run in (the contract test prepares each stage's batch with
# the ones before it); stages not listed here come after, by name.
DAG_ORDER: tuple[str, ...] = ("ingest", "noun_phrases", "pseudo_label")

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_DECLARES = re.compile(r"^STAGE\s*=", re.M)
_PACKAGE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class StageSpec:
    name: str
    stage_class: type
    config_class: type


def registered_stages() -> list[str]:
    """The names of every stage module in ``stages/`` (modules that declare ``STAGE``), in DAG
    order. Found by reading the files, so nothing heavy is imported."""
    names = [m.name for m in pkgutil.iter_modules([str(_PACKAGE)])
             if not m.ispkg and _DECLARES.search((_PACKAGE / f"{m.name}.py").read_text(encoding="utf-8"))]
    return sorted(names, key=lambda n: (DAG_ORDER.index(n) if n in DAG_ORDER else len(DAG_ORDER), n))


def stage_spec(name: str) -> StageSpec:
    """The stage ``name``; an unknown name raises ValueError listing the known ones."""
    if not _NAME.match(name) or importlib.util.find_spec(f"stages.{name}") is None \
            or name not in registered_stages():
        raise ValueError(f"unknown stage {name!r}; the stages are: {', '.join(registered_stages())} "
                         "(a stage NAME is the module stages/NAME.py that declares STAGE)")
    stage_class = importlib.import_module(f"stages.{name}").STAGE
    if getattr(stage_class, "name", None) != name:
        raise ValueError(f"stages/{name}.py: STAGE is {stage_class.__name__}, whose name is "
                         f"{getattr(stage_class, 'name', None)!r}; set its name to {name!r}")
    return StageSpec(name=name, stage_class=stage_class, config_class=stage_class.config_class)
