import torch

from model.anchors import AnchorGenerator, generate_cell_anchors
from model.config import AnchorConfig

OFFICIAL_CELLS = [[-28, -28, 35, 35], [-56, -56, 71, 71], [-112, -112, 143, 143],
                  [-224, -224, 287, 287], [-448, -448, 575, 575]]


def features(sizes, batch=2, channels=4):
    return [torch.zeros(batch, channels, h, w) for h, w in sizes]


def test_official_cell_anchors_and_buffer_names():
    gen = AnchorGenerator(AnchorConfig())
    state = gen.state_dict()
    assert list(state) == [f"cell_anchors.{l}" for l in range(5)]
    for l, expected in enumerate(OFFICIAL_CELLS):
        assert state[f"cell_anchors.{l}"].tolist() == [expected]
        assert state[f"cell_anchors.{l}"].dtype == torch.float32
    assert gen.num_anchors_per_location() == 1


def test_detectron_reference_anchors_with_several_ratios():
    # The table quoted in the official anchor_generator.py is Shaoqing's 1-based matlab output;
    # the 0-based generator (reference window [0, 0, 15, 15]) gives it minus 1. By hand, row 0:
    # ratio 0.5 -> w = round(sqrt(512)) = 23, h = round(11.5) = 12 (half-even); x8 -> 184 x 96
    # around 7.5 -> [7.5 - 91.5, 7.5 - 47.5, 7.5 + 91.5, 7.5 + 47.5] = [-84, -40, 99, 55].
    matlab = [[-83, -39, 100, 56], [-175, -87, 192, 104], [-359, -183, 376, 200],
              [-55, -55, 72, 72], [-119, -119, 136, 136], [-247, -247, 264, 264],
              [-35, -79, 52, 96], [-79, -167, 96, 184], [-167, -343, 184, 360]]
    expected = [[v - 1 for v in row] for row in matlab]
    assert generate_cell_anchors(16, (128, 256, 512), (0.5, 1.0, 2.0)).tolist() == expected


def test_grid_shift_order_and_centres():
    sizes = [(5, 7), (3, 4), (2, 2), (1, 1), (1, 1)]
    gen = AnchorGenerator(AnchorConfig())
    anchors = gen(features(sizes), (40, 56))
    for (h, w), stride, cell, a in zip(sizes, (8, 16, 32, 64, 128), OFFICIAL_CELLS, anchors):
        assert a.shape == (h * w, 4)
        for y in range(h):
            for x in range(w):
                shift = torch.tensor([x * stride, y * stride] * 2, dtype=torch.float32)
                assert torch.equal(a[y * w + x], torch.tensor(cell, dtype=torch.float32) + shift)
        centres = (a[:, :2] + a[:, 2:]) / 2
        xs = torch.arange(w).repeat(h) * stride + (stride - 1) / 2
        assert torch.equal(centres[:, 0], xs.float())


def test_buffers_load_and_follow_device_dtype():
    gen = AnchorGenerator(AnchorConfig())
    other = AnchorGenerator(AnchorConfig())
    other.load_state_dict(gen.state_dict(), strict=True)
    out = other(features([(2, 3)] * 5), None)
    assert all(a.dtype == torch.float32 for a in out)
