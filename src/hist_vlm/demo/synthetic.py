"""The synthetic world: small multi-object scenes with captions, boxes and masks.

Why: the demo and the tests need data that has what HIST exploits (several distinct objects per
image, captions with several groundable noun phrases) and ground truth to score grounding, with
no download. Each image holds 2-4 objects of distinct shapes (so every description is
unambiguous and Algorithm 1 finds partners with a different subject), in varied colours, sizes
and positions, over a textured background. Captions use varied grammar; shape words are chosen
so that spaCy's small English model tags them as nouns (tests check it with the real parser).

On disk (all paths inside files are relative to `out_dir`):
    images/<split>/<split>_<i>.png       the scenes
    masks/<split>/<split>_<i>.png        object ids (0 = background, k = k-th object), uint8
    captions_<split>.jsonl               {"image", "captions": [...]}, the caption-reader format
    grounding.jsonl                      one query per line, see `Query.to_json`
    world.json                           the generator settings (for reproducibility)

Deterministic: scene i of a split depends only on (seed, split, i), so asking for more
training images leaves the validation and test scenes unchanged.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from hist_vlm._io import atomic_dir, atomic_file, atomic_write_text

SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond", "arrow", "hexagon")
COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 225),
    "yellow": (245, 215, 35),
    "orange": (245, 135, 25),
    "purple": (135, 50, 185),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
# object side as a fraction of the image side
SIZES = {"small": (0.17, 0.23), "large": (0.30, 0.37)}
# background kind -> the adjective captions use for it
BACKGROUNDS = {"noise": "noisy", "gradient": "shaded", "stripes": "striped", "checker": "checkered"}
SPLITS = ("train", "val", "test")
_SPLIT_CODE = {s: i for i, s in enumerate(SPLITS)}
_NUMBERS = {2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class WorldConfig:
    """Generator settings. `image_size` is the side of the square images in pixels."""

    image_size: int = 96
    min_objects: int = 2
    max_objects: int = 4
    min_captions: int = 3
    max_captions: int = 5
    composites_per_image: int = 2

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32 px, got {self.image_size}")
        if not 2 <= self.min_objects <= self.max_objects <= 4:
            raise ValueError("need 2 <= min_objects <= max_objects <= 4")
        if not 1 <= self.min_captions <= self.max_captions:
            raise ValueError("need 1 <= min_captions <= max_captions")


@dataclass(frozen=True)
class SceneObject:
    id: int                                  # value in the id mask, 1-based
    shape: str
    colour: str
    size: str                                # "small" | "large"
    box: tuple[int, int, int, int]           # x1, y1, x2, y2 pixels, x2/y2 exclusive

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


@dataclass(frozen=True)
class Query:
    """A grounding query: a phrase that refers to one object, or "A and B" to two."""

    text: str
    object_ids: tuple[int, ...]
    kind: str                                # "single" | "composite"


@dataclass
class Scene:
    image: np.ndarray                        # [H, W, 3] uint8
    id_mask: np.ndarray                      # [H, W] uint8
    background: str
    objects: list[SceneObject]
    captions: list[str] = field(default_factory=list)
    queries: list[Query] = field(default_factory=list)


@dataclass(frozen=True)
class WorldPaths:
    root: Path
    captions: dict[str, Path]                # split -> captions JSONL
    grounding: Path
    manifest: Path


# ----------------------------------------------------------------------------- drawing

def _regular(n: int, r: float, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(r * math.cos(phase + 2 * math.pi * k / n), r * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _outline(shape: str) -> list[tuple[float, float]] | None:
    """Polygon of a shape in a unit box centred at 0 (coordinates in [-1, 1]); None = ellipse."""
    if shape == "circle":
        return None
    if shape == "square":
        return [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]
    if shape == "triangle":
        return [(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)]
    if shape == "star":
        outer, inner = _regular(5, 1.0), _regular(5, 0.42, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        x = 16 * np.sin(ts) ** 3
        y = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
        return list(zip(x / 17, (y + 2.5) / 15))
    if shape == "diamond":
        return [(0.0, -1.0), (0.7, 0.0), (0.0, 1.0), (-0.7, 0.0)]
    if shape == "arrow":  # pointing right
        return [(-1, -0.3), (0.1, -0.3), (0.1, -0.8), (1, 0), (0.1, 0.8), (0.1, 0.3), (-1, 0.3)]
    if shape == "hexagon":
        return _regular(6, 1.0, 0.0)
    raise ValueError(f"unknown shape {shape!r}")


def _draw_mask(shape: str, cx: float, cy: float, side: float, size: int) -> np.ndarray:
    """Boolean [size, size] mask of one shape of the given side centred at (cx, cy)."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    r = side / 2
    pts = _outline(shape)
    if pts is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        draw.polygon([(cx + r * x, cy + r * y) for x, y in pts], fill=1)
    return np.asarray(canvas, dtype=bool)


