"""GradCAM: batching exactness, padding recipes, layer/head combination, second-order gradients."""
import pytest
import torch

from hist_vlm.losses.gradcam import gradcam_maps
from hist_vlm.batch import TextRows, cat_rows
from losses_fixtures import BACKBONES, check_against_finite_differences, float64_rms_norm, tiny_backbone, tiny_blip

LAYER = 1  # a cross-attention layer of every tiny backbone
TEXTS = ["a man", "a man riding a brown horse on the beach", "two cats and a dog"]


def _setup(name, dtype=torch.float32):
    model, layer = tiny_backbone(name, dtype=dtype).eval(), LAYER
    s = model.image_size
    img = model.encode_image(torch.randn(2, 3, s, s, dtype=dtype))
    return model, layer, img


def _capture_mask(model, img, rows, layer):
    """[N, S]: the tokens the captured cross-attention averages over (the text, or the
    backbone's `capture_mask`: BLIP-2's queries)."""
    fused = model.fuse_rows(rows, img, capture_layer=layer)
    return rows.attention_mask if fused.capture_mask is None else fused.capture_mask


def _rows(model, texts, index):
    ids, mask = model.tokenize(texts)
    return TextRows(ids, mask, torch.tensor(index))


@pytest.mark.parametrize("name", BACKBONES)
def test_each_row_of_a_batch_equals_its_map_alone(name):
    model, layer, img = _setup(name)
    rows = _rows(model, TEXTS, [0, 1, 0])
    batched = gradcam_maps(model, img, rows, layers=(layer,), recipe="train")
    assert batched.shape == (3, *model.patch_grid)
    assert (batched >= 0).all() and batched.sum() > 0
    for i, text in enumerate(TEXTS):
        alone_rows = _rows(model, [text], [rows.image_index[i].item()])
        alone = gradcam_maps(model, img, alone_rows, layers=(layer,), recipe="train")
        torch.testing.assert_close(batched[i], alone[0], rtol=1e-4, atol=1e-9)
    # the ALBEF reference recipe divides by the padded length: the train map x n_valid / S
    mask = _capture_mask(model, img, rows, layer).float()
    scale = (mask.sum(1) / mask.shape[1]).view(-1, 1, 1)
    reference = gradcam_maps(model, img, rows, layers=(layer,), recipe="reference")
    torch.testing.assert_close(reference, batched * scale, rtol=1e-4, atol=1e-9)


def test_head_and_layer_combinations():
    model = tiny_blip().eval()
    img = model.encode_image(torch.randn(2, 3, 32, 32))
    rows = _rows(model, TEXTS[:2], [0, 1])
    l0, l2 = (gradcam_maps(model, img, rows, layers=(k,), head=3) for k in (0, 2))
    torch.testing.assert_close(gradcam_maps(model, img, rows, layers=(0, 2), head=3), (l0 + l2) / 2)
    torch.testing.assert_close(gradcam_maps(model, img, rows, layers=(0, 2), head=3, combine="product"), l0 * l2)
    heads = torch.stack([gradcam_maps(model, img, rows, layers=(2,), head=h) for h in range(4)])
    torch.testing.assert_close(gradcam_maps(model, img, rows, layers=(2,)), heads.mean(0))
    with pytest.raises(ValueError, match="recipe"):
        gradcam_maps(model, img, rows, layers=(2,), recipe="padded")
    with pytest.raises(ValueError, match="head 4 out of range"):
        gradcam_maps(model, img, rows, layers=(2,), head=4)


@pytest.mark.parametrize("name", BACKBONES)
def test_second_order_gradient_matches_finite_differences(name, monkeypatch):
    """d/dw of a scalar of the maps, for the first and the last parameter that get gradient:
    the image encoder's (below the captured layer; LLaVA's projector, its vision tower being
    frozen) and the score head's (above it: only create_graph=True carries gradient there)."""
    float64_rms_norm(monkeypatch)  # every op in float64 (LLaVA's decoder norms)
    model, layer, _ = _setup(name, dtype=torch.float64)
    s = model.image_size
    px = torch.randn(2, 3, s, s, dtype=torch.float64)
    rows = _rows(model, TEXTS, [0, 1, 1])
    weights = torch.rand(3, *model.patch_grid, dtype=torch.float64)

    def f():
        maps = gradcam_maps(model, model.encode_image(px), rows, layers=(layer,), create_graph=True)
        return (maps * weights).sum()

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(f(), [p for _, p in named], allow_unused=True)
    reached = [(n, p, g) for (n, p), g in zip(named, grads) if g is not None and g.abs().sum() > 0]
    assert len(reached) > 2
    for n, param, g in (reached[0], reached[-1]):
        check_against_finite_differences(f, param, g, n)


@pytest.mark.parametrize("name", BACKBONES)
def test_reference_recipe_matches_albef_grounding_written_out(name):
    """ALBEF Grounding.py, literally: backward of the match-logit sum, A.grad, mask, clamp,
    mean over heads then over all padded tokens."""
    model, layer, img = _setup(name)
    rows = _rows(model, TEXTS, [1, 0, 1])
    fused = model.fuse_rows(rows, img, capture_layer=layer)
    attn = fused.cross_attention
    attn.retain_grad()
    model.grounding_score(fused).sum().backward()
    tokens, patches = fused.capture_block  # ALBEF, BLIP: every token, the columns after the image CLS
    block, grad = attn[..., tokens, patches], attn.grad[..., tokens, patches]
    n, heads, t, _ = block.shape
    mask = (rows.attention_mask if fused.capture_mask is None else fused.capture_mask).view(n, 1, t, 1).float()
    cams = block * mask
    grads = grad.clamp(min=0) * mask
    expected = (cams * grads).mean(1).mean(1).reshape(n, *model.patch_grid)
    got = gradcam_maps(model, img, rows, layers=(layer,), recipe="reference")
    torch.testing.assert_close(got, expected.detach())
    assert not got.requires_grad
