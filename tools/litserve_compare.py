"""serve.py's batching against LitServe's (issue 22: "FastAPI + uvicorn, or LitServe if its batching
serves better: say why, with a measurement"). Both serve POST /search on the same index, with the
same model, encoder runtime, worker count and search code (service.Service.work: the one inference
road, exact search, the classifier's probability of each hit); only what gathers requests into
batches differs:

    serve.py   FastAPI + uvicorn, service.Batcher: worker threads in the server process
    LitServe   its own API server process, requests handed over a queue to inference worker
               processes (workers_per_device), batched by max_batch_size / batch_timeout

Each is started on 127.0.0.1, warmed up, loaded by bench.py's client (measure.load: a closed loop
of `concurrency` clients, the index's own questions as queries) at each concurrency, and stopped.
The report (JSON) has requests/s and p50/p95/p99 for both and their ratio. Needs litserve (not a
requirement of the project: pip install litserve).

    python tools/litserve_compare.py runs/index8k --requests 400 --out runs/litserve_compare.json
"""
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from typing import List, Literal

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from cli import UserError, arg, check_ranges, parse_config, run  # noqa: E402
from measure import ServerProcess, free_port, load, machine_info, versions  # noqa: E402
from retrieval import require_onnx  # noqa: E402

try:  # optional: only this tool needs it
    import litserve as ls
except ImportError:
    ls = None


@dataclass
class CompareConfig:
    index: str = arg("", "index folder written by index.py (of a checkpoint: the hits get probabilities)")
    requests: int = arg(400, "requests per concurrency level (twice that at 32 and above)")
    concurrency: List[int] = arg([1, 8, 32], "concurrent clients, one level each")
    runtime: Literal["onnx", "torch"] = arg("onnx", "what runs the encoder in both (serve.py's CPU default: onnx)")
    workers: int = arg(2, "encoder workers in both: serve.py's threads, LitServe's worker processes")
    max_batch: int = arg(64, "questions batched together at most, in both")
    max_wait_ms: float = arg(2.0, "wait for more requests after the first of a batch, in both")
    rounds: int = arg(2, "runs of each server, their order alternating from round to round")
    seed: int = arg(0, "which of the index's questions are the queries")
    out: str = arg("runs/litserve_compare.json", "the report")
    # internal: the LitServe server process this tool starts
    serve_litserve_port: int = arg(0, "(internal) run the LitServe server on this port and block")


# What each numeric flag may be: (test, the rule in words).
RANGES = {"requests": (lambda v: v >= 1, "at least 1"), "workers": (lambda v: v >= 1, "at least 1"),
          "max_batch": (lambda v: v >= 1, "at least 1 (1: no batching)"),
          "max_wait_ms": (lambda v: 0 <= v <= 1000, "in [0, 1000]"), "rounds": (lambda v: v >= 1, "at least 1")}


def main(argv=None):
    run(compare, parse_config(CompareConfig, argv, __doc__, positional=("index",)))


def compare(cfg):
    check_config(cfg)
    if cfg.serve_litserve_port:
        return serve_litserve(cfg)
    import engine
    from retrieval import Index
    texts = Index(cfg.index).questions[1]
    picks = np.random.default_rng(cfg.seed).choice(len(texts), 2000, replace=len(texts) < 2000).tolist()
    searches = [{"question": texts[i], "k": 10} for i in picks]  # as bench.py's serve stage
    report = {"machine": machine_info(engine.setup_runtime("cpu", "fp32")),
              "versions": {**versions(), "litserve": version("litserve")},
              "config": {k: v for k, v in vars(cfg).items() if k != "serve_litserve_port"}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="litserve-compare-") as tmp:
        index = os.path.join(tmp, "index")  # a copy: each server opens its added-questions database beside it
        subprocess.run(["cp", "-r", cfg.index, index], check=True)
        flags = ["--device", "cpu", "--runtime", cfg.runtime, "--workers", str(cfg.workers), "--max_batch",
                 str(cfg.max_batch), "--max_wait_ms", str(cfg.max_wait_ms)]
        servers = {"serve.py": lambda: ServerProcess(index, *flags, log_path=os.path.join(tmp, "serve.log")),
                   "litserve": lambda: LitServeProcess(cfg, index, os.path.join(tmp, "litserve.log"))}
        # Each round runs both, the order alternating (serve.py first, then LitServe first, ...), so
        # that a machine getting slower or faster does not favour one of them.
        for r in range(cfg.rounds):
            for name in (["serve.py", "litserve"] if r % 2 == 0 else ["litserve", "serve.py"]):
                with servers[name]() as server:
                    report["runs"].append({"server": name, "round": r, "levels": measure_levels(cfg, server.url,
                                                                                                searches)})
    report["mean_requests_per_sec"] = means = {
        name: {str(c): float(np.mean([run["levels"][str(c)]["requests_per_sec"] for run in report["runs"]
                                      if run["server"] == name])) for c in cfg.concurrency}
        for name in servers}
    report["ratio_requests_per_sec"] = {c: means["serve.py"][c] / means["litserve"][c] for c in means["serve.py"]}
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    with open(cfg.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"requests/s, mean of {cfg.rounds} run(s) each (every run in {cfg.out}):")
    print(f"{'concurrency':>11} | {'serve.py':>9} | {'LitServe':>9} | ratio")
    for c in means["serve.py"]:
        print(f"{c:>11} | {means['serve.py'][c]:>9.1f} | {means['litserve'][c]:>9.1f} | "
              f"{report['ratio_requests_per_sec'][c]:.2f}x")


