"""bench.py end to end on tiny settings: every stage runs and reports; no timing is asserted."""
import json
import math
import random

import numpy as np
import pytest
import torch

import bench
from conftest import TINY_BERT
from model import ModelConfig, build_model


def test_every_stage_reports_positive_ratios(tmp_path, pairs_csv, tiny_bert_dir):
    """All six stages on 400 synthetic pairs and a tiny random BERT; 'gpu' named explicitly, so
    on a machine without CUDA it runs as a CPU smoke check of its code."""
    out = tmp_path / "bench.json"
    bench.main(["--stages", "preprocess,data,padding,train,infer,gpu", "--model", tiny_bert_dir,
                "--data", pairs_csv, "--rows", "1000", "--batch_size", "16", "--warmup_steps", "1",
                "--train_steps", "2", "--data_batches", "4", "--infer_pairs", "48", "--out", str(out)])
    report = json.loads(out.read_text())
    assert set(report["stages"]) == set(bench.STAGES)
    for key in ("cpu", "cpu_cores", "memory_gb"):
        assert report["machine"][key]
    for key in ("python", "torch", "transformers", "tokenizers"):
        assert report["versions"][key]
    assert report["settings"]["batch_size"] == 16 and report["date"]
    for name, stage in report["stages"].items():
        assert isinstance(stage["ratio"], float) and math.isfinite(stage["ratio"]) and stage["ratio"] > 0, name
        assert stage["rows"], name
    assert report["stages"]["preprocess"]["ours"]["rows_read"] == 1000
    train = report["stages"]["train"]
    assert train["ours"]["pairs"] == train["notebook"]["pairs"] == 2 * 16  # the same pairs, both sides
    assert 0 < report["stages"]["padding"]["ours"]["efficiency"] <= 1
    assert len(report["table"]) == sum(len(s["rows"]) for s in report["stages"].values())


def test_gpu_stage_is_skipped_without_cuda_unless_named(tmp_path, pairs_csv, tiny_bert_dir):
    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the gpu stage runs for real")
    out = tmp_path / "bench.json"
    bench.main(["--stages", "all", "--model", tiny_bert_dir, "--data", pairs_csv, "--rows", "500",
                "--batch_size", "16", "--warmup_steps", "1", "--train_steps", "1", "--data_batches", "2",
                "--infer_pairs", "16", "--out", str(out)])
    gpu = json.loads(out.read_text())["stages"]["gpu"]
    assert "not yet measured" in gpu["skipped"]


def test_unknown_stage_is_an_error():
    with pytest.raises(SystemExit):
        bench.parse_args(["--stages", "train,warp"])


def test_notebook_model_normalizes_over_the_batch():
    """The re-implementation keeps the notebook's LogSoftmax(dim=0): each column sums to one
    over the batch, not each row over the classes."""
    torch.manual_seed(0)
    encoder = build_model(ModelConfig(encoder_config=TINY_BERT)).encoder
    model = bench.NotebookModel(encoder, torch.device("cpu"))
    ids = torch.randint(1000, 2000, (5, 7))
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    log_probs = model.forward(enc, enc, train=False)
    torch.testing.assert_close(log_probs.exp().sum(0), torch.ones(2))
    assert not model.training


def test_shuffle_data_keeps_pairs_together():
    random.seed(0)
    a, b, y = bench.shuffle_data(list("abcdef"), list("ABCDEF"), [0, 1, 0, 1, 0, 1])
    assert sorted(a) == list("abcdef") and [x.upper() for x in a] == b
    assert y == ["abcdef".index(x) % 2 for x in a]
    assert np.array_equal(sorted(y), [0, 0, 0, 1, 1, 1])
