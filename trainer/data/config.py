"""The trainer's data config: the sources (COCO detection, MDETR grounding, pseudo-labelled
shards), their mixture weights and the data-loading knobs."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from core import config as typed_config
from stages.readers.common import BoxConvention
from stages.schema import UnlabelledPhrases
from trainer.data.prompts import CaptionPackingConfig, DetectionPromptConfig

__all__ = ["SourceKind", "UnlabelledPhrases", "KnownPhrases", "TrainSourceConfig", "TrainDataConfig"]


class SourceKind(str, enum.Enum):
    COCO = "coco"        # COCO-format detection JSON + image root: class-name prompts with negatives
    MDETR = "mdetr"      # MDETR-format grounding JSON + image root(s): captions as they are
    PSEUDO = "pseudo"    # output shards of the teacher DAG: boxes screened at min_score


class KnownPhrases(str, enum.Enum):
    """What a pseudo source makes of a caption phrase that names a class of its ``known_names``
    (the classes the gold sets already label, e.g. the detection set's categories)."""
    TRAIN = "train"     # official: its pseudo box is trained on like any other
    # its pseudo box is dropped and its tokens take no token loss (an image left without a box is
    # skipped): the pseudo labels teach only the words the gold sets never name, and the gold
    # sets alone teach the rest, with their clean boxes
    IGNORE = "ignore"
    # as ignore, and the dropped boxes become ignore regions: the anchors assigned to them take no
    # loss at all, so the object (there, but unlabelled here) is not taught as background either
    IGNORE_REGION = "ignore_region"


@dataclass
class TrainSourceConfig:
    kind: SourceKind = SourceKind.MDETR
    weight: float = 1.0                      # relative; use copies x size to mimic official "copies"
    annotations: str = ""                    # coco/mdetr: the JSON (path or fsspec URL)
    image_root: str = ""                     # coco/mdetr: folder the file names are relative to
    image_roots: dict[str, str] = field(default_factory=dict)   # mdetr: data_source -> folder
    shards: list[str] = field(default_factory=list)            # pseudo: OUTPUT/*.tar (globs, braces)
    min_score: float = 0.5                   # pseudo: keep boxes scoring > min_score
    prompt: DetectionPromptConfig = field(default_factory=DetectionPromptConfig)   # coco
    pack_captions: CaptionPackingConfig | None = None   # mdetr/pseudo: negative captions; null = off
    pool_size: int = 64                      # pseudo: captions kept as the packing pool
    unlabelled_phrases: UnlabelledPhrases = UnlabelledPhrases.NEGATIVE   # pseudo: phrases left without a box
    known_phrases: KnownPhrases = KnownPhrases.TRAIN   # pseudo: phrases naming a class of known_names
    known_names: list[str] = field(default_factory=list)   # pseudo: the classes the gold sets label
    # pseudo: an image whose boxes ground more than this many phrases naming no class of
    # known_names has those boxes dropped and their tokens ignored (skipped if no box is left):
    # which box is which new word is then the teacher's guess among them. 0 = no limit
    max_novel_phrases: int = 0
    # 0: the source takes its weight's share of each batch (its samples replace the others'); n > 0:
    # n samples of it are added to every batch (n / workers per worker), beyond batch_size, and its
    # weight is unused: the other sources' samples are then exactly those of a run without it
    extra_per_batch: int = 0
    # null: the source's samples share the batch's loss (each loss summed over the batch's images and
    # divided by all their positives: official). A number (extra_per_batch sources only): its samples'
    # losses are computed on their own, divided by their own positives, and added x loss_weight, so
    # the other samples' loss (and gradient) is exactly that of a run without the source
    loss_weight: float | None = None
    # pseudo: false = its boxes teach the token (alignment) loss only, no box regression or
    # centerness loss: a teacher places its boxes less precisely than the student learns to from
    # the gold boxes (semi-supervised detection's classification-only pseudo boxes)
    box_loss: bool = True
    box_convention: BoxConvention = BoxConvention.LEGACY
    shuffle: bool = True                     # reshuffle every epoch (seeded)
    storage_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if self.kind in (SourceKind.COCO, SourceKind.MDETR):
            if not self.annotations:
                raise ValueError(f"annotations is empty: a {self.kind.value} source needs its JSON file")
            if not self.image_root and not self.image_roots:
                raise ValueError(f"image_root is empty: a {self.kind.value} source needs its image folder")
            if self.shards:
                raise ValueError(f"shards is set on a {self.kind.value} source; shards are for kind=pseudo")
        else:
            if not self.shards:
                raise ValueError("shards is empty: a pseudo source needs its output shards, e.g. [out/run1/*.tar]")
            if self.annotations:
                raise ValueError("annotations is set on a pseudo source; it reads shards only")
        if self.kind is SourceKind.COCO and self.pack_captions is not None:
            raise ValueError("pack_captions applies to mdetr and pseudo sources (coco builds class-name prompts)")
        if self.pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {self.pool_size}")
        if self.kind is not SourceKind.PSEUDO and self.unlabelled_phrases is not UnlabelledPhrases.NEGATIVE:
            raise ValueError(f"unlabelled_phrases applies to pseudo sources (their captions keep the noun "
                             f"phrases the teacher found no box for); a {self.kind.value} source labels "
                             "every phrase it names: remove the key")
        if self.kind is not SourceKind.PSEUDO and (self.known_phrases is not KnownPhrases.TRAIN or self.known_names):
            raise ValueError(f"known_phrases and known_names apply to pseudo sources; a {self.kind.value} "
                             "source's labels are gold: remove the keys")
        if self.extra_per_batch < 0:
            raise ValueError(f"extra_per_batch must be >= 0 (0: the source shares the batch by weight), "
                             f"got {self.extra_per_batch}")
        if self.loss_weight is not None:
            if self.loss_weight < 0:
                raise ValueError(f"loss_weight must be >= 0 (or null: the source shares the batch's loss), "
                                 f"got {self.loss_weight}")
            if not self.extra_per_batch:
                raise ValueError("loss_weight applies to a source added to every batch (extra_per_batch > 0), "
                                 "so that every batch and worker holds its samples: set extra_per_batch or "
                                 "remove loss_weight")
        if not self.box_loss and self.kind is not SourceKind.PSEUDO:
            raise ValueError(f"box_loss: false applies to pseudo sources; a {self.kind.value} source's boxes "
                             "are gold: remove the key")
        if self.max_novel_phrases < 0:
            raise ValueError(f"max_novel_phrases must be >= 0 (0: no limit), got {self.max_novel_phrases}")
        if self.max_novel_phrases and self.kind is not SourceKind.PSEUDO:
            raise ValueError(f"max_novel_phrases applies to pseudo sources; a {self.kind.value} source's labels "
                             "are gold: remove the key")
        if self.known_phrases is not KnownPhrases.TRAIN and not self.known_names:
            raise ValueError(f"known_phrases is {self.known_phrases.value} but known_names is empty: list the "
                             "classes the gold sets label, e.g. known_names=[circle, square], or set "
                             "known_phrases=train")


@dataclass
class TrainDataConfig:
    # name -> source; YAML: ``sources: {o365: {kind: coco, ...}, goldg: {kind: mdetr, ...}}``
    sources: dict[str, TrainSourceConfig] = field(default_factory=dict)
    flip_prob: float = 0.5                   # AUGMENT.FLIP_PROB_TRAIN
    prefetch_batches: int = 2                # built ahead in a background thread; 0 = none
    max_consecutive_skips: int = 1000        # fail when this many samples in a row are unusable
    # stop when a source has lost more than this share of the samples read to missing image
    # files, checked once it has read missing_image_min_read (trainer.data.accounting)
    max_missing_image_fraction: float = 0.01
    missing_image_min_read: int = 200

    def __post_init__(self) -> None:
        converted = {}
        for name, value in dict(self.sources).items():
            if isinstance(value, TrainSourceConfig):
                converted[str(name)] = value
            else:
                converted[str(name)] = typed_config.from_dict(TrainSourceConfig, value,
                                                              prefix=f"data.sources.{name}.")
        self.sources = converted

    def validate(self) -> None:
        if not self.sources:
            raise ValueError("data.sources is empty: give at least one source, e.g. "
                             "data.sources.goldg={kind: mdetr, annotations: ..., image_root: ...}")
        for name, src in self.sources.items():
            try:
                src.validate()
            except ValueError as exc:
                raise ValueError(f"data.sources.{name}: {exc}") from None
        if sum(s.weight for s in self.sources.values() if not s.extra_per_batch) <= 0:
            raise ValueError("data.sources: the weights of the sources that share the batch (extra_per_batch 0) "
                             "sum to 0")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"data.flip_prob must be a probability, got {self.flip_prob}")
        if not 0.0 <= self.max_missing_image_fraction <= 1.0:
            raise ValueError(f"data.max_missing_image_fraction must be in [0, 1], got {self.max_missing_image_fraction}")
        if self.missing_image_min_read < 1:
            raise ValueError(f"data.missing_image_min_read must be >= 1, got {self.missing_image_min_read}")
        if self.prefetch_batches < 0:
            raise ValueError(f"data.prefetch_batches must be >= 0, got {self.prefetch_batches}")
