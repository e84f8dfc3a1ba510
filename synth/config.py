"""The miniature world's config: its classes, colours, split sizes and how objects and captions
are drawn. Read in one place (``WorldConfig``); ``configs/world/*.yaml`` hold the presets."""
from __future__ import annotations

from dataclasses import dataclass, field

from synth.draw import PALETTE
from synth.shapes import SHAPES

__all__ = ["WorldConfig"]


@dataclass
class WorldConfig:
    seed: int = 0
    common_classes: list[str] = field(default_factory=lambda: [
        "circle", "square", "triangle", "star", "heart", "cross", "ring", "diamond"])
    rare_classes: list[str] = field(default_factory=lambda: ["moon", "arrow", "cloud", "flower"])
    colours: list[str] = field(default_factory=lambda: list(PALETTE))
    detection_images: int = 300
    grounding_images: int = 120
    eval_images: int = 120
    web_images: int = 600
    web_shard_size: int = 100            # samples per web tar
    image_size: list[int] = field(default_factory=lambda: [160, 192])    # [min, max] of width and height
    object_size: list[int] = field(default_factory=lambda: [24, 96])     # [min, max] longest side, px
    objects_per_image: list[int] = field(default_factory=lambda: [1, 4])
    max_overlap: float = 0.1             # box intersection / smaller box area, at most
    rare_in_grounding: int = 6           # grounding images (one instance each) per rare class
    eval_rare_fraction: float = 0.4      # chance an eval object is of a rare class
    web_rare_fraction: float = 0.4       # chance a web object is of a rare class
    web_unmentioned_prob: float = 0.1    # chance each web object but one is left out of the caption
    web_colour_prob: float = 0.85        # chance a web caption names an object's colour
    scene_phrase_prob: float = 0.25      # chance the backdrop is a wall/floor/curtain (a boxless phrase)
    clutter: int = 2                     # at most this many background strokes per image
    jpeg_quality: int = 90

    def validate(self) -> None:
        def pair(name: str, low: int) -> None:
            v = getattr(self, name)
            if len(v) != 2 or not low <= v[0] <= v[1]:
                raise ValueError(f"{name}: expected [min, max] with {low} <= min <= max, got {v}")

        for group in ("common_classes", "rare_classes"):
            unknown = [c for c in getattr(self, group) if c not in SHAPES]
            if unknown:
                raise ValueError(f"{group}: unknown class {unknown[0]!r}; known: {', '.join(SHAPES)}")
        names = self.common_classes + self.rare_classes
        if not self.common_classes or len(set(names)) != len(names):
            raise ValueError("common_classes must be non-empty and no class may be listed twice "
                             f"(common {self.common_classes}, rare {self.rare_classes})")
        unknown = [c for c in self.colours if c not in PALETTE]
        if unknown or len(set(self.colours)) != len(self.colours) or len(self.colours) < 2:
            raise ValueError(f"colours: at least two distinct names from {', '.join(PALETTE)}, got {self.colours}")
        for name in ("detection_images", "grounding_images", "eval_images", "web_images", "clutter",
                     "rare_in_grounding"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not 1 <= self.web_shard_size <= 10000:
            raise ValueError(f"web_shard_size: expected 1..10000 (keys hold 4 digits), got {self.web_shard_size}")
        pair("image_size", 32)           # ingest's default min_size is 32
        pair("object_size", 8)
        pair("objects_per_image", 1)
        if self.object_size[0] > 0.7 * self.image_size[0]:
            raise ValueError(f"object_size: min {self.object_size[0]} must fit in 0.7 x the smallest "
                             f"image side ({self.image_size[0]})")
        if self.objects_per_image[1] > len(self.colours):
            raise ValueError("objects_per_image: max must not exceed the number of colours "
                             "(objects of one image are distinct (class, colour) pairs)")
        if self.rare_in_grounding * len(self.rare_classes) > self.grounding_images:
            raise ValueError(f"rare_in_grounding: {self.rare_in_grounding} x {len(self.rare_classes)} rare "
                             f"classes needs that many grounding images, only {self.grounding_images}")
        for name in ("max_overlap", "eval_rare_fraction", "web_rare_fraction", "web_unmentioned_prob",
                     "web_colour_prob", "scene_phrase_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: expected a fraction in [0, 1], got {getattr(self, name)}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality: expected 1..95, got {self.jpeg_quality}")

    @property
    def classes(self) -> list[str]:
        """All classes; category id = position + 1 (common first, then rare)."""
        return self.common_classes + self.rare_classes
