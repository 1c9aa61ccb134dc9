"""Measuring, for bench.py: device-synchronized timing, a script's wall time and peak memory in a
subprocess, the measured matmul rate (MFU's denominator), which GPU kernels ran, and the report's
rows, table and the machine, versions and commit it ran on."""
import os
import platform
import subprocess
import threading
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


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
