"""distill.py, teach.py and train.py --loss distill: the student's targets are its teacher's
probabilities on training and mined pairs (never a validation or test label), the distillation
loss is what it says and lowers itself, and runs are reproducible."""
import json

import numpy as np
import pytest
import torch
from conftest import TINY_BERT
from test_model import no_dropout

import distill
import engine
import teach
import train
from data import Collator, InMemoryPairs, PairDataset
from model import ModelConfig, build_model, load_model
from objectives import Objective, batch_loss, distill_loss
from text import NO_LABEL


def test_distill_loss_by_hand():
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0], [3.0, 3.0]])
    index = torch.tensor([2, 0, -1])  # the last is a fill pair
    probs = torch.tensor([0.1, 0.5, 0.8])
    logp = logits.log_softmax(-1)
    expected = -(0.2 * logp[0, 0] + 0.8 * logp[0, 1]) - (0.9 * logp[1, 0] + 0.1 * logp[1, 1])
    assert distill_loss(logits, index, probs).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.fixture(scope="module")
def taught(tmp_path_factory, tiny_bert_dir):
    """A tiny data folder, a tiny siamese teacher trained on it, and teach.py's file (mined by the
    tiny encoder)."""
    import preprocess
    from conftest import synthetic_rows, write_csv
    tmp = tmp_path_factory.mktemp("taught")
    data = str(tmp / "prep")
    preprocess.main([write_csv(tmp / "pairs.csv", synthetic_rows(400)), "--out_dir", data, "--max_len", "32"])
    train.main(["--data_dir", data, "--out_dir", str(tmp / "teacher"), "--encoder", tiny_bert_dir, "--epochs", "1",
                "--batch_size", "32", "--num_workers", "0", "--lr", "1e-3"])
    ckpt = str(tmp / "teacher" / "ckpt.pt")
    out = str(tmp / "teacher.npz")
    teach.main(["--data_dir", data, "--teacher", ckpt, "--out", out, "--encoder", tiny_bert_dir, "--mine", "150",
                "--batch_size", "64"])
    return data, ckpt, out, tmp


def test_teacher_file_holds_the_teachers_probabilities_of_training_questions_only(taught):
    data, ckpt, out, _ = taught
    train_ds = PairDataset(data, "train")
    pairs, probs, record = distill.load_teacher_file(out, train_ds)
    n = len(train_ds)
    assert np.array_equal(pairs[:n], train_ds.pairs) and record["mined_pairs"] == len(pairs) - n == 150
    mined = pairs[n:]
    assert (mined[:, 2] == NO_LABEL).all()
    # mined among the training questions only: no validation or test question takes part
    train_q = set(distill.training_questions(train_ds.pairs).tolist())
    held_out = {q for s in ("validation", "test") for q in PairDataset(data, s).pairs[:, :2].ravel().tolist()}
    assert set(mined[:, :2].ravel().tolist()) <= train_q and not held_out & train_q
    labelled = {frozenset(p) for p in train_ds.pairs[:, :2].tolist()}
    assert not any(frozenset(p) in labelled for p in mined[:, :2].tolist())
    assert len({frozenset(p) for p in mined[:, :2].tolist()}) == len(mined)
    # the targets are the teacher's own probabilities of exactly these pairs, not labels
    model, _ = load_model(ckpt)
    rt = engine.setup_runtime("cpu", "fp32")
    again = engine.Inference(model.probability, "siamese", rt, 64)(InMemoryPairs(train_ds.tokens, train_ds.offsets,
                                                                                pairs, 0))
    np.testing.assert_allclose(probs, again, atol=1e-5)
    assert not np.array_equal(probs[:n] >= 0.5, train_ds.labels == 1)  # a 1-epoch tiny teacher errs: not the labels
    assert record["teachers"][0]["validation"]["accuracy"] > 0


