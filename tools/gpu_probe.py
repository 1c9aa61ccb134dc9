"""What one short GPU run must show about the training step and scoring, for a random
DistilBERT-size siamese classifier (66M parameters) built and trained as train.py does on this
device (packed batches, bf16, torch.compile with CUDA graphs), on the real rows:

  train    seconds of the first two steps of each distinct packed shape (the first compiles or
           warms up, the second records the CUDA graphs), then --steps steady steps after
           --warmup_steps, each timed with CUDA events: GPU ms and host ms (issuing it) per step,
           pairs/s; recompiles, graph breaks, CUDA graph recordings and why CUDA graphs were
           skipped (torch's recompiles, graph_breaks and cudagraphs logs, dynamo's counters)
  profile  --profile_steps steps under torch.profiler: kernels and CUDA graph launches per step,
           the top kernels by GPU time, the attention kernels
  score    the one inference road (engine.Inference, model.probability) eager against compiled on
           --score_pairs pairs: pairs/s of each on its second pass over the same loader

    # CPU smoke of this code (no CUDA: host timers, no compile, a tiny encoder), about a minute:
    python tools/gpu_probe.py --encoder tiny --steps 3 --warmup_steps 2 --score_pairs 512 --out /tmp/gpu_probe.json
    # one GPU, about 2 minutes (tools/gpu_check.sh runs it):
    python tools/gpu_probe.py --device cuda --data .device/qqp_first8k.csv.gz --out gpu_probe.json

Each part runs under its own time budget (cut to what --total_budget_s leaves); a part over its
budget or failing is reported as such and the next one runs. The JSON is written after each part,
so a run cut short keeps what it measured. Steps time train.py's own step (engine.train_step) on
batches collated beforehand, so the numbers are the step's, not the loader's.
"""
import getpass
import json
import os
import re
import signal
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Literal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # a tool beside the scripts: it imports the same library modules they do

import numpy as np  # noqa: E402
import torch  # noqa: E402

import engine  # noqa: E402
from cli import UserError, arg, parse_config, run  # noqa: E402
from data import check_out_file, make_loader, padding_stats, shapes_of, to_device  # noqa: E402
from hub import BUNDLED_MODEL  # noqa: E402
from measure import (DISTILBERT_CONFIG, Workspace, attention_kernels, git_commit, machine_info, sync,  # noqa: E402
                     versions)
from model import ModelConfig, build_model  # noqa: E402

TINY = "tiny"  # --encoder: a 2-layer, 32-wide random DistilBERT (the tests' TINY_DISTILBERT), for CPU smoke
TINY_DISTILBERT = dict(model_type="distilbert", vocab_size=30522, dim=32, n_layers=2, n_heads=2,
                       hidden_dim=64, max_position_embeddings=512)
ATTENTION_WORDS = ("attention", "fmha", "flash", "sdpa", "cudnn")
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


@dataclass
class ProbeConfig:
    data: str = arg(os.path.join(ROOT, "..", "shared", "data", "qqp", "qqp_first8k.csv.gz"), "the real rows")
    encoder: Literal[DISTILBERT_CONFIG, TINY] = arg(DISTILBERT_CONFIG, "random weights: distilbert-config "
                                                    "(66M, DistilBertConfig()) or tiny (CPU smoke)")
    device: str = arg("auto", "auto (cuda > mps > cpu), cpu, cuda")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = arg("auto", "auto: bf16 (else fp16) on GPU, fp32 on CPU")
    shapes: Literal[engine.SHAPES] = arg("packed", engine.SHAPES_HELP)
    compile: Literal[engine.COMPILE_MODES] = arg("auto", engine.COMPILE_HELP)
    batch_size: int = arg(128, "pairs per training step (scoring: twice as many, as train.py's validation)",
                          aliases=["--bs"])
    warmup_steps: int = arg(30, "untimed steps after the first two of each shape")
    steps: int = arg(200, "steady steps timed (CUDA events on a GPU)")
    profile_steps: int = arg(3, "steps under torch.profiler")
    score_pairs: int = arg(65_536, "pairs scored per pass (drawn from the rows, with replacement)")
    num_workers: int = arg(-1, "scoring DataLoader workers (-1: 2 on CUDA, 0 on CPU, as bench.py)")
    data_budget_s: float = arg(45, "seconds for preprocessing, collating and building the model")
    train_budget_s: float = arg(90, "seconds for the first steps of each shape, warm-up and timed steps")
    profile_budget_s: float = arg(25, "seconds for the profiled steps")
    score_budget_s: float = arg(60, "seconds for eager and compiled scoring, two passes each")
    total_budget_s: float = arg(170, "seconds for everything: each part gets at most what is left")
    seed: int = arg(0, "weights, batches, scored pairs")
    out: str = arg("gpu_probe.json", "the JSON report")


