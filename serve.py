"""A duplicate-question service: the model and the index loaded once, answers in milliseconds.

    # CPU, the index of index.py's smoke run (bundled MiniLM, the real 8k rows' questions):
    python serve.py runs/idx8k                      # http://127.0.0.1:8000: the page, /docs for the API
    # a fine-tuned checkpoint's index (probabilities, /score, rerank); additions on, with a token:
    QQP_SERVE_TOKEN=secret python serve.py runs/index_ft8k --port 8000
    curl -s localhost:8000/search -d '{"question": "How do I learn Python?", "k": 5}'

Endpoints (JSON; the OpenAPI page at /docs):
    POST /search     {"question", "k", "rerank"}: the k nearest known questions: id, question, cosine
                     and, for a checkpoint's index, the classifier's duplicate probability
    POST /score      {"pairs": [[q1, q2], ...]}: probabilities and the decision at the threshold
    POST /questions  {"id", "question"} or {"questions": [...]}, with "Authorization: Bearer TOKEN":
                     added to the corpus, durable (SQLite, committed) before the reply
    GET  /healthz    liveness;  GET /stats: counts, model, uptime, requests and latency percentiles
    GET  /           a web page: duplicates appear as you type, and a question can be posted as new

The index folder is read-only here: added questions go to <index>.added.sqlite beside it (WAL,
synchronous=FULL), which every server process on this machine started on that index shares (each
sees the others' additions at its next request); `python index.py --fold --out_dir INDEX` moves
them into the folder. Concurrent requests are embedded together (--max_batch questions, waiting at
most --max_wait_ms for more; --max_batch 1: one at a time) through the inference road of every
other script, in worker threads beside the event loop (--workers: on a CPU two, each encoding its
own batch; searches and commits one at a time). On a CPU the encoder runs on ONNX Runtime where
onnx and onnxruntime are installed (--runtime: the same vectors to 1e-5, faster than torch;
bench.py's serve stage).

Safety: binds 127.0.0.1 unless --host says otherwise; adding questions needs the bearer token
(--token, or the QQP_SERVE_TOKEN environment variable, which `ps` does not show), and is off
without one; a non-loopback --host without a token is refused. Request bodies, questions per
request, question length and k are limited (flags below); every bad request gets a 4xx with a
one-line JSON error naming the field. The index's model is fingerprint-checked at start (a moved
checkpoint: --checkpoint), like search.py.
"""
import ipaddress
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch

import engine
import retrieval
import service
from cli import Interrupted, UserError, arg, check_ranges, parse_config, require_packages, run
from metrics import tuned_threshold
from model import describe_model

# What each numeric flag may be: (test, the rule in words).
RANGES = {"port": (lambda v: 1 <= v <= 65535, "in [1, 65535]"),
          "max_batch": (lambda v: v >= 1, "at least 1 (1: no batching)"),
          "threads": (lambda v: v >= 0, "0 (the cores shared out among the workers) or more"),
          "workers": (lambda v: v >= 0, "0 (auto) or more"),
          "batch_size": (lambda v: v >= 0, "0 (auto) or more"),
          "max_wait_ms": (lambda v: 0 <= v <= 1000, "in [0, 1000]"),
          "nprobe": (lambda v: v >= 0, "0 (as calibrated) or more"),
          "rerank_depth": (lambda v: v >= 1, "at least 1"),
          "max_body_bytes": (lambda v: v >= 1024, "at least 1024"),
          "max_questions": (lambda v: v >= 1, "at least 1"),
          "max_question_chars": (lambda v: v >= 1, "at least 1"),
          "max_k": (lambda v: v >= 1, "at least 1")}


