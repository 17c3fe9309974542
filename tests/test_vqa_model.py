"""The VQA model: decoder initialisation from the multimodal encoder, ranking inference against
a brute-force scorer, save/load."""
import pytest
import torch

from hist_vlm.models.albef import AlbefConfig, AlbefModel
from hist_vlm.models.albef_vqa import AlbefVqaModel
from hist_vlm.models.registry import load_head
from hist_vlm.batch import TextRows
from hist_vlm.models.tokenization import build_vocab, write_vocab_file

WORDS = "what color is the circle square how many yes no red blue green big small 2 3"


def _backbone(tmp_path, momentum=True) -> AlbefModel:
    vocab = write_vocab_file(build_vocab([WORDS]), tmp_path / "vocab.txt")
    cfg = AlbefConfig(image_size=16, patch_size=8, vision_width=32, vision_depth=1, vision_heads=2, text_width=32,
                      text_layers=4, text_heads=2, text_intermediate_size=64, fusion_layer=2, vocab_size=len(
                          build_vocab([WORDS])), max_position_embeddings=32, embed_dim=16, momentum=momentum,
                      vocab_file=str(vocab))
    torch.manual_seed(0)
    model = AlbefModel(cfg)
    if momentum:   # momentum copies that differ from the online weights, to see which one is copied
        with torch.no_grad():
            for p in model.text_encoder_m.parameters():
                p.add_(1.0)
    return model


def test_decoder_is_initialised_from_the_multimodal_layers(tmp_path):
    backbone = _backbone(tmp_path)
    src = backbone.state_dict()
    model, report = AlbefVqaModel.from_backbone(backbone, distill=True)
    dst = model.state_dict()
    checked = 0
    for suffix in ("", "_m"):
        enc, dec = f"text_encoder{suffix}", f"text_decoder{suffix}"
        for key, value in dst.items():
            if key.startswith(f"{dec}.bert.encoder.layer."):
                j, rest = key[len(f"{dec}.bert.encoder.layer."):].split(".", 1)
                source = f"{enc}.bert.encoder.layer.{int(j) + 2}.{rest}"   # fusion_layer 2: layer j <- 2 + j
            elif key.startswith(f"{dec}.bert.embeddings.") or key.startswith(f"{dec}.cls."):
                source = key.replace(dec, enc, 1)                          # embeddings, MLM head -> LM head
            elif key.startswith(f"{enc}.") or key.startswith(f"visual_encoder{suffix}."):
                source = key                                               # the encoder keeps every layer
            else:
                continue
            assert torch.equal(value, src[source]), (key, source)
            checked += 1
    assert checked == len(dst)                                             # every tensor came from somewhere
    assert report.decoder_from == {0: 2, 1: 3} and report.missing == []
    assert not report.momentum_from_online
    assert set(report.dropped) == {k for k in src if k.split(".")[0] in
                                   ("vision_proj", "text_proj", "itm_head", "temp", "vision_proj_m", "text_proj_m")}
    assert "text_encoder.cls.predictions.bias" not in dst                  # the encoder has no head left
    text = str(report)
    assert "0<-2, 1<-3" in text and "itm_head.bias" in text and "temp" in text


def test_momentum_from_online_and_vocabulary_extension(tmp_path):
    backbone = _backbone(tmp_path, momentum=False)
    old = backbone.text_encoder.bert.embeddings.word_embeddings.weight
    model, report = AlbefVqaModel.from_backbone(backbone, distill=True,
                                                extra_words=["yes", "purple", "4"], vocab_dir=tmp_path / "run")
    assert report.momentum_from_online and report.vocabulary_added == ["4", "purple"]   # "yes" was known
    new = model.text_decoder.bert.embeddings.word_embeddings.weight
    assert new.shape[0] == old.shape[0] + 2 and torch.equal(new[: old.shape[0]], old)
    assert model.text_decoder.cls.predictions.decoder.weight is new                        # still tied
    assert torch.equal(model.text_decoder_m.bert.encoder.layer[1].output.dense.weight,
                       backbone.text_encoder.bert.encoder.layer[3].output.dense.weight)
    ids, _ = model.tokenize_answers(["purple"])
    assert ids[0, 1].item() == old.shape[0] + 1 and ids[0, 2].item() == model.tokenizer.sep_token_id


def _brute_loglik(model: AlbefVqaModel, states, q_mask, b: int, answer_ids: torch.Tensor) -> tuple[float, float]:
    """(first-token probability, sequence log-likelihood) of one answer, by running the decoder
    on every prefix alone and reading the next token's log-probability at its last position."""
    total, first = 0.0, None
    real = [int(t) for t in answer_ids if t != 0]
    for t in range(1, len(real)):
        prefix = torch.tensor([real[:t]])
        rows = TextRows(prefix, torch.ones_like(prefix), torch.tensor([b]))
        logp = model.decoder_logits(rows, states, q_mask)[0, -1].log_softmax(-1)
        total += float(logp[real[t]])
        first = float(logp[real[t]].exp()) if first is None else first
    return first, total


@torch.no_grad()
def test_ranking_picks_the_highest_sequence_likelihood(tmp_path):
    model, _ = AlbefVqaModel.from_backbone(_backbone(tmp_path), distill=False)
    model.eval()
    torch.manual_seed(1)
    answers = ["red", "big red", "big blue", "small green", "2", "yes", "no", "small red circle"]
    cand = TextRows(*model.tokenize_answers(answers), torch.zeros(len(answers), dtype=torch.long))
    q_ids, q_mask = model.tokenize_question(["what color is the circle", "how many", "is it red"])
    questions = TextRows(q_ids, q_mask, torch.arange(3))
    pixels = torch.randn(3, 3, 16, 16)
    states = model.question_states(pixels, questions)
    brute = [[_brute_loglik(model, states, q_mask, b, cand.input_ids[c]) for c in range(len(answers))]
             for b in range(3)]
    order, loglik = model.rank_answers(pixels, questions, cand, k=len(answers))
    for b in range(3):
        scores = [s for _, s in brute[b]]
        assert order[b, 0].item() == max(range(len(answers)), key=scores.__getitem__)
        assert loglik[b].tolist() == pytest.approx(sorted(scores, reverse=True), abs=1e-4)
    # k = 3: only the 3 best first tokens compete, then the full sequence decides
    order3, _ = model.rank_answers(pixels, questions, cand, k=3)
    for b in range(3):
        firsts = [f for f, _ in brute[b]]
        kept = order3[b].tolist()   # a top 3 by first-token probability (answers sharing a first word tie)
        assert min(firsts[c] for c in kept) >= max(firsts[c] for c in range(len(answers)) if c not in kept) - 1e-6
        assert order3[b, 0].item() == max(kept, key=lambda c: brute[b][c][1])


def test_save_and_load_roundtrip(tmp_path):
    model, _ = AlbefVqaModel.from_backbone(_backbone(tmp_path), distill=True)
    model.save_pretrained(tmp_path / "vqa")
    loaded = load_head(tmp_path / "vqa", "vqa")
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert loaded.vqa_config == model.vqa_config
    with pytest.raises(ValueError, match="not a VQA model: .* holds albef"):
        _backbone(tmp_path).save_pretrained(tmp_path / "plain") or load_head(tmp_path / "plain", "vqa")
