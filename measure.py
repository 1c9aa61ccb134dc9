"""Measuring, for bench.py: device-synchronized timing, a script's wall time and peak memory in a
subprocess, the measured matmul rate (MFU's denominator), which GPU kernels ran, the report's rows,
table and the machine, versions and commit it ran on; and what the stages time:

- Workspace: what several stages share, built on first use (the real rows preprocessed, their
  texts, the tokenizer, the same encoder weights in ours, the notebook's and the peer's models).
- synthesize: the 404k-row file and its preprocessed folder, through the scripts themselves.
- ours_train / notebook_train / peer_train: training pairs per second of each side over the same
  rows after warm-up: ours is train.py's step (engine.train_step) with its defaults on this device,
  the other two are reference.py's loops.
- end_to_end: train.py --epochs 1 on the synthesized file, as a user runs it.
- measure_speed / bench_search: exact and ANN search latency, ANN recall against exact, index
  build speed (bench.py's search stage, search.py --speed).
- ServerProcess / load / writes_during_searches / kill_during_writes: serve.py in its own process,
  a bounded closed-loop HTTP client (httpx + asyncio: a fixed number of requests at a fixed
  concurrency), and the service's two fault checks (bench.py's serve stage, tests/test_serve.py).
"""
import copy
import json
import os
import platform
import random
import subprocess
import sys
import threading
import time
from functools import cached_property, partial

import numpy as np
import torch
from torch import optim

import engine
import reference
from data import PairDataset, make_loader, padding_stats, shapes_of, to_device
from hub import load_tokenizer
from model import ModelConfig, build_model, describe_model, load_question_encoder
from retrieval import (Index, ann_search, build_ann, embed_texts, exact_search, exclude_rows, import_faiss, overlap,
                       question_inference, read_questions, search_matrix, unit)
from text import read_pairs

ROOT = os.path.dirname(os.path.abspath(__file__))
DISTILBERT_CONFIG = "distilbert-config"  # bench.py --encoder: a random 66M DistilBERT


def sync(rt):
    """Timings end only when the GPU has finished the work queued so far."""
    if rt.cuda:
        torch.cuda.synchronize(rt.device)


def run_child(argv, tmp, name, timeout=None):
    """Run a script of this repo in a subprocess: (wall seconds, its own peak RSS in GB); its
    output goes to <tmp>/<name>.log, whose end is shown if it fails."""
    log_path = os.path.join(tmp, f"{name}.log")
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        timer = threading.Timer(timeout, proc.kill) if timeout else None
        if timer:
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS, not earlier children's
        seconds = time.perf_counter() - t0
        if timer:
            timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        with open(log_path) as f:
            raise RuntimeError(f"{name} failed (exit {proc.returncode}, {seconds:.0f} s):\n{f.read()[-3000:]}")
    return seconds, usage.ru_maxrss * 1024 / 1e9  # Linux reports kilobytes


def matmul_tflops(rt, dtype, n, reps):
    """Measured dense matmul rate, the denominator of MFU."""
    a = torch.randn(n, n, device=rt.device, dtype=dtype)
    b = torch.randn(n, n, device=rt.device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(rt)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(rt)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def attention_kernels(model, batch, rt):
    """Names of the GPU kernels one forward runs for attention (what SDPA picked); the profiler
    may be unavailable (no CUPTI): then why, instead of failing the benchmark."""
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof, rt.autocast():
            model(batch)
            sync(rt)
    except Exception as e:  # the benchmark's numbers stand without it; the error says which part failed
        return f"not traced (the profiler, or the forward under it, failed): {type(e).__name__}: {str(e)[:200]}"
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if any(w in n.lower() for w in ("attention", "fmha", "flash", "cudnn", "sdpa")))[:8]


def row(stage, measure, ours, reference_value, ratio, target="-", passed=None):
    """One line of the benchmark table (reference_value: the notebook's, or the named reference's)."""
    def num(v):  # numpy scalars -> plain JSON numbers
        return v if v is None or isinstance(v, str) else float(v)
    return {"stage": stage, "measure": measure, "ours": num(ours), "notebook": num(reference_value),
            "ratio": num(ratio), "target": target, "pass": passed if passed is None else bool(passed)}


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"


