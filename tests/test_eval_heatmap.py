import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from hist_vlm.eval.heatmap import BLEND_GAMMA, blend_heatmap, display_map, save_heatmap, save_heatmap_grid
from hist_vlm.eval.pointing import top_k_points

YELLOW = (255, 220, 0)


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def count_colour(arr: np.ndarray, rgb) -> int:
    return int(np.all(arr == np.array(rgb), axis=-1).sum())


def red_pixels(arr: np.ndarray) -> int:
    return int(((arr[..., 0] > 200) & (arr[..., 1] < 60) & (arr[..., 2] < 60)).sum())


def peaked_heat() -> torch.Tensor:
    heat = torch.zeros(4, 6)
    heat[0, 0], heat[3, 5], heat[1, 2], heat[2, 4] = 4, 3, 2, 1
    return heat


def test_display_map_is_min_max_of_the_upsampled_map():
    heat = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    d = display_map(heat, (10, 20))
    assert d.shape == (10, 20) and d.min() == 0.0 and d.max() == 1.0
    assert np.all(display_map(torch.zeros(3, 3), (5, 5)) == 0)


def test_blend_opacity_follows_the_map_value():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    m = rng.random((5, 7))
    m[0, :] = 0.0
    m[4, 6] = 1.0
    out = blend_heatmap(image, m, alpha=0.6)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert np.array_equal(out[0], image[0])            # no attention: the image as it is
    jet = matplotlib.colormaps["jet"](m)[..., :3] * 255
    opacity = 0.6 * m ** BLEND_GAMMA
    expected = (1 - opacity[..., None]) * image + opacity[..., None] * jet
    assert np.abs(out.astype(float) - expected).max() <= 0.5
    assert np.abs(out[4, 6].astype(float) - (0.4 * image[4, 6] + 0.6 * jet[4, 6])).max() <= 0.5
    with pytest.raises(ValueError, match="alpha"):
        blend_heatmap(image, m, alpha=1.5)


def test_save_heatmap_returns_and_draws_the_stars(tmp_path):
    image = Image.new("RGB", (120, 80), (128, 128, 128))
    out = tmp_path / "fig" / "heat.png"
    pts = save_heatmap(image, peaked_heat(), out, title="a dog and a frisbee", boxes=[[0, 0, 30, 20]])
    assert pts == [(10, 10), (110, 70), (50, 30), (90, 50)]
    assert save_heatmap(image, peaked_heat(), tmp_path / "plain.png", title="a dog and a frisbee", k=0) == []
    with_stars, plain = pixels(out), pixels(tmp_path / "plain.png")
    assert with_stars.shape == plain.shape and with_stars.shape[1] > 150
    assert red_pixels(with_stars) > red_pixels(plain) + 50   # the stars are pure red


def test_overlay_leaves_the_unattended_image_untouched(tmp_path):
    """A yellow scene with attention only in the top-left corner: the rest stays yellow (the old
    constant-opacity jet layer tinted every pixel blue, so no pixel kept the scene's colour)."""
    image = Image.new("RGB", (80, 80), YELLOW)
    heat = torch.zeros(8, 8)
    heat[0, 0] = 1.0
    save_heatmap(image, heat, tmp_path / "h.png", k=0)
    arr = pixels(tmp_path / "h.png")
    assert count_colour(arr, YELLOW) > 0.5 * arr.shape[0] * arr.shape[1]
    save_heatmap(image, torch.ones(8, 8), tmp_path / "flat.png", k=0)   # min-max of a flat map: all 0
    assert count_colour(pixels(tmp_path / "flat.png"), YELLOW) > 0.8 * arr.shape[0] * arr.shape[1]


def test_side_by_side_shows_the_untouched_image(tmp_path):
    """Attention everywhere but one corner: the overlay recolours the yellow square under the
    map, the side-by-side figure also shows it in its own colour."""
    image = Image.new("RGB", (80, 80), (30, 30, 30))
    image.paste(YELLOW, (20, 20, 60, 60))
    heat = torch.ones(8, 8)
    heat[7, 7] = 0.0
    alone = save_heatmap(image, heat, tmp_path / "overlay.png", k=4)
    both = save_heatmap(image, heat, tmp_path / "both.png", k=4, show_image=True)
    assert alone == both
    overlay, pair = pixels(tmp_path / "overlay.png"), pixels(tmp_path / "both.png")
    assert count_colour(overlay, YELLOW) == 0
    scale = overlay.shape[0] / 80
    assert count_colour(pair, YELLOW) > 0.5 * (40 * scale) ** 2        # the square, in its own colour
    assert pair.shape[1] > 1.8 * overlay.shape[1]


def test_grid_has_an_image_column_and_any_number_of_models(tmp_path):
    image = Image.new("RGB", (64, 48), (30, 30, 30))
    image.paste(YELLOW, (8, 8, 24, 24))
    rng = torch.Generator().manual_seed(0)
    rows = [(image, f"query {r}", [torch.rand(3, 4, generator=rng) for _ in range(3)], [[8, 8, 24, 24]])
            for r in range(2)]
    points = save_heatmap_grid(rows, ["base", "baseline", "HIST"], tmp_path / "grid.png")
    assert [[len(p) for p in row] for row in points] == [[4, 4, 4], [4, 4, 4]]
    assert points[1][2] == top_k_points(rows[1][2][2], (48, 64), 4)
    save_heatmap_grid(rows, ["base", "baseline", "HIST"], tmp_path / "maps_only.png", image_column=None)
    grid, maps_only = pixels(tmp_path / "grid.png"), pixels(tmp_path / "maps_only.png")
    assert 1.2 < grid.shape[1] / maps_only.shape[1] < 1.45             # 4 columns against 3
    assert count_colour(grid, YELLOW) > count_colour(maps_only, YELLOW)
    with pytest.raises(ValueError, match="row 0 has 3 maps for 2 model columns"):
        save_heatmap_grid(rows, ["a", "b"], tmp_path / "bad.png")
    # the old call (two models, no keywords) still works
    save_heatmap_grid([(image, "q", rows[0][2][:2], [])], ["baseline", "HIST"], tmp_path / "old.png")
    assert (tmp_path / "old.png").is_file() and not list(tmp_path.glob(".*tmp*"))


def test_ground_cli_by_preset_name_from_another_directory(tmp_path, monkeypatch):
    from hist_vlm.cli import app
    from hist_vlm.models import build_backbone
    from hist_vlm.train.config import load_config

    cfg = load_config("demo_tiny")
    params = {k: v for k, v in cfg.model.params.items() if k not in ("vocab_file", "vocab_size")}
    torch.manual_seed(0)
    model = build_backbone("albef", {**params, "image_size": cfg.data.image_size})
    model.save_pretrained(tmp_path / "model")
    Image.new("RGB", (96, 64), YELLOW).save(tmp_path / "scene.png")
    monkeypatch.chdir(tmp_path)
    for mode, name in (("--side-by-side", "pair.png"), ("--overlay-only", "one.png")):
        res = CliRunner().invoke(app, ["ground", "scene.png", "a yellow square", "--checkpoint", "model",
                                       "--config", "demo_tiny", "--device", "cpu", "--out", name, mode])
        assert res.exit_code == 0, res.output
        assert "top-4 points" in res.output
    assert pixels(tmp_path / "pair.png").shape[1] > 1.8 * pixels(tmp_path / "one.png").shape[1]
