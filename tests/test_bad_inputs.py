"""Nothing lost, nothing silently wrong: every script tried on bad files, damaged folders and odd
flags. Each case is a one-line `error: ... Fix: ...` with exit code 2, or a note where the script
can go on safely; inputs and earlier outputs are never overwritten."""
import csv
import gzip
import json
import os
import shutil

import numpy as np
import pytest

import evaluate
import predict
import preprocess
from conftest import synthetic_rows, write_csv
from data import PairDataset, load_manifest
from test_evaluate import csv_results_dir, make_checkpoint


def fails(entry, argv, capsys):
    """Run a script's main in this process; it must exit 2 with one error line. Returns the line."""
    with pytest.raises(SystemExit) as e:
        entry(argv)
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and ". Fix: " in lines[0], lines
    return lines[0]


@pytest.fixture
def ckpt(tmp_path, tiny_data):
    return make_checkpoint(tmp_path / "run" / "ckpt.pt", tiny_data)


# ----------------------------------------------------------------------------- predict.py

def test_predict_never_writes_over_its_input_or_an_earlier_output(ckpt, pairs_csv, tmp_path, capsys):
    before = open(pairs_csv, "rb").read()
    assert "is or lies in an input" in fails(predict.main, [ckpt, "--csv", pairs_csv, "--out", pairs_csv], capsys)
    assert open(pairs_csv, "rb").read() == before
    out = str(tmp_path / "preds.csv")
    predict.main([ckpt, "--csv", pairs_csv, "--out", out])
    capsys.readouterr()
    first = open(out).read()
    probs = sorted(float(line.split(",")[1]) for line in first.splitlines()[1:])
    median = f"{probs[len(probs) // 2]:.6f}"  # a threshold that changes about half the predictions
    assert "--overwrite" in fails(predict.main, [ckpt, "--csv", pairs_csv, "--out", out, "--threshold", median], capsys)
    assert open(out).read() == first
    predict.main([ckpt, "--csv", pairs_csv, "--out", out, "--threshold", median, "--overwrite"])
    capsys.readouterr()
    assert open(out).read() != first
    assert "does not exist" in fails(predict.main, [ckpt, "--csv", pairs_csv, "--out",
                                                    str(tmp_path / "no" / "dir" / "p.csv")], capsys)


def test_predict_checks_the_threshold_kind_and_range(ckpt, tiny_data, tiny_bert_dir, pairs_csv, tmp_path, capsys):
    import baseline_cosine
    baseline_cosine.main(["--data_dir", tiny_data, "--encoder", tiny_bert_dir, "--out_dir", str(tmp_path / "cos")])
    capsys.readouterr()
    cosine = str(tmp_path / "cos" / "results.json")
    out = str(tmp_path / "p.csv")
    assert "cosine scores" in fails(predict.main, [ckpt, "--csv", pairs_csv, "--out", out, "--threshold_from", cosine],
                                    capsys)
    assert "must be in [0, 1]" in fails(predict.main, [ckpt, "--csv", pairs_csv, "--out", out, "--threshold", "5"],
                                        capsys)
    assert not os.path.exists(out)


def test_predict_reads_no_label_column(ckpt, tmp_path, capsys):
    """A label column predict.py does not need may hold anything: no row is rejected for it."""
    rows = [[i, 1, 2, "How do I learn chess?", "Chess tips?", label] for i, label in enumerate(["", "maybe", "1"])]
    path = write_csv(tmp_path / "x.csv", rows)
    out = str(tmp_path / "p.csv")
    predict.main([ckpt, "--csv", path, "--out", out])
    assert "3 rows, 0 rejected" in capsys.readouterr().out
    with open(out) as f:
        assert len(list(csv.DictReader(f))) == 3


# ----------------------------------------------------------------------------- evaluate.py

def test_evaluate_of_a_csv_keeps_the_split_results(ckpt, tmp_path, capsys):
    """evaluate --csv test.csv writes to eval_csv_test_<hash>/, never over the test split's
    eval_test/ (whose results.json predict.py --threshold_from reads)."""
    evaluate.main([ckpt])
    capsys.readouterr()
    split_results = tmp_path / "run" / "eval_test" / "results.json"
    before = split_results.read_text()
    evaluate.main([ckpt, "--csv", write_csv(tmp_path / "test.csv", synthetic_rows(30, seed=4))])
    assert split_results.read_text() == before
    assert os.path.exists(os.path.join(csv_results_dir(tmp_path / "run", "test"), "results.json"))


@pytest.mark.parametrize("argv,message", [(["--batch_size", "0"], "--batch_size 0"),
                                          (["--device", "quantum"], "not a device")])
def test_evaluate_checks_flags(ckpt, argv, message, capsys):
    assert message in fails(evaluate.main, [ckpt, *argv], capsys)


def test_truncated_gzip_is_one_line_everywhere(ckpt, tmp_path, capsys):
    data = ("id,qid1,qid2,question1,question2,is_duplicate\n" +
            "".join(f"{i},{2 * i},{2 * i + 1},How do I learn item {i}?,What is item {i}?,{i % 2}\n"
                    for i in range(3000))).encode()
    path = str(tmp_path / "pairs.csv.gz")
    with open(path, "wb") as f:
        f.write(gzip.compress(data)[:-200])
    for entry, argv in ((preprocess.main, [path, "--out_dir", str(tmp_path / "prep")]),
                        (evaluate.main, [ckpt, "--csv", path]),
                        (predict.main, [ckpt, "--csv", path, "--out", str(tmp_path / "p.csv")])):
        assert "truncated or corrupt" in fails(entry, argv, capsys)