def format_table(rows):
    head = ("stage", "measure", "ours", "reference", "ratio", "target", "result")
    cells = [[r["stage"], r["measure"], fmt(r["ours"]), fmt(r["notebook"]),
              "-" if r["ratio"] is None else f"{r['ratio']:.2f}x", r["target"],
              {True: "PASS", False: "FAIL", None: "-"}.get(r["pass"], r["pass"])] for r in rows]
    widths = [max(len(str(c[i])) for c in [head, *cells]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in
                       enumerate(zip(line, widths))) for line in [head, *cells]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def machine_info(rt):
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "platform": platform.platform(), "gpu": None}
    if rt.cuda:
        props = torch.cuda.get_device_properties(rt.device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 1e9, 1),
                    gpu_capability=f"{props.major}.{props.minor}")
    return info


def versions():
    import tokenizers
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "numpy": np.__version__}


def git_commit():
    """The commit this code is at, marked when the work tree has uncommitted changes."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}{' (uncommitted changes)' if dirty else ''}" if rev else None


# ----------------------------------------------------------------------------- what the stages time

class Workspace:
    """What several stages need, built on first use: the real rows preprocessed (all in one split;
    splits do not matter for speed), their texts, the tokenizer, the three models."""

    def __init__(self, cfg, plan, rt, tmp):
        self.cfg, self.plan, self.rt, self.tmp = cfg, plan, rt, tmp
        self.recipe = engine.Recipe()  # ours runs train.py's defaults: this recipe (its frozen layers too),
        self.packed = engine.batch_layout(rt)  # and this device's batch layout
        self.layout = ModelConfig.arch

    @cached_property
    def tokenizer(self):
        return load_tokenizer(self.plan.tokenizer)

    @cached_property
    def dataset(self):
        out = os.path.join(self.tmp, "real")  # a script of its own: run, never imported
        run_child([sys.executable, "preprocess.py", self.cfg.data, "--out_dir", out, "--encoder", self.plan.tokenizer,
                   "--split", "random", "--val_frac", "0", "--test_frac", "0"], self.tmp, "preprocess_real")
        return PairDataset(out, "train")

    @cached_property
    def texts(self):
        """(q1 texts, q2 texts, labels) aligned with dataset rows: with the random split and no
        validation/test share, train.npy keeps the file's usable rows in order. Checked."""
        pairs, _, _ = read_pairs(self.cfg.data)
        ds = self.dataset
        ok = len(pairs["q1"]) == len(ds) and np.array_equal(np.array(pairs["label"]), ds.labels)
        for i in range(min(len(ds), 20)) if ok else ():
            ids = self.tokenizer([pairs["q1"][i], pairs["q2"][i]], truncation=True,
                                 max_length=ds.manifest["max_len"])["input_ids"]
            _, t1, t2, _ = ds[i]
            ok = ok and list(t1) == ids[0] and list(t2) == ids[1]
        if not ok:
            raise RuntimeError("bench.py: the preprocessed rows no longer line up with the file's rows "
                               "(has preprocess.py's row order changed?); texts cannot be matched")
        return pairs["q1"], pairs["q2"], pairs["label"]

    @cached_property
    def models(self):
        """{ours, notebook, peer}, the same encoder weights in all. Ours is built as train.py
        builds it with its default settings (head, pooling, features, the embeddings frozen)."""
        torch.manual_seed(self.cfg.seed)
        if self.plan.encoder == DISTILBERT_CONFIG:
            from transformers import DistilBertConfig
            hf = {k: v for k, v in DistilBertConfig().to_dict().items()
                  if not k.startswith("_") and k != "transformers_version"}
            ours = build_model(ModelConfig(encoder_config=hf, freeze_layers=self.recipe.freeze_layers))
        else:
            ours = build_model(ModelConfig(encoder=self.plan.encoder, freeze_layers=self.recipe.freeze_layers))
        # The notebook and the peer train every encoder weight: their copies unfrozen.
        notebook = reference.NotebookModel(copy.deepcopy(ours.encoder).requires_grad_(True), self.rt.device)
        peer = reference.PeerModel(copy.deepcopy(ours.encoder).requires_grad_(True), copy.deepcopy(ours.head))
        return {k: m.to(self.rt.device) for k, m in (("ours", ours), ("notebook", notebook), ("peer", peer))}

    def sample(self, n, salt):
        """A fixed random sample of n pair rows (with replacement only when n exceeds the rows)."""
        rng = np.random.default_rng([self.cfg.seed, salt])
        return rng.choice(len(self.dataset), n, replace=n > len(self.dataset))

    def subset(self, rows):
        """The dataset restricted to these rows; each process still maps tokens.npy itself."""
        sub = copy.copy(self.dataset)
        sub.pairs, sub._tokens = self.dataset.pairs[rows], None
        return sub

    def pair_texts(self, rows):
        q1, q2, labels = self.texts
        return [q1[i] for i in rows], [q2[i] for i in rows], [labels[i] for i in rows]

    def first_batch(self):
        """One batch of ours on the device, as training makes it."""
        loader, _ = self.loader(self.sample(self.cfg.batch_size, salt=3), self.cfg.batch_size, shuffle=False)
        return to_device(next(iter(loader)), self.rt.device)

    def loader(self, rows, batch_size, shuffle, seed=0):
        """Ours, as train.py makes it on this device."""
        return make_loader(self.subset(rows), self.layout, batch_size, shuffle=shuffle, seed=seed,
                           num_workers=self.plan.num_workers, pin_memory=self.rt.cuda,
                           packed=self.packed)


