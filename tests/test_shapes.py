"""The GPU's batch layout, run on the CPU: every script that batches, end to end with --shapes
packed against --shapes exact on a tiny model (the outputs must agree to 1e-5), and train.py with
its scoring compiled over a whole epoch of the real rows' packed shapes (no graph break, at most
one recompile). CI has no GPU; this is how it sees the code paths a GPU takes."""
import csv
import json
import logging
import os

import numpy as np
import pytest
import torch
from conftest import REAL_8K, needs_real_data, synthetic_rows, write_csv

import baseline_cosine
import evaluate
import index
import predict
import preprocess
import search
import teach
import train

LAYOUTS = ("exact", "packed")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_bert_dir):
    """A tiny data folder, a checkpoint train.py trained on it end to end with packed batches
    (bigger than one batch, with a short last one), and a queries file."""
    tmp = tmp_path_factory.mktemp("shapes")
    data = str(tmp / "prep")
    pairs = write_csv(tmp / "pairs.csv", synthetic_rows(400))
    preprocess.main([pairs, "--out_dir", data, "--max_len", "32"])
    train.main(["--data_dir", data, "--encoder", tiny_bert_dir, "--epochs", "2", "--bs", "24", "--lr", "1e-3",
                "--shapes", "packed", "--num_workers", "0", "--out_dir", str(tmp / "run")])
    with open(tmp / "run" / "test_results.json") as f:
        assert json.load(f)["accuracy"] > 0.6  # it learned through packed batches
    return {"tmp": tmp, "data": data, "pairs": pairs, "ckpt": str(tmp / "run" / "ckpt.pt"), "enc": tiny_bert_dir}


def both(fn):
    """fn(layout) for each layout -> {layout: result}."""
    return {layout: fn(layout) for layout in LAYOUTS}


def close(a, b, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=atol, rtol=0)


def assert_same_results(dirs):
    """Same per-pair scores and the same metrics at every threshold, whatever the layout."""
    a, b = (json.load(open(os.path.join(d, "results.json"))) for d in (dirs["exact"], dirs["packed"]))
    assert a["results"].keys() == b["results"].keys()
    for split in a["results"]:
        for name, m in a["results"][split].items():
            for key, value in m.items() if isinstance(m, dict) else ():
                if isinstance(value, float):
                    assert value == pytest.approx(b["results"][split][name][key], abs=1e-5), (split, name, key)
    for f in sorted(os.listdir(dirs["exact"])):
        if f.startswith("scores_"):
            close(np.load(os.path.join(dirs["exact"], f))["scores"], np.load(os.path.join(dirs["packed"], f))["scores"])


def test_evaluate_packed_equals_exact(run):
    dirs = both(lambda s: str(run["tmp"] / f"eval_{s}"))
    for s, d in dirs.items():
        evaluate.main([run["ckpt"], "--split", "all", "--out_dir", d, "--batch_size", "16", "--shapes", s])
    assert_same_results(dirs)


def test_baseline_cosine_packed_equals_exact(run):
    dirs = both(lambda s: str(run["tmp"] / f"cos_{s}"))
    for s, d in dirs.items():
        baseline_cosine.main(["--data_dir", run["data"], "--encoder", run["enc"], "--out_dir", d, "--pooling", "mean",
                              "--batch_size", "16", "--shapes", s])
    assert_same_results(dirs)


def test_predict_packed_equals_exact(run):
    def predict_with(s):
        out = str(run["tmp"] / f"preds_{s}.csv")
        predict.main([run["ckpt"], "--csv", run["pairs"], "--out", out, "--batch_size", "16", "--shapes", s])
        with open(out) as f:
            return [float(r["probability"]) for r in csv.DictReader(f)]
    probs = both(predict_with)
    assert len(probs["exact"]) == 400
    close(probs["exact"], probs["packed"], atol=2e-6)  # written with 6 decimals