@dataclass
class Plan:
    """Values derived once from the config (measure.Workspace reads tokenizer and num_workers)."""
    encoder: str
    tokenizer: str
    num_workers: int
    packed: bool
    compile_mode: str


class PartTimeout(BaseException):
    """A part ran past its budget. A BaseException, like KeyboardInterrupt, so that no library's
    `except Exception` swallows it midway."""


@contextmanager
def time_limit(seconds):
    """Raise PartTimeout in this (main) thread after `seconds`."""
    def expire(signum, frame):
        raise PartTimeout()
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Clock:
    def __init__(self):
        self.t0 = time.perf_counter()

    def elapsed(self):
        return time.perf_counter() - self.t0

    def say(self, msg):
        print(f"[{time.strftime('%H:%M:%S')} +{self.elapsed():6.1f} s] {msg}", flush=True)


# ----------------------------------------------------------------------------- compile diagnostics

class TorchLogs:
    """torch's recompiles, graph_breaks and cudagraphs logs (what TORCH_LOGS="recompiles,graph_breaks,
    cudagraphs" shows), on stderr as usual and also in a file read back per part."""

    def __init__(self, path):
        self.path, self.error = path, None
        before = os.environ.get("TORCH_LOGS_OUT")
        os.environ["TORCH_LOGS_OUT"] = path  # set_logs reads it: a file handler beside stderr's
        try:
            torch._logging.set_logs(recompiles=True, graph_breaks=True, cudagraphs=True)
        except Exception as e:  # a torch without these logs: the counters still say how many
            self.error = f"torch logs unavailable: {type(e).__name__}: {e}"
        finally:
            if before is None:
                os.environ.pop("TORCH_LOGS_OUT")
            else:
                os.environ["TORCH_LOGS_OUT"] = before

    def offset(self):
        return os.path.getsize(self.path) if os.path.exists(self.path) else 0

    def since(self, offset):
        if not os.path.exists(self.path):
            return ""
        with open(self.path, errors="replace") as f:
            f.seek(offset)
            return f.read()


# Each line of torch's logs starts "V1130 18:55:43.960000 10937 file.py:5396] [0/1] [__recompiles] ".
LOG_PREFIX = re.compile(r"^[A-Z]\d{4} [\d:.]+ \d+ \S+\] (?:\[[^\]]*\] )*")


def unique(items, n=8, width=300):
    out = []
    for item in items:
        item = item.strip()[:width]
        if item not in out:
            out.append(item)
    return out[:n]


def log_summary(text):
    """Counts and reasons from a stretch of the torch logs: each recompile with its guard failures,
    each graph break's reason, CUDA graph recordings and every reason CUDA graphs were skipped."""
    lines = [LOG_PREFIX.sub("", line) for line in text.splitlines()]

    def with_next(i, n):  # line i and the next n non-empty lines, as one
        return " | ".join([lines[i].strip()] + [s.strip() for s in lines[i + 1:i + 1 + 2 * n] if s.strip()][:n])

    recompiles = [i for i, line in enumerate(lines) if line.startswith("Recompiling function")]
    return {"recompiles": len(recompiles),
            "recompile_reasons": unique(with_next(i, 2) for i in recompiles),
            "graph_break_lines": sum(line.startswith("Graph break") for line in lines),
            "graph_break_reasons": unique(with_next(i, 1) for i, line in enumerate(lines)
                                          if line.startswith("Graph Break Reason")),
            "cudagraph_recordings": sum("Recording function=" in line and "Re-recording" not in line
                                        for line in lines),
            "cudagraph_rerecordings": sum("Re-recording" in line for line in lines),
            "cudagraph_skips": unique(line.split("skipping cudagraphs", 1)[1].strip(" :")
                                      for line in lines if "skipping cudagraphs" in line)}


