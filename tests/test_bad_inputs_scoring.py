"""The scoring scripts (evaluate, predict, baseline_cosine, teach, index, search, bench, synth_qqp)
on bad flags, bad output places and inputs the model cannot read: every numeric flag has its range,
every output place is checked before any work, a failed write leaves no temp file, one input's
results never replace another's, two index runs never share a folder, and a pair or query made of
nothing the vocabulary reads is named as such. Every pairs file here is invented."""
import errno
import json
import os
import shutil

import pytest
from conftest import synthetic_rows, write_csv
from test_bad_inputs import fails
from test_evaluate import csv_results_dir, make_checkpoint, read_results

import baseline_cosine
import bench
import data
import distill
import engine
import evaluate
import index
import predict
import search
import synth_qqp
import teach

EMOJI = "🙂🙂🙂"  # nothing the bundled vocabulary reads: [CLS] [UNK] [SEP]


@pytest.fixture
def ckpt(tmp_path, tiny_data):
    return make_checkpoint(tmp_path / "run" / "ckpt.pt", tiny_data)


@pytest.fixture
def other_data(tmp_path):
    """A data folder of other rows: not the one the checkpoint was trained on."""
    import preprocess
    out = str(tmp_path / "other")
    preprocess.main([write_csv(tmp_path / "other.csv", synthetic_rows(300, seed=5)), "--out_dir", out,
                     "--max_len", "32"])
    return out


@pytest.fixture
def indexed(tmp_path, tiny_data, ckpt):
    """An index of the tiny data folder's questions, by the tiny checkpoint."""
    out = str(tmp_path / "index")
    index.main([ckpt, tiny_data, "--out_dir", out])
    return out


def fails_after_work(entry, argv, capsys):
    """Exit 2 with an error line last on stderr (what went before it there: the device banner)."""
    with pytest.raises(SystemExit) as e:
        entry(argv)
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and ". Fix: " in last, last
    return last


def no_scoring(monkeypatch):
    """Any scoring from here on fails the test: what is checked must be checked before the work."""
    def refuse(*args, **kwargs):
        raise AssertionError("the work started before the check")
    monkeypatch.setattr(engine.Inference, "__init__", refuse)


def unwritable(monkeypatch, folder):
    """data.check_writable's probe fails in `folder`, as in a read-only folder (which root, who may
    run these tests, would still write into)."""
    real, folder = data.tempfile.mkstemp, os.path.realpath(folder)

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and os.path.realpath(dir) == folder:
            raise PermissionError(errno.EACCES, "Permission denied", dir)
        return real(*args, dir=dir, **kwargs)
    monkeypatch.setattr(data.tempfile, "mkstemp", mkstemp)


def disk_full_after_header(monkeypatch):
    """A csv.writer writes its first row, then the disk is full."""
    import csv
    real = csv.writer

    class Writer:
        def __init__(self, f, **kwargs):
            self.w, self.rows = real(f, **kwargs), 0

        def writerow(self, row):
            self.rows += 1
            if self.rows > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.w.writerow(row)
    monkeypatch.setattr(csv, "writer", Writer)


# ----------------------------------------------------------------------------- 5. every numeric flag's range

RANGE_CASES = [
    (evaluate.main, ["nope.pt"], [("batch_size", "0"), ("num_workers", "-1"), ("num_workers", "100000")]),
    (predict.main, ["nope.pt", "a?", "b?"], [("threshold", "1.5"), ("threshold", "-0.1"), ("threshold", "nan"),
                                            ("batch_size", "0"), ("num_workers", "-1"),
                                            ("num_workers", "65")]),
    (teach.main, ["--teacher", "nope.pt"], [("mine", "-5"), ("mine", "-2"), ("k", "0"), ("batch_size", "0"),
                                            ("num_workers", "-1"), ("seed", "-1")]),
    (index.main, ["--encoder", "enc", "in.txt"], [("max_len", "-1"), ("max_len", "2"), ("batch_size", "0"),
                                                 ("num_workers", "-1"), ("seed", "-1"), ("seed", str(2 ** 31))]),
    (search.main, ["idx", "a question?"], [("k", "0"), ("nprobe", "-1"), ("rerank_depth", "0"), ("batch_size", "0"),
                                           ("num_workers", "-2")]),
    (baseline_cosine.main, [], [("threshold", "1.5"), ("threshold", "nan"), ("batch_size", "0"),
                                ("num_workers", "-1")]),
    (bench.main, ["--stages", "data"], [("batch_size", "0"), ("warmup_steps", "-2"), ("train_steps", "0"),
                                        ("reference_steps", "-3"), ("data_batches", "0"), ("infer_pairs", "0"),
                                        ("rows", "10"), ("rows", "20000001"), ("notebook_rows", "-1"),
                                        ("num_workers", "-2"),
                                        ("e2e_timeout", "0"), ("seed", "-1")]),
    (synth_qqp.main, ["src.csv", "out.csv"], [("rows", "0"), ("rows", "10000000000000"), ("seed", "-1")]),
]


