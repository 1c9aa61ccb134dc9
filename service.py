"""The duplicate-question service behind serve.py: one long-running process that holds the model
and the index, and answers while someone types.

- LiveIndex: the index folder (memory-mapped, read-only: a kill -9 cannot damage it) plus the
  questions added since (retrieval.AddedQuestions, SQLite beside the folder), searched as one
  corpus. Before each batch it reads the rows other server processes committed.
- Batcher: requests that arrive together go through the encoder in one call (dynamic batching):
  when a worker is free, everything already queued joins the next batch, then it waits up to
  max_wait_ms for more, up to max_batch questions. The encoder call is the project's one
  inference road (retrieval.embed_texts -> engine.Inference: the batch layout and compiled step
  of training on CUDA). Model, search and database work run in worker threads (on a CPU two,
  each encoding its own batch; searches and commits one at a time), so the event loop only
  parses requests and writes replies: it never waits on the encoder, a search or a commit.
- Service.work: one batch of jobs (search, score, add) -> their answers.
- make_app: the FastAPI app: POST /search, /score, /questions; GET /healthz, /stats, /docs (the
  OpenAPI page) and the web page at /. Every error is a one-line JSON {"error", "field"} with a 4xx
  status; a bug is a 500 with a one-line error (its traceback goes to the server's log, never to
  the client).
"""
import asyncio
import hmac
import json
import os
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Union

import numpy as np
import torch

import retrieval
from cli import UserError

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web", "index.html")
TOKEN_ENV = "QQP_SERVE_TOKEN"
PACKAGES = ("fastapi", "uvicorn")  # the web framework and the server (imported where used)


# ----------------------------------------------------------------------------- the corpus