def synthesize(ws):
    """The 404k-row file and its preprocessed folder, made once (subprocesses: wall time and this
    child's own peak RSS). Returns (csv path, data dir, preprocess stats)."""
    if getattr(ws, "synth", None):
        return ws.synth
    synth, out = os.path.join(ws.tmp, "synth.csv"), os.path.join(ws.tmp, "synth_prep")
    run_child([sys.executable, "synth_qqp.py", ws.cfg.data, synth, "--rows", str(ws.cfg.rows),
               "--seed", str(ws.cfg.seed)], ws.tmp, "synth_qqp")
    seconds, peak_gb = run_child([sys.executable, "preprocess.py", synth, "--out_dir", out, "--encoder",
                                  ws.plan.tokenizer], ws.tmp, "preprocess")
    with open(os.path.join(out, "manifest.json")) as f:
        counts = json.load(f)["counts"]
    ws.synth = synth, out, {"seconds": seconds, "peak_rss_gb": peak_gb, **counts}
    return ws.synth


def ours_train(ws, warm_rows, timed_rows):
    """train.py's step (engine.train_step) with its defaults on this device, timed over one pass
    of timed_rows after one of warm_rows (compilation and CUDA graph capture happen there)."""
    cfg, plan, rt = ws.cfg, ws.plan, ws.rt
    tc, raw = ws.recipe, ws.models["ours"]
    compile_mode = engine.resolve_compile("auto", rt, packed=ws.packed)
    model = engine.prepare_model(raw, rt, compile_mode)
    optimizer = engine.build_optimizer(raw, tc.lr, tc.weight_decay, rt)
    scheduler = engine.build_scheduler(optimizer, plan.warmup_steps + plan.train_steps, tc.warmup_ratio)
    scaler = engine.build_scaler(rt)
    model.train()

    def one_pass(rows, seed):
        loader, sampler = ws.loader(rows, cfg.batch_size, shuffle=True, seed=seed)
        sizes = sampler.global_sizes(0)
        stats = {"data_wait_s": 0.0, "real_tokens": 0, "padded_tokens": 0, "pairs": 0, "shapes": set()}
        loss_sum = torch.zeros((), device=rt.device)
        batches = iter(loader)  # worker start-up (once per run in train.py) is not timed
        sync(rt)
        t0 = time.perf_counter()
        for k in range(len(sizes)):
            tw = time.perf_counter()
            batch = next(batches)
            stats["data_wait_s"] += time.perf_counter() - tw
            real, padded = padding_stats(batch)
            stats["shapes"].update(shapes_of(batch))
            batch = to_device(batch, rt.device)
            loss_sum += engine.train_step(model, [batch], sizes[k], optimizer, scheduler, scaler, rt, tc.clip)
            stats["real_tokens"] += real
            stats["padded_tokens"] += padded
            stats["pairs"] += sizes[k]
        sync(rt)
        stats["seconds"] = time.perf_counter() - t0
        stats["mean_loss"] = loss_sum.item() / stats["pairs"]
        return stats

    warm = one_pass(warm_rows, cfg.seed + 1)
    if rt.cuda:
        torch.cuda.reset_peak_memory_stats(rt.device)
    stats = one_pass(timed_rows, cfg.seed)
    if rt.cuda:
        stats["peak_memory_gb"] = torch.cuda.max_memory_allocated(rt.device) / 1e9
    # Compilation and graph capture: the warm-up pass's time beyond its steps at the timed speed.
    stats["warmup_seconds"] = warm["seconds"]
    stats["compile_seconds"] = max(0.0, warm["seconds"] - warm["pairs"] / stats["pairs"] * stats["seconds"])
    stats["distinct_shapes"] = len(stats.pop("shapes") | warm.pop("shapes"))
    stats["compile"] = compile_mode
    return stats


