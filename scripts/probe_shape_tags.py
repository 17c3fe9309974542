"""Does a vision tower that already knows which shapes are in an image keep that through caption pretraining?

A diagnostic of the demo base's plateau (README, "The demo's base model"), in three steps:

    (options before the positional arguments)
    python scripts/probe_shape_tags.py tags --out TOWER.pt [--steps 800] [KEY=VALUE ...]
        trains a fresh vision tower (AlbefConfig fields as KEY=VALUE) to say which shapes are in
        an image: max over its patch tokens -> linear -> binary cross-entropy per shape. The
        tags are the world's object shapes, which are exactly the subjects its captions name
        (one caption per scene lists every object), so nothing here is beyond what `hist-vlm
        parse` gives; the pooling is a max because a mean over 256 patches drowns an object of
        9-30 of them (measured: the mean stayed at the prior for 600 steps, the max learned).
    python scripts/probe_shape_tags.py readout MODEL|TOWER.pt [KEY=VALUE ...]
        freezes a tower (a saved model or checkpoint, `demo_base`, or a `tags` output with the
        KEY=VALUE it was trained with) and trains only a linear head on its max- and
        mean-pooled patch tokens: how much of "which shapes are here" the tower still holds,
        on another world's scenes: the mean over shapes of the ROC AUC (0.5: nothing), and the
        binary cross-entropy (the label prior's entropy, 0.662, is nothing; an overconfident
        head can score worse than that).
    python scripts/probe_shape_tags.py pretrain [--freeze stem|tower] [--vision-lr-scale F] TOWER.pt RUN_DIR [OVERRIDE ...]
        the `demo_pretrain` preset (plus `section.key=value` overrides, which must give the
        tower's own sizes, e.g. `model.params.patch_embed=conv`) with its vision tower starting
        from TOWER.pt; --freeze keeps its convolutional stem (`patch_embed`) or the whole tower
        as TOWER.pt left it; --vision-lr-scale trains the vision tower at F times `optim.lr`
        (the same warm-up and cosine). The trainer has no option to initialise one tower
        from a file nor a learning rate per tower, so this wraps `HistTask.build_model` and
        `build_optimizer`; score the run with `probe_grounding_words.py` and `readout`.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import Tensor, nn

from hist_vlm.data.dataset import ImageRecord
from hist_vlm.data.synthetic import SHAPES, generate_world
from hist_vlm.eval.runner import eval_transform
from hist_vlm.models import load_backbone
from hist_vlm.models.albef import AlbefConfig, build_vision_encoder
from hist_vlm.train.tags import caption_word_tags as word_tags

#: the demo's vision sizes; the tower keeps timm's ViT init (`build_vision_encoder` draws no
#: other), as the trainer's `init: fan_in_text` does
DEMO_VISION = dict(image_size=64, patch_size=4, vision_width=64, vision_depth=2, vision_heads=2, momentum=False)
PRIOR_ENTROPY = 0.662   # binary entropy of the share of scenes holding a given shape (~3 of 8)


def presence_tags(world: Path, split: str, preprocess, words: bool = False) -> tuple[Tensor, Tensor]:
    """(pixels [N, 3, H, W], multi-hot shapes present [N, len(SHAPES)]) of a world's split;
    with `words`, the caption words instead (`caption_word_tags`)."""
    present: dict[str, set[int]] = {}
    for line in (world / "grounding.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "single" and rec["split"] == split:
            present.setdefault(rec["image"], set()).add(SHAPES.index(rec["text"].split()[-1]))
    images = sorted(present)
    tags = torch.zeros(len(images), len(SHAPES))
    for row, image in enumerate(images):
        tags[row, sorted(present[image])] = 1
    pixels = torch.stack([preprocess(Image.open(world / image).convert("RGB")) for image in images])
    return pixels, caption_word_tags(world, split, images)[0] if words else tags


def caption_word_tags(world: Path, split: str, images: list[str]) -> tuple[Tensor, list[str]]:
    """([N, W] multi-hot, the W words) of a world's split: `hist_vlm.train.tags.caption_word_tags`
    (the words some but not nearly all images' captions use) on its captions file."""
    captions = {}
    for line in (world / f"captions_{split}.jsonl").read_text().splitlines():
        rec = json.loads(line)
        captions[rec["image"]] = tuple(rec["captions"])
    vocab, tags = word_tags([ImageRecord(image, captions[image], (), ()) for image in images])
    return tags, vocab


def pooled(vision: nn.Module, pixels: Tensor, how: str) -> Tensor:
    """[N, Dv]: the patch tokens' max or mean."""
    tokens = vision.forward_features(pixels)[:, 1:]                       # [N, P, Dv]
    return tokens.amax(1) if how == "max" else tokens.mean(1)


def mean_auc(scores: Tensor, tags: Tensor) -> float:
    """Mean over columns of the ROC AUC: P(a present item outscores an absent one), ties half."""
    aucs = []
    for s, t in zip(scores.t(), tags.t().bool()):
        pos, neg = s[t], s[~t]
        if len(pos) and len(neg):
            diff = pos[:, None] - neg[None, :]
            aucs.append(((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item())
    return sum(aucs) / len(aucs)


def fit(params, loss_of, steps: int, n: int, batch: int, lr: float, log: bool = False) -> None:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.02)
    start = time.time()
    for step in range(1, steps + 1):
        loss = loss_of(torch.randint(0, n, (batch,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log and step % 100 == 0:
            print(f"step {step}: tag loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)


def worlds(scenes: int, preprocess, words: bool = False) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Training tags of the demo's world (seed 0; the caption words with `words`) and test
    shape tags of another (seed 1)."""
    with tempfile.TemporaryDirectory() as tmp:
        train, test = Path(tmp) / "train", Path(tmp) / "test"
        generate_world(train, n_train=scenes, n_val=0, n_test=0, image_size=64, seed=0, progress=False)
        generate_world(test, n_train=0, n_val=0, n_test=512, image_size=64, seed=1, progress=False)
        return presence_tags(train, "train", preprocess, words), presence_tags(test, "test", preprocess)


def tower(overrides: list[str]) -> nn.Module:
    """A fresh vision tower of the demo's sizes with AlbefConfig fields KEY=VALUE (YAML values)."""
    fields = {key: yaml.safe_load(value) for key, value in (o.split("=", 1) for o in overrides)}
    return build_vision_encoder(AlbefConfig(**{**DEMO_VISION, **fields}))


def train_tags(args) -> None:
    torch.manual_seed(0)
    vision = tower(args.overrides)
    (pixels, tags), _ = worlds(args.scenes, eval_transform(SimpleNamespace(image_size=64)), args.tags == "words")
    head = nn.Linear(vision.embed_dim, tags.shape[1])
    fit([*vision.parameters(), *head.parameters()],
        lambda b: F.binary_cross_entropy_with_logits(head(pooled(vision, pixels[b], "max")), tags[b]),
        args.steps, len(pixels), 64, 1e-3, log=True)
    torch.save(vision.state_dict(), args.out)
    print(f"tower saved to {args.out}")


def readout(args) -> None:
    if args.model.endswith(".pt"):
        vision = tower(args.overrides)
        vision.load_state_dict(torch.load(args.model, weights_only=True))
    else:
        vision = load_backbone(args.model).visual_encoder
    vision.eval().requires_grad_(False)
    torch.manual_seed(0)
    (pixels, tags), (test_pixels, test_tags) = worlds(args.scenes, eval_transform(SimpleNamespace(image_size=64)))
    for how in ("max", "mean"):
        with torch.no_grad():
            feats, test_feats = (torch.cat([pooled(vision, x[i:i + 256], how) for i in range(0, len(x), 256)])
                                 for x in (pixels, test_pixels))
        head = nn.Linear(feats.shape[1], len(SHAPES))
        fit(head.parameters(), lambda b: F.binary_cross_entropy_with_logits(head(feats[b]), tags[b]),
            2000, len(feats), 128, 3e-3)
        with torch.no_grad():
            logits = head(test_feats)
            loss = F.binary_cross_entropy_with_logits(logits, test_tags).item()
        print(f"{args.model}: frozen {how}-pooled readout on another world: AUC {mean_auc(logits, test_tags):.3f} "
              f"(0.5: nothing), tag loss {loss:.3f} (prior {PRIOR_ENTROPY})")


def pretrain(args) -> None:
    from hist_vlm.train import loop
    from hist_vlm.train.config import load_config
    from hist_vlm.train.optim import weight_decay_groups

    build = loop.HistTask.build_model

    def build_from_tower(task):
        model = build(task)
        model.visual_encoder.load_state_dict(torch.load(args.tower, weights_only=True))
        if args.freeze:
            frozen = model.visual_encoder if args.freeze == "tower" else model.visual_encoder.patch_embed
            frozen.requires_grad_(False)
        return model

    def build_optimizer(named, optim):
        named = list(named)
        vision = [(n, p) for n, p in named if n.startswith("visual_encoder.")]
        rest = [(n, p) for n, p in named if not n.startswith("visual_encoder.")]
        groups = weight_decay_groups(rest, optim.weight_decay) + [
            dict(g, lr=optim.lr * args.vision_lr_scale) for g in weight_decay_groups(vision, optim.weight_decay)]
        return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)

    loop.HistTask.build_model = build_from_tower
    if args.vision_lr_scale != 1.0:
        loop.build_optimizer = build_optimizer
    loop.train(load_config("demo_pretrain", [f"run.dir={args.run_dir}", *args.overrides]), progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tags", help="train a tower on which shapes an image holds")
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, default=800)
    t.add_argument("--scenes", type=int, default=2048)
    t.add_argument("--tags", choices=("shapes", "words"), default="shapes",
                   help="the shapes present, or every word the captions use (caption_word_tags)")
    t.add_argument("overrides", nargs="*", help="AlbefConfig fields as KEY=VALUE")
    r = sub.add_parser("readout", help="what a frozen tower holds of which shapes are present")
    r.add_argument("model")
    r.add_argument("--scenes", type=int, default=2048)
    r.add_argument("overrides", nargs="*", help="a tags tower's AlbefConfig fields as KEY=VALUE")
    p = sub.add_parser("pretrain", help="demo_pretrain from a tags tower")
    p.add_argument("tower")
    p.add_argument("run_dir")
    p.add_argument("--freeze", choices=("stem", "tower"), help="keep this part as the tower file left it")
    p.add_argument("--vision-lr-scale", type=float, default=1.0, help="the vision tower's lr as a multiple of optim.lr")
    p.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    args = ap.parse_args()
    {"tags": train_tags, "readout": readout, "pretrain": pretrain}[args.command](args)


if __name__ == "__main__":
    main()
