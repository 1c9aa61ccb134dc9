"""evaluate.py, predict.py, baseline_cosine.py on tiny random encoders; metrics.best_threshold."""
import csv
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_BERT, TINY_DISTILBERT, synthetic_rows, write_csv

import baseline_cosine
import evaluate
import metrics
import predict
import text
from data import Collator, PairDataset
from model import ModelConfig, build_model, save_checkpoint

PLOTS = ("pr_curve", "roc_curve", "confusion_matrix", "score_histogram")


def make_checkpoint(path, data_dir, arch="siamese", encoder_config=TINY_BERT):
    """A checkpoint as train.py writes it, of an untrained tiny model, for the tiny_data folder."""
    with open(os.path.join(data_dir, "manifest.json")) as f:
        m = json.load(f)
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, encoder_config=encoder_config))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_checkpoint(str(path), {
        "model": model.state_dict(), "model_config": asdict(model.cfg), "train_config": {}, "step": 7,
        "data": {"data_dir": os.path.abspath(data_dir),
                 "fingerprint": json.dumps(m["cache_key"], sort_keys=True),
                 "tokenizer": m["tokenizer"], "tokenizer_path": m["tokenizer_path"],
                 "vocab_hash": m["vocab_hash"], "pad_token_id": m["pad_token_id"],
                 "max_len": m["max_len"], "split_policy": m["split_policy"]}})
    return str(path)


@pytest.fixture
def ckpt(tmp_path, tiny_data):
    return make_checkpoint(tmp_path / "run" / "ckpt.pt", tiny_data)


def csv_results_dir(run_dir, stem):
    """evaluate --csv's default folder: eval_csv_<stem>_<hash of the file's content>, the only one."""
    found = [d for d in os.listdir(run_dir) if d.startswith(f"eval_csv_{stem}_")]
    assert len(found) == 1, found
    return os.path.join(run_dir, found[0])


def read_results(out_dir):
    with open(os.path.join(out_dir, "results.json")) as f:
        return json.load(f)


def spy_best_threshold(monkeypatch):
    """Record the labels every best_threshold call sees (the real function still answers)."""
    seen, real = [], metrics.best_threshold

    def spy(labels, scores, by="f1"):
        seen.append(np.array(labels))
        return real(labels, scores, by=by)

    monkeypatch.setattr(metrics, "best_threshold", spy)
    return seen


def assert_metrics_match(result, thresholds, labels, scores, probabilistic=True):
    """Each reported metrics dict equals compute_metrics on the saved scores: counts exactly,
    rates to float rounding (pytest.approx takes flat dicts only since pytest 9.2)."""
    for how, m in result["metrics"].items():
        expected = metrics.compute_metrics(labels, scores, thresholds[how]["value"], probabilistic)
        assert m.keys() == expected.keys(), how
        assert m["confusion_matrix"] == expected["confusion_matrix"], how
        flat = {k: v for k, v in m.items() if k != "confusion_matrix"}
        assert flat == pytest.approx({k: expected[k] for k in flat}, nan_ok=True), how


# ----------------------------------------------------------------------------- evaluate.py

