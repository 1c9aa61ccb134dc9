"""serve.py and service.py on a tiny random siamese checkpoint: the API through FastAPI's in-process
test client (answers, the one scoring road, dynamic batching, every bad input and the answer it
must get), then real server processes: kill -9 in the middle of writes, two servers on one
database, index.py --fold, refusals at start, and the web page in a real headless browser."""
import importlib.util
import json
import os
import sys
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import pytest
from conftest import ROOT, synthetic_rows, write_csv
from test_evaluate import make_checkpoint, run_bad

import engine
import index
import predict
import retrieval
import serve
import service
from measure import ServerProcess

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A data folder of 300 synthetic pairs, a tiny untrained siamese checkpoint, its index (+ ANN)."""
    import preprocess
    tmp = tmp_path_factory.mktemp("serve")
    data = str(tmp / "prep")
    preprocess.main([write_csv(tmp / "pairs.csv", synthetic_rows(300)), "--out_dir", data, "--max_len", "32"])
    ckpt = make_checkpoint(tmp / "run" / "ckpt.pt", data)
    index.main([ckpt, data, "--out_dir", str(tmp / "index"), "--ann"])
    return {"tmp": tmp, "data": data, "ckpt": ckpt, "index": str(tmp / "index")}


@pytest.fixture
def fresh_index(built, tmp_path):
    """A copy of the index with no added questions: each test's writes are its own."""
    path = str(tmp_path / "index")
    shutil.copytree(built["index"], path)
    return path


def make_client(index_dir, **flags):
    app, _ = serve.build(serve.ServeConfig(index=index_dir, **{"token": TOKEN, **flags}))
    return TestClient(app)


@pytest.fixture
def client(fresh_index):
    with make_client(fresh_index) as c:
        yield c


def index_questions(path):
    return retrieval.Index(path).questions


# ----------------------------------------------------------------------------- answers

def test_search_finds_a_planted_duplicate_first_with_its_probability(client, built):
    ids, texts = index_questions(built["index"])
    for i in (3, 50, 120):
        planted = "  ".join(texts[i].upper().split())  # the same tokens for the uncased vocabulary
        r = client.post("/search", json={"question": planted, "k": 3})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert len(results) == 3 and results[0]["id"] == ids[i] and results[0]["question"] == texts[i]
        assert results[0]["cosine"] > 0.999
        assert all(0 <= hit["probability"] <= 1 for hit in results)
        assert [h["cosine"] for h in results] == sorted((h["cosine"] for h in results), reverse=True)


def test_rerank_orders_by_probability(client, built):
    texts = index_questions(built["index"])[1]
    results = client.post("/search", json={"question": texts[9], "k": 5, "rerank": True}).json()["results"]
    probs = [h["probability"] for h in results]
    assert len(results) == 5 and probs == sorted(probs, reverse=True)


def test_exact_and_ann_servers_agree_on_the_top_answer(fresh_index, built):
    texts = index_questions(built["index"])[1]
    with make_client(fresh_index) as exact, make_client(fresh_index, ann=True) as ann:
        for i in (1, 77):
            a = exact.post("/search", json={"question": texts[i], "k": 1}).json()["results"]
            b = ann.post("/search", json={"question": texts[i], "k": 1}).json()["results"]
            assert a[0]["id"] == b[0]["id"]
        assert "ANN" in ann.get("/stats").json()["search"]


def test_score_is_predict_py_probability_on_the_one_road(client, built, tmp_path, capsys):
    """/score embeds each question once and applies the classifier head to the pooled vectors; the
    probabilities must equal predict.py's (the pair batches of training) to float precision."""
    texts = index_questions(built["index"])[1]
    pairs = [[texts[i], texts[j]] for i, j in ((0, 1), (5, 40), (7, 7), (100, 3))]
    r = client.post("/score", json={"pairs": pairs})
    assert r.status_code == 200, r.text
    body = r.json()
    got = np.array([x["probability"] for x in body["results"]])
    csv_path = write_csv(tmp_path / "pairs.csv", pairs, header=("question1", "question2"))
    out = str(tmp_path / "preds.csv")
    predict.main([built["ckpt"], "--csv", csv_path, "--out", out])
    with open(out) as f:
        expected = np.array([float(line.split(",")[1]) for line in f.readlines()[1:]])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert body["threshold"] == 0.5 and "argmax" in body["threshold_source"]
    assert [x["duplicate"] for x in body["results"]] == [bool(p >= 0.5) for p in got]


