"""The CUDA path, on a GPU only (`python -m pytest -q -m gpu`; skipped without CUDA): packed batches,
torch.compile with CUDA graphs, bf16, and that they compute what the plain CPU path computes."""
import json
import os

import numpy as np
import pytest
import torch

import engine
import train
from conftest import TINY_BERT
from data import Collator, PairDataset, to_device
from model import ModelConfig, build_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("objective", [[], ["--loss", "ce+mnrl+contrastive", "--both_orders"]],
                         ids=["ce", "all-terms"])
def test_train_py_defaults_on_cuda_use_packed_batches_and_cuda_graphs(tmp_path, tiny_data, tiny_bert_dir, capsys,
                                                                      objective):
    """A user's plain command on a GPU: bf16, packed batches, compiled with CUDA graphs; it learns
    the synthetic task and its batches take only a few shapes (with every objective)."""
    out = str(tmp_path / "out")
    train.main(["--data_dir", tiny_data, "--encoder", tiny_bert_dir, "--epochs", "4", "--bs", "16",
                "--lr", "1e-3", "--out_dir", out, "--log_every_steps", "5", *objective])
    printed = capsys.readouterr().out
    assert "precision bf16" in printed and "batches packed" in printed
    assert "compile reduce-overhead" in printed
    distinct = int(printed.split("batch shapes seen by the encoder: ")[1].split()[0])
    assert distinct <= 4
    with open(os.path.join(out, "test_results.json")) as f:
        assert json.load(f)["accuracy"] > 0.75


