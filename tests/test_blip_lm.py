"""BLIP's LM term from transformers folders: a `BlipForImageTextRetrieval` folder loaded with the
text decoder of a `BlipForConditionalGeneration` folder (`model.params.decoder`) is a captioner
whose LM term trains; without the decoder the preset's `loss.mlm_weight: 1` stops the run at
start-up; mismatched or misplaced folders are one-line errors; the decoder survives save/load.
Tiny random models in the real transformers format (nothing is downloaded)."""
import json
from dataclasses import replace

import pytest
import torch
from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval

from hist_vlm.losses.hist import HistLoss, HistLossConfig
from hist_vlm.models import load_backbone
from hist_vlm.models.base import CaptioningModel
from hist_vlm.models.blip import BlipBackbone, BlipCaptioner, blip_config, decoder_folder
from hist_vlm.train.config import ConfigError, load_config
from losses_fixtures import hist_batch
from train_helpers import read_log, write_world


def _hf_config(vision_width: int = 24, vocab_size: int | None = None) -> BlipConfig:
    cfg = blip_config("tiny").to_dict()
    cfg["vision_config"]["hidden_size"] = vision_width
    if vocab_size is not None:
        cfg["text_config"]["vocab_size"] = vocab_size
    return BlipConfig.from_dict(cfg)


