"""The training loop on the real tiny ALBEF + HistLoss: resume exactness, unreadable images,
checkpoint contents."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from hist_vlm.train.checkpoint import latest_checkpoint
from hist_vlm.train.config import ConfigError, load_config
from hist_vlm.train.loop import train
from train_helpers import DEMO_CONFIGS, read_log, tiny_overrides, write_world

TERMS = ("loss", "itc", "itm", "mlm", "phrase_itc", "phrase_itm", "phrase_mlm", "subject_itc", "subject_itm", "add")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("world"), n_images=16, size=40)


def config(world, run_dir, *extra):
    return load_config(DEMO_CONFIGS / "demo_tiny.yaml", tiny_overrides(*world, run_dir, *extra))


def printed_steps(text: str) -> list[int]:
    """The steps of the "step N | ..." lines a run prints (one per log line)."""
    return [int(m) for m in re.findall(r"^step (\d+) \|", text, flags=re.M)]


def test_stop_and_resume_repeats_the_uninterrupted_losses(world, tmp_path, capsys):
    # 16 images / batch 4 = 4 steps per epoch: stop mid-epoch 0, resume across the epoch boundary
    full = train(config(world, tmp_path / "full", "run.max_steps=6"), progress=False)
    assert full.global_step == 6 and full.start_step == 0
    first = train(config(world, tmp_path / "split", "run.max_steps=3"), progress=False)
    assert first.global_step == 3 and first.checkpoint.name == "step-00000003" and first.start_step == 0
    with pytest.raises(ConfigError, match="--resume"):
        train(config(world, tmp_path / "split", "run.max_steps=6"), progress=False)
    capsys.readouterr()
    resumed = train(config(world, tmp_path / "split", "run.max_steps=6"), resume=True, progress=False)
    assert resumed.global_step == 6
    # it started at the checkpoint's step: only steps 4-6 were trained (and printed) again
    assert resumed.start_step == 3
    assert printed_steps(capsys.readouterr().out) == [4, 5, 6]

    a, b = read_log(tmp_path / "full"), read_log(tmp_path / "split")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in TERMS + ("lr", "epoch")} == {k: rb[k] for k in TERMS + ("lr", "epoch")}
    # the HIST terms were live (paper schedule, first epochs) and the steps differ from each other
    assert all(r["add"] > 0 and r["phrase_itc"] > 0 for r in a)
    assert len({r["loss"] for r in a}) == 6

    # the final weights agree too
    wa = load_file(str(latest_checkpoint(tmp_path / "full") / "model" / "model.safetensors"))
    wb = load_file(str(latest_checkpoint(tmp_path / "split") / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoint_holds_every_state(world, tmp_path):
    result = train(config(world, tmp_path / "run", "run.max_steps=2", "run.save_every=1",
                          "run.keep_checkpoints=1"), progress=False)
    ckpt = result.checkpoint
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-00000002"]
    names = {p.name for p in ckpt.iterdir()}
    assert names == {"model", "loss.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json", "config.yaml"}
    assert json.loads((ckpt / "model" / "config.json").read_text())["backbone"] == "albef"
    state = json.loads((ckpt / "state.json").read_text())
    assert state == {"epoch": 0, "step_in_epoch": 2, "global_step": 2, "seed": 42, "global_batch": 4,
                     "skipped_images": 0}
    assert any("queue" in k for k in load_file(str(ckpt / "loss.safetensors")))
    rng = torch.load(ckpt / "rng.pt", weights_only=True)
    assert set(rng[0]) == {"python", "numpy", "torch", "cuda", "generators"} and rng[0]["generators"]
    # the saved model loads through the backbone's own loader (what `hist-vlm eval` does)
    from hist_vlm.models.albef import AlbefModel
    AlbefModel.from_pretrained(ckpt / "model")


def test_unreadable_images_are_skipped_and_counted(tmp_path, capsys):
    phrases, images = write_world(tmp_path / "world", n_images=8, size=40)
    (images / "img002.png").write_bytes(b"broken")
    (images / "img005.png").unlink()
    result = train(config((phrases, images), tmp_path / "run", "schedule.epochs=1"), progress=False)
    assert result.global_step == 2        # the whole epoch ran
    assert result.skipped_images == 2     # each broken image is drawn once per epoch
    assert "skipped 2 unreadable image" in capsys.readouterr().out + capsys.readouterr().err


def test_blip_trains_and_resumes(world, tmp_path):
    blip = ("model.name=blip", "model.params={size: tiny}", "data.max_length=16")
    train(config(world, tmp_path / "full", *blip, "run.max_steps=3"), progress=False)
    train(config(world, tmp_path / "split", *blip, "run.max_steps=2"), progress=False)
    resumed = train(config(world, tmp_path / "split", *blip, "run.max_steps=3"), resume=True, progress=False)
    assert (resumed.start_step, resumed.global_step) == (2, 3)
    a, b = read_log(tmp_path / "full"), read_log(tmp_path / "split")
    assert [r["step"] for r in b] == [1, 2, 3]
    terms = [k for k in TERMS if not k.endswith("mlm")]  # BLIP without its decoder: no language term, none logged
    assert all(a[i][k] == b[i][k] for i in range(3) for k in terms) and "mlm" not in a[0]
    assert a[2]["add"] > 0 and a[2]["subject_itm"] > 0


def test_gradient_accumulation_averages_micro_batches(world, tmp_path):
    # warm-up from lr 0: the first update changes nothing, so the accumulated step 1 sees the same
    # weights as the two one-batch steps it is made of (same images, same loss draws); no
    # dependence on the epoch fraction (HIST weight, distillation ramp), which differs
    zero = ("schedule.warmup_lr=0.0", "data.batch_size=2", "loss.schedule=constant", "loss.alpha=0.0")
    train(config(world, tmp_path / "plain", *zero, "run.max_steps=2"), progress=False)
    train(config(world, tmp_path / "accum", *zero, "optim.grad_accum=2", "run.max_steps=1"), progress=False)
    plain, accum = read_log(tmp_path / "plain"), read_log(tmp_path / "accum")
    assert plain[0]["lr"] == accum[0]["lr"] == 0.0
    for k in TERMS:
        assert accum[0][k] == pytest.approx((plain[0][k] + plain[1][k]) / 2, rel=1e-5, abs=1e-6), k


def test_a_checkpoint_with_the_old_queue_keys_still_resumes_exactly(world, tmp_path):
    """Checkpoints written before the ITC queue moved into ItcLoss name it `queue.*` (today
    `itc.queue.*`): resume renames them and continues as from a new checkpoint."""
    from safetensors.torch import save_file

    train(config(world, tmp_path / "new", "run.max_steps=3"), progress=False)
    train(config(world, tmp_path / "old", "run.max_steps=3"), progress=False)
    loss_file = latest_checkpoint(tmp_path / "old") / "loss.safetensors"
    state = load_file(str(loss_file))
    assert any(k.startswith("itc.queue.") for k in state)
    save_file({k.replace("itc.queue.", "queue.", 1): v for k, v in state.items()}, str(loss_file))
    for run in ("new", "old"):
        train(config(world, tmp_path / run, "run.max_steps=5"), resume=True, progress=False)
    a, b = read_log(tmp_path / "new"), read_log(tmp_path / "old")
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and len(a) == 5


def test_swap_negatives_and_subject_masking_reach_the_step(world, tmp_path):
    """At step 1 (same weights, same draws) swaps change only the caption ITM, subject masking
    only the MLM terms: the trainer wires both from the config to the loss."""
    def first(name, *extra):
        train(config(world, tmp_path / name, "run.max_steps=1", *extra), progress=False)
        return read_log(tmp_path / name)[0]

    plain = first("plain")
    swaps = first("swaps", "data.swap_negatives=1.0")
    masked = first("masked", "loss.mlm_subject_probability=1.0")
    assert swaps["itm"] != plain["itm"]
    assert {k: swaps[k] for k in TERMS if k not in ("itm", "loss")} == {k: plain[k] for k in TERMS if k not in ("itm", "loss")}
    assert masked["mlm"] != plain["mlm"] and masked["phrase_mlm"] != plain["phrase_mlm"]
    assert {k: masked[k] for k in ("itc", "itm", "phrase_itc", "subject_itm", "add")} == \
        {k: plain[k] for k in ("itc", "itm", "phrase_itc", "subject_itm", "add")}