def dynamo_counters():
    """The counters of torch._dynamo.utils that say how compilation went (frames, graphs, graph
    breaks by reason, CUDA graph skips), as plain dicts; cleared at the start of each part."""
    from torch._dynamo.utils import counters
    out = {k: {key[:300]: n for key, n in counters[k].items()} for k in list(counters)
           if k in ("stats", "frames", "graph_break", "unimplemented", "recompiles")}
    cudagraphs = {k: v for k, v in counters.get("inductor", {}).items() if "cudagraph" in k}
    if cudagraphs:
        out["inductor_cudagraphs"] = cudagraphs
    return out


def compile_seconds():
    """Seconds spent so far in each compile phase (dynamo's own timers; none in a torch without them)."""
    import torch._dynamo.utils as dynamo_utils
    return {k: sum(v) for k, v in getattr(dynamo_utils, "compilation_time_metrics", {}).items()}


def inductor_cache():
    """Whether inductor's on-disk cache already held compiled code at the start (a warm cache makes
    the first steps faster than on a fresh machine)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    path = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(tempfile.gettempdir(),
                                                                     f"torchinductor_{user}")
    return {"path": path, "warm": os.path.isdir(path) and bool(os.listdir(path))}


# ----------------------------------------------------------------------------- the parts

class Trainer:
    """train.py's step with its defaults (engine.Recipe), built as train.py builds it."""

    def __init__(self, raw, rt, compile_mode, total_steps):
        recipe = engine.Recipe()
        self.rt, self.clip = rt, recipe.clip
        self.model = engine.prepare_model(raw, rt, compile_mode)
        self.optimizer = engine.build_optimizer(raw, recipe.lr, recipe.weight_decay, rt)
        self.scheduler = engine.build_scheduler(self.optimizer, total_steps, recipe.warmup_ratio)
        self.scaler = engine.build_scaler(rt)
        self.loss_sum = torch.zeros((), device=rt.device)
        self.pairs = 0
        raw.train()

    def __call__(self, batch, pairs):
        """One optimizer step on a collated batch in (pinned) CPU memory, copied over as train.py does."""
        self.loss_sum += engine.train_step(self.model, [to_device(batch, self.rt.device)], pairs, self.optimizer,
                                           self.scheduler, self.scaler, self.rt, self.clip)
        self.pairs += pairs


