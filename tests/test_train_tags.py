"""`task: tags` (a vision tower taught which words the captions use) and `optim.freeze`."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from hist_vlm.data.dataset import ImageRecord
from hist_vlm.train.config import ConfigError, load_config
from hist_vlm.train.loop import train
from hist_vlm.demo.tags import CaptionWordTagsLoss, caption_word_tags
from losses_fixtures import hist_batch, tiny_albef
from train_helpers import DEMO_CONFIGS, read_log, tiny_overrides, write_world


def test_tags_are_the_caption_words_that_tell_images_apart():
    records = [ImageRecord(f"{k}.png", (f"a {c} {s}", f"the {s} is here"), (), ())
               for k, (c, s) in enumerate([("red", "star"), ("red", "kite"), ("blue", "kite")])]
    vocab, tags = caption_word_tags(records)
    assert vocab == ["blue", "kite", "red", "star"]  # a / the / is / here are in every image
    assert tags.tolist() == [[0, 0, 1, 1], [0, 1, 1, 0], [1, 1, 0, 0]]


def test_tags_loss_is_bce_of_a_linear_head_on_the_max_over_patch_tokens():
    torch.manual_seed(0)
    model = tiny_albef(momentum=False)
    batch = hist_batch(model, n_images=3, image_ids=[2, 0, 1])
    tags = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    loss_fn = CaptionWordTagsLoss(model, tags)
    out = loss_fn(model, batch, 0.0)
    patches = model.encode_image(batch.pixel_values)[:, 1:]
    expected = F.binary_cross_entropy_with_logits(loss_fn.head(patches.max(1).values), tags[[2, 0, 1]])
    torch.testing.assert_close(out["loss"], expected)
    # the mean would give another value: the max is what is trained
    assert not torch.allclose(out["loss"], F.binary_cross_entropy_with_logits(loss_fn.head(patches.mean(1)), tags[[2, 0, 1]]))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("world"), n_images=16, size=40)


def test_a_tags_run_trains_the_vision_tower_only_and_stage_2_keeps_the_frozen_stem(world, tmp_path):
    tags_dir, caps_dir = tmp_path / "tags", tmp_path / "captions"
    first = train(load_config(DEMO_CONFIGS / "demo_tiny.yaml", tiny_overrides(
        *world, tags_dir, "task=tags", "run.max_steps=3", "model.derive_vocab=true")), progress=False)
    log = read_log(tags_dir)
    assert [r["step"] for r in log] == [1, 2, 3] and all(0 < r["tags"] == r["loss"] for r in log)
    # only the vision tower had a gradient: the text side is exactly its initialisation
    init = train(load_config(DEMO_CONFIGS / "demo_tiny.yaml", tiny_overrides(
        *world, tmp_path / "init", "task=tags", "run.max_steps=1", "optim.lr=1e-30", "model.derive_vocab=true")),
        progress=False)
    a = load_file(str(first.checkpoint / "model" / "model.safetensors"))
    b = load_file(str(init.checkpoint / "model" / "model.safetensors"))
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    assert moved and all(k.startswith("visual_encoder.") for k in moved)

    second = train(load_config(DEMO_CONFIGS / "demo_tiny.yaml", tiny_overrides(
        *world, caps_dir, "run.max_steps=2", f"model.checkpoint={first.checkpoint}",
        "optim.freeze=[visual_encoder.patch_embed]")), progress=False)
    c = load_file(str(second.checkpoint / "model" / "model.safetensors"))
    stem = [k for k in a if k.startswith("visual_encoder.patch_embed.")]
    assert stem and all(torch.equal(a[k], c[k]) for k in stem)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.startswith("visual_encoder.blocks."))


def test_freezing_a_name_the_model_lacks_is_a_config_error(world, tmp_path):
    cfg = load_config(DEMO_CONFIGS / "demo_tiny.yaml", tiny_overrides(
        *world, tmp_path / "r", "run.max_steps=1", "optim.freeze=[visual_encoder.stem_that_is_not]"))
    with pytest.raises(ConfigError, match="optim.freeze: no parameter .*stem_that_is_not"):
        train(cfg, progress=False)