class LiveIndex:
    """The index folder and the added questions as one corpus: rows 0..N-1 are the folder's, N..
    the added ones in commit order. ann: search the folder's faiss index (the added rows, few until
    index.py --fold, are always searched exactly)."""

    def __init__(self, index, device, ann=False, nprobe=0):
        self.index, self.base_n, self.device = index, len(index), device
        self.ids, self.texts = (list(x) for x in index.questions)
        self.row_of = {qid: row for row, qid in enumerate(self.ids)}
        self.ann = index.ann if ann else None
        self.nprobe = nprobe or (index.manifest["ann"]["nprobe"] if ann else 0)
        self.matrix = None if ann else index.matrix(device)  # (N, H) unit rows
        dim = index.manifest["dim"]
        self.added = torch.zeros(0, dim, dtype=torch.float32, device=device)  # (capacity, H) unit rows
        self.added_norms = np.zeros(0, np.float32)
        self.n_added, self.last_seq = 0, 0

    def __len__(self):
        return self.base_n + self.n_added

    def known(self, qid):
        """The text of question qid, or None."""
        row = self.row_of.get(qid)
        return None if row is None else self.texts[row]

    def sync(self, store):
        """Take in the rows committed to the store since the last look (ours and other processes').
        Rows already in the folder (folded by index.py, not yet deleted there) are skipped."""
        if not store.changed():
            return 0
        seqs, ids, texts, vectors, norms = store.rows(after=self.last_seq)
        if not seqs:
            return 0
        self.last_seq = seqs[-1]
        keep = [i for i, qid in enumerate(ids) if qid not in self.row_of]
        n = len(keep)
        if self.n_added + n > len(self.added):  # grow by doubling: appends stay O(1) on average
            capacity = max(1024, 2 * (self.n_added + n))
            grown = torch.zeros(capacity, self.added.shape[1], dtype=torch.float32, device=self.device)
            grown[:self.n_added] = self.added[:self.n_added]
            self.added, self.added_norms = grown, np.resize(self.added_norms, capacity)
        rows = slice(self.n_added, self.n_added + n)
        self.added[rows] = torch.from_numpy(np.asarray(vectors[keep], np.float32)).to(self.device)
        self.added_norms[rows] = norms[keep]
        for i in keep:
            self.row_of[ids[i]] = len(self.ids)
            self.ids.append(ids[i])
            self.texts.append(texts[i])
        self.n_added += n
        return n

    def search(self, queries, k):
        """Top-k rows of unit queries (Q, H) over the whole corpus: (Q, k) scores and rows (-1 and
        -inf where the corpus, or the ANN's probed lists, hold fewer)."""
        if self.ann is not None:
            scores, rows = retrieval.ann_search(self.ann, queries, k, self.nprobe)
            scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
        else:
            scores, rows = retrieval.exact_search(self.matrix, queries, min(k, self.base_n))
        if self.n_added:
            s, r = retrieval.exact_search(self.added[:self.n_added], queries, min(k, self.n_added))
            scores, rows = np.concatenate([scores, s], 1), np.concatenate([rows, r + self.base_n], 1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        scores, rows = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
        if rows.shape[1] < k:  # a corpus smaller than k
            pad = k - rows.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
        return scores, rows

    def rerank_vectors(self, rows):
        """(..., H) float32 unnormalized vectors of these rows (-1: any), as the classifier head
        takes them (retrieval.rerank)."""
        flat = rows.reshape(-1)
        out = self.index.rerank_vectors(np.where(flat < self.base_n, flat, 0))
        added = np.flatnonzero(flat >= self.base_n)
        if len(added):
            a = flat[added] - self.base_n
            out[added] = self.added[torch.from_numpy(a)].cpu().numpy() * self.added_norms[a][:, None]
        return out.reshape(*rows.shape, -1)


# ----------------------------------------------------------------------------- the work

@dataclass
class Job:
    kind: str               # "search", "score" or "add"
    texts: list             # the questions to embed: a query; q1s then q2s; the new questions
    params: dict = field(default_factory=dict)
    unreadable: list = field(default_factory=list)  # set by Service.work: its texts of nothing but [UNK]


class Service:
    """Everything a request needs, used only from the worker threads: the model (qe, through
    `inference`: read-only, so workers embed at once), the corpus, the store of added questions,
    the decision threshold (the corpus and the store: one worker at a time, under `lock`)."""

    def __init__(self, qe, rt, inference, live, store, threshold, threshold_source, rerank_depth=50):
        self.qe, self.rt, self.inference, self.live, self.store = qe, rt, inference, live, store
        self.threshold, self.threshold_source, self.rerank_depth = threshold, threshold_source, rerank_depth
        self.batches, self.batched_questions, self.busy_s = 0, 0, 0.0  # busy: summed over the workers
        self.lock = threading.Lock()

    def warm_up(self):
        """Before the first request, not counted in /stats: one batch of each kind, then a full
        one (on CUDA each batch shape is compiled and recorded the first time it is seen)."""
        jobs = [Job("search", ["How do I learn Python?"], {"k": 1, "rerank": False})]
        if self.qe.classifier is not None:
            jobs.append(Job("score", ["How do I learn Python?", "What is the best way to learn Python?"]))
        self.work(jobs)
        texts = self.live.texts[:self.inference.batch_size]
        self.work([Job("search", [t], {"k": 1, "rerank": False}) for t in texts])
        self.batches, self.batched_questions, self.busy_s = 0, 0, 0.0

    def work(self, jobs):
        """One batch: every job's questions embedded in one encoder call (any worker thread, several
        at once), then each job answered (one thread at a time: the corpus and the store are
        shared). Returns one answer or UserError per job."""
        t0 = time.perf_counter()
        texts = [t for job in jobs for t in job.texts]
        pooled, bad = retrieval.embed_and_check(self.qe, self.inference, texts, verbose=False)  # (T, H), (T,)
        start = 0
        for job in jobs:  # what each request's reply warns about, found where the texts are tokenized anyway
            job.unreadable = [t for t, b in zip(job.texts, bad[start:start + len(job.texts)]) if b]
            start += len(job.texts)
        with self.lock:
            answers = self.answer(jobs, pooled)
            self.batches, self.batched_questions = self.batches + 1, self.batched_questions + len(texts)
            self.busy_s += time.perf_counter() - t0
        return answers

    def answer(self, jobs, pooled):
        """The jobs of one batch answered from their questions' vectors pooled (T, H)."""
        self.live.sync(self.store)
        starts = np.cumsum([0] + [len(job.texts) for job in jobs])
        answers = [None] * len(jobs)
        searches = [i for i, job in enumerate(jobs) if job.kind == "search"]
        if searches:  # the batch's queries searched together: one matmul over the corpus
            found = self.search([pooled[starts[i]] for i in searches], [jobs[i].params for i in searches])
            for i, answer in zip(searches, found):
                answers[i] = answer
        adds = [i for i, job in enumerate(jobs) if job.kind == "add"]
        if adds:  # the batch's additions committed together: one transaction, one fsync
            added = self.add([jobs[i] for i in adds], [pooled[starts[i]:starts[i + 1]] for i in adds])
            for i, answer in zip(adds, added):
                answers[i] = answer
        for i, job in enumerate(jobs):
            if job.kind == "score":
                answers[i] = self.score(job, pooled[starts[i]:starts[i + 1]])
        return answers

    def search(self, pooled, params):
        """Each query's top k (params: k, rerank) with cosine and, where the model has a
        classifier, the duplicate probability; rerank orders the top rerank_depth by it."""
        pooled = np.stack(pooled)  # (Q, H)
        unit = retrieval.unit(pooled)[0]
        depth = max(max(p["k"], self.rerank_depth) if p["rerank"] else p["k"] for p in params)
        scores, rows = self.live.search(unit, min(depth, len(self.live)))
        probs = None
        if self.qe.classifier is not None:  # the top k of every query scored in one head call
            k = max(p["k"] for p in params)
            probs = retrieval.duplicate_probability(self.qe.classifier, pooled, self.live.rerank_vectors(rows[:, :k]),
                                                    self.rt)  # (Q, k)
        answers = []
        for q, p in enumerate(params):
            s, r, prob = scores[q:q + 1], rows[q:q + 1], None if probs is None else probs[q:q + 1]
            if p["rerank"]:  # the top max(k, rerank_depth) reordered by the classifier
                d = max(p["k"], self.rerank_depth)
                s, r, prob = retrieval.rerank(self.qe.classifier, pooled[q:q + 1], self.live, s[:, :d], r[:, :d],
                                              self.rt)
            answers.append([{"id": self.live.ids[row], "question": self.live.texts[row], "cosine": round(float(c), 6),
                             **({"probability": round(float(prob[0, j]), 6)} if prob is not None else {})}
                            for j, (c, row) in enumerate(zip(s[0, :p["k"]], r[0, :p["k"]])) if row >= 0])
        return answers

    def score(self, job, pooled):
        """Duplicate probability of each pair (texts: q1s then q2s) and the decision at the threshold."""
        n = len(job.texts) // 2
        probs = retrieval.duplicate_probability(self.qe.classifier, pooled[:n], pooled[n:, None], self.rt)[:, 0]
        return [{"probability": round(float(p), 6), "duplicate": bool(p >= self.threshold)} for p in probs]

    def add(self, jobs, pooled):
        """Commit the new questions of these requests (durable before any reply), then take them
        into the corpus: per request its ids' statuses, or its retrieval.IdTaken."""
        requests = [(job.params["ids"], job.texts, *retrieval.unit(p)) for job, p in zip(jobs, pooled)]
        results = self.store.add(requests, self.live.known)
        self.live.sync(self.store)
        return [r if isinstance(r, UserError) else [{"id": qid, "status": s} for qid, s in zip(job.params["ids"], r)]
                for job, r in zip(jobs, results)]


class Batcher:
    """Dynamic batching: jobs queued on the event loop, run as batches by Service.work on
    `workers` threads. A batch forms when a worker is free: every job queued by then joins it (up
    to max_batch questions), then it waits up to max_wait_ms for more. max_batch 1 turns batching
    off (each request alone, on whichever worker is free)."""

    def __init__(self, work, max_batch, max_wait_ms, workers=1):
        self.work, self.max_batch, self.max_wait = work, max_batch, max_wait_ms / 1000
        # One single-thread executor per worker: a worker's thread is fixed (torch's thread count
        # and, on CUDA, recorded graphs are per thread), and run_on_each reaches every one.
        self.executors = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model{i}") for i in range(workers)]
        self.queue, self.idle, self.task, self.running = None, None, None, set()

    def run_on_each(self, fn):
        """fn() on every worker's thread, one after another, waited for: the warm-up (each thread's
        lazy initialization), torch's thread count."""
        return [executor.submit(fn).result() for executor in self.executors]

    def start(self):
        self.queue, self.idle = asyncio.Queue(), asyncio.Queue()
        for executor in self.executors:
            self.idle.put_nowait(executor)
        self.task = asyncio.get_running_loop().create_task(self.loop())

    async def stop(self):
        if self.task is not None:
            self.task.cancel()
        for executor in self.executors:
            executor.shutdown(wait=True)  # the batch in flight (a commit, perhaps) finishes

    async def submit(self, job):
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((job, future))
        answer = await future
        if isinstance(answer, UserError):
            raise answer
        return answer

    async def loop(self):
        while True:
            executor = await self.idle.get()  # a free worker first: meanwhile, requests queue up
            batch = await self.gather()
            task = asyncio.get_running_loop().create_task(self.run(executor, batch))
            self.running.add(task)  # a reference kept until it is done (the loop holds only weak ones)
            task.add_done_callback(self.running.discard)

    async def gather(self):
        """The next batch: the first queued job, everything queued behind it, then what arrives
        within max_wait_ms, up to max_batch questions."""
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        size = len(batch[0][0].texts)
        deadline = loop.time() + self.max_wait
        while size < self.max_batch:
            if self.queue.empty():  # wait a little for more, but never past the deadline
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            else:
                batch.append(self.queue.get_nowait())
            size += len(batch[-1][0].texts)
        return batch

    async def run(self, executor, batch):
        try:
            answers = await asyncio.get_running_loop().run_in_executor(executor, self.work, [job for job, _ in batch])
        except Exception as e:  # a bug, or e.g. NaN outputs: every request of the batch is told
            if not isinstance(e, UserError):
                traceback.print_exc(file=sys.stderr)
            answers = [e] * len(batch)
        finally:
            self.idle.put_nowait(executor)
        for (_, future), answer in zip(batch, answers):
            if not future.done():  # its client may have gone
                if isinstance(answer, Exception) and not isinstance(answer, UserError):
                    future.set_exception(answer)
                else:
                    future.set_result(answer)


# ----------------------------------------------------------------------------- the app

@dataclass
class Limits:
    max_body_bytes: int = 1_048_576   # a request body
    max_questions: int = 256          # questions per POST /questions, pairs per POST /score
    max_question_chars: int = 1_000   # characters of one question (Quora's limit is about 300 words)
    max_k: int = 100                  # answers per search


class ApiError(Exception):
    def __init__(self, status, field, message):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


class Stats:
    """Requests and latency per endpoint, over the last `window` requests of each."""

    def __init__(self, window=10_000):
        self.started = time.time()
        self.counts, self.errors, self.latency = {}, {}, {}
        self.window = window

    def record(self, path, status, seconds):
        self.counts[path] = self.counts.get(path, 0) + 1
        if status >= 400:
            self.errors[path] = self.errors.get(path, 0) + 1
        self.latency.setdefault(path, deque(maxlen=self.window)).append(seconds * 1000)

    def report(self):
        out = {}
        for path, n in sorted(self.counts.items()):
            ms = np.array(self.latency[path])
            out[path] = {"requests": n, "errors": self.errors.get(path, 0),
                         **{f"p{q}_ms": round(float(np.percentile(ms, q)), 2) for q in (50, 95, 99)}}
        return out


class Guard:
    """ASGI middleware around every request: the body read and refused over the size limit
    before any parsing (a chunked body has no length to check first), a bug answered with a
    one-line 500 (its traceback to the server's log, never to the client), and each request's
    status and latency counted for /stats."""

    def __init__(self, app, limits, stats):
        self.app, self.limit, self.stats = app, limits.max_body_bytes, stats

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]

        async def reply(code, field, message):
            body = json.dumps({"error": message, "field": field}).encode()
            await send({"type": "http.response.start", "status": code,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            status[0] = code

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await reply(413 if length.isdigit() else 400, "body",
                        f"body: {int(length):,} bytes, over the limit of {self.limit:,} (serve.py --max_body_bytes)"
                        if length.isdigit() else "Content-Length: not a number")
        else:
            chunks, size, more = [], 0, True
            while more and size <= self.limit:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                size, more = size + len(chunks[-1]), message.get("more_body", False)
            if size > self.limit:
                await reply(413, "body", f"body: over the limit of {self.limit:,} bytes (serve.py --max_body_bytes)")
            else:
                whole, replayed = b"".join(chunks), [False]

                async def replay():  # the body once, then whatever the client does next
                    if not replayed[0]:
                        replayed[0] = True
                        return {"type": "http.request", "body": whole, "more_body": False}
                    return await receive()
                # Every body is JSON, whatever Content-Type says (curl -d sends a form's type).
                headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                scope = {**scope, "headers": headers + [(b"content-type", b"application/json")]}
                try:
                    await self.app(scope, replay, send_counted)
                except Exception as exc:
                    traceback.print_exception(exc, file=sys.stderr)
                    if status[0] == 0:  # nothing sent yet: the client gets one line, not a dropped connection
                        await reply(500, "", f"internal error ({type(exc).__name__}); the server's log has "
                                             "the details")
        self.stats.record(scope["path"], status[0], time.perf_counter() - t0)


def make_app(service, batcher, limits, token="", about=None):
    """The FastAPI app over a Service: routes, request models with the limits, one-line errors."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

    stats = Stats()
    about = about or {}

    class Strict(BaseModel):
        # strict: "5" is not a number, 1 is not a string; forbid: a misspelt field is an error, not ignored
        model_config = ConfigDict(strict=True, extra="forbid")

    Text = Annotated[StrictStr, Field(min_length=1, max_length=limits.max_question_chars)]

    def not_blank(value):
        if not value.strip():
            raise ValueError("empty or only whitespace")
        return value.strip()

    class SearchRequest(Strict):
        question: Text = Field(description="the new question")
        k: StrictInt = Field(10, ge=1, le=limits.max_k, description="answers wanted")
        rerank: StrictBool = Field(False, description=f"order the top {service.rerank_depth} by the "
                                   "classifier's duplicate probability (a checkpoint's index only)")
        _blank = field_validator("question")(not_blank)

    class ScoreRequest(Strict):
        pairs: list[Annotated[list[Text], Field(min_length=2, max_length=2)]] = Field(
            min_length=1, max_length=limits.max_questions, description="[[question1, question2], ...]")

        @field_validator("pairs")
        @classmethod
        def _blank(cls, pairs):
            return [[not_blank(q) for q in pair] for pair in pairs]

    class NewQuestion(Strict):
        id: Union[StrictStr, StrictInt, None] = Field(None, description="its id (default: a new random one)")
        question: Text
        _blank = field_validator("question")(not_blank)

    class AddRequest(Strict):
        id: Union[StrictStr, StrictInt, None] = None
        question: Union[Text, None] = None
        questions: Union[list[NewQuestion], None] = Field(None, min_length=1, max_length=limits.max_questions)

        @field_validator("question")
        @classmethod
        def _blank(cls, value):
            return None if value is None else not_blank(value)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="qqp-dup duplicate-question service", version="1", lifespan=lifespan,
                  description="Finds the questions already asked that a new question duplicates; scores pairs; "
                              "takes new questions (durable before the reply).")

    def error(status, field, message):
        return JSONResponse({"error": message, "field": field}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        e = exc.errors()[0]
        if e.get("type") == "json_invalid":
            return error(400, "body", f"body: not valid JSON ({e.get('ctx', {}).get('error', e['msg'])})")
        # loc: ("body", field, index, ...), with a union's member types in it ("str", "int"): dropped
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "str", "int", "none")]
        name = ".".join(loc) or "body"
        if e.get("type") in ("string_type", "int_type") and "id" in loc:
            return error(422, name, f"{name}: should be a string or an integer")
        if name == "body" and e.get("type") == "missing":
            return error(422, "body", "body: empty; send a JSON object (see /docs)")
        return error(422, name, f"{name}: {e['msg'].removeprefix('Value error, ')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):  # 404, 405, 400: the same one-line shape as every other error
        field = "path" if exc.status_code in (404, 405) else "body" if exc.status_code == 400 else ""
        return error(exc.status_code, field, f"{request.method} {request.url.path}: {exc.detail}")

    @app.exception_handler(ApiError)
    async def _api_error(request, exc):
        return error(exc.status, exc.field, exc.message)

    @app.exception_handler(retrieval.IdTaken)
    async def _id_taken(request, exc):
        return error(409, "id", str(exc))

    @app.exception_handler(UserError)
    async def _server_problem(request, exc):  # e.g. NaN vectors: the server's to fix, said in one line
        print(f"error: {exc}", file=sys.stderr)
        return error(500, "", str(exc))

    app.add_middleware(Guard, limits=limits, stats=stats)

    @app.post("/search", summary="the k nearest known questions of a new one")
    async def search(req: SearchRequest):
        if req.rerank and service.qe.classifier is None:
            raise ApiError(400, "rerank", "rerank: this index's model has no pair classifier (an untuned "
                                          "encoder); serve an index built with a checkpoint")
        t0 = time.perf_counter()
        job = Job("search", [req.question], {"k": req.k, "rerank": req.rerank})
        answers = await batcher.submit(job)
        return {"question": req.question, "k": req.k, "rerank": req.rerank, "results": answers,
                "threshold": service.threshold, "ms": round((time.perf_counter() - t0) * 1000, 2),
                **unreadable_warning(job.unreadable)}

    @app.post("/score", summary="duplicate probability of question pairs")
    async def score(req: ScoreRequest):
        if service.qe.classifier is None:
            raise ApiError(400, "pairs", "pairs: this index's model has no pair classifier (an untuned "
                                         "encoder); serve an index built with a checkpoint")
        job = Job("score", [p[0] for p in req.pairs] + [p[1] for p in req.pairs])
        answers = await batcher.submit(job)
        return {"threshold": service.threshold, "threshold_source": service.threshold_source, "results": answers,
                **unreadable_warning(job.unreadable)}

    def unreadable_warning(bad):
        """{"warning": ...} where a job's questions held nothing the vocabulary reads (as predict.py
        and search.py warn on stderr): their answers are given, and mean nothing."""
        return {"warning": f"{len(bad)} question(s) hold nothing the model's vocabulary reads (only [UNK]: "
                           f"emoji, other scripts), e.g. {bad[0][:60]!r}: what they match or score means "
                           "nothing"} if bad else {}

    @app.post("/questions", summary="add questions to the index (needs the bearer token)")
    async def add(req: AddRequest, request: Request):
        if not token:
            raise ApiError(403, "authorization", "adding questions is off on this server: start it with "
                                                 f"--token or {TOKEN_ENV}")
        got = request.headers.get("authorization", "")
        if not (got.startswith("Bearer ") and hmac.compare_digest(got[7:].encode(), token.encode())):
            return JSONResponse({"error": "authorization: a valid 'Authorization: Bearer TOKEN' header is needed",
                                 "field": "authorization"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        one_form = (req.questions is None) != (req.question is None) and not (req.questions and req.id is not None)
        if not one_form:
            raise ApiError(422, "questions", "questions: post {\"id\", \"question\"} or {\"questions\": "
                                             "[{\"id\", \"question\"}, ...]} (one of them)")
        new = req.questions if req.questions is not None else [NewQuestion(id=req.id, question=req.question)]
        ids = [str(q.id) if q.id is not None else f"u-{uuid.uuid4().hex[:16]}" for q in new]
        if any(not i.strip() or len(i) > 200 for i in ids):
            raise ApiError(422, "id", "id: empty, or longer than 200 characters")
        if len(set(ids)) < len(ids):
            raise ApiError(422, "id", f"id: {next(i for i in ids if ids.count(i) > 1)} is given twice")
        unread = retrieval.unreadable_texts(service.qe, [q.question for q in new])
        if unread:  # in the corpus, such a question would come up for every unreadable query
            raise ApiError(422, "question", f"question: {unread[0][:60]!r} holds nothing the model's vocabulary "
                                            "reads (only [UNK]: emoji, other scripts), so it cannot be searched")
        answers = await batcher.submit(Job("add", [q.question for q in new], {"ids": ids}))
        return {"added": sum(a["status"] == "added" for a in answers),
                "existing": sum(a["status"] == "exists" for a in answers),
                "questions": answers, "corpus": len(service.live)}

    @app.get("/healthz", summary="liveness: the model and the index are loaded")
    async def healthz():
        return {"ok": True, "questions": len(service.live)}

    @app.get("/stats", summary="counts, the model, uptime, requests and latency")
    async def get_stats():
        live = service.live
        return {"uptime_s": round(time.time() - stats.started, 1),
                "questions": {"index": live.base_n, "added": live.n_added, "total": len(live)},
                "model": service.qe.record, "classifier": service.qe.classifier is not None,
                "threshold": service.threshold, "threshold_source": service.threshold_source,
                "search": "ANN (faiss IVF, nprobe %d)" % live.nprobe if live.ann is not None else "exact cosine",
                "batching": {"max_batch": batcher.max_batch, "max_wait_ms": batcher.max_wait * 1000,
                             "batches": service.batches, "worker_busy_s": round(service.busy_s, 3),
                             "mean_questions_per_batch": round(service.batched_questions / max(service.batches, 1), 2)},
                "requests": stats.report(), **about}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    return app