@dataclass
class ServeConfig:
    index: str = arg("", "index folder written by index.py")
    checkpoint: str = arg("", "the index's checkpoint where it is now, if it moved (fingerprint-checked)")
    host: str = arg("127.0.0.1", "address to listen on (not loopback: a token is required)")
    port: int = arg(8000, "port to listen on")
    token: str = arg("", f"bearer token that POST /questions needs (or the {service.TOKEN_ENV} environment "
                         "variable); none: adding is off")
    ann: bool = arg(False, "search the index's ANN index (index.py --ann) instead of all vectors")
    runtime: Literal["auto", "torch", "onnx"] = arg("auto", "what runs the encoder: onnx (ONNX Runtime on the CPU, "
                                                    "fp32, exported at start: the same vectors to 1e-5, faster: "
                                                    "bench.py's serve stage) or torch; auto: onnx where it can run "
                                                    "(a CPU, fp32, exact batches, no --int8 or --compile, "
                                                    "onnx and onnxruntime installed), else torch")
    int8: bool = arg(False, "CPU: the encoder's linear layers in int8 (faster; query vectors differ slightly "
                            "from the index's fp32 ones: bench.py's serve stage measures by how much)")
    nprobe: int = arg(0, "IVF lists probed with --ann (0: the one calibrated when the index was built)")
    threshold_from: str = arg("", "evaluate.py's results.json: /score decides at its validation-tuned "
                                  "threshold (default: <checkpoint dir>/eval_test/results.json if it is this "
                                  "checkpoint's, else 0.5)")
    workers: int = arg(0, "threads that run batches through the encoder at once (0: auto: 2 on a CPU of 2 "
                          "or more cores, where two one-thread encoders outrun one two-thread encoder; 1 on a "
                          "GPU)")
    threads: int = arg(0, "CPU: torch threads each worker's encoder uses (0: the cores shared out among the "
                          "workers)")
    max_batch: int = arg(64, "questions embedded together at most (dynamic batching; 1: off)")
    batch_size: int = arg(0, "questions per encoder call: an exact-layout batch is sorted by length and cut into "
                             "calls of at most this many, each padded to its own longest (0: auto: 8 with onnx, "
                             "where short calls run faster; max(--max_batch, 64) with torch)")
    max_wait_ms: float = arg(2.0, "after the first request of a batch, wait at most this long for more")
    rerank_depth: int = arg(50, "candidates a search with rerank re-scores")
    max_body_bytes: int = arg(service.Limits.max_body_bytes, "request body limit (413 over it)")
    max_questions: int = arg(service.Limits.max_questions, "questions per POST /questions, pairs per /score")
    max_question_chars: int = arg(service.Limits.max_question_chars, "characters of one question")
    max_k: int = arg(service.Limits.max_k, "answers per search")
    device: str = arg("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = arg("auto", "auto: bf16 (else fp16) on GPU, fp32 on CPU")
    shapes: Literal[engine.SHAPES] = arg("auto", engine.SHAPES_HELP)
    compile: Literal[engine.COMPILE_MODES] = arg("auto", "as train.py's; auto: CUDA graphs on one GPU (compiled "
                                                 "at start: a service amortizes it), off on the CPU")


def main(argv=None):
    cfg = parse_config(ServeConfig, argv, __doc__, positional=("index",))
    run(serve, cfg)


def serve(cfg):
    app, about = build(cfg)
    import uvicorn  # checked in build (check_config), with the rest, before anything loads
    print(f"serving {about['corpus']:,} questions ({about['model']}; encoder on {about['runtime']}, "
          f"{about['workers']} worker(s)) at http://{cfg.host}:{cfg.port}/ "
          f"(the page; API at /docs); adding questions {'on' if about['token'] else 'off (no token)'}; "
          f"Ctrl-C stops", flush=True)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False)
    except Interrupted as e:  # uvicorn shut down cleanly, then passed its signal on: how a server ends
        print(f"stopped by {e.args[0].name}", flush=True)