def ms_stats(seconds):
    ms = 1e3 * np.asarray(seconds, dtype=np.float64)
    return {"mean": float(ms.mean()), "p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "max": float(ms.max())}


def part_data(st, result):
    """The rows preprocessed (preprocess.py, a subprocess), the steps' batches collated once, the model."""
    cfg, rt, ws = st.cfg, st.rt, st.ws
    t0 = time.perf_counter()
    result["pairs"] = len(ws.dataset)
    result["preprocess_s"] = time.perf_counter() - t0
    n = cfg.warmup_steps + cfg.steps + cfg.profile_steps
    loader, sampler = make_loader(ws.dataset, ws.layout, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                  pin_memory=rt.cuda, packed=st.plan.packed)
    t0, epoch, st.batches = time.perf_counter(), 0, []
    while len(st.batches) < n:  # epoch after epoch, as training draws them
        sampler.set_epoch(epoch)
        epoch += 1
        for batch in loader:
            st.batches.append((batch, int((batch["index"] >= 0).sum())))  # pairs counted on the CPU
            if len(st.batches) == n:
                break
    real, padded = np.sum([padding_stats(b) for b, _ in st.batches], axis=0)
    result.update(batches=n, collate_ms_per_batch=1e3 * (time.perf_counter() - t0) / n,
                  real_over_padded_tokens=float(real / padded))
    torch.manual_seed(cfg.seed)
    if cfg.encoder == DISTILBERT_CONFIG:  # as measure.Workspace builds bench.py's DistilBERT
        from transformers import DistilBertConfig
        hf = {k: v for k, v in DistilBertConfig().to_dict().items()
              if not k.startswith("_") and k != "transformers_version"}
    else:
        hf = TINY_DISTILBERT
    st.raw = build_model(ModelConfig(encoder_config=hf, freeze_layers=engine.Recipe.freeze_layers)).to(rt.device)
    result["params"] = sum(p.numel() for p in st.raw.parameters())


def shape_name(shape):
    return " + ".join("x".join(map(str, s)) for s in shape)


def part_train(st, result):
    rt, cfg, batches = st.rt, st.cfg, st.batches
    first = {}  # shape -> index of its first batch, over every batch this run takes
    for i, (batch, _) in enumerate(batches):
        first.setdefault(shapes_of(batch), i)
    result["distinct_shapes"] = len(first)
    step = st.trainer = Trainer(st.raw, rt, st.plan.compile_mode, 2 * len(first) + len(batches))
    result["shapes"] = []
    for shape, i in first.items():
        # cudagraph trees run a new shape once to warm up (compiling first if the graph is new),
        # record its CUDA graphs on the second call, and replay from the third.
        seconds = []
        for _ in range(2):
            sync(rt)
            t0 = time.perf_counter()
            step(*batches[i])
            sync(rt)
            seconds.append(time.perf_counter() - t0)
        result["shapes"].append({"shape": shape_name(shape), "first_step_s": seconds[0],
                                 "second_step_s": seconds[1], "first_seen_at_batch": i})
        st.say(f"shape {shape_name(shape)}: first step {seconds[0]:.2f} s, second {seconds[1]:.2f} s")
    for batch, pairs in batches[:cfg.warmup_steps]:
        step(batch, pairs)
    sync(rt)
    st.say(f"warm-up: {cfg.warmup_steps} steps")
    timed = batches[cfg.warmup_steps:cfg.warmup_steps + cfg.steps]
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in timed] if rt.cuda else []
    host = []
    pairs0 = step.pairs
    t_wall = time.perf_counter()
    for k, (batch, pairs) in enumerate(timed):
        t0 = time.perf_counter()
        if events:
            events[k][0].record()
        step(batch, pairs)
        if events:
            events[k][1].record()
        host.append(time.perf_counter() - t0)
    sync(rt)  # the one sync of the timed loop; events are read after it
    wall = time.perf_counter() - t_wall
    pairs = step.pairs - pairs0
    result["steady"] = {"steps": len(timed), "pairs": pairs, "wall_s": wall, "pairs_per_sec": pairs / wall,
                        "host_ms_per_step": ms_stats(host),
                        "gpu_ms_per_step": ms_stats([a.elapsed_time(b) / 1e3 for a, b in events]) if events else
                        "no CUDA here: wall time only"}
    result["mean_loss"] = step.loss_sum.item() / step.pairs
    gpu = result["steady"]["gpu_ms_per_step"]
    st.say(f"steady: {len(timed)} steps, {pairs / wall:,.0f} pairs/s, host ms/step p50 "
           f"{result['steady']['host_ms_per_step']['p50']:.2f}"
           + (f", GPU ms/step p50 {gpu['p50']:.2f} (max {gpu['max']:.2f})" if events else ""))