def test_index_and_search_packed_equal_exact(run):
    """Index vectors (fp32 norms to 1e-5; the stored unit vectors are fp16, so to one fp16
    rounding step), the retrieval benchmark's metrics and query results."""
    def index_and_search(s):
        idx = str(run["tmp"] / f"idx_{s}")
        index.main([run["ckpt"], run["data"], "--out_dir", idx, "--batch_size", "16", "--shapes", s])
        search.main([idx, "--eval", run["data"], "--out_dir", str(run["tmp"] / f"seval_{s}"), "--shapes", s])
        with open(run["tmp"] / f"seval_{s}" / "results.json") as f:
            metrics = json.load(f)["metrics"]
        return idx, metrics
    out = both(index_and_search)
    (ix, mx), (ip, mp) = out["exact"], out["packed"]
    close(np.load(os.path.join(ix, "norms.npy")), np.load(os.path.join(ip, "norms.npy")))
    close(np.load(os.path.join(ix, "vectors.npy")), np.load(os.path.join(ip, "vectors.npy")), atol=2 ** -11)
    assert mx.keys() == mp.keys() and all(mx[k] == pytest.approx(mp[k], abs=1e-5) for k in mx)


def test_teach_packed_equals_exact(run):
    """The teacher's probabilities, and the pairs mined by the untuned encoder's vectors."""
    def teach_with(s):
        out = str(run["tmp"] / f"teacher_{s}.npz")
        teach.main(["--data_dir", run["data"], "--teacher", run["ckpt"], "--out", out, "--encoder", run["enc"],
                    "--mine", "150", "--batch_size", "16", "--shapes", s])
        f = np.load(out)
        return f["pairs"], f["probs"]
    out = both(teach_with)
    assert np.array_equal(out["exact"][0], out["packed"][0])
    close(out["exact"][1], out["packed"][1])


@needs_real_data
def test_training_and_scoring_compile_over_an_epoch_of_real_shapes(tmp_path, tiny_bert_dir):
    """train.py --compile default --shapes packed on the CPU, over a whole epoch of the real rows
    (50 steps of 128 pairs: the row counts real questions give), then its compiled validation and
    test passes: no graph break, and at most one recompile (dynamo's own logs, counted)."""
    data = str(tmp_path / "data")
    preprocess.main([REAL_8K, "--out_dir", data])
    events = []

    class Count(logging.Handler):
        def emit(self, record):
            events.append((record.name, record.getMessage().splitlines()[0]))

    handler = Count()
    torch._logging.set_logs(recompiles=True, graph_breaks=True)
    logging.getLogger("torch._dynamo").addHandler(handler)
    try:
        train.main(["--data_dir", data, "--encoder", tiny_bert_dir, "--epochs", "1", "--batch_size", "128",
                    "--shapes", "packed", "--compile", "default", "--num_workers", "0", "--out_dir",
                    str(tmp_path / "run")])
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
        torch._logging.set_logs()
    breaks = [m for name, m in events if name.endswith("__graph_breaks")]
    recompiles = [m for name, m in events if name.endswith("__recompiles")]
    assert not breaks, breaks
    assert len(recompiles) <= 1, recompiles
    assert os.path.isfile(tmp_path / "run" / "test_results.json")


def test_auto_compile_records_cuda_graphs_only_for_packed_batches_on_one_gpu():
    """--compile auto: CUDA graphs where the shapes are few (packed batches, one GPU, one micro-batch
    a step); plain compile for exact batches (a shape per group's rows and length: hundreds of graph
    recordings), under DDP or with accumulation; off on the CPU; an explicit mode as given."""
    import engine
    gpu, cpu = engine.Runtime(device=torch.device("cuda")), engine.Runtime(device=torch.device("cpu"))
    ddp = engine.Runtime(device=torch.device("cuda"), world=2)
    assert engine.resolve_compile("auto", gpu, packed=True) == "reduce-overhead"
    assert engine.resolve_compile("auto", gpu, packed=False) == "default"
    assert engine.resolve_compile("auto", gpu, 2, packed=True) == "default"
    assert engine.resolve_compile("auto", ddp, packed=True) == "default"
    assert engine.resolve_compile("auto", cpu, packed=True) == "off"
    assert engine.resolve_compile("reduce-overhead", gpu, packed=False) == "reduce-overhead"
    assert engine.Inference(None, "siamese", gpu, 8, shapes="exact").compile_mode == "default"
    assert engine.Inference(None, "siamese", gpu, 8).compile_mode == "reduce-overhead"  # auto: packed on CUDA