def notebook_train(ws, warm_rows, timed_rows):
    cfg, rt = ws.cfg, ws.rt
    model = ws.models["notebook"]
    optimizer = optim.Adam(model.parameters(), lr=0.0001)
    random.seed(cfg.seed)
    reference.notebook_train_epoch(model, ws.tokenizer, optimizer, *ws.pair_texts(warm_rows), cfg.batch_size, rt.device)
    if rt.cuda:
        torch.cuda.reset_peak_memory_stats(rt.device)
    sync(rt)
    t0 = time.perf_counter()
    loss, stats = reference.notebook_train_epoch(model, ws.tokenizer, optimizer, *ws.pair_texts(timed_rows),
                                                 cfg.batch_size, rt.device)
    sync(rt)
    stats.update(seconds=time.perf_counter() - t0, mean_loss=float(loss))
    if rt.cuda:
        stats["peak_memory_gb"] = torch.cuda.max_memory_allocated(rt.device) / 1e9
    return stats


def peer_train(ws, warm_rows, timed_rows):
    cfg, rt = ws.cfg, ws.rt
    model = ws.models["peer"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=ws.recipe.lr, fused=rt.cuda)
    scheduler = engine.build_scheduler(optimizer, 10 ** 6, 0.0)
    amp = torch.bfloat16 if rt.cuda else None  # the peer's bf16 is a GPU habit; fp32 on the CPU
    reference.peer_train(model, ws.dataset, warm_rows, cfg.batch_size, rt.device, amp, cfg.seed + 1, optimizer, scheduler)
    if rt.cuda:
        torch.cuda.reset_peak_memory_stats(rt.device)
    sync(rt)
    t0 = time.perf_counter()
    stats = reference.peer_train(model, ws.dataset, timed_rows, cfg.batch_size, rt.device, amp, cfg.seed,
                                 optimizer, scheduler)
    sync(rt)
    stats["seconds"] = time.perf_counter() - t0
    if rt.cuda:
        stats["peak_memory_gb"] = torch.cuda.max_memory_allocated(rt.device) / 1e9
    return stats


def end_to_end(ws, max_steps=0):
    """train.py --epochs 1 on the synthesized file, as a user runs it: the bundled MiniLM (the
    tokenizer's model: bench's --encoder where that is a model train.py loads); the preprocessing
    before it is timed apart (synthesize). max_steps > 0 stops training there (a smoke check of
    this code on a CPU: validation still runs)."""
    cfg, rt = ws.cfg, ws.rt
    _, data_dir, prep = synthesize(ws)
    print(f"train.py end to end: preprocessed {ws.cfg.rows:,} rows in {prep['seconds']:.1f} s", flush=True)
    out, logs = os.path.join(ws.tmp, "e2e_run"), os.path.dirname(os.path.abspath(cfg.out))
    seconds, _ = run_child([sys.executable, "train.py", "--data_dir", data_dir, "--out_dir", out, "--epochs", "1",
                            "--encoder", ws.plan.tokenizer, "--batch_size", str(cfg.batch_size),
                            "--device", str(rt.device), *(["--max_steps", str(max_steps)] if max_steps else [])],
                           logs, "bench_train_e2e", timeout=cfg.e2e_timeout)
    with open(os.path.join(logs, "bench_train_e2e.log")) as f:
        log = f.read()
    with open(os.path.join(out, "metrics.jsonl")) as f:
        val = json.loads(f.readlines()[-1])
    return {"train_py_seconds": seconds, "preprocess_seconds": prep["seconds"], "train_pairs": prep["train_pairs"],
            "validation_pairs": prep["validation_pairs"], "validation_accuracy": val["accuracy"],
            "log_tail": log[-3000:]}


# ----------------------------------------------------------------------------- search speed