def build(cfg):
    """The app, ready to answer: flags checked, index and model loaded and matched, the added
    questions read, the encoder warmed up. Returns (app, what was loaded)."""
    token = cfg.token or os.environ.get(service.TOKEN_ENV, "")
    check_config(cfg, token)
    t0 = time.time()
    index = retrieval.Index(cfg.index)
    if cfg.ann:
        index.ann  # fail now if it has none
    qe = retrieval.load_index_model(index, cfg.checkpoint)
    threshold, threshold_source = decision_threshold(cfg, qe)
    store = retrieval.AddedQuestions(retrieval.added_path(cfg.index), index.manifest["model"], index.manifest["dim"])
    rt = engine.setup_runtime(cfg.device, cfg.precision, file=sys.stderr)
    qe.to(rt.device)
    if cfg.int8:
        if rt.device.type != "cpu":
            raise UserError(f"--int8 on {rt.device}: dynamic int8 quantization runs on the CPU only",
                            "drop --int8 (a GPU serves in bf16), or pass --device cpu")
        retrieval.quantize_int8(qe)
    workers, threads = worker_threads(cfg, rt)
    runtime = encoder_runtime(cfg, rt)
    if runtime == "onnx":
        retrieval.use_onnx(qe, threads)  # on the CPU, worker_threads gives >= 1
    # A long-running service amortizes a compile: resolved here (auto -> CUDA graphs on one GPU), not
    # left to Inference's per-job rule, which runs short jobs (all of a service's) eagerly.
    batch_size = cfg.batch_size or retrieval.encoder_batch_size(runtime, cfg.max_batch)
    compile_mode = engine.resolve_compile(cfg.compile, rt, packed=engine.batch_layout(rt, cfg.shapes))
    inference = retrieval.question_inference(qe, rt, batch_size, cfg.shapes, compile_mode)
    live = service.LiveIndex(index, rt.device, cfg.ann, cfg.nprobe)
    work = service.Service(qe, rt, inference, live, store, threshold, threshold_source, cfg.rerank_depth)
    batcher = service.Batcher(work.work, cfg.max_batch, cfg.max_wait_ms, workers)
    if threads:  # set on each worker's thread, where its encoder runs (OpenMP's setting is per thread)
        batcher.run_on_each(partial(torch.set_num_threads, threads))
    batcher.run_on_each(work.warm_up)  # lazy initialization (on CUDA: the compile) paid now, not by the first user
    limits = service.Limits(cfg.max_body_bytes, cfg.max_questions, cfg.max_question_chars, cfg.max_k)
    about = {"index": os.path.abspath(cfg.index), "database": store.path, "runtime": runtime,
             "encoder_batch_size": batch_size, "workers": workers,
             "threads_per_worker": threads or torch.get_num_threads(), "started_in_s": round(time.time() - t0, 1)}
    app = service.make_app(work, batcher, limits, token, about)
    return app, {**about, "corpus": len(live), "model": describe_model(qe.record), "token": bool(token)}


