"""How far two labellings of the same samples agree (precision, batching, preprocessing checks).

A reference box is matched when the other labelling has a box for the same phrase with
IoU >= ``iou`` and a score within ``score_tol``; ``agreement`` is the matched share of the
reference's boxes (1.0 when neither has a box). Drops must be the same sample for sample.
"""
from __future__ import annotations

from dataclasses import dataclass

from stages.schema import Sample


def iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else float(a == b)


@dataclass
class Agreement:
    boxes: int              # reference boxes
    matched: int
    drop_mismatches: list[str]   # keys whose status or drop reason differ

    @property
    def fraction(self) -> float:
        return self.matched / self.boxes if self.boxes else 1.0


def compare_labels(reference: list[Sample], other: list[Sample], iou_min: float = 0.9,
                   score_tol: float = 0.02) -> Agreement:
    """Reference vs other labelling of the same samples (same order)."""
    if [s.key for s in reference] != [s.key for s in other]:
        raise ValueError("compare_labels needs the same samples in the same order")
    boxes = matched = 0
    mismatches = []
    for ref, oth in zip(reference, other):
        if (ref.status, ref.drop_reason) != (oth.status, oth.drop_reason):
            mismatches.append(ref.key)
        if not ref.kept:
            continue
        candidates = list(zip(oth.boxes, oth.scores, [tuple(map(tuple, tp)) for tp in oth.tokens_positive])) if oth.kept else []
        for box, score, tp in zip(ref.boxes, ref.scores, ref.tokens_positive):
            boxes += 1
            tp = tuple(map(tuple, tp))
            if any(t == tp and abs(s - score) <= score_tol and iou(box, b) >= iou_min for b, s, t in candidates):
                matched += 1
    return Agreement(boxes, matched, mismatches)
