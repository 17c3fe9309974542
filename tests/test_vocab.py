"""Vocabulary derived by the pipeline (`model.derive_vocab`), on words the project never
uses anywhere else, and saved with the checkpoint so that a moved checkpoint tokenizes alike."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hist_vlm.cli import app
from hist_vlm.models import load_backbone
from hist_vlm.models.albef import AlbefConfig, AlbefModel
from hist_vlm.models.tokenization import (
    SPECIAL_TOKENS,
    AlbefTokenizer,
    build_vocab,
    read_vocab_file,
    write_vocab_file,
)
from hist_vlm.train.config import ConfigError, load_config
from hist_vlm.train.loop import train
from train_helpers import DEMO_CONFIGS, _phrase, tiny_overrides, write_world

DEMO = DEMO_CONFIGS / "demo_tiny.yaml"
# nothing like the demo world: other words, accents, digits, hyphens, CJK, capitals, punctuation
NEW_CAPTIONS = [
    "Zwei Kühe grasen neben der Mühle.",
    "A señora's naïve café-au-lait (2 cups) on the 3rd floor!",
    "東京 tower at dusk; a fox-like dog sniffs the QUAY",
    "an ochre trapezoid beside the teal rhombus",
]


def test_every_word_of_the_texts_tokenizes_to_a_known_id(tmp_path):
    vocab = build_vocab(NEW_CAPTIONS)
    assert vocab[: len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS) and vocab[0] == "[PAD]"
    assert len(set(vocab)) == len(vocab)
    words = vocab[len(SPECIAL_TOKENS):]
    assert words == sorted(words) and {"kuhe", "cafe", "naive", "東", "京", "quay", "rhombus", "3rd"} <= set(words)
    assert build_vocab(reversed(NEW_CAPTIONS)) == vocab               # order of the texts does not matter
    tok = AlbefTokenizer(str(write_vocab_file(vocab, tmp_path / "vocab.txt")))
    ids, mask = tok(NEW_CAPTIONS)
    unk = vocab.index("[UNK]")
    assert tok.vocab_size == len(vocab) and not (ids[mask.bool()] == unk).any()
    # round trip through the words (ALBEF's cleaning drops the punctuation it drops)
    assert tok.decode(tok(["the teal rhombus"])[0]) == ["the teal rhombus"]
    # a word never seen is [UNK], not some other word
    assert (tok(["a purple rhombus"])[0] == unk).sum() == 1
    assert read_vocab_file(tmp_path / "vocab.txt") == vocab


def _new_world(root: Path) -> tuple[Path, Path]:
    """write_world's images and layout with captions in words the project never uses."""
    phrases, images = write_world(root, n_images=8, size=32)
    colours, shapes = ["ochre", "teal", "mauve", "umber"], ["trapezoid", "rhombus", "crescent", "kite"]
    lines = []
    for k, line in enumerate(json.loads(x) for x in phrases.read_text().splitlines()):
        a = f"an {colours[k % 4]} {shapes[k % 4]}"
        b = f"the {colours[(k + 1) % 4]} {shapes[(k + 2) % 4]}"
        captions = [f"{a} beside {b}", f"look at {b}"]
        lines.append({**line, "captions": captions, "phrases": [_phrase(captions, 0, a), _phrase(captions, 0, b)]})
    phrases.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return phrases, images


@pytest.fixture(scope="module")
def derived_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    world = _new_world(root / "world")
    cfg = load_config(DEMO, tiny_overrides(*world, root / "run", "run.max_steps=2", "model.derive_vocab=true"))
    result = train(cfg, progress=False)
    return root, world, result.checkpoint


def test_training_derives_the_vocabulary_of_its_texts(derived_run):
    root, (phrases, _), ckpt = derived_run
    from hist_vlm.data.dataset import read_parse_output

    records, _ = read_parse_output(phrases)
    texts = [c for r in records for c in r.captions] + [f"{r.phrases[i][0]} and {r.phrases[j][0]}"
                                                        for r in records for i, j in r.pairs]
    vocab = read_vocab_file(root / "run" / "vocab.txt")
    assert vocab == build_vocab(texts)
    assert {"ochre", "rhombus", "kite", "beside", "and"} <= set(vocab) and "red" not in vocab
    saved = json.loads((ckpt / "model" / "config.json").read_text())["config"]
    assert saved["vocab_size"] == len(vocab) and saved["vocab_file"] == "vocab.txt"
    assert str(root) not in (ckpt / "model" / "config.json").read_text()
    assert (ckpt / "model" / "vocab.txt").read_bytes() == (root / "run" / "vocab.txt").read_bytes()