# ----------------------------------------------------------------------------- preprocess.py

def test_a_damaged_folder_is_rebuilt_not_reused(tmp_path, pairs_csv, capsys):
    """preprocess.py checks every file's hash before reusing a folder: a deleted tokens.npy, or
    arrays that no longer match the manifest (an interrupted write), rebuild it."""
    out = str(tmp_path / "prep")
    preprocess.main([pairs_csv, "--out_dir", out, "--max_len", "32"])
    tokens = os.path.join(out, "tokens.npy")
    good = open(tokens, "rb").read()
    os.remove(tokens)
    capsys.readouterr()
    preprocess.main([pairs_csv, "--out_dir", out, "--max_len", "32"])
    assert "rebuilding" in capsys.readouterr().out and open(tokens, "rb").read() == good
    np.save(os.path.join(out, "train.npy"), np.zeros((3, 3), np.int32))  # new arrays, old manifest
    preprocess.main([pairs_csv, "--out_dir", out, "--max_len", "32"])
    assert "rebuilding" in capsys.readouterr().out
    assert len(PairDataset(out, "train")) == load_manifest(out)["counts"]["train_pairs"]


def test_training_on_a_damaged_folder_names_the_file(tiny_data, tmp_path, capsys):
    import train
    with open(os.path.join(tiny_data, "tokens.npy"), "r+b") as f:
        f.truncate(200)
    line = fails(train.main, ["--data_dir", tiny_data, "--out_dir", str(tmp_path / "o")], capsys)
    assert "tokens.npy" in line and "re-run python preprocess.py" in line


def test_out_dir_that_is_a_file_or_a_foreign_folder_is_refused_before_work(tmp_path, pairs_csv, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert "is a file" in fails(preprocess.main, [pairs_csv, "--out_dir", str(a_file)], capsys)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    assert "not a data folder" in fails(preprocess.main, [pairs_csv, "--out_dir", str(foreign)], capsys)
    assert (foreign / "cat.jpg").read_bytes() == b"\xff\xd8" and a_file.read_text() == "mine"
    import train
    assert "is a file" in fails(train.main, ["--out_dir", str(a_file)], capsys)
    assert a_file.read_text() == "mine"


def test_a_very_long_question_is_read_and_truncated(tmp_path, capsys):
    rows = synthetic_rows(60)
    rows[5][3] = "why " * 50_000 + "?"  # 200,000 characters: over csv's default field limit
    out = str(tmp_path / "prep")
    preprocess.main([write_csv(tmp_path / "long.csv", rows), "--out_dir", out, "--max_len", "32"])
    m = load_manifest(out)
    assert m["counts"]["rows_rejected"] == 0 and m["token_lengths"]["truncated"] >= 1


def test_repeats_and_conflicts_are_counted_and_listed(tmp_path, capsys):
    rows = synthetic_rows(50)
    rows.append([rows[3][0], *rows[3][1:5], 1 - rows[3][5]])  # same id, same pair, the other label
    rows.append(list(rows[7]))                                # the same row twice
    rows.append([999, 5001, 5002, "🙂🙂🙂", "How do I learn chess?", 0])  # nothing the vocabulary reads
    out = str(tmp_path / "prep")
    preprocess.main([write_csv(tmp_path / "rep.csv", rows), "--out_dir", out, "--max_len", "32"])
    printed = capsys.readouterr().out
    c = load_manifest(out)["counts"]
    assert c["duplicate_ids"] == 2 and c["duplicate_pairs"] == 2 and c["pairs_with_conflicting_labels"] == 1
    assert c["unreadable_questions"] == 1 and "tokenize to nothing but [UNK]" in printed
    with open(os.path.join(out, "conflicts.tsv")) as f:
        assert [line.split("\t")[0] for line in f.read().splitlines()[1:]] == ["4", "51"]


# ----------------------------------------------------------------------------- exported model

@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_exported_hf_folder_loads_in_sentence_transformers_with_its_pooling(tmp_path, tiny_data, tiny_bert_dir,
                                                                            pooling, capsys):
    """train.py's hf/ folder: sentence-transformers reads the run's pooling (not mean by default),
    and its vectors are the checkpoint's; transformers loads it without missing weights."""
    import torch
    import train
    st = pytest.importorskip("sentence_transformers")
    out = str(tmp_path / "run")
    train.main(["--data_dir", tiny_data, "--encoder", tiny_bert_dir, "--epochs", "1", "--max_steps", "2",
                "--bs", "16", "--num_workers", "0", "--pooling", pooling, "--out_dir", out])
    hf = os.path.join(out, "hf")
    from transformers import AutoModel
    _, info = AutoModel.from_pretrained(hf, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # no "pooler MISSING" warning
    with open(os.path.join(hf, "modules.json")) as f:
        assert [m["type"] for m in json.load(f)][:2] == ["sentence_transformers.models.Transformer",
                                                         "sentence_transformers.models.Pooling"]
    from model import load_model
    model, _ = load_model(os.path.join(out, "ckpt.pt"))
    texts = ["How do I learn chess?", "What is the best way to learn python quickly?"]
    theirs = st.SentenceTransformer(hf, device="cpu").encode(texts, convert_to_tensor=True)
    tok = __import__("hub").load_tokenizer(hf)
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model.vectors({"seq_ids": [enc["input_ids"]], "seq_mask": [enc["attention_mask"]],
                              "seq_order": torch.arange(len(texts))}, len(texts))
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    shutil.rmtree(out)
