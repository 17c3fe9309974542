"""Subject-swapped captions as ITM negatives (`data.swap_negatives`): the draw, the batch rows
and the loss they enter."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from hist_vlm.data.dataset import HistCollate, HistDataset, read_parse_output
from hist_vlm.losses.hist import HistLoss, HistLossConfig
from hist_vlm.train.config import ConfigError, DataConfig
from losses_fixtures import hist_batch, rows, tiny_albef
from test_data_dataset import word_tokenize
from train_helpers import write_world


def test_a_swap_replaces_one_subject_of_the_caption_by_one_the_image_lacks(tmp_path):
    path, root = write_world(tmp_path, n_images=8)
    records = read_parse_output(path)[0]
    ds = HistDataset(records, root, 32, swap_negatives=1.0)
    assert [w for w, _ in ds.subject_words] == ["circle", "square", "star", "triangle"]
    seen = set()
    for epoch in range(6):
        for k, record in enumerate(records):
            s = ds[(epoch, k)]
            own = {lemma for *_, lemma in record.subject_spans}
            ci = record.captions.index(s.caption)
            spans = [(a, b) for c, a, b, _ in record.subject_spans if c == ci]
            if not spans:  # "there is ..." carries no parsed subject of its own: nothing to swap
                assert s.caption_swap is None
                continue
            # exactly one subject span differs, and what replaced it is a subject this image lacks
            matches = [(a, b) for a, b in spans
                       if s.caption_swap[:a] == s.caption[:a]
                       and s.caption_swap.endswith(s.caption[b:])
                       and s.caption_swap[a:len(s.caption_swap) - len(s.caption) + b] not in own
                       and s.caption_swap[a:len(s.caption_swap) - len(s.caption) + b] in dict(ds.subject_words)]
            assert matches, (s.caption, s.caption_swap)
            seen.add(s.caption_swap)
    assert len(seen) > 8  # the draw varies with the epoch


def test_swaps_off_draw_nothing_and_a_share_of_them_keeps_the_other_draws(tmp_path):
    path, root = write_world(tmp_path, n_images=8)
    records = read_parse_output(path)[0]
    off, half = HistDataset(records, root, 32, seed=5), HistDataset(records, root, 32, seed=5, swap_negatives=0.5)
    swapped = swappable = 0
    for key in [(e, k) for e in range(4) for k in range(8)]:
        a, b = off[key], half[key]
        assert a.caption_swap is None
        assert (a.caption, a.phrase, a.pair, a.flipped) == (b.caption, b.phrase, b.pair, b.flipped)
        assert torch.equal(a.pixel_values, b.pixel_values)
        swapped += b.caption_swap is not None
        swappable += b.caption == records[key[1]].captions[0]  # the caption with parsed subjects
    assert 0 < swapped < swappable


def test_collate_pads_swaps_like_captions_and_points_them_at_their_image(tmp_path):
    path, root = write_world(tmp_path, n_images=6)
    ds = HistDataset(read_parse_output(path)[0], root, 32, swap_negatives=0.5)
    samples = [ds[(0, k)] for k in range(6)]
    batch, _ = HistCollate(word_tokenize, 25)(samples)
    expected = [b for b, s in enumerate(samples) if s.caption_swap is not None]
    assert batch.caption_swaps.image_index.tolist() == expected and 0 < len(expected) < 6
    assert batch.caption_swaps.input_ids.shape[1] == batch.captions.input_ids.shape[1]
    alone, _ = HistCollate(word_tokenize, 25)([dataclasses.replace(s, caption_swap=None) for s in samples])
    assert alone.caption_swaps is None
    ids, mask = word_tokenize([s.caption_swap for s in samples if s.caption_swap], 25)
    n = ids.shape[1]
    assert torch.equal(batch.caption_swaps.input_ids[:, :n], ids) and not batch.caption_swaps.attention_mask[:, n:].any()


def test_caption_itm_averages_the_swapped_rows_as_negatives_of_their_image():
    torch.manual_seed(0)
    model = tiny_albef(momentum=False)
    batch = hist_batch(model, n_images=4, pad_to=16)
    cfg = HistLossConfig(schedule="off", queue_size=0, itm_hard_negatives=False, mlm_weight=0.0)
    plain = HistLoss(cfg, model)(model, batch, 0.0)["itm"]
    swaps = rows(model, ["a man riding a brown kite", "two dogs sleeping on a couch"], [0, 3], pad_to=16)
    with_swaps = HistLoss(cfg, model)(model, dataclasses.replace(batch, caption_swaps=swaps), 0.0)["itm"]

    image_embeds = model.encode_image(batch.pixel_values)
    fused = model.fuse_rows(swaps, image_embeds, text_embeds=model.encode_text(swaps.input_ids, swaps.attention_mask))
    swap_ce = F.cross_entropy(model.itm_logits(fused), torch.zeros(2, dtype=torch.long), reduction="sum")
    n_block = 3 * 4  # 4 positives, 4 (caption, other image), 4 (other caption, image)
    assert with_swaps.item() == pytest.approx(((n_block * plain + swap_ce) / (n_block + 2)).item(), rel=1e-5)
    assert abs(with_swaps.item() - plain.item()) > 1e-4


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_swap_share_outside_0_1_is_a_config_error(share):
    with pytest.raises(ConfigError, match="swap_negatives"):
        DataConfig(swap_negatives=share)

