"""model.py and train.py on tiny random encoders: learning, checkpoints, exact resume, DDP."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY_BERT, TINY_DISTILBERT, save_tiny_encoder
import train
from data import Collator, PairDataset
from model import (ModelConfig, build_model, load_checkpoint, loss_fn, model_from_checkpoint,
                   save_checkpoint)

FAST = ["--epochs", "2", "--bs", "16", "--num_workers", "0", "--log_every_steps", "5", "--lr", "1e-3"]


def run_train(args, **kw):
    """train.py in its own process, as a user runs it."""
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, **kw)


def final_weights(out_dir):
    return torch.load(os.path.join(out_dir, "last.pt"), map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0 if atol == 0 else 1e-4, msg=k)


def first_batch(data_dir, layout, n=16):
    ds = PairDataset(data_dir, "train")
    return Collator(layout, ds.manifest["pad_token_id"])([ds[i] for i in range(n)])


def test_overfit_one_batch(tiny_data):
    """The model and loss can drive one batch to zero loss: gradients reach every layer."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder_config=TINY_BERT, dropout=0.0))
    batch = first_batch(tiny_data, "siamese")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = loss_fn(model(batch), batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert loss.item() < 0.05
    assert (model(batch).argmax(-1) == batch["labels"]).all()


def test_loss_is_over_classes_not_batch():
    """The notebook's LogSoftmax(dim=0) made one example's loss depend on the others; ours doesn't."""
    logits = torch.randn(4, 2)
    labels = torch.tensor([0, 1, 1, 0])
    alone = torch.stack([loss_fn(logits[i:i + 1], labels[i:i + 1]) for i in range(4)]).mean()
    torch.testing.assert_close(loss_fn(logits, labels), alone)


@pytest.mark.parametrize("encoder", [TINY_BERT, TINY_DISTILBERT], ids=["bert", "distilbert"])
@pytest.mark.parametrize("arch", ["siamese", "cross"])
def test_architectures_and_encoder_families_learn(tiny_data, encoder, arch):
    """Both architectures on both encoder families (DistilBERT has no token types) take steps
    that lower the loss on a fixed batch."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder_config=encoder, arch=arch, dropout=0.0, pooling="mean",
                                    features="rich"))
    batch = first_batch(tiny_data, arch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = loss_fn(model(batch), batch["labels"])
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]


def test_frozen_encoder_gets_no_updates(tiny_data):
    model = build_model(ModelConfig(encoder_config=TINY_BERT, freeze_encoder=True))
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head_before = [p.clone() for p in model.head.parameters()]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = first_batch(tiny_data, "siamese")
    model.train()
    assert not model.encoder.training  # frozen encoder keeps dropout off too
    for _ in range(3):
        loss = loss_fn(model(batch), batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert_same_weights(before, model.encoder.state_dict())
    assert any(not torch.equal(a, b) for a, b in zip(head_before, model.head.parameters()))


def test_checkpoint_round_trip_weights_only(tmp_path, tiny_data):
    """Saved with the config, loaded with weights_only=True, rebuilt without any pretrained files."""
    model = build_model(ModelConfig(encoder_config=TINY_DISTILBERT, arch="cross")).eval()
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, {"model": model.state_dict(), "model_config": model.cfg.__dict__})
    raw = torch.load(path, map_location="cpu", weights_only=True)
    rebuilt = model_from_checkpoint(load_checkpoint(path)).eval()
    assert_same_weights(raw["model"], rebuilt.state_dict())
    batch = first_batch(tiny_data, "cross", n=8)
    torch.testing.assert_close(model(batch), rebuilt(batch))
    assert not os.path.exists(path + ".tmp")  # written atomically


def test_train_script_end_to_end(tmp_path, tiny_data, tiny_bert_dir):
    """train.py learns the synthetic task, writes every artifact and reports test metrics."""
    out = str(tmp_path / "out")
    r = run_train(["--data_dir", tiny_data, "--encoder", tiny_bert_dir, "--out_dir", out, *FAST,
                   "--epochs", "4", "--pooling", "mean", "--features", "rich"])
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("ckpt.pt", "last.pt", "metrics.jsonl", "test_results.json", "hf/config.json",
                 "hf/tokenizer.json"):
        assert os.path.exists(os.path.join(out, name)), name
    assert "Accuracy:" in r.stdout and "Confusion matrix" in r.stdout
    lines = open(os.path.join(out, "metrics.jsonl")).read().splitlines()
    assert len(lines) == 4  # one evaluation per epoch
    import json
    assert json.load(open(os.path.join(out, "test_results.json")))["accuracy"] > 0.75
    from transformers import AutoModel
    AutoModel.from_pretrained(os.path.join(out, "hf"))  # other tools can load the encoder


def test_resume_after_kill_equals_uninterrupted(tmp_path, tiny_data, tiny_bert_dir):
    """kill -9 at whatever step the run has reached, then --resume: same final weights, bit for bit."""
    common = ["--data_dir", tiny_data, "--encoder", tiny_bert_dir, *FAST, "--save_every_steps", "1",
              "--eval_every_steps", "7"]
    full = str(tmp_path / "full")
    assert run_train([*common, "--out_dir", full]).returncode == 0

    cut = str(tmp_path / "cut")
    proc = subprocess.Popen([sys.executable, "train.py", *common, "--out_dir", cut], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = os.path.join(cut, "last.pt")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if torch.load(last, map_location="cpu", weights_only=True)["step"] >= 5:
                break
        except Exception:  # not written yet (the rename is atomic, so never half-written)
            pass
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(last, map_location="cpu", weights_only=True)["step"]
    r = run_train(["--out_dir", cut, "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"at step {killed_at}" in r.stdout
    assert_same_weights(final_weights(full), final_weights(cut))
    full_log = open(os.path.join(full, "metrics.jsonl")).read()
    assert open(os.path.join(cut, "metrics.jsonl")).read() == full_log


def test_sigterm_saves_and_exits_cleanly(tmp_path, tiny_data, tiny_bert_dir):
    out = str(tmp_path / "out")
    proc = subprocess.Popen([sys.executable, "train.py", "--data_dir", tiny_data, "--encoder", tiny_bert_dir,
                             *FAST, "--epochs", "50", "--out_dir", out], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if "step" in (open(os.path.join(out, "metrics.jsonl")).read() if os.path.exists(
                os.path.join(out, "metrics.jsonl")) else ""):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "continue with --resume" in stdout
    assert "Traceback" not in stderr
    assert load_checkpoint(os.path.join(out, "last.pt"))["step"] > 0


def test_ddp_two_processes_match_single_process(tmp_path, tiny_data):
    """torchrun with 2 gloo processes x batch 8 = one process x batch 16, step for step."""
    # Dropout off everywhere (head and encoder): ranks draw different masks than one process would.
    encoder = save_tiny_encoder(tmp_path / "encoder", {**TINY_BERT, "hidden_dropout_prob": 0.0,
                                                       "attention_probs_dropout_prob": 0.0})
    common = ["--data_dir", tiny_data, "--encoder", encoder, "--num_workers", "0", "--epochs", "1",
              "--max_steps", "6", "--dropout", "0", "--lr", "1e-3", "--seed", "3"]
    single, double = str(tmp_path / "single"), str(tmp_path / "double")
    assert run_train([*common, "--bs", "16", "--out_dir", single]).returncode == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29517", "train.py", *common, "--bs", "8", "--out_dir", double],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "processes 2" in r.stdout
    # The only difference left is float summation order across the two shards.
    a, b = final_weights(single), final_weights(double)
    print("max abs weight difference", max((a[k] - b[k]).abs().max().item() for k in a))
    assert_same_weights(a, b, atol=1e-4)


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, tiny_data, tiny_bert_dir, monkeypatch, capsys):
    monkeypatch.setattr(train, "loss_fn", lambda logits, labels: (logits.sum() * float("nan")))
    with pytest.raises(SystemExit) as e:
        train.main(["--data_dir", tiny_data, "--encoder", tiny_bert_dir, *FAST, "--out_dir",
                    str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: non-finite loss") and "lr" in err and "batch lengths" in err
    assert "\n" not in err


@pytest.mark.parametrize("args,message", [
    (["--data_dir", "/nonexistent"], "preprocess.py"),
    (["--resume"], "no "),
])
def test_bad_inputs_give_one_line_errors(tmp_path, args, message):
    r = run_train([*args, "--out_dir", str(tmp_path / "out")])
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error:") and message in r.stderr


def test_symmetric_siamese_ignores_question_order(tiny_data):
    """--symmetric: p(q1, q2) == p(q2, q1); without it the head sees an ordered pair."""
    ds = PairDataset(tiny_data, "train")
    items = [ds[i] for i in range(8)]
    swapped = [(i, b, a, y) for i, a, b, y in items]
    collate = Collator("siamese", ds.manifest["pad_token_id"])
    for symmetric in (True, False):
        torch.manual_seed(0)
        model = build_model(ModelConfig(encoder_config=TINY_BERT, symmetric=symmetric)).eval()
        with torch.no_grad():
            same = torch.allclose(model(collate(items)), model(collate(swapped)), atol=1e-5)
        assert same == symmetric
