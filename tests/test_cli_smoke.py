from typer.testing import CliRunner

from hist_vlm.cli import app


def test_parse_text_prints_phrases():
    res = CliRunner().invoke(app, ["parse", "--text", "a dog chasing a red frisbee"])
    assert res.exit_code == 0, res.output
    assert '"subject": "frisbee"' in res.output
