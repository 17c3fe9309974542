import numpy as np
import torch
from PIL import Image

from hist_vlm.eval.heatmap import display_map, save_heatmap


def test_display_map_is_min_max_of_the_upsampled_map():
    heat = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    d = display_map(heat, (10, 20))
    assert d.shape == (10, 20) and d.min() == 0.0 and d.max() == 1.0
    assert np.all(display_map(torch.zeros(3, 3), (5, 5)) == 0)


def test_save_heatmap_writes_figure_with_stars(tmp_path):
    image = Image.new("RGB", (120, 80), (128, 128, 128))
    heat = torch.zeros(4, 6)
    heat[0, 0], heat[3, 5], heat[1, 2], heat[2, 4] = 4, 3, 2, 1
    out = tmp_path / "fig" / "heat.png"
    pts = save_heatmap(image, heat, out, title="a dog and a frisbee", boxes=[[0, 0, 30, 20]])
    assert pts == [(10, 10), (110, 70), (50, 30), (90, 50)]
    assert save_heatmap(image, heat, tmp_path / "plain.png", k=0) == []

    def red_pixels(path):
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB")).astype(int)
        assert arr.shape[0] > 100 and arr.shape[1] > 150
        return ((arr[..., 0] > 200) & (arr[..., 1] < 60) & (arr[..., 2] < 60)).sum()

    # the stars are what is pure red: the map blended over the image never is
    assert red_pixels(out) > 50 and red_pixels(tmp_path / "plain.png") == 0