def test_compiled_bf16_step_matches_the_cpu_step(tiny_data):
    """The first training loss of the compiled, CUDA-graphed, bf16, packed step equals the
    plain fp32 CPU loss on the same pairs (no dropout) to bf16 precision; scores likewise."""
    cfg = {**TINY_BERT, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    torch.manual_seed(0)
    cpu_model = build_model(ModelConfig(encoder_config=cfg, dropout=0.0))
    gpu_model = build_model(ModelConfig(encoder_config=cfg, dropout=0.0))
    gpu_model.load_state_dict(cpu_model.state_dict())
    rt = engine.setup_runtime("cuda", "bf16")
    cpu = engine.Runtime(device=torch.device("cpu"))
    gpu_model.to(rt.device)
    compiled = engine.prepare_model(gpu_model, rt, engine.resolve_compile("auto", rt, packed=True))
    ds = PairDataset(tiny_data, "train")
    items = [ds[i] for i in range(16)]  # the same pairs, exact on the CPU, packed on the GPU
    losses = {}
    for name, model, runtime, packed in (("cpu", cpu_model, cpu, False), ("gpu", compiled, rt, True)):
        pad = ds.manifest["pad_token_id"]
        batch = (Collator("siamese", pad, batch_size=16, row_len=32) if packed else Collator("siamese", pad))(items)
        opt = engine.build_optimizer(model, 0.0, 0.0, runtime)  # lr 0: the step changes nothing
        sched = engine.build_scheduler(opt, 10, 0.0)
        losses[name] = engine.train_step(model, [to_device(batch, runtime.device)], 16, opt, sched,
                                         engine.build_scaler(runtime), runtime, 1.0).item() / 16
    assert losses["gpu"] == pytest.approx(losses["cpu"], abs=2e-2)

    val = PairDataset(tiny_data, "validation")
    scores = {name: engine.Inference(m.eval().probability, "siamese", r, 32)(val, verbose=False)
              for name, m, r in (("cpu", cpu_model, cpu), ("gpu", gpu_model, rt))}
    assert abs(scores["gpu"] - scores["cpu"]).max() < 2e-2


def test_compiled_scoring_equals_eager(tiny_data):
    """engine.Inference on CUDA in auto mode compiles a job of MIN_COMPILED_BATCHES batches or more
    (CUDA graphs) and gives the eager loop's probabilities, in dataset order."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder_config=TINY_BERT)).eval()
    rt = engine.setup_runtime("cuda", "bf16")
    model.to(rt.device)
    val = PairDataset(tiny_data, "validation")
    batch = max(1, len(val) // (engine.Inference.MIN_COMPILED_BATCHES + 2))
    auto = engine.Inference(model.probability, "siamese", rt, batch)
    eager = engine.Inference(model.probability, "siamese", rt, batch, compile="off")
    assert auto.step_fn(len(auto.loader(val)))[1]  # this job is compiled
    np.testing.assert_allclose(auto(val, verbose=False), eager(val, verbose=False), atol=2e-2)


# ----------------------------------------------------------------------------- every script on CUDA
# Each script with a batch loop, end to end on the GPU with its defaults (packed batches where the
# engine picks them), so that one device run shows every GPU-only failure at once.

@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory, tiny_bert_dir):
    import preprocess
    from conftest import synthetic_rows, write_csv
    tmp = tmp_path_factory.mktemp("cuda_scripts")
    data = str(tmp / "prep")
    csv_path = write_csv(tmp / "pairs.csv", synthetic_rows(400))
    preprocess.main([csv_path, "--out_dir", data, "--max_len", "32"])
    train.main(["--data_dir", data, "--encoder", tiny_bert_dir, "--epochs", "1", "--bs", "32", "--lr", "1e-3",
                "--out_dir", str(tmp / "run"), "--device", "cuda"])
    return {"tmp": tmp, "data": data, "csv": csv_path, "ckpt": str(tmp / "run" / "ckpt.pt"), "enc": tiny_bert_dir}


def _evaluate(r):
    import evaluate
    evaluate.main([r["ckpt"], "--out_dir", str(r["tmp"] / "eval"), "--device", "cuda"])


def _baseline_cosine(r):
    import baseline_cosine
    baseline_cosine.main(["--data_dir", r["data"], "--encoder", r["enc"], "--out_dir", str(r["tmp"] / "cos"),
                          "--device", "cuda"])


def _predict(r):
    import predict
    predict.main([r["ckpt"], "--csv", r["csv"], "--out", str(r["tmp"] / "preds.csv"), "--device", "cuda"])


def _index_and_search(r):
    import index
    import search
    import importlib.util
    ann = ["--ann"] if importlib.util.find_spec("faiss") else []  # the GPU machine's image has no faiss
    index.main([r["ckpt"], r["data"], "--out_dir", str(r["tmp"] / "idx"), *ann, "--device", "cuda"])
    search.main([str(r["tmp"] / "idx"), "--eval", r["data"], "--out_dir", str(r["tmp"] / "seval"), "--device", "cuda"])


def _teach(r):
    import teach
    teach.main(["--data_dir", r["data"], "--teacher", r["ckpt"], "--out", str(r["tmp"] / "t.npz"),
                "--encoder", r["enc"], "--mine", "150", "--batch_size", "64", "--device", "cuda"])


@pytest.mark.parametrize("script", [_evaluate, _baseline_cosine, _predict, _index_and_search, _teach],
                         ids=lambda f: f.__name__.strip("_"))
def test_every_script_runs_on_cuda(cuda_run, script):
    script(cuda_run)


def test_serve_on_cuda_answers_like_the_cpu(tmp_path, tiny_data):
    """serve.py on CUDA (packed batches, compiled with CUDA graphs at start, bf16): a planted
    duplicate comes first, and the cosines match the CPU server's to bf16 precision."""
    import shutil

    pytest.importorskip("fastapi", reason="serve.py needs fastapi (not in the GPU machine's image)")
    pytest.importorskip("httpx", reason="FastAPI's test client needs httpx")
    import index
    import retrieval
    import serve
    from fastapi.testclient import TestClient
    from test_evaluate import make_checkpoint
    ckpt = make_checkpoint(tmp_path / "run" / "ckpt.pt", tiny_data)
    index.main([ckpt, tiny_data, "--out_dir", str(tmp_path / "index"), "--device", "cpu"])
    ids, texts = retrieval.Index(str(tmp_path / "index")).questions
    answers = {}
    for device in ("cpu", "cuda"):
        folder = str(tmp_path / f"index_{device}")
        shutil.copytree(tmp_path / "index", folder)
        app, _ = serve.build(serve.ServeConfig(index=folder, device=device))
        with TestClient(app) as c:
            answers[device] = [c.post("/search", json={"question": texts[i].upper(), "k": 3}).json()["results"]
                               for i in (0, 5, 9)]
    for i, cpu, cuda in zip((0, 5, 9), answers["cpu"], answers["cuda"]):
        assert cuda[0]["id"] == ids[i]
        np.testing.assert_allclose([h["cosine"] for h in cuda], [h["cosine"] for h in cpu], atol=2e-2)
