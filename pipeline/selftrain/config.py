"""The config of ``pipeline selftrain``: every key of the loop, read in one place."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from core.config import load
from core.device import Device
from stages.schema import UnlabelledPhrases
from trainer.data.config import KnownPhrases

__all__ = ["StudentInit", "ScoreBar", "KnownPhrases", "SelfTrainConfig", "load_selftrain_config", "Device"]


class StudentInit(str, enum.Enum):
    TEACHER = "teacher"                       # the student (and the control) continue from the teacher
    PRETRAINED_PARTS = "pretrained_parts"     # both start where the teacher started


class ScoreBar(str, enum.Enum):
    """How the student's pseudo-box score bar is set."""
    FIXED = "fixed"                           # student_min_score as given
    # the lowest bar at which the teacher's rare pseudo boxes are right rare_precision_target of the
    # time, read from their precision-by-score curve scored against the world's truth (analysis
    # data: the report says so); student_min_score when no bar reaches the target
    RARE_PRECISION = "rare_precision"


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
    # the oracle: the student's recipe (init, steps, mixture, bar) on the same pseudo-labelled web
    # images carrying the world's true boxes instead of the teacher's (synth.truth.write_oracle_shards):
    # what perfect pseudo labels add in this budget; one more student training
    oracle: bool = False
    teacher_min_score: float = 0.3       # stages.pseudo_label.min_score: boxes stored (with their scores)
    student_min_score: float = 0.4       # the student reads pseudo boxes scoring above this
    score_bar: ScoreBar = ScoreBar.FIXED
    rare_precision_target: float = 0.8   # score_bar: rare_precision
    # rounds of self-training: the student of round k is the teacher of round k + 1 (it labels the
    # web shards again; that round's control and student continue from it)
    rounds: int = 1
    # paired bootstrap of the held-out images: resamples behind the noise of each difference
    noise_resamples: int = 50
    # more controls, each the control with another data-order seed (seed + 1000 k; same init and
    # steps): the spread of single trainings when only the sample stream changes, which the
    # bootstrap (the evaluation set's luck) does not see. One control training each; 0 = none
    control_repeats: int = 0
    pseudo_weight: float = 1.0           # mixture weight of the pseudo source for the student
    # 0: the pseudo samples take pseudo_weight's share of the student's batches (they replace gold
    # samples); n > 0: n pseudo samples are added to every batch of batch_size gold samples, which
    # are then exactly the control's (pseudo_weight unused)
    pseudo_per_batch: int = 0
    # null: the pseudo samples share the batch's loss (normalised by all its positives); a number
    # (pseudo_per_batch > 0): their loss is normalised by their own positives and added x this
    # weight, so the gold samples' loss is exactly the control's
    pseudo_loss_weight: float | None = None
    # false: the pseudo boxes teach the token loss only (which phrase is where), no box regression
    # or centerness loss (the student learns to place boxes from the gold sets alone)
    pseudo_box_loss: bool = True
    # a caption phrase left without a box (> student_min_score): negative everywhere (official) or
    # ignored by the token loss
    unlabelled_phrases: UnlabelledPhrases = UnlabelledPhrases.NEGATIVE
    # a pseudo box whose phrase names a class of the detection set (its categories): trained on
    # (train, official) or dropped with its tokens ignored (ignore: the web shards teach only the
    # words the detection set never names; the detection set teaches its own classes, cleanly), or
    # dropped with its tokens ignored and its box an ignore region (ignore_region: the anchors there
    # take no loss, so the object is not taught as background either)
    known_phrases: KnownPhrases = KnownPhrases.TRAIN
    # grounding and pseudo captions: up to this many other captions packed around each as
    # negatives (official GoldG recipe, pack_random_caption_number); 0 = the caption alone
    pack_captions: int = 0
    # a pseudo-labelled image whose boxes ground more than this many phrases naming no detection-set
    # class has those boxes dropped (tokens ignored): with one new word beside known ones the
    # teacher's box for it is an educated guess; with several, a guess among them. 0 = no limit
    max_novel_phrases: int = 0
    label_overrides: list[str] = field(default_factory=list)   # `pipeline run` key=value
    eval_batch_size: int = 8
    device: Device = Device.AUTO         # training and evaluation (pseudo-labelling: GPU actors when Ray has GPUs)
    seed: int = 0
    progress: bool = True


    def validate(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds: expected >= 1, got {self.rounds}")
        if not 0.0 < self.rare_precision_target <= 1.0:
            raise ValueError(f"rare_precision_target: expected a fraction in (0, 1], got {self.rare_precision_target}")
        if self.pseudo_per_batch < 0:
            raise ValueError(f"pseudo_per_batch: expected >= 0 (0: pseudo samples share the batch by "
                             f"pseudo_weight), got {self.pseudo_per_batch}")
        if self.pseudo_loss_weight is not None and (self.pseudo_loss_weight < 0 or not self.pseudo_per_batch):
            raise ValueError(f"pseudo_loss_weight: expected >= 0 with pseudo_per_batch > 0 (null: the pseudo "
                             f"samples share the batch's loss), got {self.pseudo_loss_weight} with "
                             f"pseudo_per_batch {self.pseudo_per_batch}")
        if self.max_novel_phrases < 0:
            raise ValueError(f"max_novel_phrases: expected >= 0 (0: no limit), got {self.max_novel_phrases}")
        if self.control_repeats < 0 or (self.control_repeats and not self.control):
            raise ValueError(f"control_repeats: expected >= 0, and control: true to repeat it, got "
                             f"{self.control_repeats} (control: {self.control})")
        if self.noise_resamples < 0:
            raise ValueError(f"noise_resamples: expected >= 0 (0: none), got {self.noise_resamples}")


def load_selftrain_config(path: str | None, overrides: list[str] | None = None) -> SelfTrainConfig:
    """YAML file (optional) + ``key=value`` overrides -> a validated SelfTrainConfig."""
    return load(SelfTrainConfig, path, overrides)