def part_profile(st, result):
    """A few steps under torch.profiler; on CUDA the kernels (those inside CUDA graph replays too,
    when CUPTI reports them) and the host's kernel and graph launches."""
    rt, cfg = st.rt, st.cfg
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    base = cfg.warmup_steps + cfg.steps
    profiled = st.batches[base:base + cfg.profile_steps]
    n = max(len(profiled), 1)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if rt.cuda else [])) as prof:
        for batch, pairs in profiled:
            st.trainer(batch, pairs)
        sync(rt)
    events = prof.events()
    result["steps"] = len(profiled)
    result["graph_launches_per_step"] = sum(e.name == "cudaGraphLaunch" for e in events) / n
    result["host_kernel_launches_per_step"] = sum(e.name in LAUNCHES for e in events) / n
    if not rt.cuda:
        result["note"] = "no CUDA here: CPU ops only (no kernels, no graphs)"
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]
        result["top_cpu_ops"] = [{"name": e.key[:120], "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / n,
                                  "calls_per_step": e.count / n} for e in ops]
        return
    kernels = {}  # name -> [calls, GPU microseconds]
    for e in events:
        if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset")):
            k = kernels.setdefault(e.name, [0, 0.0])
            k[0] += 1
            k[1] += e.time_range.elapsed_us()
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:10]
    result.update(kernels_per_step=sum(c for c, _ in kernels.values()) / n,
                  kernel_gpu_ms_per_step=sum(us for _, us in kernels.values()) / 1e3 / n,
                  top_kernels=[{"name": name[:160], "gpu_ms_per_step": us / 1e3 / n, "calls_per_step": c / n}
                               for name, (c, us) in top],
                  attention_kernels_traced=sorted(name for name in kernels
                                                  if any(w in name.lower() for w in ATTENTION_WORDS))[:8])
    if result["graph_launches_per_step"] and not kernels:
        result["note"] = "CUDA graphs launched but no kernels traced: CUPTI did not report graph kernels"
    if not result["attention_kernels_traced"]:
        # What SDPA picks in an eager forward of the same model, as bench.py reports it. Only when
        # the trace above named none: a second profiler session is one more chance for CUPTI to
        # trip over the captured graphs, so what was measured is saved first.
        st.save()
        batch = to_device(profiled[0][0], rt.device)
        result["attention_kernels_eager_forward"] = attention_kernels(st.raw, batch, rt)
    st.say(f"profile: {result['kernels_per_step']:.0f} kernels, "
           f"{result['graph_launches_per_step']:.0f} graph launches and "
           f"{result['host_kernel_launches_per_step']:.0f} host kernel launches per step; "
           f"{result['kernel_gpu_ms_per_step']:.2f} GPU ms in kernels per step")


def part_score(st, result):
    """engine.Inference over the same pairs, eager and compiled: each timed on its second pass over
    one loader (the first compiles, records CUDA graphs and starts the workers), as bench.py's infer."""
    rt, cfg, ws = st.rt, st.cfg, st.ws
    rows = ws.sample(cfg.score_pairs, salt=2)
    pairs = ws.subset(rows)
    st.raw.eval()
    for name, mode in (("eager", "off"), ("compiled", cfg.compile)):
        inference = engine.Inference(st.raw.probability, ws.layout, rt, 2 * cfg.batch_size, shapes=cfg.shapes,
                                     compile=mode, num_workers=st.plan.num_workers)
        loader = inference.loader(pairs)
        passes = []
        for _ in range(2):
            sync(rt)
            t0 = time.perf_counter()
            inference.run(loader, len(rows), verbose=False)
            sync(rt)
            passes.append(time.perf_counter() - t0)
        result[name] = {"batches": inference.describe(), "first_pass_s": passes[0], "seconds": passes[1],
                        "pairs_per_sec": len(rows) / passes[1]}
        st.say(f"score {name} ({inference.describe()}): {len(rows) / passes[1]:,.0f} pairs/s "
               f"(first pass {passes[0]:.1f} s)")
        st.save()
    result["pairs"] = len(rows)
    result["compiled_over_eager"] = result["compiled"]["pairs_per_sec"] / result["eager"]["pairs_per_sec"]
    if not rt.cuda:
        result["note"] = "no CUDA here: compile auto is off on the CPU, so both sides run eager"


PARTS = (("data", part_data, "data_budget_s"), ("train", part_train, "train_budget_s"),
         ("profile", part_profile, "profile_budget_s"), ("score", part_score, "score_budget_s"))


# ----------------------------------------------------------------------------- main

class State:
    """What the parts share: config, runtime, workspace, the model and its trainer, the batches."""

    def __init__(self, cfg, plan, rt, ws, report, clock):
        self.cfg, self.plan, self.rt, self.ws, self.report, self.clock = cfg, plan, rt, ws, report, clock
        self.say = clock.say
        self.batches, self.raw, self.trainer = [], None, None

    def save(self):
        with open(self.cfg.out, "w") as f:
            json.dump(self.report, f, indent=1, default=str)