def test_a_moved_checkpoint_tokenizes_identically(derived_run, tmp_path):
    root, _, ckpt = derived_run
    texts = ["an ochre kite and the teal rhombus", "look at the mauve crescent", "a purple kite"]
    original = load_backbone(ckpt)
    ids, mask = original.tokenize(texts)
    reference = AlbefTokenizer(str(root / "run" / "vocab.txt"))(texts)
    assert torch.equal(ids, reference[0]) and torch.equal(mask, reference[1])
    moved = tmp_path / "elsewhere" / "step"
    shutil.copytree(ckpt, moved)
    hidden = root / "run" / "vocab.hidden"
    (root / "run" / "vocab.txt").rename(hidden)                 # the run's own copy is gone
    shutil.move(ckpt, root / "ckpt.hidden")                    # and so is the original checkpoint
    try:
        copy = load_backbone(moved)
        assert Path(copy.config.vocab_file).is_relative_to(moved)
        assert all(torch.equal(a, b) for a, b in zip(copy.tokenize(texts), (ids, mask)))
        assert all(torch.equal(v, copy.state_dict()[k]) for k, v in original.state_dict().items())
        copy.save_pretrained(tmp_path / "again")                 # re-saving copies the vocabulary on
        assert (tmp_path / "again" / "vocab.txt").read_bytes() == hidden.read_bytes()
    finally:
        hidden.rename(root / "run" / "vocab.txt")
        shutil.move(root / "ckpt.hidden", ckpt)


def test_folders_saved_with_a_path_to_the_vocabulary_still_load(tmp_path):
    vocab = build_vocab(NEW_CAPTIONS)
    external = write_vocab_file(vocab, tmp_path / "shared" / "words.txt")
    model = AlbefModel(AlbefConfig(image_size=32, patch_size=16, vision_width=32, vision_depth=1, vision_heads=2,
                                   text_width=32, text_layers=2, text_heads=2, text_intermediate_size=64,
                                   fusion_layer=1, embed_dim=16, momentum=False, vocab_size=len(vocab),
                                   vocab_file=str(external)))
    model.save_pretrained(tmp_path / "old")
    cfg_path = tmp_path / "old" / "config.json"
    payload = json.loads(cfg_path.read_text())
    payload["config"]["vocab_file"] = str(external)          # how folders were written before
    cfg_path.write_text(json.dumps(payload))
    (tmp_path / "old" / "vocab.txt").unlink()
    assert AlbefModel.from_pretrained(tmp_path / "old").tokenizer.vocab_size == len(vocab)
    external.unlink()
    with pytest.raises(FileNotFoundError, match="vocabulary"):
        AlbefModel.from_pretrained(tmp_path / "old")


def test_starting_from_a_checkpoint_keeps_its_vocabulary(derived_run, tmp_path):
    root, world, ckpt = derived_run
    res = CliRunner().invoke(app, ["train", "demo_tiny", *tiny_overrides(*world, tmp_path / "ft", "run.max_steps=1",
                                                                         f"model.checkpoint={ckpt}",
                                                                         "model.derive_vocab=true")])
    assert res.exit_code == 0, res.output
    assert "vocabulary saved with model.checkpoint is used" in res.output
    assert not (tmp_path / "ft" / "vocab.txt").exists()
    step = tmp_path / "ft" / "checkpoints" / "step-00000001" / "model"
    assert (step / "vocab.txt").read_bytes() == (ckpt / "model" / "vocab.txt").read_bytes()


@pytest.mark.parametrize("extra, message", [
    (["model.params.vocab_size=100"], "sets model.params.vocab_size itself"),
    (["model.params.vocab_file=v.txt"], "sets model.params.vocab_file itself"),
    (["model.name=blip"], "keeps its own tokenizer"),
])
def test_conflicting_settings_are_one_line_errors(extra, message, derived_run, tmp_path):
    _, world, _ = derived_run
    res = CliRunner().invoke(app, ["train", "demo_tiny", *tiny_overrides(*world, tmp_path / "run",
                                                                         "model.derive_vocab=true", *extra)])
    assert res.exit_code == 2 and message in res.output and len(res.output.strip().splitlines()) == 1


def test_a_resumed_run_refuses_changed_texts(tmp_path):
    from hist_vlm.data.dataset import ImageRecord
    from hist_vlm.train.model import derive_vocabulary

    cfg = load_config(DEMO, ["model.derive_vocab=true"]).model
    records = [ImageRecord("a.png", ("an ochre kite",), (("an ochre kite", "kite"),), ())]
    vocab, path = derive_vocabulary(cfg, records, tmp_path, resume=False, is_main=True, barrier=lambda: None)
    assert read_vocab_file(path) == vocab and "ochre" in vocab
    assert derive_vocabulary(cfg, records, tmp_path, resume=True, is_main=True, barrier=lambda: None)[0] == vocab
    changed = [ImageRecord("a.png", ("a teal kite",), (("a teal kite", "kite"),), ())]
    with pytest.raises(ConfigError, match="training texts changed"):
        derive_vocabulary(cfg, changed, tmp_path, resume=True, is_main=True, barrier=lambda: None)