def test_score_decides_at_the_validation_tuned_threshold(fresh_index, built, tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"score": "probability", "checkpoint": os.path.abspath(built["ckpt"]),
                                   "thresholds": {"best_f1": {"value": 0.4242, "chosen_on": "validation"}}}))
    with make_client(fresh_index, threshold_from=str(results)) as c:
        body = c.post("/score", json={"pairs": [["a question", "another question"]]}).json()
        assert body["threshold"] == 0.4242 and "validation" in body["threshold_source"]
        assert body["results"][0]["duplicate"] == (body["results"][0]["probability"] >= 0.4242)


def test_added_questions_are_found_at_once_and_retries_are_harmless(client):
    question = "Where can I adopt a purple giraffe in the city?"
    r = client.post("/questions", json={"id": "new-1", "question": question}, headers=AUTH)
    assert r.status_code == 200 and r.json()["added"] == 1, r.text
    hit = client.post("/search", json={"question": question, "k": 1}).json()["results"][0]
    assert hit["id"] == "new-1" and hit["question"] == question and hit["cosine"] > 0.999
    again = client.post("/questions", json={"id": "new-1", "question": question}, headers=AUTH).json()
    assert again["added"] == 0 and again["existing"] == 1  # a client's retry after a lost reply
    many = client.post("/questions", json={"questions": [{"question": "Why do cats purr?"},
                                                         {"id": 42000, "question": "Is tea better than coffee?"}]},
                       headers=AUTH).json()
    assert many["added"] == 2 and many["questions"][1]["id"] == "42000"
    assert many["questions"][0]["id"].startswith("u-")
    stats = client.get("/stats").json()
    assert stats["questions"]["added"] == 3 and stats["questions"]["total"] == stats["questions"]["index"] + 3


def test_an_id_taken_by_another_question_is_a_conflict_and_nothing_is_written(client, built):
    ids, texts = index_questions(built["index"])
    r = client.post("/questions", json={"questions": [{"id": "fresh", "question": "A new one?"},
                                                      {"id": ids[0], "question": "Not " + texts[0]}]}, headers=AUTH)
    assert r.status_code == 409 and r.json()["field"] == "id" and ids[0] in r.json()["error"]
    assert client.get("/stats").json()["questions"]["added"] == 0  # the whole request was refused
    same = client.post("/questions", json={"id": ids[0], "question": texts[0]}, headers=AUTH).json()
    assert same["existing"] == 1  # the index's own question under its own id: already there


def test_additions_batched_together_commit_together_and_a_conflict_fails_alone(fresh_index, built):
    """8 posts at once share one batch and one transaction (group commit); the one whose id is
    taken is refused alone (its savepoint rolled back), the other 7 are written and found."""
    ids, texts = index_questions(built["index"])
    posts = [{"id": f"g{i}", "question": f"Group commit question {i} about giraffes?"} for i in range(8)]
    posts[5] = {"id": ids[0], "question": "Not the question that id names?"}
    with make_client(fresh_index, max_wait_ms=100.0) as c:
        before = c.get("/stats").json()["batching"]["batches"]
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda body: c.post("/questions", json=body, headers=AUTH), posts))
        assert c.get("/stats").json()["batching"]["batches"] - before < 8
        assert [r.status_code for r in replies] == [200] * 5 + [409] + [200] * 2
        assert c.get("/stats").json()["questions"]["added"] == 7
        for body in posts[:5] + posts[6:]:
            hit = c.post("/search", json={"question": body["question"], "k": 1}).json()["results"][0]
            assert hit["id"] == body["id"]


def test_health_stats_docs_and_page(client):
    assert client.get("/healthz").json()["ok"] is True
    client.post("/search", json={"question": "How do I learn chess?", "k": 2})
    stats = client.get("/stats").json()
    assert stats["model"]["kind"] == "checkpoint" and stats["classifier"] is True
    assert stats["requests"]["/search"]["requests"] == 1 and stats["requests"]["/search"]["p95_ms"] > 0
    assert stats["uptime_s"] >= 0 and stats["batching"]["max_batch"] == 64
    assert stats["workers"] >= 1 and stats["threads_per_worker"] >= 1 and stats["batching"]["worker_busy_s"] > 0
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/search", "/score", "/questions", "/healthz", "/stats"} <= set(spec["paths"])
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "/search" in page.text