def check_config(cfg):
    """Every flag checked before anything starts."""
    check_ranges(cfg, RANGES)
    if not cfg.concurrency or min(cfg.concurrency) < 1:
        raise UserError(f"--concurrency {' '.join(map(str, cfg.concurrency))}: each level is at least 1 client",
                        "e.g. --concurrency 1 8 32")
    if ls is None:
        raise UserError("litserve is not installed", "pip install litserve (it is not one of the project's "
                        "requirements)")
    if cfg.runtime == "onnx":
        require_onnx()
    if not os.path.isdir(cfg.index):
        raise UserError(f"{cfg.index}: no such index folder", "build one: python index.py out/ckpt.pt data/qqp8k "
                        f"--out_dir {cfg.index}")


def measure_levels(cfg, url, searches):
    load(url, "/search", searches[:50], 4, 50)  # warm-up: connections, allocator, caches
    levels = {}
    for c in cfg.concurrency:
        levels[str(c)] = r = load(url, "/search", searches, c, cfg.requests * (2 if c >= 32 else 1))
        if r["errors"]:
            raise RuntimeError(f"{url}: {r['errors']} errors at concurrency {c}: {r['first_errors']}")
    return levels


class LitServeProcess(ServerProcess):
    """This tool again, as the LitServe server (--serve_litserve_port), up when /health answers.
    It runs in a session of its own, and stop() ends the whole session: LitServe's API server and
    workers are processes of their own."""

    def __init__(self, cfg, index, log_path, timeout=300):
        self.port, self.token = free_port(), ""
        argv = [sys.executable, os.path.abspath(__file__), index, "--serve_litserve_port", str(self.port),
                "--runtime", cfg.runtime, "--workers", str(cfg.workers), "--max_batch", str(cfg.max_batch),
                "--max_wait_ms", str(cfg.max_wait_ms)]
        self.start(argv, log_path, "/health", timeout, start_new_session=True)

    def stop(self, signal_name="SIGTERM"):
        import signal
        try:  # the session's processes, even when its first one has already exited
            os.killpg(self.proc.pid, getattr(signal, signal_name))
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


class SearchAPI(ls.LitAPI if ls else object):
    """The same work as serve.py's /search, as a LitAPI (module level: LitServe pickles it into its
    worker processes): setup() loads what serve.build loads, in each worker process; predict()
    hands a batch of queries to service.Service.work."""

    def __init__(self, cfg):
        super().__init__(max_batch_size=cfg.max_batch, batch_timeout=cfg.max_wait_ms / 1000, api_path="/search")
        self.cfg = cfg

    def setup(self, device):
        import torch

        import engine
        import retrieval
        import service
        cfg = self.cfg
        threads = max(1, torch.get_num_threads() // cfg.workers)  # as serve.py shares the cores out
        torch.set_num_threads(threads)
        index = retrieval.Index(cfg.index)
        qe = retrieval.load_index_model(index)
        rt = engine.setup_runtime("cpu", "fp32")
        if cfg.runtime == "onnx":
            retrieval.use_onnx(qe, threads)
        inference = retrieval.question_inference(qe, rt, retrieval.encoder_batch_size(cfg.runtime, cfg.max_batch),
                                                 "exact", "off")
        # The database opened as serve.py opens it; nothing is added here.
        store = retrieval.AddedQuestions(retrieval.added_path(cfg.index), index.manifest["model"],
                                         index.manifest["dim"])
        self.work = service.Service(qe, rt, inference, service.LiveIndex(index, rt.device, False, 0), store,
                                    0.5, "argmax")
        self.work.warm_up()
        self.job = service.Job

    def decode_request(self, request):
        return request["question"], int(request.get("k", 10))

    def predict(self, batch):  # a list of decoded requests; one request itself with --max_batch 1
        single = self.cfg.max_batch == 1
        jobs = [self.job("search", [question], {"k": k, "rerank": False})
                for question, k in ([batch] if single else batch)]
        answers = self.work.work(jobs)
        return answers[0] if single else answers

    def encode_response(self, results):
        return {"results": results}


def serve_litserve(cfg):
    server = ls.LitServer(SearchAPI(cfg), accelerator="cpu", workers_per_device=cfg.workers, timeout=60)
    server.run(host="127.0.0.1", port=cfg.serve_litserve_port, num_api_servers=1, generate_client_file=False,
               log_level="warning")


if __name__ == "__main__":
    main()