def percentiles_ms(seconds):
    return {"p50_ms": 1e3 * float(np.percentile(seconds, 50)), "p95_ms": 1e3 * float(np.percentile(seconds, 95))}


def measure_speed(vectors, queries, rt, k=10, query_batch=64, n_single=30, exclude=None, ann=None, seed=0):
    """Latency of top-k search over unit vectors (N, H) for unit queries (Q, H): exact one query at
    a time and in batches of query_batch (per query: batch time / its queries), ANN one query at a
    time (its use), each as p50/p95 ms over the queries (batches); ANN recall@k against exact on
    the same queries; sizes on disk (fp16 vectors, norms, serialized ANN) and held in memory by a
    search process (the exact matrix, the ANN index). exclude (Q, E): rows kept out of each query's
    answers (its own row when queries are index rows). ann: (index, record), built here if None."""
    exclude = np.zeros((len(queries), 0), np.int64) if exclude is None else exclude
    matrix = search_matrix(vectors, rt.device)
    exact_fn = partial(exact_search, matrix)
    exclude_rows(partial(exact_fn, queries[:query_batch]), k, exclude[:query_batch])  # warm-up
    single = []
    for i in range(min(n_single, len(queries))):
        t0 = time.perf_counter()
        exclude_rows(partial(exact_fn, queries[i:i + 1]), k, exclude[i:i + 1])
        single.append(time.perf_counter() - t0)
    batched, exact_rows = [], []
    for b in range(0, len(queries), query_batch):
        t0 = time.perf_counter()
        exact_rows.append(exclude_rows(partial(exact_fn, queries[b:b + query_batch], query_batch=query_batch), k,
                                       exclude[b:b + query_batch])[1])
        if len(exact_rows[-1]) == query_batch or b == 0:  # a short last batch is not what batching costs
            batched.append((time.perf_counter() - t0) / len(exact_rows[-1]))
    exact_rows = np.concatenate(exact_rows)
    index, record = ann if ann is not None else build_ann(vectors, seed, n_calibration=100)
    ann_times, ann_rows = [], []
    for i in range(len(queries)):
        t0 = time.perf_counter()
        ann_rows.append(exclude_rows(partial(ann_search, index, queries[i:i + 1], nprobe=record["nprobe"]), k,
                                     exclude[i:i + 1])[1])
        ann_times.append(time.perf_counter() - t0)
    ann_bytes = import_faiss().serialize_index(index).nbytes
    n, dim = vectors.shape
    return {"vectors": n, "dim": dim, "queries": len(queries), "k": k, "device": str(rt.device),
            "exact": {**{f"single_{p}": v for p, v in percentiles_ms(single).items()},
                      **{f"batched_{p}": v for p, v in percentiles_ms(batched).items()},
                      "single_queries": len(single), "query_batch": query_batch, "batches": len(batched)},
            "ann": {**percentiles_ms(ann_times), **record,
                    f"recall_at_{k}_vs_exact": overlap(np.concatenate(ann_rows), exact_rows)},
            "disk_mb": (n * dim * 2 + n * 4 + ann_bytes) / 1e6,
            "memory_mb": {"exact_matrix": matrix.numel() * matrix.element_size() / 1e6, "ann": ann_bytes / 1e6}}