@pytest.mark.parametrize("workers", [1, 2])
def test_concurrent_requests_are_batched_and_answered_as_alone(fresh_index, built, workers):
    """32 searches at once: fewer encoder batches than requests, and each answer the same as the
    same search sent alone (batching, and batches on several workers, change nothing but the speed)."""
    texts = index_questions(built["index"])[1][:32]
    with make_client(fresh_index, max_wait_ms=50.0, workers=workers) as c:
        alone = [c.post("/search", json={"question": t, "k": 3}).json()["results"] for t in texts]
        before = c.get("/stats").json()["batching"]["batches"]
        with ThreadPoolExecutor(32) as pool:
            together = list(pool.map(lambda t: c.post("/search", json={"question": t, "k": 3}).json()["results"],
                                     texts))
        batches = c.get("/stats").json()["batching"]["batches"] - before
    assert batches < len(texts) / 2, batches
    for a, b in zip(alone, together):
        assert [h["id"] for h in a] == [h["id"] for h in b]
        np.testing.assert_allclose([h["cosine"] for h in a], [h["cosine"] for h in b], atol=1e-5)
        np.testing.assert_allclose([h["probability"] for h in a], [h["probability"] for h in b], atol=1e-5)


def test_workers_run_batches_at_the_same_time_and_one_at_a_time_answer():
    """The Batcher gives each free worker the next batch (two batches in the encoder at once with
    two workers, never with one), while Service.work's answering part holds one lock."""
    import asyncio

    def concurrency(workers):
        state = {"now": 0, "most": 0}
        lock = threading.Lock()

        def work(jobs):  # stands in for Service.work: slow enough for batches to overlap
            with lock:
                state["now"] += 1
                state["most"] = max(state["most"], state["now"])
            time.sleep(0.05)
            with lock:
                state["now"] -= 1
            return [job.texts[0] for job in jobs]

        async def run():
            batcher = service.Batcher(work, max_batch=2, max_wait_ms=0, workers=workers)
            batcher.start()
            try:
                jobs = [service.Job("search", [f"q{i}"]) for i in range(8)]
                return await asyncio.gather(*(batcher.submit(job) for job in jobs))
            finally:
                await batcher.stop()
        answers = asyncio.run(run())
        assert answers == [f"q{i}" for i in range(8)]
        return state["most"]
    assert concurrency(1) == 1
    assert concurrency(2) == 2


def test_worker_count_auto_and_a_gpu_keeps_one():
    import torch
    import engine
    cpu = engine.Runtime(device=torch.device("cpu"))
    cores = torch.get_num_threads()
    assert serve.worker_threads(serve.ServeConfig(), cpu) == (min(2, cores), max(1, cores // min(2, cores)))
    assert serve.worker_threads(serve.ServeConfig(workers=3, threads=1), cpu) == (3, 1)
    gpu = engine.Runtime(device=torch.device("meta"))  # any device that is not the CPU
    assert serve.worker_threads(serve.ServeConfig(), gpu) == (1, 0)
    with pytest.raises(serve.UserError, match="--workers 2"):
        serve.worker_threads(serve.ServeConfig(workers=2), gpu)


def test_batching_off_runs_one_request_per_batch(fresh_index):
    with make_client(fresh_index, max_batch=1) as c:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: c.post("/search", json={"question": f"How do I learn chess {i}?"}), range(8)))
        assert c.get("/stats").json()["batching"]["mean_questions_per_batch"] == 1.0


# ----------------------------------------------------------------------------- bad requests

