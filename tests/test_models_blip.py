"""BLIP wrapper: decomposed forward == HF forward, capture hook, checkpoints, LM loss."""
import pytest
import torch

from hist_vlm.batch import TextRows
from hist_vlm.models.base import CaptioningModel
from hist_vlm.models.blip import BlipBackbone, blip_config, blip_tokenizer
from losses_fixtures import tiny_blip


def test_tokenizer_has_blip_special_tokens():
    tok = blip_tokenizer()
    assert len(tok) == 30524
    assert tok.bos_token_id == 30522 and tok.convert_tokens_to_ids("[ENC]") == 30523
    assert tiny_blip().enc_token_id == 30523


def test_decomposed_itm_equals_hf_forward_and_capture_is_a_softmax():
    model = tiny_blip().eval()
    hf_style = BlipBackbone(model.retrieval, use_enc_token=False).eval()
    ids, mask = model.tokenize(["a dog", "a man riding a red horse"])
    px = torch.randn(2, 3, 32, 32)
    rows = TextRows(ids, mask, torch.tensor([0, 1]))
    fused = hf_style.fuse_rows(rows, hf_style.encode_image(px), capture_layer=1)
    expected = model.retrieval(input_ids=ids, pixel_values=px, attention_mask=mask).itm_score
    torch.testing.assert_close(hf_style.itm_logits(fused), expected)
    a = fused.cross_attention
    assert a.shape == (2, 4, ids.shape[1], 1 + 16)
    torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]))
    # the [ENC] token changes the fused output (it is a different embedding)
    assert not torch.allclose(model.itm_logits(model.fuse_rows(rows, model.encode_image(px))), expected)


def test_image_index_gathers_image_embeddings():
    model = tiny_blip().eval()
    ids, mask = model.tokenize(["a dog", "a dog"])
    img = model.encode_image(torch.randn(3, 3, 32, 32))
    both = model.itm_logits(model.fuse_rows(TextRows(ids, mask, torch.tensor([2, 0])), img))
    alone = model.itm_logits(model.fuse_rows(TextRows(ids[:1], mask[:1], torch.tensor([0])), img[[2]]))
    torch.testing.assert_close(both[0], alone[0])


def test_transformers_folders_load(tmp_path):
    model = tiny_blip().eval()
    model.retrieval.save_pretrained(tmp_path / "itm")
    from transformers import BlipForConditionalGeneration

    captioner = BlipForConditionalGeneration(blip_config("tiny"))
    captioner.text_decoder.load_state_dict(model.decoder.state_dict())
    captioner.save_pretrained(tmp_path / "cap")
    loaded = BlipBackbone.from_transformers(tmp_path / "itm", decoder_path=tmp_path / "cap").eval()
    px = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded.encode_image(px), model.encode_image(px))
    ids, mask = model.tokenize(["a cat"])
    rows = TextRows(ids, mask, torch.tensor([0]))
    torch.testing.assert_close(
        loaded.lm_loss(rows, loaded.encode_image(px)), model.lm_loss(rows, model.encode_image(px))
    )


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        BlipBackbone.from_transformers(tmp_path / "nothing")


def test_lm_loss_reaches_decoder_and_vision():
    model = tiny_blip()
    ids, mask = model.tokenize(["a man riding a horse", "a dog"])
    img = model.encode_image(torch.randn(2, 3, 32, 32))
    loss = model.lm_loss(TextRows(ids, mask, torch.tensor([1, 0])), img)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert model.decoder.bert.encoder.layer[0].crossattention.self.key.weight.grad.abs().sum() > 0
    assert model.retrieval.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert isinstance(model, CaptioningModel) and not isinstance(tiny_blip(decoder=False), CaptioningModel)


def test_lm_loss_is_the_decoders_own_loss_label_smoothing_included():
    """The per-token LM losses reduce to transformers' own decoder loss (labels = the real tokens)."""
    model = tiny_blip().eval()
    model.decoder.label_smoothing = 0.1  # BLIP pretraining's value; the released configs say 0
    ids, mask = model.tokenize(["a dog catching a red frisbee", "two cats"])
    rows = TextRows(ids, mask, torch.tensor([1, 0]))
    img = model.encode_image(torch.randn(2, 3, model.image_size, model.image_size))
    dec = ids.clone()
    dec[:, 0] = model.decoder.config.bos_token_id
    own = model.decoder(input_ids=dec, attention_mask=mask, encoder_hidden_states=img[rows.image_index],
                        labels=dec.masked_fill(mask == 0, -100)).loss
    torch.testing.assert_close(model.lm_loss(rows, img), own)
    losses, scored = model.lm_token_losses(rows, img)
    assert losses.shape == scored.shape == (2, ids.shape[1] - 1) and torch.equal(scored, mask[:, 1:])