def bench_search(encoder, questions_path, rt, batch_size=256, seed=0, sample=4096, n_queries=256, embed_all=False,
                 index_path=""):
    """bench.py's search stage, on embedded questions only (ANN on random vectors, which have no
    neighbourhoods, says nothing about real search). Index build speed: questions/s of tokenizing
    and embedding `sample` distinct questions of questions_path with `encoder`, through the one
    inference road (all of them with embed_all; a small sample pads more: its length-sorted
    batches each span a wider range of lengths). Search speed: over the vectors of an index.py
    folder with index_path (and its own ANN index), else over the questions just embedded;
    n_queries of its rows as queries, each excluded from its own answers."""
    qs = read_questions(questions_path)
    rng = np.random.default_rng(seed)
    texts = qs.texts if embed_all else [qs.texts[i] for i in np.sort(rng.choice(
        len(qs.texts), min(sample, len(qs.texts)), replace=False))]
    qe = load_question_encoder(encoder=encoder).to(rt.device)
    inference = question_inference(qe, rt, batch_size)
    # warm-up: first-call imports, kernels, and on CUDA the compile (a job long enough to be compiled)
    embed_texts(qe, inference, texts[:inference.MIN_COMPILED_BATCHES * batch_size], verbose=False)
    t0 = time.perf_counter()
    vectors, _ = unit(embed_texts(qe, inference, texts, verbose=False))
    build = {"questions": len(texts), "seconds": time.perf_counter() - t0, "encoder": encoder,
             "batches": inference.describe()}
    build["questions_per_sec"] = build["questions"] / build["seconds"]
    ann = None
    if index_path:
        index = Index(index_path)
        kind = f"{len(index):,} embedded questions of the index {index_path} ({describe_model(index.manifest['model'])})"
        vectors = index.vectors
        if index.manifest.get("ann") is not None:
            ann = index.ann, index.manifest["ann"]
    else:
        kind = (f"{len(texts):,} {'' if embed_all else 'sampled '}questions of {os.path.basename(questions_path)} "
                f"embedded with {encoder}")
    picks = np.sort(rng.choice(len(vectors), min(n_queries, len(vectors)), replace=False))
    queries = np.asarray(vectors[picks], np.float32)
    return {"build": build, "corpus": kind,
            **measure_speed(np.asarray(vectors, np.float16), queries, rt, exclude=picks[:, None], ann=ann, seed=seed)}


# ----------------------------------------------------------------------------- the service

def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """serve.py in its own process on a free loopback port, up when /healthz answers (its output
    in log_path, or captured for an error); stop() sends SIGTERM, kill() SIGKILL."""

    def __init__(self, index_dir, *flags, token="", log_path=None, timeout=180):
        self.port = free_port()
        self.token = token
        self.start([sys.executable, os.path.join(ROOT, "serve.py"), index_dir, "--port", str(self.port),
                    *(["--token", token] if token else []), *flags],
                   log_path or os.path.join(os.path.dirname(os.path.abspath(index_dir)), f"serve_{self.port}.log"),
                   "/healthz", timeout)

    def start(self, argv, log_path, health, timeout, **popen):
        """Start argv (a server on self.port) and wait until GET `health` answers 200."""
        import httpx
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path, self.log = log_path, open(log_path, "w")
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, **popen)
        name = os.path.basename(argv[1])
        deadline = time.time() + timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    with open(self.log_path) as f:
                        raise RuntimeError(f"{name} exited {self.proc.returncode}: {f.read()[-2000:]}")
                try:
                    if httpx.get(self.url + health, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline:
                    raise RuntimeError(f"{name} did not answer {health} within {timeout} s (log: {self.log_path})")
                time.sleep(0.2)
        except BaseException:  # a failed start or a Ctrl-C while waiting: nothing left running
            self.kill()
            raise

    def post(self, path, body, auth=False, timeout=30):
        import httpx
        headers = {"Authorization": f"Bearer {self.token}"} if auth else {}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=timeout)

    def stats(self):
        import httpx
        return httpx.get(self.url + "/stats", timeout=30).json()

    def kill(self):
        self.stop(signal_name="SIGKILL")

    def stop(self, signal_name="SIGTERM"):
        import signal
        if self.proc.poll() is None:
            self.proc.send_signal(getattr(signal, signal_name))
            self.proc.wait(60)
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


async def http_load(url, path, bodies, concurrency, n_requests, headers=None, timeout=60):
    """n_requests POSTs of bodies (cycled) to url+path from `concurrency` clients, each sending its
    next request when its last one is answered (a closed loop: the offered load is what the
    server sustains). Returns requests/s, latency percentiles (ms), errors (non-2xx or failed)."""
    import asyncio
    import httpx
    latencies, errors, sent = [], [], [0]
    async with httpx.AsyncClient(base_url=url, timeout=timeout, headers=headers,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one_client():
            while sent[0] < n_requests:
                body = bodies[sent[0] % len(bodies)]
                sent[0] += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post(path, json=body)
                    if r.status_code >= 300:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as e:
                    errors.append(f"{type(e).__name__}: {e}")
                latencies.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
    ms = 1e3 * np.array(latencies)
    return {"path": path, "concurrency": concurrency, "requests": len(latencies), "seconds": seconds,
            "requests_per_sec": len(latencies) / seconds, "errors": len(errors), "first_errors": errors[:3],
            **{f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 95, 99)}}


def load(url, path, bodies, concurrency, n_requests, headers=None):
    import asyncio
    return asyncio.run(http_load(url, path, bodies, concurrency, n_requests, headers))