def run_part(st, logs, name, fn, budget_s):
    """One part under its budget; its compile diagnostics (torch logs, dynamo counters and timers)
    from its own stretch of the run. Failures are recorded, not raised: the next part still runs."""
    from torch._dynamo.utils import counters
    budget_s = min(budget_s, st.cfg.total_budget_s - st.clock.elapsed())
    result = st.report["parts"][name] = {"status": "running", "budget_s": round(budget_s, 1)}
    if budget_s < 1:
        result["status"] = "skipped: --total_budget_s spent"
        st.say(f"== {name}: skipped, no time left")
        return
    stopped = [n for n, r in st.report["parts"].items() if r["status"].startswith("stopped")]
    if stopped:  # cut in the middle of a compile or a CUDA graph recording: this part's failure may be that
        result["after_a_stopped_part"] = stopped
    st.say(f"== {name} (budget {budget_s:.0f} s)")
    offset, times = logs.offset(), compile_seconds()
    counters.clear()
    t0 = time.perf_counter()
    try:
        with time_limit(budget_s):
            fn(st, result)
        result["status"] = "ok"
    except PartTimeout:
        result["status"] = f"stopped at its budget of {budget_s:.0f} s"
    except Exception as e:  # one part failing must not hide what the others measure
        traceback.print_exc()
        result["status"] = f"failed: {type(e).__name__}: {str(e)[:500]}"
    result["seconds"] = time.perf_counter() - t0
    spent = {k: v - times.get(k, 0.0) for k, v in compile_seconds().items()}
    result["compile"] = {**log_summary(logs.since(offset)), "counters": dynamo_counters(),
                         "compile_phase_s": {k: round(v, 2) for k, v in sorted(spent.items(), key=lambda kv: -kv[1])
                                             if v >= 0.05}}
    st.say(f"== {name}: {result['status']} ({result['seconds']:.1f} s)")
    st.save()


def summary_lines(report):
    """The compact report printed at the end."""
    s, p = report["settings"], report["parts"]
    lines = [f"gpu probe: {report['machine'].get('gpu') or s['device']} | {s['precision']} | "
             f"{'packed' if s['resolved']['packed'] else 'exact'} batches | compile {s['resolved']['compile_mode']} | "
             f"{s['encoder']} "
             f"({p['data'].get('params', 0) / 1e6:.1f}M params) | batch {s['batch_size']}"]
    for name, r in p.items():
        after = f" (after {', '.join(r['after_a_stopped_part'])} was stopped)" if r.get("after_a_stopped_part") else ""
        lines.append(f"{name:8s} {r['status']} in {r.get('seconds', 0):.1f} s{after}")
    t = p.get("train", {})
    for sh in t.get("shapes", []):
        lines.append(f"  shape {sh['shape']}: first step {sh['first_step_s']:.2f} s, "
                     f"second {sh['second_step_s']:.2f} s")
    if "steady" in t:
        sd = t["steady"]
        gpu = sd["gpu_ms_per_step"]
        gpu = f"GPU ms/step p50 {gpu['p50']:.2f} p90 {gpu['p90']:.2f} max {gpu['max']:.2f}" if isinstance(gpu, dict) \
            else gpu
        lines.append(f"  steady {sd['steps']} steps: {sd['pairs_per_sec']:,.0f} pairs/s | {gpu} | host ms/step p50 "
                     f"{sd['host_ms_per_step']['p50']:.2f}")
    for name in ("train", "score"):
        c = p.get(name, {}).get("compile")
        if c:
            lines.append(f"  {name} compile: recompiles {c['recompiles']}, graph breaks "
                         f"{sum(c['counters'].get('graph_break', {}).values())} (log lines {c['graph_break_lines']}), "
                         f"CUDA graph recordings {c['cudagraph_recordings']} "
                         f"(re-recorded {c['cudagraph_rerecordings']}), "
                         f"skipped CUDA graphs: {'; '.join(c['cudagraph_skips']) or 'none'}")
            lines += [f"    {r}" for r in (c["recompile_reasons"] + c["graph_break_reasons"])[:4]]
    pr = p.get("profile", {})
    if "kernels_per_step" in pr:
        lines.append(f"  profile: {pr['kernels_per_step']:.0f} kernels/step, "
                     f"{pr['graph_launches_per_step']:.0f} graph launches/step, "
                     f"{pr['kernel_gpu_ms_per_step']:.2f} GPU ms/step in kernels; attention: "
                     f"{pr['attention_kernels_traced'] or pr.get('attention_kernels_eager_forward')}")
        lines += [f"    {k['gpu_ms_per_step']:7.3f} ms x{k['calls_per_step']:.0f}  {k['name'][:100]}"
                  for k in pr["top_kernels"]]
    elif "top_cpu_ops" in pr:
        lines.append(f"  profile: {pr['note']}; top: " + ", ".join(
            f"{o['name']} {o['self_cpu_ms_per_step']:.1f} ms" for o in pr["top_cpu_ops"][:5]))
    sc = p.get("score", {})
    if "compiled_over_eager" in sc:
        lines.append(f"  score {sc['pairs']:,} pairs: eager {sc['eager']['pairs_per_sec']:,.0f} pairs/s, compiled "
                     f"{sc['compiled']['pairs_per_sec']:,.0f} pairs/s ({sc['compiled_over_eager']:.2f}x)")
    return lines


