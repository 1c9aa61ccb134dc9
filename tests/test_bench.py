"""bench.py end to end on tiny settings: every stage runs, times what training runs, and reports
numbers that follow from what it measured; no timing is asserted. reference.py's loops."""
import json
import os
import random

import numpy as np
import pytest
import torch

import bench
import engine
import reference
from conftest import TINY_BERT
from data import PairDataset, make_loader, padding_stats
from model import ModelConfig, build_model

TINY = ["--data_batches", "4", "--batch_size", "16", "--warmup_steps", "1", "--train_steps", "2",
        "--infer_pairs", "48"]


def test_every_stage_runs_and_reports_what_it_measured(tmp_path, pairs_csv, tiny_bert_dir, monkeypatch):
    """All six stages on 400 synthetic pairs and a tiny random BERT ('gpu' named explicitly, so
    without CUDA it runs as a CPU smoke check of its code)."""
    steps, real_step = [], engine.train_step

    def spy(*args, **kwargs):  # ours must be train.py's own step
        steps.append(len(args[1]))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine, "train_step", spy)
    out = tmp_path / "bench.json"
    bench.main(["--stages", "preprocess,data,padding,train,infer,gpu", "--encoder", tiny_bert_dir,
                "--data", pairs_csv, "--rows", "1000", *TINY, "--out", str(out)])
    report = json.loads(out.read_text())
    assert set(report["stages"]) == {"preprocess", "data", "padding", "train", "infer", "gpu"}
    for key in ("cpu", "cpu_cores", "memory_gb"):
        assert report["machine"][key]
    for key in ("python", "torch", "transformers", "tokenizers"):
        assert report["versions"][key]
    assert report["settings"]["batch_size"] == 16 and report["date"]
    assert len(report["table"]) == sum(len(s["rows"]) for s in report["stages"].values())

    assert report["stages"]["preprocess"]["ours"]["rows_read"] == 1000
    train = report["stages"]["train"]
    assert steps == [1] * (1 + 2)  # warm-up + timed steps, one micro-batch each, through engine.train_step
    assert train["ours"]["pairs"] == train["notebook"]["pairs"] == train["peer"]["pairs"] == 2 * 16
    for side in ("ours", "notebook", "peer"):
        s = train[side]
        assert s["pairs_per_sec"] == pytest.approx(s["pairs"] / s["seconds"])
        assert np.isfinite(s["mean_loss"]) and 0 < s["mean_loss"] < 5
    assert train["ratio"] == pytest.approx(train["ours"]["pairs_per_sec"] / train["notebook"]["pairs_per_sec"])
    assert train["ratio_vs_peer"] == pytest.approx(train["ours"]["pairs_per_sec"] / train["peer"]["pairs_per_sec"])

    # Ours' padding is what make_loader gives on this device (exact on the CPU), recomputed here.
    padding = report["stages"]["padding"]
    assert padding["ours"]["batches"] == ("packed" if torch.cuda.is_available() else "exact")
    assert padding["ours"]["real_tokens"] <= padding["ours"]["padded_tokens"]
    assert padding["ratio"] == pytest.approx(padding["ours"]["efficiency"] / padding["notebook"]["efficiency"])
    gpu = report["stages"]["gpu"]
    assert gpu["smoke_check_on"] == ("cpu" if not torch.cuda.is_available() else None)
    assert 0 < gpu["ours"]["mfu"] and gpu["ours"]["distinct_shapes"] >= 1
    # train.py end to end ran on the synthesized rows (on a CPU: 2 steps, then validation), with the
    # tokenizer's encoder; its log lies beside the report
    e2e = gpu["train_py"]
    assert e2e["train_py_seconds"] > 0 and 0 <= e2e["validation_accuracy"] <= 1
    assert e2e["train_pairs"] + e2e["validation_pairs"] < 1000 * 2
    log = (tmp_path / "bench_train_e2e.log").read_text()
    assert tiny_bert_dir in log or torch.cuda.is_available()


