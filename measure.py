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
from functools import cached_property

import numpy as np
import torch
from torch import optim

import engine
import reference
from data import PairDataset, make_loader, padding_stats, shapes_of, to_device
from model import ModelConfig, build_model
from text import load_tokenizer, read_pairs

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
    except Exception as e:  # any profiler failure: the benchmark's numbers stand without it
        return f"profiler unavailable: {type(e).__name__}: {str(e)[:200]}"
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
        self.recipe = engine.Recipe()  # ours runs train.py's defaults: this recipe, ModelConfig(),
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
        builds it with its default settings (head, pooling, features)."""
        torch.manual_seed(self.cfg.seed)
        if self.plan.encoder == DISTILBERT_CONFIG:
            from transformers import DistilBertConfig
            hf = {k: v for k, v in DistilBertConfig().to_dict().items()
                  if not k.startswith("_") and k != "transformers_version"}
            ours = build_model(ModelConfig(encoder_config=hf))
        else:
            ours = build_model(ModelConfig(encoder=self.plan.encoder))
        notebook = reference.NotebookModel(copy.deepcopy(ours.encoder), self.rt.device)
        peer = reference.PeerModel(copy.deepcopy(ours.encoder), copy.deepcopy(ours.head))
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
    compile_mode = engine.resolve_compile("auto", rt)
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


def end_to_end(ws):
    """train.py --epochs 1 on the synthesized file, bundled MiniLM, as a user runs it; the
    preprocessing before it is timed apart (synthesize)."""
    cfg, rt = ws.cfg, ws.rt
    _, data_dir, prep = synthesize(ws)
    print(f"train.py end to end: preprocessed {ws.cfg.rows:,} rows in {prep['seconds']:.1f} s", flush=True)
    out, logs = os.path.join(ws.tmp, "e2e_run"), os.path.dirname(os.path.abspath(cfg.out))
    seconds, _ = run_child([sys.executable, "train.py", "--data_dir", data_dir, "--out_dir", out, "--epochs", "1",
                            "--batch_size", str(cfg.batch_size), "--device", str(rt.device)],
                           logs, "bench_train_e2e", timeout=cfg.e2e_timeout)
    with open(os.path.join(logs, "bench_train_e2e.log")) as f:
        log = f.read()
    with open(os.path.join(out, "metrics.jsonl")) as f:
        val = json.loads(f.readlines()[-1])
    return {"train_py_seconds": seconds, "preprocess_seconds": prep["seconds"], "train_pairs": prep["train_pairs"],
            "validation_pairs": prep["validation_pairs"], "validation_accuracy": val["accuracy"],
            "log_tail": log[-3000:]}
