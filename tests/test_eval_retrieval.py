"""The retrieval metric: hand-made ranks, and ALBEF's itm_eval semantics on seeded random scores."""
import numpy as np
import pytest

from hist_vlm.eval.retrieval import gold_ranks, metrics_from_ranks, retrieval_metrics, retrieval_ranks

# 4 images with 2 captions each: texts 2i and 2i+1 belong to image i
IMG2TXT = [[0, 1], [2, 3], [4, 5], [6, 7]]
TXT2IMG = [0, 0, 1, 1, 2, 2, 3, 3]
I2T = np.array([
    #  t0    t1    t2    t3    t4    t5    t6    t7
    [0.9, 0.1, 0.5, 0.3, 0.2, 0.0, 0.4, 0.6],  # gold t0 first                     -> rank 0
    [0.8, 0.7, 0.6, 0.1, 0.5, 0.4, 0.3, 0.2],  # t2 behind t0, t1 (t3 last)        -> rank 2
    [0.9, 0.8, 0.7, 0.6, 0.5, 0.1, 0.3, 0.2],  # t4 behind 4 texts                 -> rank 4
    [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2],  # t6 behind 6 texts (t7 behind 7)   -> rank 6
])
T2I = np.array([
    #  i0    i1    i2    i3
    [0.9, 0.1, 0.2, 0.3],          # gold i0                                    -> 0
    [0.2, 0.9, 0.1, 0.0],          # gold i0, behind i1                         -> 1
    [0.5, 0.5, 0.1, 0.0],          # gold i1 ties i0: the higher index first    -> 0
    [0.5, 0.1, 0.5, 0.0],          # gold i1 behind i0 and i2                   -> 2
    [-100., -100., -100., -100.],  # nothing re-ranked, gold i2: only i3 ahead  -> 1
    [0.1, 0.2, 0.3, 0.4],          # gold i2 behind i3                          -> 1
    [0.0, 0.0, 0.0, 1.0],          # gold i3                                    -> 0
    [1.0, 0.0, 0.0, 0.5],          # gold i3 behind i0                          -> 1
])


def test_hand_made_ranks_and_metrics():
    i2t, t2i = retrieval_ranks(I2T, T2I, TXT2IMG, IMG2TXT)
    assert i2t.tolist() == [0, 2, 4, 6]
    assert t2i.tolist() == [0, 1, 0, 2, 1, 1, 0, 1]
    m = retrieval_metrics(I2T, T2I, TXT2IMG, IMG2TXT)
    # TR: ranks 0, 2, 4, 6 -> @1: 1/4, @5: 3/4, @10: 4/4; IR: three of eight at rank 0, all < 5
    expected = {"txt_r1": 25.0, "txt_r5": 75.0, "txt_r10": 100.0, "img_r1": 37.5, "img_r5": 100.0, "img_r10": 100.0}
    expected["txt_r_mean"] = 200.0 / 3
    expected["img_r_mean"] = 237.5 / 3
    expected["r_mean"] = (200.0 + 237.5) / 6
    assert m == pytest.approx(expected)
    # ALBEF's dataset keeps the maps as dicts keyed 0..n-1
    as_dicts = retrieval_metrics(I2T, T2I, dict(enumerate(TXT2IMG)), dict(enumerate(IMG2TXT)))
    assert as_dicts == pytest.approx(expected)


def test_an_image_without_captions_is_a_miss_and_shapes_are_checked():
    scores = np.array([[0.9, 0.1], [0.8, 0.2]])
    i2t, _ = retrieval_ranks(scores, scores.T, [0, 0], [[0, 1], []])
    assert i2t[0] == 0 and i2t[1] > 10 ** 9
    assert metrics_from_ranks(i2t, np.array([0, 0]))["txt_r10"] == 50.0
    with pytest.raises(ValueError, match=r"scores_t2i must be \[2, 2\]"):
        retrieval_ranks(scores, scores[:1], [0, 0], [[0, 1], []])


def test_gold_ranks_chunks_agree():
    rng = np.random.default_rng(3)
    scores = rng.standard_normal((7, 30))
    query, gold = rng.integers(0, 7, 50), rng.integers(0, 30, 50)
    assert np.array_equal(gold_ranks(scores, query, gold, chunk=4), gold_ranks(scores, query, gold, chunk=1000))


