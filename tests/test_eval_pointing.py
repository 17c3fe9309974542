import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hist_vlm.eval.pointing import (
    IoUMeter,
    all_objects_hit,
    argmax_points,
    in_box,
    picked_region,
    pointing_hit,
    pointing_point,
    pointing_points,
    region_iou_parts,
    top_k_points,
    upsample_map,
)


def _selfeq_point(pred: torch.Tensor, h: int, w: int) -> tuple[int, int]:
    """SelfEQ's own lines (reference 2.3), as the oracle."""
    g = pred.shape[-1]
    mask = F.interpolate(pred.view(1, 1, g, g), size=(h, w), mode="bicubic").squeeze()
    y, x = (mask == torch.max(mask)).nonzero()[0]
    return int(x), int(y)


def test_upsample_is_bicubic_to_original_size():
    heat = torch.rand(4, 4)
    up = upsample_map(heat, (37, 53))
    assert up.shape == (37, 53)
    ref = F.interpolate(heat[None, None], size=(37, 53), mode="bicubic", align_corners=False)[0, 0]
    assert torch.equal(up, ref)
    # bicubic overshoots: values outside the input range show it is not bilinear
    spike = torch.zeros(4, 4)
    spike[1, 1] = 1.0
    assert upsample_map(spike, (40, 40)).min() < 0


@pytest.mark.parametrize("seed", range(20))
def test_point_matches_selfeq_on_random_maps(seed):
    g = torch.Generator().manual_seed(seed)
    pred = torch.rand(8, 8, generator=g)
    h, w = 30 + seed * 7, 90 - seed * 2
    assert pointing_point(pred, (h, w)) == _selfeq_point(pred, h, w)


def test_point_lands_on_the_hot_cell_at_original_size():
    heat = torch.zeros(4, 4)
    heat[3, 0] = 1.0  # bottom-left cell
    x, y = pointing_point(heat, (100, 200))  # H=100, W=200
    assert 0 <= x < 50 and 75 <= y < 100


def test_all_zero_map_points_at_origin():
    assert pointing_point(torch.zeros(6, 6), (50, 70)) == (0, 0)
    assert argmax_points(torch.zeros(2, 5, 5)).tolist() == [[0, 0], [0, 0]]


def test_ties_take_first_row_major_maximum():
    maps = torch.zeros(1, 4, 5)
    maps[0, 2, 1] = 3.0
    maps[0, 1, 4] = 3.0  # earlier in row-major order (row 1)
    maps[0, 3, 0] = 3.0
    assert argmax_points(maps).tolist() == [[4, 1]]
    same_row = torch.zeros(1, 3, 6)
    same_row[0, 1, 5] = same_row[0, 1, 2] = 1.0
    assert argmax_points(same_row).tolist() == [[2, 1]]


def test_nan_map_does_not_crash():
    m = torch.full((1, 3, 3), float("nan"))
    m[0, 2, 2] = 1.0
    assert argmax_points(m).tolist() == [[2, 2]]


def test_batched_points_group_sizes_and_keep_order():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(5, 6, 6, generator=g)
    sizes = [(40, 60), (33, 33), (40, 60), (71, 20), (33, 33)]
    assert pointing_points(maps, sizes) == [pointing_point(m, s) for m, s in zip(maps, sizes)]


def test_strict_inclusion_edges_miss_xywh_and_xyxy():
    xywh = [10, 20, 30, 40]  # x 10..40, y 20..60
    assert in_box((11, 21), xywh, "xywh")
    assert in_box((39, 59), xywh, "xywh")
    for edge in [(10, 30), (40, 30), (20, 20), (20, 60), (10, 20), (40, 60)]:
        assert not in_box(edge, xywh, "xywh"), edge
    xyxy = [10, 20, 40, 60]
    assert in_box((25, 40), xyxy, "xyxy")
    assert not in_box((40, 40), xyxy, "xyxy")
    # the same numbers mean different boxes in the two formats
    assert in_box((45, 65), [10, 20, 40, 60], "xywh") and not in_box((45, 65), [10, 20, 40, 60], "xyxy")
    with pytest.raises(ValueError):
        in_box((1, 1), [0, 0, 2, 2], "cxcywh")


def test_pointing_hit_any_box():
    boxes = [[0, 0, 10, 10], [50, 50, 60, 60]]
    assert pointing_hit((55, 55), boxes, "xyxy")
    assert pointing_hit((5, 5), boxes, "xyxy")
    assert not pointing_hit((30, 30), boxes, "xyxy")
    assert not pointing_hit((5, 5), [], "xyxy")


def test_map_to_hit_end_to_end_on_a_hand_made_map():
    heat = torch.zeros(4, 4)
    heat[1, 2] = 5.0  # cell x 50..75, y 25..50 of a 100x100 image
    pt = pointing_point(heat, (100, 100))
    assert pointing_hit(pt, [[50, 25, 25, 25]], "xywh")
    assert not pointing_hit(pt, [[0, 0, 50, 50]], "xywh")


def test_top_k_points_are_cell_centres_ordered_by_value():
    heat = torch.zeros(4, 4)
    heat[0, 0], heat[3, 3], heat[1, 2], heat[2, 0] = 4.0, 3.0, 2.0, 1.0
    heat[0, 1] = 0.5  # fifth: not picked
    pts = top_k_points(heat, (40, 80))  # H=40, W=80 -> cells 20 wide, 10 high
    assert pts == [(10, 5), (70, 35), (50, 15), (10, 25)]


def test_top_k_ties_row_major_and_zero_map():
    pts = top_k_points(torch.zeros(3, 3), (30, 30))
    assert pts == [(5, 5), (15, 5), (25, 5), (5, 15)]


def test_both_objects_hit_needs_a_point_in_each_box():
    boxes = [[0, 0, 20, 20], [40, 40, 60, 60]]
    assert all_objects_hit([(10, 10), (50, 50), (70, 70), (1, 1)], boxes, "xyxy")
    assert not all_objects_hit([(10, 10), (11, 11), (12, 12), (13, 13)], boxes, "xyxy")
    assert not all_objects_hit([(10, 10), (40, 50)], boxes, "xyxy")  # on the edge of box 2


def test_region_iou_uses_object_masks_under_points():
    ids = np.zeros((10, 10), np.uint8)
    ids[0:4, 0:4] = 1   # 16 px, referred
    ids[6:10, 6:10] = 2  # 16 px, referred
    ids[0:2, 7:9] = 3   # 4 px, distractor
    assert picked_region([(1, 1), (0, 9)], ids).sum() == 16  # background point picks nothing
    assert region_iou_parts([(1, 1), (7, 7)], ids, [1, 2]) == (32, 32)
    assert region_iou_parts([(1, 1), (2, 2)], ids, [1, 2]) == (16, 32)
    assert region_iou_parts([(1, 1), (8, 1)], ids, [1, 2]) == (16, 36)
    assert region_iou_parts([(5, 5)], ids, [1, 2]) == (0, 32)


def test_iou_meter_cumulative_and_mean():
    m = IoUMeter()
    m.add(10, 20)
    m.add(0, 80)
    assert m.ciou == pytest.approx(10 / 100)
    assert m.miou == pytest.approx(0.25)