def new_question(i, tag):
    """A question no index holds, unique per (tag, i)."""
    return f"[{tag} {i}] Where can I find a purple giraffe costume in size {i} before the {tag} parade?"


def found_by_search(server, questions, ids, concurrency=16):
    """How many of these (question, id) the server returns first when asked the question itself."""
    import asyncio
    import httpx

    async def run():
        found, todo = [], list(zip(questions, ids))
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            async def worker():
                while todo:
                    q, qid = todo.pop()
                    r = await client.post("/search", json={"question": q, "k": 1})
                    found.append(r.status_code == 200 and r.json()["results"][0]["id"] == qid)
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return sum(found)
    return asyncio.run(run())


def writes_during_searches(server, search_bodies, n_writes=1000, search_concurrency=8, writers=4, tag="w"):
    """A writer adds n_writes questions, one per request (each committed before its reply), over
    `writers` connections, while searches run at search_concurrency until it is done; then every
    acknowledged question is searched for. Returns the write rate, the searches' latency and
    errors, and acknowledged vs found."""
    import asyncio
    import httpx

    async def run():
        acked, write_errors, done = [], [], asyncio.Event()
        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     headers={"Authorization": f"Bearer {server.token}"}) as client:
            async def writer():
                t0, todo = time.perf_counter(), list(range(n_writes))[::-1]

                async def one():
                    while todo:
                        i = todo.pop()
                        r = await client.post("/questions", json={"id": f"{tag}{i}", "question": new_question(i, tag)})
                        (acked if r.status_code == 200 else write_errors).append(i if r.status_code == 200 else r.text)
                await asyncio.gather(*(one() for _ in range(writers)))
                done.set()
                return time.perf_counter() - t0

            async def searches():
                lat, errors, i = [], 0, 0
                async def one():
                    nonlocal errors, i
                    while not done.is_set():
                        body = search_bodies[i % len(search_bodies)]
                        i += 1
                        t0 = time.perf_counter()
                        r = await client.post("/search", json=body)
                        lat.append(time.perf_counter() - t0)
                        errors += r.status_code != 200
                await asyncio.gather(*(one() for _ in range(search_concurrency)))
                return lat, errors
            write_seconds, (lat, search_errors) = await asyncio.gather(writer(), searches())
        return acked, write_errors, write_seconds, lat, search_errors

    acked, write_errors, write_seconds, lat, search_errors = asyncio.run(run())
    found = found_by_search(server, [new_question(i, tag) for i in acked], [f"{tag}{i}" for i in acked])
    ms = 1e3 * np.array(lat)
    return {"writes": n_writes, "writer_connections": writers, "acknowledged": len(acked), "write_errors": len(write_errors),
            "writes_per_sec": n_writes / write_seconds, "searches_meanwhile": len(lat),
            "search_errors": int(search_errors), "search_p95_ms_meanwhile": float(np.percentile(ms, 95)) if len(ms) else None,
            "found_after": found, "lost": len(acked) - found}


def kill_during_writes(index_dir, flags, token, kill_after=200, tag="k", log_dir=None):
    """A server takes questions one per request; after kill_after acknowledgements it is killed
    with SIGKILL (a write in flight), restarted, and every acknowledged question searched for.
    Returns acknowledged, found after the restart, lost, and the restart's seconds."""
    import httpx
    log = os.path.join(log_dir, "serve_kill.log") if log_dir else None
    server = ServerProcess(index_dir, *flags, token=token, log_path=log)
    acked, stop = [], threading.Event()

    def writer():
        for i in range(10 ** 6):
            if stop.is_set():
                return
            try:
                r = server.post("/questions", {"id": f"{tag}{i}", "question": new_question(i, tag)}, auth=True)
            except httpx.HTTPError:
                return  # the server died under this request: never acknowledged
            if r.status_code == 200:
                acked.append(i)
    thread = threading.Thread(target=writer)
    thread.start()
    deadline = time.time() + 120
    while len(acked) < kill_after and time.time() < deadline and thread.is_alive():
        time.sleep(0.005)
    server.kill()
    stop.set()
    thread.join(60)
    t0 = time.perf_counter()
    Index(index_dir)  # the folder still loads (the server never writes it)
    again = ServerProcess(index_dir, *flags, token=token, log_path=log and log + ".restart")
    restart = time.perf_counter() - t0
    try:
        found = found_by_search(again, [new_question(i, tag) for i in acked], [f"{tag}{i}" for i in acked])
    finally:
        again.stop()
    return {"acknowledged_before_kill": len(acked), "found_after_restart": found, "lost": len(acked) - found,
            "restart_seconds": restart}