def worker_threads(cfg, rt):
    """(workers, torch threads per worker; 0: leave torch's). On a CPU, auto is two workers sharing
    the cores: a two-thread encoder's matmuls wait at every sync for a core that the event loop,
    or its own Python between ops, holds (bench.py's serve stage: two workers against one). One
    worker on a GPU: CUDA graphs are recorded per thread."""
    if rt.device.type != "cpu":
        if cfg.workers > 1:
            raise UserError(f"--workers {cfg.workers} on {rt.device}: a GPU serves with one worker (its compiled "
                            "step belongs to one thread; batching fills it)", "drop --workers")
        return 1, 0
    cores = torch.get_num_threads()
    workers = cfg.workers or min(2, cores)
    return workers, cfg.threads or max(1, cores // workers)


def encoder_runtime(cfg, rt):
    """torch or onnx, as --runtime says (onnx refused off the CPU); auto: onnx where it runs the
    same model (fp32 on a CPU, exact batches, uncompiled, not int8) and onnx and onnxruntime are
    installed. (--device auto resolves to a GPU only here, after check_config.)"""
    if cfg.runtime == "onnx" and rt.device.type != "cpu":
        raise UserError(f"--runtime onnx on {rt.device}: it runs the encoder on the CPU", "drop --runtime (a GPU "
                        "serves in bf16 with torch), or pass --device cpu")
    if cfg.runtime != "auto":
        return cfg.runtime
    same_model = rt.device.type == "cpu" and rt.precision == "fp32" and not onnx_conflicts(cfg)
    return "onnx" if same_model and not retrieval.onnx_missing() else "torch"



def onnx_conflicts(cfg):
    """The flags ONNX Runtime cannot honour (it runs fp32, exact batches, uncompiled, not int8)."""
    flags = (("--int8", cfg.int8), (f"--precision {cfg.precision}", cfg.precision in ("bf16", "fp16")),
             ("--shapes packed", cfg.shapes == "packed"),
             (f"--compile {cfg.compile}", cfg.compile not in ("auto", "off")))
    return [flag for flag, on in flags if on]


def check_config(cfg, token):
    """Every flag checked before anything loads."""
    require_packages(service.PACKAGES, "serve.py")
    check_ranges(cfg, RANGES)
    if not os.path.isdir(cfg.index):
        raise UserError(f"{cfg.index}: no such index folder", "build one: python index.py out/ckpt.pt "
                        f"questions.csv --out_dir {cfg.index}")
    if cfg.runtime == "onnx" and onnx_conflicts(cfg):
        raise UserError(f"--runtime onnx with {' '.join(onnx_conflicts(cfg))}: ONNX Runtime runs the encoder in "
                        "fp32, in exact batches, uncompiled", f"drop {onnx_conflicts(cfg)[0]}, or pass --runtime torch")
    if cfg.runtime == "onnx" and cfg.device.split(":")[0] in ("cuda", "mps"):
        raise UserError(f"--runtime onnx with --device {cfg.device}: it runs the encoder on the CPU",
                        "drop --runtime (a GPU serves in bf16 with torch), or pass --device cpu")
    if cfg.runtime == "onnx":
        retrieval.require_onnx()
    if cfg.nprobe and not cfg.ann:
        raise UserError("--nprobe without --ann", "add --ann (nprobe is the ANN index's search width)")
    if not is_loopback(cfg.host) and not token:
        raise UserError(f"--host {cfg.host} is reachable from other machines, and no token is set: anyone "
                        "could add questions", f"set {service.TOKEN_ENV} (or --token), or serve on 127.0.0.1")
    try:  # the port, before minutes of loading: in use, or not this machine's address
        with socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET) as s:
            # as uvicorn binds: a port left in TIME_WAIT by a server just stopped is free, a listening one is not
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((cfg.host, cfg.port))
    except OSError as e:
        raise UserError(f"--host {cfg.host} --port {cfg.port}: cannot listen there ({e.strerror})",
                        "pass another --port (another server may hold this one), or an address of this "
                        "machine") from None
    if cfg.threshold_from and not os.path.isfile(cfg.threshold_from):
        raise UserError(f"--threshold_from {cfg.threshold_from}: no such file", "pass the results.json of "
                        "evaluate.py on this checkpoint")


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def decision_threshold(cfg, qe):
    """/score's threshold and where it came from: --threshold_from, else evaluate.py's results of
    this checkpoint in its folder (eval_test, tuned on validation), else 0.5 (the argmax)."""
    if qe.classifier is None:
        return None, "no classifier (an untuned encoder's index): /score is off"
    ckpt = qe.record["checkpoint"]
    if cfg.threshold_from:
        return tuned_threshold(cfg.threshold_from, ckpt), f"best F1 on validation ({cfg.threshold_from})"
    found = os.path.join(os.path.dirname(ckpt), "eval_test", "results.json")
    try:
        with open(found) as f:
            of_this_checkpoint = json.load(f).get("checkpoint") == ckpt
        if of_this_checkpoint:  # another checkpoint's threshold (an older run in the folder) is no use
            return tuned_threshold(found, ckpt), f"best F1 on validation ({found})"
    except (OSError, ValueError, AttributeError, UserError):
        pass  # none there, or not one evaluate.py wrote: the argmax
    return 0.5, "0.5, the argmax (no evaluate.py results of this checkpoint: pass --threshold_from)"


if __name__ == "__main__":
    main()
