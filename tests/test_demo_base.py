"""The pretrained demo base shipped in the package: it loads by name and it grounds."""
import json

from hist_vlm.data.grounding import read_synthetic
from hist_vlm.data.synthetic import generate_world
from hist_vlm.eval.runner import GradcamMaps, evaluate
from hist_vlm.models import load_backbone
from hist_vlm.models.registry import PACKAGED
from hist_vlm.train.config import load_config

#: chance on the synthetic test scenes: random maps 4.5 %, a centre peak 9.4 %; the shipped
#: base scores 53.7 % on the demo's 128 test scenes (55.6 % on the 48 used here)
POINTING_FLOOR = 0.45


def test_shipped_base_loads_by_name_and_grounds_test_scenes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # found from any directory
    base = PACKAGED["demo_base"]
    recipe = json.loads((base / "recipe.json").read_text())
    assert recipe["command"].startswith("hist-vlm demo --pretrain") and recipe["preset"] == "demo_pretrain"
    model = load_backbone("demo_base")
    assert model.config.vocab_file and (base / "vocab.txt").is_file()
    # the same test scenes the demo scores (scene i depends only on (seed, split, i)), a handful of them
    generate_world(tmp_path / "w", n_train=0, n_val=0, n_test=48, image_size=64, seed=0, progress=False)
    records = [r for r in read_synthetic(tmp_path / "w" / "grounding.jsonl") if r.kind != "composite"]
    assert len(records) >= 80
    layers = load_config("demo_finetune").loss.capture_layers
    report = evaluate(records, GradcamMaps(model, layers=layers), batch_size=32, progress=False)
    pointing = report.summary()["test"]["pointing"]
    assert pointing >= POINTING_FLOOR, pointing