def test_distillation_trains_toward_the_teacher_and_is_reproducible(taught, tiny_bert_dir, capsys):
    data, ckpt, out, tmp = taught
    args = ["--data_dir", data, "--encoder", tiny_bert_dir, "--epochs", "1", "--batch_size", "32",
            "--num_workers", "0", "--lr", "1e-3", "--seed", "1", "--loss", "distill", "--teacher_file", out]
    train.main([*args, "--out_dir", str(tmp / "s1")])
    log = capsys.readouterr().out
    assert "training split + mined" in log and "objective distill" in log
    train.main([*args, "--out_dir", str(tmp / "s2")])
    a, b = (torch.load(tmp / s / "last.pt", weights_only=True)["model"] for s in ("s1", "s2"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # every training step saw the mined pairs too: 1 epoch = ceil((train + mined) / 32) steps
    n = len(PairDataset(data, "train")) + 150
    assert json.loads((tmp / "s1" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == -(-n // 32)


def test_distillation_lowers_its_loss_on_a_planted_task(taught):
    """60 steps of distill toward fixed targets lower the distillation loss by at least a third."""
    data, _, out, _ = taught
    train_ds = PairDataset(data, "train")
    pairs, probs, _ = distill.load_teacher_file(out, train_ds)
    train_ds.pairs = pairs
    probs = torch.from_numpy(probs)
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder_config=no_dropout(TINY_BERT), dropout=0.0))
    collate = Collator("siamese", train_ds.manifest["pad_token_id"])
    batches = [collate([train_ds[i] for i in range(32 * k, 32 * k + 32)]) for k in range(4)]
    batches.append(collate([train_ds[i] for i in range(len(pairs) - 32, len(pairs))]))  # mined pairs
    objective = Objective(loss="distill")

    def measure():
        with torch.no_grad():
            return sum(distill_loss(model(b), b["index"], probs).item() for b in batches)

    model.eval()
    before = measure()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(60):
        b = batches[step % len(batches)]
        opt.zero_grad()
        (batch_loss(model, b, objective, teacher_probs=probs) / len(b["labels"])).backward()
        opt.step()
    model.eval()
    after = measure()
    # the floor is the targets' own entropy: measure the part above it
    floor = sum(torch.special.entr(torch.stack([1 - probs[b["index"]], probs[b["index"]]])).sum().item()
                for b in batches)
    assert after - floor < (before - floor) * 2 / 3, (before, after, floor)


def test_bad_teacher_inputs_are_one_line_errors(taught, tmp_path, tiny_bert_dir, capsys):
    data, ckpt, out, _ = taught
    import preprocess
    from conftest import synthetic_rows, write_csv
    other = str(tmp_path / "other")
    preprocess.main([write_csv(tmp_path / "p.csv", synthetic_rows(300, seed=5)), "--out_dir", other, "--max_len", "32"])
    base = ["--encoder", tiny_bert_dir, "--mine", "10"]
    truncated = tmp_path / "truncated.npz"
    with open(out, "rb") as f:
        truncated.write_bytes(f.read(500))  # a copy cut short
    with np.load(out) as f:
        saved = dict(f)
    crafted = {}  # whole files with a part of the wrong kind
    negative = saved["pairs"].copy()
    negative[-1, 0] = -1  # a mined pair's qid below 0: it would wrap to the last question
    for name, change in (("column", {"probs": saved["probs"][:, None]}), ("record", {"record": np.array("[1]")}),
                         ("negative", {"pairs": negative})):
        crafted[name] = str(tmp_path / f"{name}.npz")
        np.savez(crafted[name], **{**saved, **change})
    cases = [
        (teach.main, ["--data_dir", other, "--teacher", ckpt, "--out", str(tmp_path / "t.npz"), *base],
         "may have seen this folder's validation"),  # a teacher of another folder
        (teach.main, ["--data_dir", data, "--teacher", ckpt, "--out", out, *base], "exists"),
        (teach.main, ["--data_dir", data, "--teacher", ckpt, "--out", ckpt, *base], "is or lies in an input"),
        (teach.main, ["--data_dir", data, "--out", str(tmp_path / "t.npz")], "no --teacher"),
        (train.main, ["--data_dir", other, "--out_dir", str(tmp_path / "r"), "--loss", "distill",
                      "--teacher_file", out], "was made for"),
        (train.main, ["--data_dir", data, "--out_dir", str(tmp_path / "r"), "--loss", "distill"], "needs both"),
        (train.main, ["--data_dir", data, "--out_dir", str(tmp_path / "r"), "--teacher_file", out], "needs both"),
        (train.main, ["--data_dir", data, "--out_dir", str(tmp_path / "r"), "--loss", "distill",
                      "--teacher_file", ckpt], "not a teacher file"),
        (train.main, ["--data_dir", data, "--out_dir", str(tmp_path / "r"), "--loss", "distill",
                      "--teacher_file", str(truncated)], "not a teacher file teach.py wrote (BadZipFile)"),
        *((train.main, ["--data_dir", data, "--out_dir", str(tmp_path / "r"), "--loss", "distill",
                        "--teacher_file", crafted[name]], message)
          for name, message in (("column", "are of another kind"), ("record", "are of another kind"),
                                ("negative", "the file is damaged"))),
    ]
    for fn, argv, message in cases:
        with pytest.raises(SystemExit) as e:
            fn(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, (argv, err)