def _save(cls, folder, seed: int, **sizes):
    torch.manual_seed(seed)
    cls(_hf_config(**sizes)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """models/itm (retrieval), models/cap (captioning, same sizes), and mismatched captioners."""
    root = tmp_path_factory.mktemp("models")
    return {
        "itm": _save(BlipForImageTextRetrieval, root / "itm", 0),
        "cap": _save(BlipForConditionalGeneration, root / "cap", 1),
        "wide": _save(BlipForConditionalGeneration, root / "wide", 2, vision_width=32),
        "vocab": _save(BlipForConditionalGeneration, root / "vocab", 3, vocab_size=30600),
    }


def test_the_decoder_folder_makes_a_captioner_whose_lm_term_is_logged(folders):
    model = load_backbone(folders["itm"], "blip", params={"decoder": str(folders["cap"])})
    assert isinstance(model, BlipCaptioner) and isinstance(model, CaptioningModel)
    # the decoder is the captioning folder's text decoder, the rest the retrieval folder's
    cap = BlipForConditionalGeneration.from_pretrained(folders["cap"]).text_decoder
    itm = BlipForImageTextRetrieval.from_pretrained(folders["itm"])
    assert all(torch.equal(v, cap.state_dict()[k]) for k, v in model.decoder.state_dict().items())
    assert all(torch.equal(v, itm.state_dict()[k]) for k, v in model.retrieval.state_dict().items())
    batch = hist_batch(model)
    lm = model.lm_loss(batch.captions, model.encode_image(batch.pixel_values))
    assert torch.isfinite(lm) and lm > 0
    model.train()
    cfg = HistLossConfig(schedule="constant", capture_layers=(2,), queue_size=0, mlm_weight=1.0)
    out = HistLoss(cfg, model)(model, batch, 0.0)
    assert out["mlm"] > 1 and out["phrase_mlm"] > 1  # ~ ln(30524) = 10.3 at random init
    out["loss"].backward()
    assert model.decoder.bert.encoder.layer[0].crossattention.self.key.weight.grad.abs().sum() > 0


def test_lm_weight_zero_is_the_same_model_without_the_lm_term(folders):
    with_lm = load_backbone(folders["itm"], params={"decoder": str(folders["cap"])}).train()
    without = load_backbone(folders["itm"]).train()
    assert type(without) is BlipBackbone and not isinstance(without, CaptioningModel)
    cfg = dict(schedule="constant", capture_layers=(2,), queue_size=0)
    batch = hist_batch(without)
    a = HistLoss(HistLossConfig(**cfg, mlm_weight=0.0), with_lm)(with_lm, batch, 0.0)
    b = HistLoss(HistLossConfig(**cfg, mlm_weight=0.0), without)(without, batch, 0.0)
    torch.testing.assert_close(a["loss"], b["loss"], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^loss\.mlm_weight=1\.0: the blip backbone cannot compute the language"):
        HistLoss(HistLossConfig(**cfg, mlm_weight=1.0), without)


def test_relative_decoder_paths_are_read_from_the_working_directory_then_beside_the_checkpoint(
        folders, tmp_path, monkeypatch):
    itm, cap = folders["itm"], folders["cap"]
    monkeypatch.chdir(itm.parent)
    assert decoder_folder("cap", itm) == cap.relative_to(itm.parent)
    monkeypatch.chdir(tmp_path)
    assert decoder_folder("cap", itm) == cap                                 # beside model.checkpoint
    assert decoder_folder(str(cap), itm) == cap
    assert isinstance(load_backbone(itm, params={"decoder": "cap"}), BlipCaptioner)
    with pytest.raises(ValueError, match=r"^model\.params\.decoder: no folder nope or .*nope \(a transformers "):
        decoder_folder("nope", itm)
    with pytest.raises(ValueError, match=r"^model\.params\.decoder=3: give the path"):
        decoder_folder(3, itm)


@pytest.mark.parametrize("params, message", [
    ({"decoder": "wide"}, r"decoder reads 32-wide image tokens, the retrieval model's ViT gives 24: pair ViT sizes"),
    ({"decoder": "vocab"}, r"decoder has a 30600-token vocabulary, the retrieval model 30524"),
    ({"decoder": "itm"}, r"^model\.params\.decoder: .*itm holds a BlipForImageTextRetrieval, not a "
                         r"BlipForConditionalGeneration"),
    ({"decoder": "gone"}, r"^model\.params\.decoder: no folder"),
    ({"with_decoder": True}, r"^model\.params\.with_decoder is not a setting of a transformers BLIP folder "
                             r"\(known: decoder, use_enc_token, temp\)"),
])
def test_a_decoder_that_cannot_serve_the_retrieval_model_is_a_one_line_error(folders, params, message):
    with pytest.raises(ValueError, match=message) as info:
        load_backbone(folders["itm"], params=params)
    assert "\n" not in str(info.value)


def test_folders_of_the_wrong_class_are_errors_never_random_heads(folders, tmp_path):
    with pytest.raises(ValueError, match=r"^model\.checkpoint: .*cap holds a BlipForConditionalGeneration, not a "
                                         r"BlipForImageTextRetrieval"):
        load_backbone(folders["cap"])
    # without config.json's "architectures", the weights the load finds missing tell
    for name in ("itm", "cap"):
        bare = tmp_path / name
        bare.mkdir()
        for f in folders[name].iterdir():
            (bare / f.name).write_bytes(f.read_bytes())
        cfg = json.loads((bare / "config.json").read_text())
        del cfg["architectures"]
        (bare / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"cap is not a BlipForImageTextRetrieval checkpoint: \d+ ITC/ITM weights "
                                         r"missing \(e\.g\. "):
        load_backbone(tmp_path / "cap")
    with pytest.raises(ValueError, match=r"itm is not a BlipForConditionalGeneration checkpoint: \d+ text decoder "
                                         r"weights missing \(e\.g\. text_decoder\."):
        load_backbone(folders["itm"], params={"decoder": str(tmp_path / "itm")})


def test_a_decoder_path_when_building_from_scratch_is_an_error():
    with pytest.raises(ValueError, match=r"decoder='x' is a folder: it is read with a transformers BLIP "
                                         r"model\.checkpoint"):
        BlipBackbone.from_config({"size": "tiny", "decoder": "x"})


def test_save_and_load_keep_the_decoder(folders, tmp_path):
    model = load_backbone(folders["itm"], params={"decoder": str(folders["cap"])})
    model.save_pretrained(tmp_path / "saved")
    again = load_backbone(tmp_path / "saved", "blip", params={"decoder": "ignored: the folder describes itself"})
    assert type(again) is BlipCaptioner
    assert again.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    batch = hist_batch(model)
    torch.testing.assert_close(again.lm_loss(batch.captions, again.encode_image(batch.pixel_values)),
                               model.lm_loss(batch.captions, model.encode_image(batch.pixel_values)), rtol=0, atol=0)
    # tied LM-head weights stay tied after loading
    dec = again.decoder
    assert dec.cls.predictions.decoder.weight.data_ptr() == dec.bert.embeddings.word_embeddings.weight.data_ptr()


def _preset(tmp_path, folders, *extra):
    phrases, images = write_world(tmp_path / "world", size=32)
    return load_config("blip_coco", [
        f"data.phrases={phrases}", f"data.image_root={images}", "data.image_size=32", "data.batch_size=4",
        "data.num_workers=0", f"model.checkpoint={folders['itm']}", "loss.capture_layers=[2]",
        "schedule.epochs=2", "schedule.warmup_steps=2", "run.log_every=1", "run.save_every=1000",
        "run.max_steps=1", f"run.dir={tmp_path / 'run'}", *extra,
    ])


def test_the_blip_preset_trains_itc_itm_and_lm_and_its_checkpoint_keeps_the_decoder(folders, tmp_path):
    from hist_vlm.train.distributed import setup_environment
    from hist_vlm.train.loop import Trainer

    cfg = _preset(tmp_path, folders, f"model.params.decoder={folders['cap']}")
    assert cfg.loss.mlm_weight == 1
    trainer = Trainer(cfg, setup_environment("cpu"), resume=False, progress=False)
    result = trainer.run()
    (line,) = read_log(tmp_path / "run")
    assert line["mlm"] > 1 and line["phrase_mlm"] > 1 and line["itc"] > 0 and line["itm"] > 0
    loaded = load_backbone(result.checkpoint, "blip")  # RUN/checkpoints/step-N/model
    assert type(loaded) is BlipCaptioner
    trained = trainer.model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in loaded.state_dict().items() if k.startswith("decoder."))


def test_the_blip_preset_without_the_decoder_stops_at_start_up_naming_the_term(folders, tmp_path, monkeypatch):
    from hist_vlm.train.distributed import setup_environment
    from hist_vlm.train.loop import Trainer
    from hist_vlm.train.tasks.hist import HistTask

    def no_loader(self, model):
        raise AssertionError("the batches were asked for before the objective was checked")

    monkeypatch.setattr(HistTask, "loader", no_loader)
    cfg = _preset(tmp_path, folders)  # model.params.decoder: null, as shipped
    with pytest.raises(ConfigError, match=r"^loss\.mlm_weight=1\.0: the blip backbone cannot compute the language "
                                          r"\(MLM/LM\) term") as info:
        Trainer(cfg, setup_environment("cpu"), resume=False, progress=False)
    assert "\n" not in str(info.value)
    # the same through build_model: a mismatched decoder is a one-line ConfigError
    from hist_vlm.train.model import build_model

    bad = replace(cfg.model, params={"decoder": str(folders["wide"])})
    with pytest.raises(ConfigError, match=r"^model\.checkpoint: the BLIP captioning decoder reads 32-wide") as info:
        build_model(bad, 32)
    assert "\n" not in str(info.value)
