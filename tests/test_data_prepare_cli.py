"""`hist-vlm data` needs no torch: it runs with `import torch` failing, as on an install without
the `[train]` extra."""
import json
import subprocess
import sys


def test_data_commands_run_without_torch(tmp_path):
    p = tmp_path / "dataset_flickr30k.json"
    p.write_text(json.dumps({"images": [
        {"filename": f"{n}.jpg", "split": split, "sentences": [{"raw": f"caption {n}", "tokens": []}]}
        for n, split in enumerate(("train", "val", "test"))]}))
    code = ("import sys; sys.modules['torch'] = None; from hist_vlm.cli import main; "
            "sys.argv = ['hist-vlm', 'data', 'karpathy', *sys.argv[1:]]; main()")
    res = subprocess.run([sys.executable, "-c", code, str(p), "--out", str(tmp_path / "out"), "--no-progress"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"wrote {tmp_path / 'out' / 'flickr30k_test.json'}: 1 records" in res.stdout
    assert json.loads((tmp_path / "out" / "flickr30k_val.json").read_text()) == [
        {"image": "flickr30k-images/1.jpg", "caption": ["caption 1"]}]
