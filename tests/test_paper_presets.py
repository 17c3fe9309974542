"""The paper presets' loss and optimiser settings, pinned by value: a change to a recipe must
be deliberate (this test changes with it), never a side effect of a new default.

Sources: the paper (../shared/paper-hist.txt, "Implementation details": ALBEF lr 2e-5 at 256 px,
the head-average GradCAM map of the 3rd cross-attention layer; BLIP-large lr 1e-5 at 224 px,
the 9th cross-attention layer; L = a L_vl + (1 - a)(L_vl + L_HIST) with a reaching 1 after the
second epoch), ALBEF's and SelfEQ's configs (queue 65536, momentum 0.995, alpha 0.4, MLM 0.15,
weight decay 0.02), and docs/retrieval.md / docs/vqa.md for ALBEF's downstream recipes. An
epoch here is one pass over the images; the paper's loaders pass over every caption (~5 per
COCO image), hence 10 for its 2 epochs on COCO (docs/training.md).
"""
import pytest

from hist_vlm.train.config import load_config

ALBEF_LOSS = dict(schedule="paper", lambda_phrase=1.0, lambda_subject=1.0, lambda_add=1.0, add_normalize="none",
                  capture_layers=(2,), capture_head=None, capture_combine="mean", queue_size=65536,
                  momentum=0.995, alpha=0.4, mlm_probability=0.15, mlm_weight=1.0, itm_hard_negatives=True)
BLIP_LOSS = {**ALBEF_LOSS, "capture_layers": (8,), "queue_size": 0}

PRESETS = {
    # name: (loss fields, paper_ramp_epochs, lr, weight decay, epochs, image size)
    "albef_coco": (ALBEF_LOSS, 10.0, 2e-5, 0.02, 25, 256),
    "albef_vg": (ALBEF_LOSS, 2.0, 2e-5, 0.02, 5, 256),
    "blip_coco": (BLIP_LOSS, 10.0, 1e-5, 0.02, 25, 224),
    # BLIP-2: no ITG head in transformers (docs/blip2.md); the middle of 6 cross-attention layers
    "blip2_coco": ({**BLIP_LOSS, "capture_layers": (3,), "mlm_weight": 0.0}, 10.0, 1e-5, 0.05, 25, 224),
    # ALBEF's retrieval fine-tuning: ITC + ITM only, no HIST (docs/retrieval.md)
    # LLaVA: no ITC/ITM, LM + likelihood ranking, LLaVA-1.5's LoRA rate (docs/llava.md)
    "llava_coco": ({**BLIP_LOSS, "capture_layers": None, "add_normalize": "minmax", "objectives": ("mlm", "rank")},
                   10.0, 2e-4, 0.0, 10, 336),
    "albef_retrieval_coco": ({**ALBEF_LOSS, "schedule": "off", "capture_layers": None, "mlm_weight": 0.0},
                             2.0, 1e-5, 0.02, 25, 384),
    "albef_retrieval_flickr": ({**ALBEF_LOSS, "schedule": "off", "capture_layers": None, "mlm_weight": 0.0},
                               2.0, 1e-5, 0.02, 50, 384),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_paper_preset_settings_by_value(name):
    loss, ramp, lr, weight_decay, epochs, image_size = PRESETS[name]
    cfg = load_config(name)
    assert {key: getattr(cfg.loss, key) for key in loss} == loss
    assert cfg.loss.paper_ramp_epochs == ramp
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.schedule.epochs, cfg.data.image_size) == (
        lr, weight_decay, epochs, image_size)
    assert cfg.task == "hist" and cfg.model.require_checkpoint


def test_the_coco_presets_fade_hist_out_over_the_papers_two_caption_passes():
    """40 % of the run, as the paper's 2 of 5 epochs, and a pass over ~5 captions per image."""
    for name in ("albef_coco", "blip_coco", "blip2_coco"):
        cfg = load_config(name)
        assert cfg.loss.paper_ramp_epochs / cfg.schedule.epochs == pytest.approx(2 / 5)
        assert cfg.loss.paper_ramp_epochs == 2 * 5


def test_albef_vqa_keeps_albefs_vqa_recipe():
    cfg = load_config("albef_vqa")
    assert cfg.task == "vqa"
    assert (cfg.optim.lr, cfg.schedule.epochs, cfg.data.image_size) == (2e-5, 8, 384)
    assert (cfg.vqa.distill, cfg.vqa.alpha, cfg.vqa.momentum) == (True, 0.4, 0.995)