@pytest.mark.parametrize("arch,encoder_config", [("siamese", TINY_BERT), ("cross", TINY_DISTILBERT)])
def test_evaluate_writes_results_plots_and_consistent_metrics(tmp_path, tiny_data, arch, encoder_config):
    path = make_checkpoint(tmp_path / "run" / "ckpt.pt", tiny_data, arch, encoder_config)
    evaluate.main([path, "--batch_size", "16"])
    out = tmp_path / "run" / "eval_test"  # the default out_dir
    r = read_results(out)
    assert r["split"] == "test" and r["checkpoint"] == os.path.abspath(path) and r["step"] == 7
    assert set(r["thresholds"]) == {"argmax", "best_f1", "best_accuracy"}
    assert r["thresholds"]["argmax"] == {"value": 0.5, "chosen_on": "fixed"}
    for kind in PLOTS:
        assert (out / f"test_{kind}.png").stat().st_size > 1000

    saved = np.load(out / "scores_test.npz")
    test = PairDataset(tiny_data, "test")
    np.testing.assert_array_equal(saved["labels"], test.labels)
    assert r["results"]["test"]["n"] == len(test)
    assert_metrics_match(r["results"]["test"], r["thresholds"], test.labels, saved["scores"])

    # The length-sorted batches were put back in split order: recompute a few pairs one by one.
    model, _ = evaluate.load_model(path)
    collate = Collator(arch, test.manifest["pad_token_id"])
    with torch.inference_mode():
        for i in (0, len(test) // 2, len(test) - 1):
            p = model(collate([test[i]])).softmax(-1)[0, 1].item()
            assert p == pytest.approx(float(saved["scores"][i]), abs=1e-5)


def test_tuned_threshold_is_chosen_on_validation_not_test(ckpt, tiny_data, pairs_csv, monkeypatch, tmp_path,
                                                          capsys):
    seen = spy_best_threshold(monkeypatch)
    out = tmp_path / "eval"
    evaluate.main([ckpt, "--out_dir", str(out)])
    r = read_results(out)
    val_labels, test_labels = (PairDataset(tiny_data, s).labels for s in ("validation", "test"))
    assert len(seen) == 2  # F1 and accuracy, each tuned once ...
    for labels in seen:  # ... on the validation labels only
        np.testing.assert_array_equal(labels, val_labels)
    assert len(val_labels) != len(test_labels) or not np.array_equal(val_labels, test_labels)

    val_scores = np.load(out / "scores_validation.npz")["scores"]
    test_scores = np.load(out / "scores_test.npz")["scores"]
    for by in ("f1", "accuracy"):
        t = r["thresholds"][f"best_{by}"]
        assert t["chosen_on"] == "validation" and t["validation_n"] == len(val_labels)
        assert t["value"] == metrics.best_threshold(val_labels, val_scores, by=by)
        # ... and applied unchanged to test.
        assert r["results"]["test"]["metrics"][f"best_{by}"]["threshold"] == t["value"]
    assert_metrics_match(r["results"]["test"], r["thresholds"], test_labels, test_scores)
    assert r["results"]["test"]["tuned_thresholds_in_sample"] is False

    # predict.py --threshold_from takes that validation-tuned F1 threshold.
    tuned, preds = r["thresholds"]["best_f1"]["value"], str(tmp_path / "preds.csv")
    predict.main([ckpt, "--csv", pairs_csv, "--out", preds, "--threshold_from", str(out / "results.json")])
    assert f"threshold {tuned:.4f}" in capsys.readouterr().out
    with open(preds) as f:
        for g in csv.DictReader(f):
            assert int(g["prediction"]) == int(float(g["probability"]) >= tuned)


def test_validation_split_labels_tuned_thresholds_in_sample(ckpt, tmp_path, capsys):
    out = tmp_path / "eval_val"
    evaluate.main([ckpt, "--split", "validation", "--out_dir", str(out)])
    assert read_results(out)["results"]["validation"]["tuned_thresholds_in_sample"] is True
    assert "IN-SAMPLE" in capsys.readouterr().out


def test_evaluate_raw_csv_counts_rejects(ckpt, tmp_path):
    rows = synthetic_rows(30, seed=1)
    bad = [[900, 1, 2, "", "Why?", 1], [901, 3, 4, "How do I learn chess?", "Chess tips?", "x"]]
    path = write_csv(tmp_path / "mine.csv", rows[:10] + bad + rows[10:])
    evaluate.main([ckpt, "--csv", path])
    out = Path(csv_results_dir(tmp_path / "run", "mine"))  # one folder per input: never the test split's eval_test
    r = read_results(out)
    assert r["rows_read"] == 32 and r["rows_rejected"] == 2
    assert r["results"]["mine"]["n"] == 30
    assert r["thresholds"]["best_f1"]["chosen_on"] == "validation"  # from the checkpoint's data folder
    with open(out / "rejects.tsv") as f:
        assert len(f.readlines()) == 1 + 2
    saved = np.load(out / "scores_mine.npz")
    np.testing.assert_array_equal(saved["labels"], [row[5] for row in rows])  # file order
    assert_metrics_match(r["results"]["mine"], r["thresholds"], saved["labels"], saved["scores"])


def test_raw_text_uses_the_tokenizer_saved_next_to_the_checkpoint(ckpt, tiny_bert_dir, tmp_path):
    data = torch.load(ckpt, weights_only=True)["data"]
    assert text.checkpoint_tokenizer(ckpt, data).name_or_path == data["tokenizer_path"]
    hf_dir = os.path.join(os.path.dirname(ckpt), "hf")  # where train.py saves it
    __import__("hub").load_tokenizer(tiny_bert_dir).save_pretrained(hf_dir)
    assert text.checkpoint_tokenizer(ckpt, data).name_or_path == hf_dir


# ----------------------------------------------------------------------------- predict.py

def test_predict_pair_equals_evaluate(ckpt, tmp_path, capsys):
    rows = synthetic_rows(20, seed=2)
    evaluate.main([ckpt, "--csv", write_csv(tmp_path / "few.csv", rows), "--out_dir", str(tmp_path / "e")])
    expected = np.load(tmp_path / "e" / "scores_few.npz")["scores"]
    for i in (0, 7):
        capsys.readouterr()
        predict.main([ckpt, rows[i][3], rows[i][4]])
        out = capsys.readouterr().out.strip()
        p = float(out)
        assert 0 <= p <= 1 and out == out.splitlines()[-1]  # only the number on stdout
        assert p == pytest.approx(float(expected[i]), abs=1e-5)


def test_predict_csv_one_row_per_input(ckpt, pairs_csv, tmp_path):
    out = str(tmp_path / "preds.csv")
    predict.main([ckpt, "--csv", pairs_csv, "--out", out, "--threshold", "0.5"])
    with open(out) as f:
        got = list(csv.DictReader(f))
    assert len(got) == 400
    assert [int(g["id"]) for g in got] == list(range(400))  # the file's own id column, in order
    for g in got:
        p = float(g["probability"])
        assert 0 <= p <= 1 and int(g["prediction"]) == int(p >= 0.5)


# ----------------------------------------------------------------------------- baseline_cosine.py

def test_baseline_cosine_reports_fixed_and_validation_thresholds(tiny_data, tiny_bert_dir, tmp_path,
                                                                 monkeypatch, capsys):
    seen = spy_best_threshold(monkeypatch)
    out = tmp_path / "baseline"
    baseline_cosine.main(["--data_dir", tiny_data, "--encoder", tiny_bert_dir, "--out_dir", str(out)])
    r = read_results(out)
    t = r["thresholds"]
    assert t["notebook"] == {"value": 0.96, "chosen_on": "fixed"}
    assert t["best_f1"]["chosen_on"] == t["best_accuracy"]["chosen_on"] == "validation"
    val_labels = PairDataset(tiny_data, "validation").labels
    assert len(seen) == 2 and all(np.array_equal(s, val_labels) for s in seen)
    saved = np.load(out / "scores_test.npz")
    assert np.all(np.abs(saved["scores"]) <= 1 + 1e-5)  # cosines
    assert "log_loss" not in r["results"]["test"]["metrics"]["notebook"]
    assert_metrics_match(r["results"]["test"], t, saved["labels"], saved["scores"], probabilistic=False)
    for kind in PLOTS:
        assert (out / f"test_{kind}.png").exists()
    printed = capsys.readouterr().out
    assert "threshold 0.96 [notebook, fixed]" in printed and "best_f1, chosen on validation" in printed


# ----------------------------------------------------------------------------- bad inputs

def one_error_line(stderr):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_missing_checkpoint_exits_2_subprocess(tmp_path):
    p = subprocess.run([sys.executable, "evaluate.py", str(tmp_path / "nope.pt")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "no such checkpoint" in one_error_line(p.stderr)


def test_not_a_checkpoint_exits_2_subprocess(tmp_path):
    fake = tmp_path / "ckpt.pt"
    fake.write_text("id,question1,question2\n")
    p = subprocess.run([sys.executable, "predict.py", str(fake), "a question?", "another?"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert "not a checkpoint" in one_error_line(p.stderr)


def run_bad(entry, argv, capsys):
    with pytest.raises(SystemExit) as e:
        entry(argv)
    assert e.value.code == 2
    return one_error_line(capsys.readouterr().err)


def test_checkpoint_of_another_format_exits_2(tmp_path, capsys):
    other = str(tmp_path / "other.pt")
    torch.save({"format": "something-else", "model": {}}, other)
    assert "not a qqp-pair-classifier" in run_bad(evaluate.main, [other], capsys)


def test_csv_without_question_columns_exits_2(ckpt, tmp_path, capsys):
    path = write_csv(tmp_path / "cols.csv", [[1, "a", "b", 0]],
                     header=("id", "text", "other", "is_duplicate"))
    assert "no question1 column" in run_bad(evaluate.main, [ckpt, "--csv", path], capsys)
    assert "no question1 column" in run_bad(predict.main, [ckpt, "--csv", path], capsys)


def test_data_folder_with_other_vocab_exits_2(tmp_path, tiny_data, tiny_bert_dir, capsys):
    path = make_checkpoint(tmp_path / "run" / "ckpt.pt", tiny_data)
    manifest_path = os.path.join(tiny_data, "manifest.json")
    with open(manifest_path) as f:
        m = json.load(f)
    m["vocab_hash"] = "0" * 16  # as if tokenized with another model
    with open(manifest_path, "w") as f:
        json.dump(m, f)
    assert "Fix: re-run python preprocess.py" in run_bad(evaluate.main, [path], capsys)
    assert "Fix: re-run python preprocess.py" in run_bad(
        baseline_cosine.main, ["--data_dir", tiny_data, "--encoder", tiny_bert_dir,
                               "--out_dir", str(tmp_path / "b")], capsys)


def test_missing_data_folder_exits_2(ckpt, tmp_path, capsys):
    assert "no manifest.json" in run_bad(evaluate.main, [ckpt, "--data_dir", str(tmp_path / "none")], capsys)


# ----------------------------------------------------------------------------- metrics

@pytest.mark.parametrize("by", ["f1", "accuracy"])
@pytest.mark.parametrize("seed", range(5))
def test_best_threshold_is_optimal_vs_brute_force(by, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    labels = rng.integers(0, 2, n)
    scores = np.round(rng.random(n) * 0.5 + labels * rng.random() * 0.5, 2)  # ties on purpose

    def value(t):  # straight from the definitions, independent of metrics.py
        pred = scores >= t
        tp, fp, fn = (pred & (labels == 1)).sum(), (pred & (labels == 0)).sum(), (~pred & (labels == 1)).sum()
        return 2 * tp / max(2 * tp + fp + fn, 1) if by == "f1" else (pred == labels).mean()

    candidates = np.r_[np.unique(scores), np.inf]  # every distinct cut, and "predict none"
    best = max(value(t) for t in candidates)
    t = metrics.best_threshold(labels, scores, by=by)
    assert value(t) == pytest.approx(best)