# ----------------------------------------------------------------------------- ALBEF's itm_eval

def albef_itm_eval(scores_i2t, scores_t2i, txt2img, img2txt):
    """The oracle: ALBEF's published `itm_eval` (Retrieval.py), transcribed step by step."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        rank = 1e20
        for i in img2txt[index]:
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        ranks[index] = rank
    tr1, tr5, tr10 = (100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10))
    i2t_ranks = ranks
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir1, ir5, ir10 = (100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10))
    tr_mean, ir_mean = (tr1 + tr5 + tr10) / 3, (ir1 + ir5 + ir10) / 3
    result = {"txt_r1": tr1, "txt_r5": tr5, "txt_r10": tr10, "txt_r_mean": tr_mean,
              "img_r1": ir1, "img_r5": ir5, "img_r10": ir10, "img_r_mean": ir_mean,
              "r_mean": (tr_mean + ir_mean) / 2}
    return result, i2t_ranks, ranks


def random_retrieval_case(seed=7, n_images=40, k=None):
    """1-5 captions per image; noise plus a +1.5 bonus on gold pairs (recall between 0 and 100);
    with k, everything outside each row's top k is set to -100 as after ALBEF's re-ranking."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 6, n_images)
    txt2img = np.repeat(np.arange(n_images), counts)
    img2txt = {i: np.flatnonzero(txt2img == i).tolist() for i in range(n_images)}
    n_texts = len(txt2img)
    gold = np.zeros((n_images, n_texts))
    gold[txt2img, np.arange(n_texts)] = 1.5
    i2t = rng.standard_normal((n_images, n_texts)) + gold
    t2i = rng.standard_normal((n_texts, n_images)) + gold.T
    if k is not None:
        for s in (i2t, t2i):
            below = np.argsort(-s, axis=1)[:, k:]
            np.put_along_axis(s, below, -100.0, axis=1)
    return i2t, t2i, dict(enumerate(txt2img.tolist())), img2txt


# The oracle's output on these seeded cases, written down once (from `albef_itm_eval`, never
# from the code under test): the test fails if either drifts.
ALBEF_SEED7 = {
    "txt_r1": 47.5, "txt_r5": 85.0, "txt_r10": 97.5, "txt_r_mean": 76.66666666666667,
    "img_r1": 23.880597014925375, "img_r5": 60.44776119402985, "img_r10": 75.3731343283582,
    "img_r_mean": 53.23383084577114, "r_mean": 64.95024875621891,
}
# seed 8 with everything outside each row's top 12 at -100: many tied entries, which the
# oracle's (unstable) argsort orders its own way; ranks >= 12 never count for R@10
ALBEF_SEED8_TOP12 = {
    "txt_r1": 40.0, "txt_r5": 70.0, "txt_r10": 82.5, "txt_r_mean": 64.16666666666667,
    "img_r1": 25.663716814159294, "img_r5": 63.716814159292035, "img_r10": 79.64601769911505,
    "img_r_mean": 56.34218289085546, "r_mean": 60.25442477876106,
}


@pytest.mark.parametrize("seed, k, reference", [(7, None, ALBEF_SEED7), (8, 12, ALBEF_SEED8_TOP12)])
def test_metric_equals_albef_itm_eval_on_random_scores(seed, k, reference):
    i2t, t2i, txt2img, img2txt = random_retrieval_case(seed=seed, k=k)
    oracle, _, _ = albef_itm_eval(i2t, t2i, txt2img, img2txt)
    assert oracle == pytest.approx(reference, abs=1e-9)
    assert retrieval_metrics(i2t, t2i, txt2img, img2txt) == pytest.approx(reference, abs=1e-9)


def test_ranks_equal_albef_ranks_without_ties():
    i2t, t2i, txt2img, img2txt = random_retrieval_case(seed=11, n_images=25)
    _, albef_i2t, albef_t2i = albef_itm_eval(i2t, t2i, txt2img, img2txt)
    ours_i2t, ours_t2i = retrieval_ranks(i2t, t2i, txt2img, img2txt)
    assert ours_i2t.tolist() == albef_i2t.astype(int).tolist()
    assert ours_t2i.tolist() == albef_t2i.astype(int).tolist()