@pytest.mark.parametrize("entry,base,flag,value", [(e, b, f, v) for e, b, cases in RANGE_CASES for f, v in cases],
                         ids=lambda x: x.__module__ if callable(x) else None)
def test_every_numeric_flag_out_of_range_is_one_line(entry, base, flag, value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nothing the scripts write by default lands in the repository
    line = fails(entry, [*base, f"--{flag}", value], capsys)
    assert f"--{flag} {value}: out of range" in line, line


# ----------------------------------------------------------------------------- 1. evaluate: one folder per input

def test_evaluate_on_a_folder_it_was_not_trained_on_is_refused_unless_allowed(ckpt, tmp_path, other_data, capsys):
    evaluate.main([ckpt])
    own = tmp_path / "run" / "eval_test" / "results.json"
    before = own.read_text()
    capsys.readouterr()
    line = fails(evaluate.main, [ckpt, "--data_dir", other_data], capsys)
    assert "is not the folder" in line and "--allow_other_data" in line
    line = fails(evaluate.main, [ckpt, "--csv", write_csv(tmp_path / "x.csv", synthetic_rows(20)),
                                 "--data_dir", other_data], capsys)  # tuning on it: the same risk
    assert "--allow_other_data" in line
    evaluate.main([ckpt, "--data_dir", other_data, "--allow_other_data"])
    assert "may have been in training" in capsys.readouterr().out
    assert own.read_text() == before  # its own folder, never eval_test
    apart = [d for d in os.listdir(tmp_path / "run") if d.startswith("eval_test_other_")]
    assert len(apart) == 1 and read_results(tmp_path / "run" / apart[0])["data_dir"] == os.path.abspath(other_data)


def test_evaluate_csvs_of_one_name_keep_their_own_folders(ckpt, tmp_path):
    os.makedirs(tmp_path / "a")
    os.makedirs(tmp_path / "b")
    a = write_csv(tmp_path / "a" / "pos.csv", synthetic_rows(20, seed=1))
    b = write_csv(tmp_path / "b" / "pos.csv", synthetic_rows(30, seed=2))
    evaluate.main([ckpt, "--csv", a])
    first = csv_results_dir(tmp_path / "run", "pos")
    kept = open(os.path.join(first, "results.json")).read()
    evaluate.main([ckpt, "--csv", b])
    assert open(os.path.join(first, "results.json")).read() == kept
    folders = sorted(d for d in os.listdir(tmp_path / "run") if d.startswith("eval_csv_pos_"))
    assert len(folders) == 2
    assert sorted(read_results(tmp_path / "run" / d)["rows_read"] for d in folders) == [20, 30]
    evaluate.main([ckpt, "--csv", a])  # the same input again: its own folder, replaced
    assert sorted(d for d in os.listdir(tmp_path / "run") if d.startswith("eval_csv_pos_")) == folders


def test_evaluate_out_dir_of_another_input_needs_overwrite(ckpt, tmp_path, capsys):
    out = tmp_path / "results"
    evaluate.main([ckpt, "--out_dir", str(out)])
    evaluate.main([ckpt, "--out_dir", str(out)])  # a re-run of the same input replaces its own
    before = (out / "results.json").read_text()
    few = write_csv(tmp_path / "few.csv", synthetic_rows(20, seed=3))
    capsys.readouterr()
    line = fails(evaluate.main, [ckpt, "--csv", few, "--out_dir", str(out)], capsys)
    assert "results of another run" in line and "--overwrite" in line
    assert (out / "results.json").read_text() == before
    line = fails(evaluate.main, [ckpt, "--split", "validation", "--out_dir", str(out)], capsys)
    assert "results of another run" in line
    evaluate.main([ckpt, "--csv", few, "--out_dir", str(out), "--overwrite"])
    assert read_results(out)["rows_read"] == 20
    assert not any(n.startswith("test_") or n == "scores_test.npz" for n in os.listdir(out))  # no mix of runs
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert "not results" in fails(evaluate.main, [ckpt, "--out_dir", str(foreign), "--overwrite"], capsys)
    assert os.listdir(foreign) == ["notes.txt"]


def test_predict_threshold_file_and_question_count_messages(ckpt, tmp_path, capsys):
    for where, what in ((tmp_path / "nope.json", "no such file"), (tmp_path, "a folder, not a file")):
        line = fails(predict.main, [ckpt, "a?", "b?", "--threshold_from", str(where)], capsys)
        assert f"--threshold_from {where}: {what}" in line
    assert "one question given: a pair needs two" in fails(predict.main, [ckpt, "How?"], capsys)


def test_evaluate_on_one_class_writes_strict_json(ckpt, tmp_path):
    """ROC-AUC of a file with one class is undefined: null in results.json, not NaN (which JSON
    readers outside Python refuse)."""
    rows = [r for r in synthetic_rows(80, seed=4) if r[-1] == 1][:20]
    evaluate.main([ckpt, "--csv", write_csv(tmp_path / "ones.csv", rows), "--out_dir", str(tmp_path / "e")])
    text = (tmp_path / "e" / "results.json").read_text()
    results = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in results.json"))
    assert None in [m.get("roc_auc") for m in json_values(results, "roc_auc")]


def json_values(tree, key):
    """Every dict in a JSON tree that holds key."""
    if isinstance(tree, dict):
        return ([tree] if key in tree else []) + [d for v in tree.values() for d in json_values(v, key)]
    if isinstance(tree, list):
        return [d for v in tree for d in json_values(v, key)]
    return []


def test_overwrite_replaces_results_only_once_the_inputs_are_good(ckpt, tiny_data, indexed, tmp_path, capsys):
    """--overwrite with an input that turns out bad (a file with no usable row, an index without
    the ANN asked for) is one line, and the results it would have replaced are still there."""
    out = tmp_path / "results"
    evaluate.main([ckpt, "--out_dir", str(out)])
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    capsys.readouterr()
    unusable = write_csv(tmp_path / "bad.csv", [[1, 1, 2, "Why?", "How?", "maybe"]] * 3)
    assert "none of its 3 rows is usable" in fails(evaluate.main, [ckpt, "--csv", unusable, "--out_dir", str(out),
                                                                   "--overwrite"], capsys)
    assert "has no ANN index" in fails(search.main, [indexed, "--eval", tiny_data, "--ann", "--out_dir", str(out),
                                                     "--overwrite"], capsys)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def test_a_results_folder_another_run_holds_is_refused(ckpt, tiny_data, tiny_bert_dir, indexed, tmp_path, capsys):
    """evaluate.py, baseline_cosine.py and search.py --eval / --speed hold their --out_dir for the
    run (data.FolderLock): a second run into it stops with the holder's pid instead of mixing its
    scores and plots into the first one's, and nothing in the folder is touched."""
    out = tmp_path / "results"
    evaluate.main([ckpt, "--out_dir", str(out)])
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    capsys.readouterr()
    runs = [(evaluate.main, [ckpt, "--out_dir", str(out), "--overwrite"]),
            (baseline_cosine.main, ["--data_dir", tiny_data, "--encoder", tiny_bert_dir, "--out_dir", str(out),
                                    "--overwrite"]),
            (search.main, [indexed, "--eval", tiny_data, "--out_dir", str(out), "--overwrite"]),
            (search.main, [indexed, "--speed", "--out_dir", str(out), "--overwrite"])]
    with data.FolderLock(str(out)):
        for entry, argv in runs:
            assert "in use by another run" in fails(entry, argv, capsys), entry.__module__
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    evaluate.main([ckpt, "--out_dir", str(out)])  # released: it goes on, and gives the lock back
    assert not os.path.exists(f"{out}.lock")


# ----------------------------------------------------------------------------- 2. one index run per folder

def test_index_into_a_folder_another_run_holds_is_refused(tmp_path, tiny_bert_dir, capsys):
    questions = tmp_path / "q.txt"
    questions.write_text("How do I learn chess?\nWhy is coffee so popular?\n")
    out = tmp_path / "idx"
    with data.FolderLock(str(out)):  # another index.py into the same folder, mid-run
        line = fails(index.main, ["--encoder", tiny_bert_dir, str(questions), "--out_dir", str(out)], capsys)
    assert "in use by another run" in line and not out.exists()
    index.main(["--encoder", tiny_bert_dir, str(questions), "--out_dir", str(out)])  # released: it goes on
    assert (out / "manifest.json").exists() and not os.path.exists(f"{out}.lock")


# ----------------------------------------------------------------------------- 3. output places, before any work

def test_unwritable_outputs_are_one_line_before_any_work(ckpt, tiny_data, tiny_bert_dir, pairs_csv, indexed, tmp_path,
                                                         monkeypatch, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    ro = tmp_path / "read_only"
    ro.mkdir()
    unwritable(monkeypatch, ro)
    monkeypatch.setattr(distill, "mine_pairs", lambda *a, **k: pytest.fail("mined before checking --out"))
    no_scoring(monkeypatch)
    queries = tmp_path / "q.txt"
    queries.write_text("How do I learn chess?\n")
    cases = [
        (predict.main, [ckpt, "--csv", pairs_csv, "--out", str(ro / "p.csv")], "not writable"),
        (teach.main, ["--data_dir", tiny_data, "--teacher", ckpt, "--out", str(a_file / "t.npz")], "is a file"),
        (teach.main, ["--data_dir", tiny_data, "--teacher", ckpt, "--out", str(ro / "t.npz")], "not writable"),
        (evaluate.main, [ckpt, "--out_dir", str(a_file)], "is a file"),
        (evaluate.main, [ckpt, "--out_dir", str(ro / "e")], "not writable"),
        (baseline_cosine.main, ["--data_dir", tiny_data, "--encoder", tiny_bert_dir, "--out_dir", str(a_file)],
         "is a file"),
        (index.main, [ckpt, tiny_data, "--out_dir", str(a_file / "idx")], "is a file"),
        (index.main, [ckpt, tiny_data, "--out_dir", str(ro / "idx")], "not writable"),
        (search.main, [indexed, "--queries", str(queries), "--out", str(ro / "m.csv")], "not writable"),
        (search.main, [indexed, "--eval", tiny_data, "--out_dir", str(a_file)], "is a file"),
        (search.main, [indexed, "--speed", "--out_dir", str(ro / "s")], "not writable"),
        (bench.main, ["--stages", "data", "--out", str(ro / "bench.json")], "not writable"),
        (synth_qqp.main, [pairs_csv, str(ro / "s.csv")], "not writable"),
        (synth_qqp.main, [pairs_csv, str(a_file), "--rows", "10"], "exists. Fix: pass --overwrite"),
    ]
    for entry, argv, message in cases:
        assert message in fails(entry, argv, capsys), (entry.__module__, argv)
    assert a_file.read_text() == "mine" and os.listdir(ro) == []


def test_a_full_disk_leaves_no_temp_file(ckpt, tiny_data, pairs_csv, indexed, tmp_path, monkeypatch, capsys):
    out = tmp_path / "outs"
    out.mkdir()
    disk_full_after_header(monkeypatch)
    assert "cannot write" in fails_after_work(predict.main, [ckpt, "--csv", pairs_csv, "--out", str(out / "p.csv")],
                                              capsys)
    queries = tmp_path / "q.txt"
    queries.write_text("How do I learn chess?\nWhy is coffee so popular?\n")
    assert "cannot write" in fails_after_work(search.main, [indexed, "--queries", str(queries), "--out",
                                                            str(out / "m.csv"), "--k", "2"], capsys)

    def savez(path, **arrays):
        with open(path, "wb") as f:
            f.write(b"PK")
        raise OSError(errno.ENOSPC, "No space left on device", path)
    monkeypatch.setattr(distill.np, "savez", savez)
    assert "cannot write" in fails_after_work(teach.main, ["--data_dir", tiny_data, "--teacher", ckpt, "--mine", "0",
                                                           "--out", str(out / "t.npz")], capsys)

    def save(path, arr):
        raise OSError(errno.ENOSPC, "No space left on device", path)
    monkeypatch.setattr(data.np, "save", save)
    assert "cannot write" in fails_after_work(index.main, [ckpt, str(queries), "--out_dir", str(out / "idx")], capsys)
    assert os.listdir(out) == []  # nor a temp folder, nor the lock


# ----------------------------------------------------------------------------- 4. --max_len the encoder can take

def test_index_max_len_over_the_encoder_positions_is_refused_before_embedding(tmp_path, tiny_bert_dir, capsys):
    questions = tmp_path / "q.txt"
    questions.write_text("How do I learn chess?\n" + "why " * 700 + "?\n")  # 700 tokens: past 512 positions
    line = fails(index.main, ["--encoder", tiny_bert_dir, str(questions), "--out_dir", str(tmp_path / "idx"),
                              "--max_len", "100000"], capsys)
    assert "--max_len 100000: over the 512 tokens" in line and "--max_len 512 or less" in line
    assert not (tmp_path / "idx").exists()


# ----------------------------------------------------------------------------- 6. rejects files of one run

def test_rejects_files_always_belong_to_the_run_beside_them(ckpt, indexed, tmp_path, capsys):
    rows = synthetic_rows(20)
    with_bad = write_csv(tmp_path / "bad.csv", rows + [[99, 1, 2, "", "Why?", 0]])
    clean = write_csv(tmp_path / "clean.csv", rows)
    out = str(tmp_path / "preds.csv")
    predict.main([ckpt, "--csv", with_bad, "--out", out])
    assert os.path.exists(out + ".rejects.tsv")
    os.remove(out)  # the predictions gone, the rejects left: not silently replaced either
    capsys.readouterr()
    assert "rejects.tsv exists" in fails(predict.main, [ckpt, "--csv", clean, "--out", out], capsys)
    predict.main([ckpt, "--csv", clean, "--out", out, "--overwrite"])
    assert os.path.exists(out) and not os.path.exists(out + ".rejects.tsv")

    bad_q = write_csv(tmp_path / "bad_q.csv", [["How do I learn chess?", "x"], ["", "y"]], header=("question", "note"))
    clean_q = write_csv(tmp_path / "clean_q.csv", [["How do I learn chess?", "x"]], header=("question", "note"))
    answers = str(tmp_path / "answers.csv")
    search.main([indexed, "--queries", bad_q, "--out", answers, "--k", "2"])
    assert os.path.exists(answers + ".rejects.tsv")
    search.main([indexed, "--queries", clean_q, "--out", answers, "--k", "2", "--overwrite"])
    assert os.path.exists(answers) and not os.path.exists(answers + ".rejects.tsv")


# ----------------------------------------------------------------------------- 7. questions the vocabulary cannot read

def test_unreadable_pairs_and_queries_are_named(ckpt, indexed, tmp_path, capsys):
    predict.main([ckpt, EMOJI, "How do I learn chess?"])
    captured = capsys.readouterr()
    assert 0 <= float(captured.out) <= 1 and len(captured.out.splitlines()) == 1  # stdout: the number only
    assert "cannot read" in captured.err and "means nothing" in captured.err

    rows = synthetic_rows(20) + [[98, 901, 902, EMOJI, "How do I learn chess?", 0], [99, 903, 904, "Why?", "😀", 1]]
    path = write_csv(tmp_path / "emoji.csv", rows)
    predict.main([ckpt, "--csv", path, "--out", str(tmp_path / "p.csv")])
    assert "2 of 22 pairs" in capsys.readouterr().err
    evaluate.main([ckpt, "--csv", path])
    assert "2 of 22 pairs" in capsys.readouterr().err
    assert read_results(csv_results_dir(tmp_path / "run", "emoji"))["pairs_unreadable"] == 2

    search.main([indexed, EMOJI, "--k", "2"])
    captured = capsys.readouterr()
    assert "nothing but [UNK]" in captured.err and captured.out.startswith(f"query: {EMOJI}")


# ----------------------------------------------------------------------------- 8. teach.py checks before it mines

def test_teach_checks_teachers_and_encoder_before_mining(ckpt, tiny_data, other_data, tiny_bert_dir, tmp_path,
                                                         monkeypatch, capsys):
    from transformers import AutoTokenizer
    other_vocab = str(tmp_path / "other_vocab")
    shutil.copytree(tiny_bert_dir, other_vocab)
    tok = AutoTokenizer.from_pretrained(other_vocab)
    tok.add_tokens(["qqpnotaword"])
    tok.save_pretrained(other_vocab)
    monkeypatch.setattr(distill, "mine_pairs", lambda *a, **k: pytest.fail("mined before checking the inputs"))
    no_scoring(monkeypatch)
    out = str(tmp_path / "t.npz")
    line = fails(teach.main, ["--data_dir", other_data, "--teacher", ckpt, "--out", out, "--encoder", tiny_bert_dir,
                              "--mine", "10"], capsys)
    assert "may have seen this folder's validation" in line  # a teacher of another folder
    line = fails(teach.main, ["--data_dir", tiny_data, "--teacher", ckpt, "--teacher", str(tmp_path / "nope.pt"),
                              "--out", out, "--mine", "10"], capsys)
    assert "no such checkpoint" in line  # the second teacher, before the first one's work
    line = fails(teach.main, ["--data_dir", tiny_data, "--teacher", ckpt, "--out", out, "--encoder", other_vocab,
                              "--mine", "10"], capsys)
    assert "vocabulary differs" in line
    assert not os.path.exists(out)