LONG = "x" * 1001
BAD_REQUESTS = [  # (path, body (json) or raw bytes, status, field)
    ("/search", b"{not json", 400, "body"),
    ("/search", b'{"question": "\xff\xfe?"}', 400, "body"),  # not UTF-8
    ("/search", b"", 422, "body"),
    ("/search", [1, 2], 422, "body"),
    ("/search", {}, 422, "question"),
    ("/search", {"question": ""}, 422, "question"),
    ("/search", {"question": "   \t "}, 422, "question"),
    ("/search", {"question": 7}, 422, "question"),
    ("/search", {"question": None}, 422, "question"),
    ("/search", {"question": LONG}, 422, "question"),
    ("/search", {"question": "ok?", "k": 0}, 422, "k"),
    ("/search", {"question": "ok?", "k": 101}, 422, "k"),
    ("/search", {"question": "ok?", "k": "5"}, 422, "k"),
    ("/search", {"question": "ok?", "k": 2.5}, 422, "k"),
    ("/search", {"question": "ok?", "rerank": "yes"}, 422, "rerank"),
    ("/search", {"question": "ok?", "kk": 3}, 422, "kk"),
    ("/score", {"pairs": []}, 422, "pairs"),
    ("/score", {"pairs": "a, b"}, 422, "pairs"),
    ("/score", {"pairs": [["only one"]]}, 422, "pairs.0"),
    ("/score", {"pairs": [["a", "b", "c"]]}, 422, "pairs.0"),
    ("/score", {"pairs": [["a", " "]]}, 422, "pairs"),
    ("/score", {"pairs": [["a", LONG]]}, 422, "pairs.0.1"),
    ("/score", {"pairs": [["a", "b"]] * 257}, 422, "pairs"),
]


