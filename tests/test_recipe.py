"""tools/recipe_study.py (docs/recipe_2026-11-30.md) on a tiny random model: both jobs scored as the
scripts score them, the soup, the rerank and the head re-fit rows."""
import importlib.util
import json
import os

import pytest
import torch
from conftest import ROOT
from test_evaluate import make_checkpoint

import engine
from data import PairDataset
from metrics import compute_metrics
from model import load_model


def load_tool():
    spec = importlib.util.spec_from_file_location("recipe_study", os.path.join(ROOT, "tools", "recipe_study.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_recipe_study_scores_the_classifier_as_evaluate_does(tmp_path, tiny_data, capsys):
    ckpt = make_checkpoint(tmp_path / "run" / "ckpt.pt", tiny_data)
    out = tmp_path / "study.jsonl"
    load_tool().main(["--data_dir", tiny_data, "--checkpoints", ckpt, ckpt, "--soup", "--rerank",
                      "--refit_epochs", "1", "--out", str(out)])
    rows = [json.loads(line) for line in open(out)]
    assert [r["model"] for r in rows] == [ckpt, ckpt, f"soup of {ckpt}, {ckpt}"]
    assert all(r["split"] == "validation" and r["alpha"] == 1.0 for r in rows)
    # The soup of one checkpoint twice is that checkpoint: every number the same.
    assert rows[2]["classifier"] == rows[0]["classifier"] and rows[2]["retrieval"] == rows[0]["retrieval"]
    model, _ = load_model(ckpt)
    val = PairDataset(tiny_data, "validation")
    cpu = engine.Runtime(device=torch.device("cpu"))
    probs = engine.Inference(model.probability, "siamese", cpu, 64, "exact", "off")(val, verbose=False)
    assert rows[0]["classifier"]["accuracy"] == pytest.approx(compute_metrics(val.labels, probs)["accuracy"])
    for r in rows:
        assert r["retrieval"]["queries"] == r["retrieval_rerank"]["queries"] > 0
        assert 0 <= r["classifier_refit"]["accuracy"] <= 1
    assert "nDCG@10" in capsys.readouterr().out
    only = tmp_path / "soup.jsonl"
    load_tool().main(["--data_dir", tiny_data, "--checkpoints", ckpt, ckpt, "--soup", "--soup_only",
                      "--out", str(only)])
    assert [json.loads(line)["model"] for line in open(only)] == [f"soup of {ckpt}, {ckpt}"]


def test_mix_untuned_at_its_ends_is_either_encoder_alone(tmp_path, tiny_data):
    """--mix_untuned w searches by w * the untuned cosine + (1 - w) * the checkpoint's: at w 0 the
    checkpoint's own search, at w 1 the untuned encoder's; a weight outside [0, 1] is refused."""
    ckpt = make_checkpoint(tmp_path / "run" / "ckpt.pt", tiny_data)
    out = tmp_path / "study.jsonl"
    load_tool().main(["--data_dir", tiny_data, "--checkpoints", ckpt, "--mix_untuned", "0", "0.5", "1",
                      "--out", str(out)])
    untuned, own = [json.loads(line) for line in open(out)]
    assert untuned["model"].startswith("untuned ") and own["model"] == ckpt
    mixed = own["retrieval_mix_untuned"]
    assert mixed["0.0"] == pytest.approx(own["retrieval"]) and mixed["1.0"] == pytest.approx(untuned["retrieval"])
    assert own["retrieval"] != untuned["retrieval"]  # the two ends differ, so the check above means something
    with pytest.raises(SystemExit) as e:
        load_tool().main(["--data_dir", tiny_data, "--checkpoints", ckpt, "--mix_untuned", "1.5"])
    assert e.value.code == 2


def test_out_and_flags_are_checked_before_any_work(tmp_path, tiny_data, capsys):
    """--out is appended to: never an input (a checkpoint, the data folder), never a file this tool
    did not write; the numeric flags have ranges. One line each, nothing written."""
    ckpt = make_checkpoint(tmp_path / "run" / "ckpt.pt", tiny_data)
    with open(ckpt, "rb") as f:
        before = f.read()
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    base = ["--data_dir", tiny_data, "--checkpoints", ckpt]
    for argv, message in (([*base, "--out", ckpt], "is or lies in an input"),
                          ([*base, "--out", str(notes)], "not a recipe_study.py results file"),
                          ([*base, "--batch_size", "0"], "--batch_size 0: out of range"),
                          ([*base, "--refit_lr", "-1"], "--refit_lr -1.0: out of range"),
                          ([*base, "--alphas", "nan"], "--alphas nan: a weight must be 0 or more")):
        with pytest.raises(SystemExit) as e:
            load_tool().main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, (argv, err)
    with open(ckpt, "rb") as f:
        assert f.read() == before
    assert notes.read_text() == "mine\n"
