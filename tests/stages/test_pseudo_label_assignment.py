"""The exclusive phrase assignment of the pseudo-label stage (the "educated guess")."""
from __future__ import annotations

import torch

from stages.pseudo_label import exclusive_assignment

KNOWN, RARE = 0, 1
ON_A, ON_B = [50, 50, 60, 60], [0, 0, 10, 10]        # two objects


def test_the_unknown_phrase_goes_to_the_object_the_known_one_does_not_explain():
    # the rare phrase scores higher on object A than on B, but the known phrase claims A:
    # one phrase per object gives the rare phrase B (0.45 + 0.25 > 0.5 alone)
    boxes = torch.tensor([ON_A, [51, 50, 60, 61], ON_B], dtype=torch.float32)
    assert exclusive_assignment(boxes, [0.45, 0.5, 0.25], [KNOWN, RARE, RARE], 0.6) == [0, 2]
    # alone, the rare phrase keeps its best box (what max_boxes_per_phrase=1 would give)
    assert exclusive_assignment(boxes[1:], [0.5, 0.25], [RARE, RARE], 0.6) == [0]


def test_one_box_per_phrase_and_per_object_best_total():
    boxes = torch.tensor([ON_A, ON_A, ON_B, ON_B, [100, 100, 120, 120]], dtype=torch.float32)
    scores, labels = [0.9, 0.8, 0.7, 0.1, 0.3], [0, 1, 0, 1, 2]
    picks = exclusive_assignment(boxes, scores, labels, 0.6)
    # phrase 0 on B (0.7) + phrase 1 on A (0.8) = 1.5 beats 0 on A (0.9) + 1 on B (0.1) = 1.0
    assert picks == [1, 2, 4]
    assert exclusive_assignment(torch.zeros(0, 4), [], [], 0.6) == []