def _background(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """A muted [size, size, 3] float background, so that the saturated objects stand out."""
    base = rng.uniform(70, 170, size=3)
    base = base.mean() * 0.6 + base * 0.4  # desaturate
    yy, xx = np.mgrid[0:size, 0:size] / size
    if kind == "noise":
        coarse = rng.normal(0, 18, size=(size // 8 + 1, size // 8 + 1, 1))
        field_ = np.kron(coarse, np.ones((8, 8, 1)))[:size, :size] + rng.normal(0, 10, (size, size, 1))
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        ramp = (math.cos(angle) * xx + math.sin(angle) * yy)[..., None]
        field_ = (ramp - ramp.mean()) * rng.uniform(60, 110)
    elif kind == "stripes":
        period = rng.uniform(5, 12)
        angle = rng.uniform(0, math.pi)
        phase = (math.cos(angle) * xx + math.sin(angle) * yy) * size / period
        field_ = (np.sin(2 * math.pi * phase) * rng.uniform(12, 25))[..., None]
    elif kind == "checker":
        cell = int(rng.integers(6, 14))
        board = ((np.arange(size)[:, None] // cell + np.arange(size)[None, :] // cell) % 2)[..., None]
        field_ = (board - 0.5) * rng.uniform(25, 45)
    else:
        raise ValueError(f"unknown background {kind!r}")
    tint = rng.normal(0, 6, size=3)
    return base + tint + field_


def _place(rng: np.random.Generator, sides: list[float], size: int) -> list[tuple[float, float]] | None:
    """Centres for squares of the given sides that stay inside the image and apart (2 px gap)."""
    centres: list[tuple[float, float]] = []
    for side in sides:
        for _ in range(200):
            lo, hi = side / 2 + 1, size - side / 2 - 1
            c = (rng.uniform(lo, hi), rng.uniform(lo, hi))
            if all(
                abs(c[0] - o[0]) > (side + s) / 2 + 2 or abs(c[1] - o[1]) > (side + s) / 2 + 2
                for o, s in zip(centres, sides)
            ):
                centres.append(c)
                break
        else:
            return None
    return centres


def render_scene(rng: np.random.Generator, config: WorldConfig) -> Scene:
    """One scene (image, id mask, objects) with its captions and grounding queries."""
    size = config.image_size
    while True:
        n = int(rng.integers(config.min_objects, config.max_objects + 1))
        shapes = [SHAPES[i] for i in rng.choice(len(SHAPES), n, replace=False)]
        colours = [list(COLOURS)[i] for i in rng.integers(0, len(COLOURS), n)]
        sizes = [("small", "large")[i] for i in rng.integers(0, 2, n)]
        sides = [rng.uniform(*SIZES[s]) * size for s in sizes]
        centres = _place(rng, sides, size)
        if centres is not None:
            break
    background = list(BACKGROUNDS)[int(rng.integers(0, len(BACKGROUNDS)))]
    image = _background(rng, background, size)
    id_mask = np.zeros((size, size), np.uint8)
    objects = []
    for k, (shape, colour, sz, side, (cx, cy)) in enumerate(zip(shapes, colours, sizes, sides, centres), start=1):
        m = _draw_mask(shape, cx, cy, side, size)
        shade = np.array(COLOURS[colour], float) + rng.normal(0, 8, 3)
        image[m] = shade
        id_mask[m] = k
        ys, xs = np.nonzero(m)
        objects.append(SceneObject(k, shape, colour, sz, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)))
    scene = Scene(np.clip(image, 0, 255).astype(np.uint8), id_mask, background, objects)
    scene.captions = _captions(rng, scene, config)
    scene.queries = _queries(rng, scene, config)
    return scene


# ----------------------------------------------------------------------------- language

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _describe(rng: np.random.Generator, o: SceneObject, definite: bool = False) -> str:
    """A noun phrase for an object: shape, with colour and/or size sometimes left out."""
    form = rng.choice(["colour", "size colour", "size", "bare"], p=[0.35, 0.3, 0.15, 0.2])
    words = {"colour": [o.colour], "size colour": [o.size, o.colour], "size": [o.size], "bare": []}[form]
    words = [*words, o.shape]
    det = "the" if definite else _article(words[0])
    return " ".join([det, *words])


def _relation(a: SceneObject, b: SceneObject, rng: np.random.Generator) -> str:
    """Where a is relative to b, from the box centres; sometimes the vaguer 'near'/'next to'."""
    if rng.random() < 0.25:
        return str(rng.choice(["near", "next to", "beside"]))
    dx, dy = a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def _captions(rng: np.random.Generator, scene: Scene, config: WorldConfig) -> list[str]:
    objs = scene.objects
    n_caps = int(rng.integers(config.min_captions, config.max_captions + 1))

    def pick(k: int) -> list[SceneObject]:
        return [objs[i] for i in rng.choice(len(objs), k, replace=False)]

    def relation() -> str:
        a, b = pick(2)
        return f"{_describe(rng, a)} {_relation(a, b, rng)} {_describe(rng, b)}"

    def there_is() -> str:
        a, b = pick(2)
        return f"there is {_describe(rng, a)} {rng.choice(['near', 'and'])} {_describe(rng, b)}"

    def listing() -> str:
        order = pick(len(objs))
        names = [_describe(rng, o) for o in order]
        listed = ", ".join(names[:-1]) + " and " + names[-1]
        return f"{_NUMBERS[len(objs)]} {rng.choice(['objects', 'shapes'])}: {listed}"

    def relation_and() -> str:
        if len(objs) < 3:
            return relation()
        a, b, c = pick(3)
        return f"{_describe(rng, a)} {_relation(a, b, rng)} {_describe(rng, b)} and {_describe(rng, c)}"

    def on_background() -> str:
        (a,) = pick(1)
        return f"{_describe(rng, a)} on a {BACKGROUNDS[scene.background]} background"

    def attribute() -> str:
        (a,) = pick(1)
        return f"the {a.size} {a.shape} is {a.colour}"

    templates = [relation, there_is, listing, relation_and, on_background, attribute]
    # always one caption naming every object, so every object is in the training text
    caps = [listing()]
    for i in rng.choice(len(templates), n_caps - 1, replace=True):
        caps.append(templates[i]())
    return [caps[i] for i in rng.permutation(len(caps))]


def _queries(rng: np.random.Generator, scene: Scene, config: WorldConfig) -> list[Query]:
    """One single query per object, and up to `composites_per_image` "A and B" queries."""
    out = [Query(_describe(rng, o, definite=True), (o.id,), "single") for o in scene.objects]
    pairs = [(a, b) for i, a in enumerate(scene.objects) for b in scene.objects[i + 1:]]
    for i in rng.choice(len(pairs), min(config.composites_per_image, len(pairs)), replace=False):
        a, b = pairs[i]
        if rng.random() < 0.5:
            a, b = b, a
        text = f"{_describe(rng, a, definite=True)} and {_describe(rng, b, definite=True)}"
        out.append(Query(text, (a.id, b.id), "composite"))
    return out


# ----------------------------------------------------------------------------- writing

def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of scene `index` of `split`: independent of how many scenes are made."""
    return np.random.default_rng([seed, _SPLIT_CODE[split], index])


def generate_world(
    out_dir: str | Path,
    n_train: int = 512,
    n_val: int = 64,
    n_test: int = 128,
    image_size: int = 96,
    seed: int = 0,
    config: WorldConfig | None = None,
    progress: bool = True,
) -> WorldPaths:
    """Write a synthetic world under `out_dir` (see the module docstring) and return its paths.

    `config` overrides `image_size` when given.
    """
    config = config or WorldConfig(image_size=image_size)
    root = Path(out_dir)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    if any(c < 0 for c in counts.values()):
        raise ValueError("image counts must be >= 0")
    captions_paths = {s: root / f"captions_{s}.jsonl" for s in SPLITS}
    grounding_path = root / "grounding.jsonl"
    root.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=sum(counts.values()), desc="synthetic world", unit="img", disable=not progress)
    with atomic_file(grounding_path) as gfile:
        for split in SPLITS:
            # a split's image and mask folders built whole, then put in place: one temp per folder, not per image
            with atomic_dir(root / "images" / split) as images, atomic_dir(root / "masks" / split) as masks, \
                    atomic_file(captions_paths[split]) as cfile:
                for i in range(counts[split]):
                    scene = render_scene(scene_rng(seed, split, i), config)
                    name = f"{split}_{i:05d}.png"
                    image_rel, mask_rel = f"images/{split}/{name}", f"masks/{split}/{name}"
                    Image.fromarray(scene.image).save(images / name)
                    Image.fromarray(scene.id_mask).save(masks / name)
                    cfile.write(json.dumps({"image": image_rel, "captions": scene.captions}) + "\n")
                    boxes = {o.id: list(o.box) for o in scene.objects}
                    for q_index, q in enumerate(scene.queries):
                        gfile.write(json.dumps({
                            "id": f"{split}_{i:05d}_{q_index}",
                            "image": image_rel,
                            "text": q.text,
                            "boxes": [boxes[k] for k in q.object_ids],
                            "box_format": "xyxy",
                            "masks": mask_rel,
                            "object_ids": list(q.object_ids),
                            "kind": q.kind,
                            "split": split,
                            "width": config.image_size,
                            "height": config.image_size,
                        }) + "\n")
                    bar.update()
    bar.close()
    manifest = root / "world.json"
    atomic_write_text(manifest, json.dumps({
        "seed": seed, "counts": counts, "config": asdict(config),
        "shapes": SHAPES, "colours": list(COLOURS), "backgrounds": list(BACKGROUNDS),
    }, indent=2))
    return WorldPaths(root, captions_paths, grounding_path, manifest)


def generate_parsed_world(out_dir: str | Path, phrases: str | Path, *, n_train: int, n_val: int, n_test: int,
                          image_size: int, seed: int) -> WorldPaths:
    """`generate_world`, then its training captions through the `hist-vlm parse` pipeline
    (caption reader, spaCy parser, Algorithm 1 seeded by `seed`) into `phrases`: what the demo
    and a `data.synthetic` run train on, built by the same steps a user runs by hand."""
    from hist_vlm.data.captions import read_captions
    from hist_vlm.text.corpus import atomic_write_jsonl, parse_images
    from hist_vlm.text.spacy_parser import SpacyParser

    paths = generate_world(out_dir, n_train=n_train, n_val=n_val, n_test=n_test, image_size=image_size, seed=seed)
    images = read_captions(paths.captions["train"], "jsonl")
    atomic_write_jsonl(Path(phrases), parse_images(images, SpacyParser(), seed=seed))
    return paths
