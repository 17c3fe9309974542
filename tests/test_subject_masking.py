"""Subject words masked at their own rate (`loss.mlm_subject_probability`): the masks, the ids
the trainer derives from the parse, and the config check."""
import pytest
import torch

from hist_vlm.data.dataset import read_parse_output
from hist_vlm.losses.hist import HistLossConfig
from hist_vlm.losses.mlm import mask_tokens
from hist_vlm.train.tasks.hist import subject_token_ids
from losses_fixtures import tiny_albef
from train_helpers import SHAPES, write_world


def _draw(n=64, t=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 1010, (n, t), generator=g)
    ids[:, 0], ids[:, 16:] = 101, 0
    return ids, (ids != 0).long(), torch.rand(3, n, t, generator=g)


def test_preferred_tokens_are_chosen_at_their_rate_with_the_same_uniforms():
    ids, att, u = _draw()
    common = dict(mask_id=103, vocab_size=30522, never_mask=(0, 101))
    preferred = torch.tensor([1000, 1001])
    base = mask_tokens(ids, att, u, **common)
    same = mask_tokens(ids, att, u, **common, preferred=preferred, preferred_probability=0.15)
    assert all(torch.equal(a, b) for a, b in zip(base, same))  # equal rates: the very same masks

    masked, labels = mask_tokens(ids, att, u, **common, preferred=preferred, preferred_probability=0.6)
    chosen, is_pref = labels != -100, torch.isin(ids, preferred) & att.bool()
    # a token is chosen iff its uniform is under ITS rate; specials and padding never
    assert torch.equal(chosen, att.bool() & (ids != 101) & (u[0] < torch.where(is_pref, 0.6, 0.15)))
    rate_pref = chosen[is_pref].float().mean().item()
    rate_other = chosen[att.bool() & ~is_pref & (ids != 101)].float().mean().item()
    assert 0.5 < rate_pref < 0.7 and 0.1 < rate_other < 0.2
    # the other tokens keep exactly the masks they had
    other = ~is_pref
    assert torch.equal(labels[other], base[1][other]) and torch.equal(masked[other], base[0][other])


def test_subject_ids_are_the_wordpieces_of_the_parsed_subjects(tmp_path):
    path, _ = write_world(tmp_path, n_images=8)
    model = tiny_albef(momentum=False)
    ids = subject_token_ids(model, read_parse_output(path)[0])
    expected, mask = model.tokenize(SHAPES)
    expected = set(expected[mask.bool()].tolist()) - set(model.mask_tokens.never_mask)
    assert set(ids.tolist()) == expected and len(ids) >= len(SHAPES)
    assert not set(ids.tolist()) & set(model.tokenize(["red green blue yellow near a"])[0][0, 1:].tolist())


@pytest.mark.parametrize("rate", [-0.5, 1.5])
def test_subject_rate_outside_0_1_is_refused(rate):
    with pytest.raises(ValueError, match="mlm_subject_probability"):
        HistLossConfig(mlm_subject_probability=rate)