def main(argv=None):
    cfg = parse_config(ProbeConfig, argv, __doc__)
    return run(probe, cfg)


def probe(cfg):
    clock = Clock()
    if min(cfg.batch_size, cfg.steps, cfg.profile_steps, cfg.score_pairs) < 1 or cfg.warmup_steps < 0:
        raise UserError("--batch_size, --steps, --profile_steps and --score_pairs must be >= 1, --warmup_steps >= 0",
                        "pass counts in range")
    if not os.path.isfile(cfg.data):
        raise UserError(f"--data {cfg.data}: no such file", "pass the real rows, e.g. .device/qqp_first8k.csv.gz "
                        "(tools/prepare_device.sh copies them there)")
    check_out_file(cfg.out, inputs=(cfg.data,), overwrite=True, example="gpu_probe.json")
    rt = engine.setup_runtime(cfg.device, cfg.precision)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # as bench.py: silences the fork warning
    packed = engine.batch_layout(rt, cfg.shapes)
    plan = Plan(encoder=cfg.encoder, tokenizer=BUNDLED_MODEL,  # both encoders use the bundled vocabulary
                num_workers=cfg.num_workers if cfg.num_workers >= 0 else 2 if rt.cuda else 0,
                packed=packed, compile_mode=engine.resolve_compile(cfg.compile, rt, packed=packed))
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": machine_info(rt), "versions": versions(),
              "git": git_commit(),
              "settings": {**asdict(cfg), "resolved": asdict(plan), "device": str(rt.device),
                           "precision": rt.precision, "attention": rt.attention,
                           "inductor_cache_at_start": inductor_cache()},
              "smoke_check_on": None if rt.cuda else rt.device.type, "parts": {}}
    clock.say(f"{cfg.encoder} | batch {cfg.batch_size} | {'packed' if plan.packed else 'exact'} batches | compile "
              f"{plan.compile_mode} | steps {cfg.warmup_steps} warm-up + {cfg.steps} timed + {cfg.profile_steps} "
              f"profiled | score {cfg.score_pairs:,} pairs | budget {cfg.total_budget_s:.0f} s")
    if not rt.cuda:
        clock.say("no CUDA here: a smoke check of this code (host timers, no CUDA events or kernels)")
    with tempfile.TemporaryDirectory(prefix="gpu_probe_") as tmp:
        logs = TorchLogs(os.path.join(tmp, "torch_logs.txt"))
        if logs.error:
            report["torch_logs"] = logs.error
            clock.say(logs.error)
        st = State(cfg, plan, rt, Workspace(cfg, plan, rt, tmp), report, clock)
        for name, fn, budget in PARTS:
            if (st.trainer if name == "profile" else st.raw) is None and name != "data":
                report["parts"][name] = {"status": f"skipped: no {'trainer' if name == 'profile' else 'model'} "
                                                   "(an earlier part did not finish)"}
                continue
            run_part(st, logs, name, fn, getattr(cfg, budget))
    report["total_seconds"] = clock.elapsed()
    st.save()
    print("\n".join(summary_lines(report)))
    print(f"wrote {cfg.out} ({report['total_seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
