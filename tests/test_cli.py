"""`hybridize` CLI: help everywhere, info on presets and checkpoints (text and --json), clear errors."""
import json
import subprocess
import sys

import pytest

from hybridize.cli import main


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "info" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["info", "--help"])
    assert "--context" in capsys.readouterr().out


def test_info_json_preset(capsys):
    assert main(["info", "mil50-1b", "--json", "--context", "8192"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["layer_pattern"].count("attention") == 8 and rep["layers"] == 16
    assert rep["attention_fraction"] == 0.5
    assert 0.9e9 < rep["parameters"] < 2.5e9
    m = rep["decode_memory"]
    # 8 attention layers × K,V × 8 kv heads × 64 dims × 2 bytes per token
    assert m["kv_cache_bytes_per_token"] == 8 * 2 * 8 * 64 * 2
    assert m["kv_cache_bytes"] >= 8192 * m["kv_cache_bytes_per_token"]
    assert m["recurrent_state_bytes"] > 0


def test_info_recurrent_vs_transformer(capsys):
    main(["info", "mil0-1b", "--json"])
    rec = json.loads(capsys.readouterr().out)["decode_memory"]
    main(["info", "llama-1b", "--json"])
    tr = json.loads(capsys.readouterr().out)["decode_memory"]
    assert rec["kv_cache_bytes"] == 0 and tr["recurrent_state_bytes"] == 0
    assert tr["total_bytes"] > rec["total_bytes"]


def test_info_text_and_checkpoint(tmp_path, capsys):
    import hybridize as hz
    hz.HybridLM(hz.preset("griffin-debug")).save_pretrained(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "layer pattern" in out and "rglru, rglru, attention, rglru" in out and "KV cache" in out


def test_info_errors(tmp_path, capsys):
    assert main(["info", "nonsense-debug"]) == 2
    assert "unknown preset family" in capsys.readouterr().err
    assert main(["info", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "hybridize.cli", "info", "hawk-tiny", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["layer_pattern"] == ["rglru"] * 6
