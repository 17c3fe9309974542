import json

import pytest
import torch
from torchvision.transforms import v2

from hist_vlm.data.dataset import (
    DatasetError,
    GlobalBatchSampler,
    HistCollate,
    HistDataset,
    read_parse_output,
)
from train_helpers import write_world


def word_tokenize(texts, max_length):
    """A real (if simple) tokenizer: one id per word, padded to the longest row."""
    rows = [[1] + [hash(w) % 97 + 2 for w in t.split()][: max_length - 1] for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    return ids, (ids != 0).long()


def test_reader_drops_images_without_phrases_and_names_bad_lines(tmp_path):
    path, _ = write_world(tmp_path, n_images=3)
    extra = {"image": "x.png", "captions": ["nothing here"], "phrases": [], "pairs": []}
    path.write_text(path.read_text() + json.dumps(extra) + "\n")
    records, dropped = read_parse_output(path)
    assert (len(records), dropped) == (3, 1)
    assert records[1].pairs == ((0, 1), (1, 0)) and records[0].pairs == ()

    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(DatasetError, match=r"phrases.jsonl:5"):
        read_parse_output(path)
    dog = {"text": "a dog", "subject": "dog", "caption_index": 0, "start": 0, "end": 5,
           "subject_start": 2, "subject_end": 5, "subject_lemma": "dog"}
    bad_pair = dict(extra, phrases=[dog], pairs=[[0, 3]])
    path.write_text(json.dumps(bad_pair) + "\n")
    with pytest.raises(DatasetError, match="pair"):
        read_parse_output(path)


def test_samples_are_a_function_of_seed_epoch_index(tmp_path):
    path, root = write_world(tmp_path, n_images=6)
    ds = HistDataset(read_parse_output(path)[0], root, 32, seed=3)
    torch.manual_seed(1)
    a = ds[(0, 4)]
    state = torch.get_rng_state()
    torch.manual_seed(2)  # the global generator's state does not reach the draw ...
    b = ds[(0, 4)]
    assert torch.equal(a.pixel_values, b.pixel_values) and a.caption == b.caption
    torch.set_rng_state(state)
    ds[(0, 5)]            # ... and a draw leaves it where it was (training's dropout reads it)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.pixel_values.shape == (3, 32, 32)
    other_epochs = [ds[(e, 4)].pixel_values for e in range(1, 4)]
    assert not all(torch.equal(a.pixel_values, p) for p in other_epochs)
    # the pair's first phrase is the sample's phrase C_i
    for k in range(6):
        s = ds[(0, k)]
        assert s.pair is None or s.pair[0] == s.phrase
        assert (s.pair is None) == (k % 3 == 0)


def test_flip_only_where_no_text_mentions_left_or_right(tmp_path):
    path, root = write_world(tmp_path / "plain", n_images=8, size=32)
    # crop scale 1 and ratio of a square image: the crop is the identity, only the flip remains
    ds = HistDataset(read_parse_output(path)[0], root, 32, crop_scale=(1.0, 1.0))
    no_flip = HistDataset(read_parse_output(path)[0], root, 32, crop_scale=(1.0, 1.0), hflip=False)
    flips = 0
    for e in range(4):
        for k in range(8):
            s, ref = ds[(e, k)], no_flip[(e, k)]
            expected = v2.functional.horizontal_flip(ref.pixel_values) if s.flipped else ref.pixel_values
            assert torch.allclose(s.pixel_values, expected)
            flips += s.flipped
    assert 0 < flips < 32

    path, root = write_world(tmp_path / "sides", n_images=8, size=32, side_words=True)
    ds = HistDataset(read_parse_output(path)[0], root, 32)
    for e in range(4):
        for k in range(8):
            s = ds[(e, k)]
            says_side = any(w in t for t in (s.caption, s.phrase) for w in ("left", "right"))
            assert not (s.flipped and says_side)


def test_collate_builds_hist_batch_and_skips_unreadable_images(tmp_path):
    path, root = write_world(tmp_path, n_images=6)
    (root / "img001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated garbage")
    ds = HistDataset(read_parse_output(path)[0], root, 32)
    batch, skipped = HistCollate(word_tokenize, 25)([ds[(0, k)] for k in range(6)])
    assert [s.split(": ")[0] for s in skipped] == [str(root / "img001.png")] and "not a readable image" in skipped[0]
    # the next readable image takes the broken one's slot: shapes stay equal across ranks
    assert batch.pixel_values.shape == (6, 3, 32, 32)
    assert batch.image_ids.tolist() == [0, 2, 2, 3, 4, 5]
    assert len(batch.captions) == len(batch.phrases) == len(batch.subjects) == 6
    # images 0 and 3 have no pair; the rest point at their position in the batch
    assert batch.pair_first.image_index.tolist() == [1, 2, 4, 5]
    assert len(batch.pair_second) == len(batch.composites) == 4
    first, second = batch.pair_first.input_ids[0], batch.pair_second.input_ids[0]
    n1, n2 = int(batch.pair_first.attention_mask[0].sum()), int(batch.pair_second.attention_mask[0].sum())
    composite = batch.composites.input_ids[0]
    assert composite[1:n1].tolist() == first[1:n1].tolist()              # "C_i ..."
    assert composite[n1 + 1:n1 + n2].tolist() == second[1:n2].tolist()  # "... and C_j"

    for k in range(6):
        (root / f"img{k:03d}.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="no image"):
        ds[(0, 0)]


def test_global_batch_sampler_shards_and_resumes():
    one = GlobalBatchSampler(20, 4, seed=1)
    ranks = [GlobalBatchSampler(20, 2, world_size=2, rank=r, seed=1) for r in range(2)]
    batches = list(one)
    assert len(batches) == one.steps_per_epoch == 5
    for step, (a, b) in enumerate(zip(*ranks)):
        assert a + b == batches[step]
    accum = list(GlobalBatchSampler(20, 2, grad_accum=2, seed=1))
    assert [accum[2 * s] + accum[2 * s + 1] for s in range(5)] == batches

    one.set_position(epoch=0, start_step=3)
    assert list(one) == batches[3:] and len(one) == 2
    one.set_position(epoch=1)
    assert list(one) != batches and {i for b in one for _, i in b} == set(range(20))
    with pytest.raises(DatasetError, match="fewer than one global batch"):
        GlobalBatchSampler(5, 4, world_size=2)