def encoder_agreement(index_dir, rt, variant="int8", n=500, seed=0):
    """How much serve.py --int8 (or --runtime onnx) changes the answers: n of the index's questions
    embedded by the index's model in torch fp32, then with its encoder quantized
    (retrieval.quantize_int8) or run by ONNX Runtime (retrieval.use_onnx): the cosine of each
    question's two vectors, top-1 and top-10 agreement of exact search over the index, and the
    classifier's probability of the same top-10 candidates."""
    from retrieval import duplicate_probability, load_index_model, quantize_int8, use_onnx
    index = Index(index_dir)
    qe = load_index_model(index).to(rt.device)
    texts = index.questions[1]
    picks = np.random.default_rng(seed).choice(len(texts), min(n, len(texts)), replace=False)
    texts = [texts[i] for i in picks]
    matrix = search_matrix(index.vectors, rt.device)
    out = {}
    for name in ("fp32", variant):
        if name == "int8":
            quantize_int8(qe)
        elif name == "onnx":
            use_onnx(qe, torch.get_num_threads())
        t0 = time.perf_counter()
        pooled = embed_texts(qe, question_inference(qe, rt, 64), texts, verbose=False)
        seconds = time.perf_counter() - t0
        rows = exact_search(matrix, unit(pooled)[0], 10)[1]
        probs = None if qe.classifier is None else duplicate_probability(qe.classifier, pooled,
                                                                          index.rerank_vectors(rows), rt)
        out[name] = {"pooled": pooled, "rows": rows, "probs": probs, "seconds": seconds}
    a, b = (unit(out[k]["pooled"])[0] for k in ("fp32", variant))
    cos = (a * b).sum(1)
    ra, rb = out["fp32"]["rows"], out[variant]["rows"]
    result = {"questions": len(texts), f"cosine_fp32_vs_{variant}_mean": float(cos.mean()),
              f"cosine_fp32_vs_{variant}_min": float(cos.min()), "top1_agreement": float((ra[:, 0] == rb[:, 0]).mean()),
              "top10_overlap": overlap(rb, ra),
              "embed_questions_per_sec": {k: len(texts) / out[k]["seconds"] for k in ("fp32", variant)}}
    if out["fp32"]["probs"] is not None:  # the same candidates' probabilities, fp32 vs the variant's queries
        pa = duplicate_probability(qe.classifier, out[variant]["pooled"], index.rerank_vectors(ra), rt)
        diff = np.abs(pa - out["fp32"]["probs"])
        result.update(probability_abs_diff_mean=float(diff.mean()), probability_abs_diff_max=float(diff.max()))
    return result


def encoder_batching_gain(index_dir, rt, runtime="torch", n=256, batch=32, seed=0):
    """What a question costs one of serve.py's CPU workers (one thread) alone and in a batch: n of
    the index's questions embedded one call each, then `batch` to a call (cut into serve's encoder
    calls: retrieval.encoder_batch_size), by the index's model on `runtime` (torch or onnx). The
    ceiling of what dynamic batching can gain over a server whose workers take one request each."""
    from retrieval import encoder_batch_size, load_index_model, use_onnx
    index = Index(index_dir)
    qe = load_index_model(index).to(rt.device)
    texts = index.questions[1]
    picks = np.random.default_rng(seed).choice(len(texts), min(n, len(texts)), replace=False)
    texts = [texts[i] for i in picks]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if runtime == "onnx":
            use_onnx(qe, 1)
        inference = question_inference(qe, rt, encoder_batch_size(runtime))
        embed_texts(qe, inference, texts[:batch], verbose=False)  # warm-up
        rates = {}
        for size in (1, batch):
            t0 = time.perf_counter()
            for i in range(0, len(texts), size):
                embed_texts(qe, inference, texts[i:i + size], verbose=False)
            rates[size] = len(texts) / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return {"runtime": runtime, "questions": len(texts), "one_at_a_time_per_sec": rates[1], "batch": batch,
            "batched_per_sec": rates[batch], "gain": rates[batch] / rates[1]}
