"""The command line on the real SmolLM2 and real text, kept small."""

import json

import pytest

from atom_compile.cli import main
from shared_data import data_file


def test_eval_json(capsys):
    text = str(data_file("enwiki_eval.txt"))
    calib = str(data_file("enwiki_calib.txt"))
    rc = main(["eval", "--configs", "fp,rtn-w4a4,atom-w4a4-rtn", "--text-file", text, "--calib-file", calib,
               "--calib-samples", "2", "--calib-seqlen", "64", "--seqlen", "128", "--max-tokens", "256", "--json"])
    assert rc == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["config"] for r in records] == ["fp", "rtn-w4a4", "atom-w4a4-rtn"]
    for r in records:
        assert {"config", "ppl", "tokens", "seconds"} <= set(r) and r["tokens"] == 2 * 127
    fp, rtn, atom = (r["ppl"] for r in records)
    assert rtn > 10 * fp and atom < rtn


def test_eval_table_and_overrides(capsys, tmp_path):
    text = str(data_file("enwiki_eval.txt"))
    rc = main(["eval", "--configs", "w4a16", "--text-file", text, "--seqlen", "64", "--max-tokens", "128",
               "--set", "group_size=64", "--dump-dir", str(tmp_path / "d"), "--out", str(tmp_path / "r.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| config" in out and "w4a16" in out
    assert json.loads((tmp_path / "r.json").read_text())[0]["overrides"] == {"group_size": 64}
    assert (tmp_path / "d" / "w4a16" / "layer_00" / "10_lowered.py").is_file()


def test_generate(capsys):
    rc = main(["generate", "--config", "w8a8", "--prompt", "The capital of France is", "--max-new-tokens", "6"])
    assert rc == 0
    assert "Paris" in capsys.readouterr().out


def test_clear_errors(capsys):
    assert main(["eval", "--configs", "nope", "--max-tokens", "64"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert main(["eval", "--configs", "fp", "--text-file", "/nonexistent.txt"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--set", "group_size"])


def test_lm_eval_on_local_multiple_choice_tasks(capsys, monkeypatch):
    """lm-eval 0.4's harness runs the compiled model on the shared multiple-choice files, offline."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mc = data_file("enwiki_eval.txt").parent / "mc"
    if not mc.is_dir():
        pytest.skip("../shared/data/mc is not available")
    rc = main(["lm-eval", "--config", "w8a8", "--mc-data", str(mc), "--limit", "8", "--json"])
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert {r["task"] for r in rows} == {"local_social_iqa", "local_strategyqa", "local_wikihow_goal", "local_winowhy"}
    assert all(r["n"] == 8 and 0.0 <= r["acc"] <= 1.0 for r in rows)


def test_ablate_subset(tmp_path, capsys):
    text, calib = str(data_file("enwiki_eval.txt")), str(data_file("enwiki_calib.txt"))
    rc = main(["ablate", "--steps", "rtn-w4a4,+outliers-int8,+groups", "--text-file", text, "--calib-file", calib,
               "--max-tokens", "256", "--seqlen", "128", "--calib-samples", "2", "--calib-seqlen", "64",
               "--group-size", "64", "--n-outliers", "64", "--out", str(tmp_path / "a.json"),
               "--png", str(tmp_path / "a.png")])
    assert rc == 0
    res = json.loads((tmp_path / "a.json").read_text())
    steps = {r["step"]: r for r in res["rows"]}
    assert list(steps) == ["fp", "rtn-w4a4", "+outliers-int8", "+groups"]
    assert steps["fp"]["kl"] == 0 and steps["fp"]["top1"] == 1
    assert steps["rtn-w4a4"]["kl"] > steps["+groups"]["kl"] > 0  # the ladder's shape, in KL
    assert (tmp_path / "a.png").stat().st_size > 10_000
