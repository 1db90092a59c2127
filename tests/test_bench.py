"""`hybridize bench`: the suites run end to end on tiny shapes (CPU, interpreter) and write JSON + plots.
(The numbers they measure only mean something on a GPU.)"""
import json

from hybridize.cli import main


def test_bench_kernels_smoke(tmp_path, capsys):
    assert main(["bench", "kernels", "--smoke", "--out", str(tmp_path)]) == 0
    ssd = json.loads((tmp_path / "ssd.json").read_text())
    step = json.loads((tmp_path / "step.json").read_text())
    assert ssd["env"] and step["env"]
    assert (tmp_path / "ssd.png").exists()


def test_bench_plot_rejects_nothing_and_lists(tmp_path, capsys):
    (tmp_path / "decode_x.json").write_text(json.dumps({"decode": [
        {"model": "m", "batch": 1, "context": c, "tokens_per_s": 10.0 + c} for c in (0, 4096)]}))
    assert main(["bench", "plot", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "decode_x.png").exists()
    assert "decode_x.png" in capsys.readouterr().out