@pytest.mark.parametrize("path,body,status,field", BAD_REQUESTS)
def test_bad_request_gets_its_status_and_a_one_line_error_naming_the_field(client, path, body, status, field):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = client.post(path, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["field"] == field and "\n" not in err["error"] and "Traceback" not in r.text


ADD_BAD = [  # (body, headers, status, field)
    ({"id": "a", "question": "q?"}, {}, 401, "authorization"),
    ({"id": "a", "question": "q?"}, {"Authorization": "Bearer wrong"}, 401, "authorization"),
    ({"id": "a", "question": "q?"}, {"Authorization": TOKEN}, 401, "authorization"),
    ({}, AUTH, 422, "questions"),
    ({"question": "q?", "questions": [{"question": "r?"}]}, AUTH, 422, "questions"),
    ({"questions": []}, AUTH, 422, "questions"),
    ({"questions": [{"question": "q?"}] * 257}, AUTH, 422, "questions"),
    ({"questions": [{"id": "q1", "question": "q?"}], "id": "zz"}, AUTH, 422, "questions"),  # id of neither form
    ({"questions": [{"id": "x", "question": "q?"}, {"id": "x", "question": "r?"}]}, AUTH, 422, "id"),
    ({"id": "   ", "question": "q?"}, AUTH, 422, "id"),
    ({"id": 1.5, "question": "q?"}, AUTH, 422, "id"),
    ({"id": "a", "question": " "}, AUTH, 422, "question"),
    ({"questions": [{"id": "a"}]}, AUTH, 422, "questions.0.question"),
    ({"questions": [{"id": "a", "question": "Why?"}, {"id": "b", "question": "\U0001f600\U0001f389"}]}, AUTH, 422,
     "question"),  # nothing but [UNK]: it would come up for every emoji query
]


@pytest.mark.parametrize("body,headers,status,field", ADD_BAD)
def test_bad_additions_are_refused_and_write_nothing(client, body, headers, status, field):
    r = client.post("/questions", json=body, headers=headers)
    assert r.status_code == status and r.json()["field"] == field, r.text
    assert "Traceback" not in r.text
    assert client.get("/stats").json()["questions"]["added"] == 0


def test_body_over_the_limit_is_413_with_or_without_a_length(fresh_index):
    with make_client(fresh_index, max_body_bytes=2048) as c:
        big = json.dumps({"question": "a" * 3000}).encode()
        r = c.post("/search", content=big)
        assert r.status_code == 413 and r.json()["field"] == "body"
        r = c.post("/search", content=iter([big[:1500], big[1500:]]))  # chunked: no Content-Length
        assert r.status_code == 413 and r.json()["field"] == "body"
        assert c.post("/search", json={"question": "fits?"}).status_code == 200


def test_without_a_token_adding_is_off_and_an_untuned_index_has_no_score(fresh_index, built, tmp_path):
    with make_client(fresh_index, token="") as c:
        r = c.post("/questions", json={"id": "a", "question": "q?"}, headers=AUTH)
        assert r.status_code == 403 and "--token" in r.json()["error"]


def test_unknown_paths_and_methods_are_one_line_json(client):
    assert client.get("/nope").json()["field"] == "path"
    r = client.get("/search")
    assert r.status_code == 405 and "\n" not in r.json()["error"]


def test_a_bug_is_a_one_line_500_without_a_traceback(client, monkeypatch):
    def broken(self, pooled, params):
        raise RuntimeError("boom")
    monkeypatch.setattr(service.Service, "search", broken)
    r = client.post("/search", json={"question": "anything?"})
    assert r.status_code == 500 and "RuntimeError" in r.json()["error"] and "Traceback" not in r.text
    assert client.get("/healthz").status_code == 200  # the server lives on


# ----------------------------------------------------------------------------- refusals at start

def test_refuses_a_port_in_use_before_loading_anything(fresh_index, capsys):
    import socket
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        err = run_bad(serve.main, [fresh_index, "--port", str(held.getsockname()[1])], capsys)
    assert "cannot listen there" in err and "--port" in err


def test_refuses_a_non_loopback_host_without_a_token(fresh_index, capsys, monkeypatch):
    monkeypatch.delenv(service.TOKEN_ENV, raising=False)
    err = run_bad(serve.main, [fresh_index, "--host", "0.0.0.0"], capsys)
    assert "0.0.0.0" in err and service.TOKEN_ENV in err


def test_refuses_an_index_of_another_model_than_the_checkpoint(built, fresh_index, tmp_path, capsys):
    other = make_checkpoint(tmp_path / "other" / "ckpt.pt", built["data"])
    import torch
    ckpt = torch.load(other, weights_only=True)
    next(iter(v for k, v in ckpt["model"].items() if k.endswith("weight"))).add_(0.01)
    torch.save(ckpt, other)
    err = run_bad(serve.main, [fresh_index, "--checkpoint", other], capsys)
    assert "fingerprint" in err and "Fix:" in err


def test_refuses_a_database_of_another_model(fresh_index, capsys):
    manifest = retrieval.Index(fresh_index).manifest
    store = retrieval.AddedQuestions(retrieval.added_path(fresh_index), {"fingerprint": "0123456789abcdef"},
                                     manifest["dim"])
    store.close()
    err = run_bad(serve.main, [fresh_index, "--token", TOKEN], capsys)
    assert "0123456789abcdef" in err and "--fold" in err


@pytest.mark.parametrize("flag,value", [("port", "70000"), ("max_batch", "0"), ("max_wait_ms", "-1"),
                                        ("max_k", "0"), ("max_body_bytes", "10"), ("workers", "-1")])
def test_flags_out_of_range_exit_2(fresh_index, flag, value, capsys):
    assert f"--{flag}" in run_bad(serve.main, [fresh_index, f"--{flag}", value], capsys)


# ----------------------------------------------------------------------------- server processes

class Server(ServerProcess):
    def __init__(self, index_dir, *flags):
        super().__init__(index_dir, *flags, token=TOKEN)

    def top(self, question):
        return self.post("/search", {"question": question, "k": 1}).json()["results"][0]


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_server_cleanly(fresh_index, signal_name):
    """SIGTERM (a service manager) or Ctrl-C is how a server ends: exit 0, one line, no error."""
    server = Server(fresh_index)
    server.stop(signal_name)
    with open(server.log_path) as f:
        log = f.read()
    assert server.proc.returncode == 0, log
    assert log.strip().splitlines()[-1] == f"stopped by {signal_name}" and "error" not in log and "Traceback" not in log


def crash_question(i):
    return f"Crash test question {i}: how many giraffes fit in room {i * 7}?"


def test_kill_9_in_the_middle_of_writes_loses_no_acknowledged_question(fresh_index):
    server = Server(fresh_index)
    acked, stop = [], threading.Event()

    def writer():
        for i in range(100_000):
            if stop.is_set():
                return
            try:
                r = server.post("/questions", {"id": f"k{i}", "question": crash_question(i)}, auth=True)
            except httpx.HTTPError:
                return  # the server died under us: this one was never acknowledged
            if r.status_code == 200:
                acked.append(i)
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        deadline = time.time() + 60
        while len(acked) < 40 and time.time() < deadline:
            time.sleep(0.02)
        server.proc.kill()  # SIGKILL: no shutdown, no cleanup, writes in flight
        server.proc.wait(30)
    finally:
        stop.set()
        thread.join(60)
        server.stop()
    assert len(acked) >= 40
    retrieval.Index(fresh_index)  # the folder still loads: the server never writes it
    again = Server(fresh_index)
    try:
        added = again.post("/questions", {"id": "after", "question": "Posted after the restart?"}, auth=True)
        assert added.status_code == 200
        missing = [i for i in acked if again.top(crash_question(i))["id"] != f"k{i}"]
        assert not missing, f"acknowledged but lost after kill -9: {missing[:10]}"
    finally:
        again.stop()


def test_two_servers_on_one_database_see_each_others_additions(fresh_index):
    a, b = Server(fresh_index), Server(fresh_index, "--ann")
    try:
        for server, other, qid in ((a, b, "via-a"), (b, a, "via-b")):
            question = f"Which server took question {qid} about purple giraffes?"
            assert server.post("/questions", {"id": qid, "question": question}, auth=True).status_code == 200
            assert other.top(question)["id"] == qid
    finally:
        a.stop()
        b.stop()


def test_fold_moves_additions_into_the_index_folder(fresh_index, capsys):
    with make_client(fresh_index) as c:
        r = c.post("/questions", json={"questions": [{"id": f"f{i}", "question": crash_question(i)}
                                                     for i in range(5)]}, headers=AUTH)
        assert r.json()["added"] == 5
    before = len(retrieval.Index(fresh_index))
    index.main(["--fold", "--out_dir", fresh_index])
    folded = retrieval.Index(fresh_index)
    assert len(folded) == before + 5 and folded.questions[0][-5:] == [f"f{i}" for i in range(5)]
    assert folded.manifest["sources"][-1]["kind"] == "serve.py additions"
    assert folded.manifest["ann"] is not None  # the ANN index covers the new rows too
    index.main(["--fold", "--out_dir", fresh_index])  # nothing left: a no-op
    assert len(retrieval.Index(fresh_index)) == before + 5
    with make_client(fresh_index) as c:
        stats = c.get("/stats").json()["questions"]
        assert stats["added"] == 0 and stats["index"] == before + 5
        assert c.post("/search", json={"question": crash_question(3), "k": 1}).json()["results"][0]["id"] == "f3"
    assert "folded 5" in capsys.readouterr().out


def test_fold_refuses_a_model_or_an_input(fresh_index, built, capsys):
    assert "--fold" in run_bad(index.main, ["--fold", "--out_dir", fresh_index, built["ckpt"]], capsys)


# ----------------------------------------------------------------------------- the page, in a browser

def chromium():
    for path in ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"):
        if os.path.exists(path):
            return path
    return None


@pytest.mark.skipif(chromium() is None, reason="no chromium here (Debian: apt-get install chromium)")
def test_page_in_a_real_browser_finds_a_duplicate_and_a_posted_question(fresh_index, built):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    ids, texts = index_questions(built["index"])
    server = Server(fresh_index)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(server.url + "/")
            first = page.locator("#results li .text").first
            page.locator("#question").press_sequentially(texts[21].upper(), delay=5)  # typed, key by key
            sync_api.expect(first).to_have_text(texts[21], timeout=15_000)
            assert "p(duplicate)" in page.locator("#results li .score").first.inner_text()

            new = "Where could a purple giraffe find a good dentist?"
            page.locator("#question").fill("")
            page.locator("#question").press_sequentially(new, delay=5)
            page.once("dialog", lambda dialog: dialog.accept(TOKEN))  # the page asks for the token
            page.locator("#post").click()
            sync_api.expect(page.locator("#posted")).to_contain_text("posted as #", timeout=15_000)
            page.locator("#question").fill("")
            page.locator("#question").press_sequentially(new, delay=5)
            sync_api.expect(first).to_have_text(new, timeout=15_000)
            browser.close()
    finally:
        server.stop()


# ----------------------------------------------------------------------------- int8, and the bench stage

def test_onnx_encoder_answers_as_torch(fresh_index, built, capsys):
    """serve.py --runtime onnx: the encoder run by ONNX Runtime gives the same searches, cosines and
    probabilities as torch's (fp32, to 1e-5); auto picks it on a CPU unless a flag needs torch; it
    refuses what it cannot run."""
    if retrieval.onnx_missing():
        pytest.skip(f"{' and '.join(retrieval.onnx_missing())} not installed (pip install onnx onnxruntime)")
    texts = index_questions(built["index"])[1][:6]
    pairs = [[texts[0], texts[1]], [texts[2], "How do I bake bread at home?"]]
    answers = {}
    for runtime in ("torch", "onnx"):
        with make_client(fresh_index, runtime=runtime) as c:
            assert c.get("/stats").json()["runtime"] == runtime
            answers[runtime] = ([c.post("/search", json={"question": t, "k": 5}).json()["results"] for t in texts],
                                c.post("/score", json={"pairs": pairs}).json()["results"])
    for a, b in zip(answers["torch"][0], answers["onnx"][0]):
        assert [h["id"] for h in a] == [h["id"] for h in b]
        np.testing.assert_allclose([h["cosine"] for h in a], [h["cosine"] for h in b], atol=1e-5)
        np.testing.assert_allclose([h["probability"] for h in a], [h["probability"] for h in b], atol=1e-5)
    np.testing.assert_allclose([r["probability"] for r in answers["torch"][1]],
                               [r["probability"] for r in answers["onnx"][1]], atol=1e-5)
    rt = engine.setup_runtime("cpu")
    auto = partial(serve.ServeConfig, index=fresh_index)
    assert serve.encoder_runtime(auto(), rt) == "onnx"
    assert serve.encoder_runtime(auto(int8=True), rt) == "torch"
    assert serve.encoder_runtime(auto(shapes="packed"), rt) == "torch"
    capsys.readouterr()
    for flags in (["--int8"], ["--shapes", "packed"], ["--precision", "bf16"]):
        err = run_bad(serve.main, [fresh_index, "--runtime", "onnx", *flags], capsys)
        assert "ONNX Runtime runs the encoder in fp32" in err and f"drop {flags[0]}" in err


def test_runtime_onnx_refusals_come_before_anything_loads(fresh_index, capsys, monkeypatch):
    """--runtime onnx on a GPU device, or without its packages, is one line before any load; auto
    picks onnx on a CPU exactly when both packages are there."""
    err = run_bad(serve.main, [fresh_index, "--runtime", "onnx", "--device", "cuda"], capsys)
    assert "--runtime onnx with --device cuda: it runs the encoder on the CPU" in err
    auto, cpu = serve.ServeConfig(index=fresh_index), engine.setup_runtime("cpu")
    with monkeypatch.context() as m:
        m.setattr(retrieval, "onnx_missing", lambda: [])
        assert serve.encoder_runtime(auto, cpu) == "onnx"
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed: find_spec gives None
    err = run_bad(serve.main, [fresh_index, "--runtime", "onnx"], capsys)
    assert "--runtime onnx: onnxruntime not installed" in err and "pip install onnxruntime" in err
    assert serve.encoder_runtime(auto, cpu) == "torch"


@pytest.mark.parametrize("package", ["fastapi", "uvicorn"])
def test_serve_without_its_web_packages_is_one_line(fresh_index, capsys, monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)
    err = run_bad(serve.main, [fresh_index], capsys)
    assert f"serve.py: {package} not installed" in err and f"pip install {package}" in err


def test_encoder_batch_size_cuts_a_batch_into_calls_with_the_same_answers(fresh_index, built, monkeypatch):
    """--batch_size 2: a gathered batch is encoded two questions a call (sorted by length), and
    the answers are those of one call for all (padding changes nothing beyond float noise)."""
    from model import Encoder
    calls = []  # questions per encoder call
    own = Encoder.question_vectors
    monkeypatch.setattr(Encoder, "question_vectors", lambda self, batch: calls.append(len(batch["index"])) or
                        own(self, batch))
    texts = index_questions(built["index"])[1][:12]
    answers = []
    for batch_size in (2, 64):
        with make_client(fresh_index, runtime="torch", batch_size=batch_size) as c:
            assert c.get("/stats").json()["encoder_batch_size"] == batch_size
            calls.clear()
            answers.append(c.post("/score", json={"pairs": [[a, b] for a, b in zip(texts, texts[::-1])]}).json())
            assert max(calls) == 2 if batch_size == 2 else max(calls) > 2  # the 12 distinct questions
    np.testing.assert_allclose([r["probability"] for r in answers[0]["results"]],
                               [r["probability"] for r in answers[1]["results"]], atol=1e-5)


def test_int8_encoder_still_finds_the_planted_duplicate(fresh_index, built):
    ids, texts = index_questions(built["index"])
    with make_client(fresh_index, int8=True) as c:
        hit = c.post("/search", json={"question": texts[11].upper(), "k": 1}).json()["results"][0]
        assert hit["id"] == ids[11] and hit["cosine"] > 0.98  # int8 query vs the index's fp32 vector


def test_bench_serve_stage_runs_and_reports_its_rows(built, tmp_path):
    """bench.py --stages serve on the tiny index: every level, both fault checks, nothing lost, no
    error (speed on a tiny random model says nothing; the stage's code is what is checked)."""
    import bench
    out = tmp_path / "bench.json"
    bench.main(["--stages", "serve", "--serve_index", built["index"], "--serve_requests", "50", "--serve_writes",
                "60", "--out", str(out)])
    stage = json.loads(out.read_text())["stages"]["serve"]
    assert {"search_exact_batched_c32", "search_exact_unbatched_c32", "search_ann_batched_c1",
            "score_batched_c32", "search_exact_batched_int8_c32"} <= set(stage["levels"])
    assert all(level["errors"] == 0 for level in stage["levels"].values())
    writes, kill = stage["faults"]["writes_during_searches"], stage["faults"]["kill_9_during_writes"]
    assert writes["acknowledged"] == 60 and writes["lost"] == 0 and writes["searches_meanwhile"] > 0
    assert kill["acknowledged_before_kill"] >= 1 and kill["lost"] == 0
    rows = {r["measure"]: r for r in stage["rows"]}
    assert rows["errors (every level and fault check)"]["pass"] is True
    assert stage["int8_agreement"]["questions"] > 0
    assert {"search_exact_one_worker_batched_c32", "search_exact_one_worker_unbatched_c32"} <= set(stage["levels"])
    if not retrieval.onnx_missing():  # ONNX Runtime: the same vectors, so the same answers
        assert stage["runtime"] == "onnx"  # auto, on a CPU
        assert "search_exact_one_call_per_batch_c32" in stage["levels"]
        assert {"search_exact_batched_torch_c32", "search_exact_unbatched_torch_c32"} <= set(stage["levels"])
        assert [g["runtime"] for g in stage["encoder_batching_gain"]] == ["onnx", "torch"]
        gains = stage["encoder_batching_gain"]
        assert all(g["one_at_a_time_per_sec"] > 0 and g["batched_per_sec"] > 0 for g in gains)
        assert stage["onnx_agreement"]["cosine_fp32_vs_onnx_min"] > 0.99999
        assert stage["onnx_agreement"]["top10_overlap"] == 1.0


def test_a_database_that_is_not_one_refuses_to_start(fresh_index, capsys):
    with open(retrieval.added_path(fresh_index), "w") as f:
        f.write("these are not the rows you are looking for\n" * 100)
    err = run_bad(serve.main, [fresh_index], capsys)
    assert "not a database" in err and "Fix:" in err


def test_litserve_compare_refuses_bad_flags_in_one_line(tmp_path, capsys):
    """tools/litserve_compare.py (LitServe against serve.py): every flag checked before anything
    starts, one line each; without litserve installed, one line saying so."""
    spec = importlib.util.spec_from_file_location("litserve_compare", os.path.join(ROOT, "tools",
                                                                                   "litserve_compare.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for flags, says in ((["--workers", "0"], "--workers 0: out of range"),
                        (["--requests", "0"], "--requests 0: out of range"),
                        (["--concurrency", "8", "0"], "--concurrency 8 0: each level is at least 1 client")):
        assert says in run_bad(tool.main, [str(tmp_path), *flags], capsys)
    err = run_bad(tool.main, [str(tmp_path / "none")], capsys)
    assert ("litserve is not installed" if tool.ls is None else "no such index folder") in err


def test_an_unreadable_query_or_pair_is_answered_with_a_warning(client):
    """A question of nothing but [UNK] (emoji) is searched and scored as asked, and the reply says
    that the answers mean nothing; a readable one has no warning."""
    emoji = "\U0001f600\U0001f389"
    r = client.post("/search", json={"question": emoji, "k": 2}).json()
    assert r["results"] and "nothing the model's vocabulary reads" in r["warning"]
    assert "warning" not in client.post("/search", json={"question": "How do I learn Python?"}).json()
    r = client.post("/score", json={"pairs": [["Why?", emoji]]}).json()
    assert len(r["results"]) == 1 and r["warning"].startswith("1 question(s)")
