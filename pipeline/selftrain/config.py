"""The config of ``pipeline selftrain``: every key of the loop, read in one place."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from core.config import load
from core.device import Device
from stages.schema import UnlabelledPhrases

__all__ = ["StudentInit", "SelfTrainConfig", "load_selftrain_config", "Device"]


class StudentInit(str, enum.Enum):
    TEACHER = "teacher"                       # the student (and the control) continue from the teacher
    PRETRAINED_PARTS = "pretrained_parts"     # both start where the teacher started


@dataclass
class SelfTrainConfig:
    workdir: str = "out/selftrain"
    world: str = "configs/world/default.yaml"
    world_overrides: list[str] = field(default_factory=list)
    train: str = "configs/selftrain/train.yaml"          # base trainer config of both models
    teacher_overrides: list[str] = field(default_factory=list)
    student_overrides: list[str] = field(default_factory=list)   # the control's too
    student_init: StudentInit = StudentInit.TEACHER
    # the control: the student's recipe (init, steps, seed) without the pseudo source, so that
    # student - control is what the pseudo labels add and not what more steps add
    control: bool = True
    teacher_min_score: float = 0.3       # stages.pseudo_label.min_score: boxes stored (with their scores)
    student_min_score: float = 0.4       # the student reads pseudo boxes scoring above this
    pseudo_weight: float = 1.0           # mixture weight of the pseudo source for the student
    # a caption phrase left without a box (> student_min_score): negative everywhere (official) or
    # ignored by the token loss
    unlabelled_phrases: UnlabelledPhrases = UnlabelledPhrases.NEGATIVE
    # grounding and pseudo captions: up to this many other captions packed around each as
    # negatives (official GoldG recipe, pack_random_caption_number); 0 = the caption alone
    pack_captions: int = 0
    label_overrides: list[str] = field(default_factory=list)   # `pipeline run` key=value
    eval_batch_size: int = 8
    device: Device = Device.AUTO         # training and evaluation (pseudo-labelling: GPU actors when Ray has GPUs)
    seed: int = 0
    progress: bool = True


def load_selftrain_config(path: str | None, overrides: list[str] | None = None) -> SelfTrainConfig:
    """YAML file (optional) + ``key=value`` overrides -> a validated SelfTrainConfig."""
    return load(SelfTrainConfig, path, overrides)