def test_padding_stage_matches_the_loader(tmp_path, tiny_data):
    """padding_stats counts every real token once, exact or packed (fill pairs not counted), and
    bench's padding share for ours is that count over an epoch."""
    ds = PairDataset(tiny_data, "train")
    l1, l2 = ds.question_lengths()
    for packed in (False, True):
        loader, _ = make_loader(ds, "siamese", 16, shuffle=True, packed=packed, max_len=32)
        real, padded = map(sum, zip(*(padding_stats(b) for b in loader)))
        assert real == l1.sum() + l2.sum() and padded > real


def test_gpu_stage_is_skipped_without_cuda_unless_named(tmp_path, monkeypatch):
    """Within 'all', no CUDA means the gpu stage says it was not measured (the other stages are
    stubbed here: this is about the stage list)."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the gpu stage runs for real")
    ran = []
    monkeypatch.setattr(bench, "STAGE_FUNCTIONS", {
        name: (lambda ws, cfg, plan, rt, name=name: ran.append(name) or {"rows": [], "ratio": 1.0})
        for name in bench.STAGE_FUNCTIONS})
    out = tmp_path / "bench.json"
    bench.main(["--stages", "all", "--out", str(out)])
    report = json.loads(out.read_text())
    assert ran == [s for s in bench.STAGES if s != "gpu"]
    assert report["stages"]["gpu"]["skipped"] == "not measured: no CUDA device here"


@pytest.mark.parametrize("stage,package,pip", [("serve", "httpx", "httpx"), ("search", "faiss", "faiss-cpu")])
def test_a_stage_without_its_packages_is_one_line_before_any_stage(tmp_path, capsys, monkeypatch, stage, package,
                                                                    pip):
    import sys
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed: find_spec gives None
    with pytest.raises(SystemExit) as e:
        bench.main(["--stages", f"data,{stage}", "--out", str(tmp_path / "bench.json")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: bench.py's {stage} stage: {package} not installed") and f"pip install {pip}" in err
    assert not (tmp_path / "bench.json").exists()


def test_missing_rows_are_one_line_before_any_stage(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--stages", "data,train", "--data", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "b.json")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --data {tmp_path / 'nope.csv'}: no such file (the data, train stage(s)")


def test_out_replaces_only_an_earlier_report(tmp_path, capsys):
    """--out over a file that is not a bench report (a data folder's manifest, a CSV), or a path
    ending in a separator, is one line before any stage; the file is untouched."""
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"format": "qqp-pair-data"}')
    for out, message in ((str(manifest), "exists and is not a bench.py report"),
                         (str(tmp_path / "newdir") + os.sep, "is a folder")):
        with pytest.raises(SystemExit) as e:
            bench.main(["--stages", "data", "--out", out])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert manifest.read_text() == '{"format": "qqp-pair-data"}' and not (tmp_path / "newdir").exists()


def test_unknown_stage_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--stages", "train,warp"])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: --stages: unknown warp")


def test_notebook_model_normalizes_over_the_batch():
    """The re-implementation keeps the notebook's LogSoftmax(dim=0): each column sums to one
    over the batch, not each row over the classes."""
    torch.manual_seed(0)
    encoder = build_model(ModelConfig(encoder_config=TINY_BERT)).encoder
    model = reference.NotebookModel(encoder, torch.device("cpu"))
    ids = torch.randint(1000, 2000, (5, 7))
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    log_probs = model.forward(enc, enc, train=False)
    torch.testing.assert_close(log_probs.exp().sum(0), torch.ones(2))
    assert not model.training


def test_shuffle_data_keeps_pairs_together():
    random.seed(0)
    a, b, y = reference.shuffle_data(list("abcdef"), list("ABCDEF"), [0, 1, 0, 1, 0, 1])
    assert sorted(a) == list("abcdef") and [x.upper() for x in a] == b
    assert y == ["abcdef".index(x) % 2 for x in a]


def test_peer_groups_by_length_like_hf():
    """HF's LengthGroupedSampler: every index once; within each megabatch of 50 batches, lengths
    descend; the longest batch comes first."""
    lengths = list(np.random.default_rng(0).integers(3, 60, 1000))
    batches = reference.group_by_length(lengths, 8, seed=1, megabatch_mult=5)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert max(lengths[i] for i in batches[0]) == max(lengths)
    flat = [i for b in batches[1:] for i in b]
    assert sum(lengths[a] < lengths[b] for a, b in zip(flat, flat[1:])) <= 1000 // 40 + 2  # only at megabatch edges
