"""The engine every script runs on (after MAE's engine_finetune.py: scripts wire, this runs).

- setup_runtime: device, precision, TF32, attention backend and processes, decided once, one banner.
- build_optimizer / build_scheduler / GradScaler: AdamW (fused on CUDA), linear warmup and decay.
- prepare_model: DDP and torch.compile in the right order (compile(DDP(model))); CUDA graphs.
- train_step: one optimizer step over its micro-batches, each weighted by its pairs.
- Inference: the one inference loop. Every scorer runs it: train.py's validation and test,
  evaluate.py, predict.py, baseline_cosine.py, index.py, search.py's queries, teach.py's teachers
  and mining, bench.py. Batches in the layout --shapes picks, compiled as training is (CUDA graphs
  on one GPU), per-item outputs (scores or vectors) put back in dataset order.
- StopSignal, rng_state: stopping cleanly and resuming exactly.

train.py, the scoring scripts and bench.py all run these functions, so the benchmark times exactly
what the scripts run.
"""
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from cli import UserError
from data import make_loader, to_device
from objectives import batch_loss

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE_MODES = ("auto", "off", "default", "reduce-overhead", "max-autotune")
SHAPES = ("auto", "exact", "packed")
# The flags every script that batches shares (help texts here: one vocabulary across scripts).
SHAPES_HELP = "batches; auto: packed on CUDA (a few fixed shapes), exact on CPU (least padding)"
COMPILE_HELP = ("torch.compile; auto: CUDA graphs (reduce-overhead) on one GPU with packed batches, default under "
                "DDP or with exact batches, off on CPU")


@dataclass
class Recipe:
    """The optimization train.py runs by default (its flags of the same names override each);
    bench.py times the same. The notebook: Adam, lr 1e-4, clip 1.0, no schedule."""
    lr: float = 1e-4              # peak learning rate
    encoder_lr: float = 0.0       # the encoder's peak learning rate (0: lr); the head's is lr
    weight_decay: float = 0.0     # AdamW's; 0 is the notebook's Adam
    warmup_ratio: float = 0.06    # share of steps with linear warmup from 0, then linear decay to 0
    clip: float = 1.0             # max gradient norm
    freeze_layers: int = 1        # bottom blocks kept as pretrained, the embeddings the first (model.ModelConfig's
                                  # field; its default stays 0, what checkpoints saved without it had)


@dataclass
class Runtime:
    """Where and how the work runs; made once per process by setup_runtime."""
    device: torch.device
    amp_dtype: object = None     # autocast dtype; None = fp32
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    attention: str = "sdpa"      # which attention kernels the encoder may use (for reports)

    @property
    def master(self):
        return self.rank == 0

    @property
    def cuda(self):
        return self.device.type == "cuda"

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()

    @property
    def precision(self):
        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[self.amp_dtype]


def parse_device(name):
    """'auto' = cuda > mps > cpu; else a torch device string, checked against this machine."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device", "use auto, cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU here", "use --device auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)",
                        "use cuda:0 .. cuda:N-1")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"--device {name}: no Apple GPU here", "use --device auto or cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: not supported", "use auto, cpu, cuda or mps")
    return device


def parse_precision(device, name):
    """Autocast dtype: bf16 on GPUs that support it, else fp16 (with a GradScaler); fp32 on CPU,
    where bf16 autocast is slower than fp32 on most CPUs. None means fp32."""
    if name not in PRECISIONS:
        raise UserError(f"--precision {name}: unknown", f"use one of {', '.join(PRECISIONS)}")
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "fp32"
    if name == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16 on the CPU: no fast fp16 kernels there", "use fp32 or bf16")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[name]


def setup_runtime(device="auto", precision="auto", distributed=False, file=None):
    """Decide device, precision and processes once, and print them as one banner line (on `file`;
    stdout by default). distributed: join the torchrun process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1")) if distributed else 1
    rank, local_rank = 0, 0
    dev = parse_device(device)
    if world > 1:
        if dev.type == "cuda" and dev.index is not None:
            raise UserError(f"--device {device} under torchrun: each process takes the GPU of its LOCAL_RANK",
                            "pass --device cuda (or auto); choose GPUs with CUDA_VISIBLE_DEVICES")
        # the backend of the device the processes compute on (NCCL cannot reduce CPU tensors)
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        rank, local_rank = torch.distributed.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    amp_dtype = parse_precision(dev, precision)
    attention = "sdpa (PyTorch picks the kernel)"
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: free speed on Ampere+
        torch.backends.cudnn.allow_tf32 = True
        # cuDNN's attention builds an execution plan for every new shape (measured: ~6x slower
        # training with varying shapes). The padding mask rules out flash attention, so SDPA
        # runs the memory-efficient kernel, which needs no plans.
        torch.backends.cuda.enable_cudnn_sdp(False)
        attention = "sdpa: memory-efficient kernel (cuDNN attention off; flash takes no padding mask)"
    rt = Runtime(device=dev, amp_dtype=amp_dtype, rank=rank, world=world, local_rank=local_rank,
                 attention=attention)
    if rt.master:
        gpu = f" ({torch.cuda.get_device_name(dev)})" if rt.cuda else ""
        print(f"device {dev}{gpu} | precision {rt.precision} | processes {world}",
              file=file or sys.stdout, flush=True)
    return rt


# ----------------------------------------------------------------------------- training

def build_optimizer(model, lr, weight_decay, rt, encoder_lr=0.0):
    """AdamW over the trainable parameters; no decay on biases, LayerNorm and PReLU weights; the
    encoder (model.encoder) at encoder_lr where it is set and differs from lr; one fused kernel
    for the whole update on CUDA instead of one per tensor."""
    own_lr = {id(p) for p in model.encoder.parameters()} if encoder_lr and encoder_lr != lr else set()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in own_lr and p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) not in own_lr and p.ndim < 2], "weight_decay": 0.0}]
    if own_lr:  # two more groups (runs without encoder_lr keep their two, and resume as they were)
        groups += [{"params": [p for p in params if id(p) in own_lr and p.ndim >= 2], "weight_decay": weight_decay,
                    "lr": encoder_lr},
                   {"params": [p for p in params if id(p) in own_lr and p.ndim < 2], "weight_decay": 0.0,
                    "lr": encoder_lr}]
    return torch.optim.AdamW(groups, lr=lr, fused=rt.cuda)


def load_optimizer_state(optimizer, state):
    """optimizer.load_state_dict(state), keeping the update kernel build_optimizer chose for this
    device: load_state_dict takes every group setting from the file, so a run saved on a CPU would
    lose the fused CUDA update when resumed on a GPU, and one saved on a GPU would take it to a CPU.
    The choice goes into the state before loading, as loading places each step counter by it (a
    CPU counter would stop the fused CUDA update)."""
    kernel = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    if len(kernel) != len(state["param_groups"]):
        optimizer.load_state_dict(state)  # torch's own error names the mismatch
    optimizer.load_state_dict({**state, "param_groups": [{**saved, **chosen} for saved, chosen in
                                                         zip(state["param_groups"], kernel)]})


def build_scheduler(optimizer, total_steps, warmup_ratio):
    """Linear warmup over warmup_ratio of the steps from 0, then linear decay to 0 (transformers')."""
    from transformers import get_linear_schedule_with_warmup
    return get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * total_steps), total_steps)


def build_scaler(rt):
    """Loss scaling for fp16 only (bf16 and fp32 keep their exponent range): a no-op otherwise."""
    return torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)


def batch_layout(rt, shapes="auto"):
    """Packed batches? auto: packed on CUDA (one encoder call of a few fixed shapes per batch:
    compiled once, replayed as CUDA graphs, no per-shape attention plans), exact on the CPU
    (padded groups cut where padding is least: no attention over a packed row's other tokens).
    Either works on any device: the layout is a flag, so CI runs the GPU's layout on the CPU."""
    if shapes not in SHAPES:
        raise UserError(f"--shapes {shapes}: unknown", f"use one of {', '.join(SHAPES)}")
    return shapes == "packed" or (shapes == "auto" and rt.cuda)


def resolve_compile(mode, rt, grad_accum_steps=1, *, packed):
    """'auto' -> what is fast here: CUDA graphs (reduce-overhead) on one GPU with packed batches,
    plain compile under DDP or with gradient accumulation (a captured graph's outputs are
    overwritten by the next replay, and accumulated gradients would alias them) or with exact
    batches (every group's rows and length make a shape: CUDA graphs would record hundreds), off
    on the CPU (compile time outweighs the gain on a few cores)."""
    if mode not in COMPILE_MODES:
        raise UserError(f"--compile {mode}: unknown", f"use one of {', '.join(COMPILE_MODES)}")
    if mode != "auto":
        return mode
    if not rt.cuda:
        return "off"
    return "reduce-overhead" if rt.world == 1 and grad_accum_steps == 1 and packed else "default"


def compiled(fn, compile_mode):
    """torch.compile(fn) in the resolved mode ('off': fn itself). With packed batches only the row
    count varies, over a few values: compiled once with it symbolic (mark_dynamic); CUDA graphs
    (reduce-overhead) are recorded once per row count."""
    if compile_mode == "off":
        return fn
    return torch.compile(fn, mode=None if compile_mode == "default" else compile_mode)


def prepare_model(model, rt, compile_mode):
    """Wrap for DDP first, then compile: torch.compile(DDP(model)) lets the compiler split graphs
    at DDP's gradient buckets so communication overlaps the backward pass."""
    if rt.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.local_rank] if rt.cuda else None)
    return compiled(model, compile_mode)


def mark_dynamic(batch):
    """Compile once for all the shapes a batch takes: the row count of packed tensors, the rows and
    length of exact groups, are symbolic (packed rows keep a fixed length, which keeps kernels
    simple)."""
    for key, dims in (("packed_ids", (0,)), ("packed_pos", (0,)), ("packed_seg", (0,)), ("packed_types", (0,)),
                      ("seq_ids", (0, 1)), ("seq_mask", (0, 1)), ("seq_types", (0, 1))):
        for t in batch[key] if isinstance(batch.get(key), list) else [batch[key]] if key in batch else []:
            for dim in dims:
                torch._dynamo.maybe_mark_dynamic(t, dim)


def mark_step():
    """Tell CUDA graphs a new step begins: the previous step's graph outputs may be reused."""
    if hasattr(torch, "compiler") and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
        torch.compiler.cudagraph_mark_step_begin()


def train_step(model, batches, step_pairs, optimizer, scheduler, scaler, rt, clip, loss_fn=batch_loss):
    """One optimizer step over `batches` (micro-batches, on the device), in the fixed order:
    forward under autocast, backward (accumulated), unscale, clip, step, zero_grad, next lr.
    loss_fn(model, batch) -> the batch's summed loss (0-dim); the default is the classifier's
    cross-entropy (objectives.py).

    Each micro-batch's summed loss is divided by step_pairs, the real pairs of the whole step on
    all processes, and multiplied by the process count (DDP averages gradients over processes):
    the gradient is the mean over the step's pairs whatever the micro-batch sizes.
    Returns the summed loss of this process's pairs, a 0-dim tensor left on the device (no sync)."""
    mark_step()
    loss_sum = torch.zeros((), device=rt.device)
    for i, batch in enumerate(batches):
        mark_dynamic(batch)
        last = i == len(batches) - 1
        with model.no_sync() if rt.world > 1 and not last else nullcontext():
            with rt.autocast():
                loss = loss_fn(model, batch)
            scaler.scale(loss * (rt.world / step_pairs)).backward()
        loss_sum += loss.detach()
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return loss_sum


def all_sum(values, rt):
    """Sum a few floats over processes (one all-reduce); the values themselves in one process."""
    if rt.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    torch.distributed.all_reduce(t)
    return t.tolist()


class StopSignal:
    """Ctrl-C / SIGTERM: the loop finishes its step, saves and exits. Under DDP the processes
    agree on when (each step, over a CPU group that does not wait for the GPU): a process leaving
    the loop alone would hang the others in their next all-reduce. They agree on which signal
    too, so every process ends by it (cli.end_by_signal). An ignored signal stays ignored (a job
    started with & ignores Ctrl-C)."""

    def __init__(self, rt):
        self.rt, self.signals = rt, []
        self.previous = {sig: signal.signal(sig, lambda signum, frame: self.signals.append(signum))
                         for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is not signal.SIG_IGN}
        self.group = torch.distributed.new_group(backend="gloo") if rt.world > 1 else None

    def close(self):
        """Give the signals back to their earlier handlers (the loop is over); again is harmless."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def __enter__(self):
        return self

    def __exit__(self, *exc):  # also when the loop raises: Ctrl-C must not stay swallowed
        self.close()

    def __call__(self):
        """The number of the signal a process got (0: none yet; the largest if several got one):
        the same answer on every process."""
        mine = int(self.signals[0]) if self.signals else 0
        if self.group is None:
            return mine
        flag = torch.tensor([mine], dtype=torch.int64)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return int(flag.item())


def rng_state():
    """Every RNG the run draws from, in types torch.load(weights_only=True) accepts."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                       "has_gauss": has_gauss, "gauss": gauss}}
    if torch.cuda.is_available():
        # this process's GPU only: a run resumes on a machine that may see fewer GPUs
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # saved before 2026-12-01: one state per GPU the saver saw
        i = torch.cuda.current_device() if torch.cuda.is_available() else 0
        cuda = cuda[i] if i < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def seed_everything(seed):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


# ----------------------------------------------------------------------------- inference

def progress_bar(total, desc, unit="pair"):
    """tqdm on a terminal; in a log (a bar there is noise) a line a minute, so that a long job
    (index.py embedding 538k questions on a CPU: 40 minutes) says how far it is."""
    if sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit=unit)
    return LogProgress(total, desc, unit)


class LogProgress:
    """progress_bar off a terminal: update(n) as tqdm's, one stderr line every `every` seconds."""

    def __init__(self, total, desc, unit, every=60.0):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.done, self.t0 = 0, time.time()
        self.next = self.t0 + every

    def update(self, n):
        self.done += n
        now = time.time()
        if now >= self.next and self.done < self.total:
            self.next = now + self.every
            rate = self.done / (now - self.t0)
            left = (self.total - self.done) / max(rate, 1e-9)
            print(f"{self.desc}: {self.done:,} of {self.total:,} {self.unit}s ({100 * self.done / self.total:.0f}%), "
                  f"{rate:,.0f}/s, about {left / 60:.0f} min left", file=sys.stderr, flush=True)

    def close(self):
        pass


class Inference:
    """The one inference loop: fn over every item of a dataset, in the batches training makes on
    this device, outputs back in dataset order.

    fn(batch) -> (B, ...) per-item outputs of a collated batch (model.PairModel.probability,
    model.Encoder.pair_cosine, model.Encoder.question_vectors): the same road to vectors and
    scores for exact and packed batches. shapes: the layout (engine.batch_layout; auto: packed on
    CUDA). compile: as train.py's --compile (auto: CUDA graphs on one GPU, off on the CPU); in auto
    a job shorter than MIN_COMPILED_BATCHES batches runs eager, as one pair or one query would wait
    seconds for a compile that saves it nothing. Outputs stay on the device for `group` batches,
    then are copied out in one transfer: no per-batch host sync."""
    MIN_COMPILED_BATCHES = 16

    def __init__(self, fn, layout, rt, batch_size, shapes="auto", compile="auto", num_workers=0, max_len=None,
                 group=64, unit=None):
        self.fn, self.layout, self.rt, self.batch_size = fn, layout, rt, batch_size
        self.packed = batch_layout(rt, shapes)
        self.compile_mode = resolve_compile(compile, rt, packed=self.packed)
        self.auto_compile = compile == "auto"
        self.num_workers, self.max_len, self.group = num_workers, max_len, group
        self.unit = unit or ("question" if layout == "questions" else "pair")
        self._compiled = None

    def describe(self):
        return f"batches {'packed' if self.packed else 'exact'} | compile {self.compile_mode}"

    def loader(self, dataset, num_replicas=1, rank=0):
        """Batches of a dataset, as training makes them (sorted by length when exact, for the least
        padding; packed ones in random order: every batch about as many tokens); a DDP rank's shard
        with num_replicas > 1."""
        loader, _ = make_loader(dataset, self.layout, self.batch_size, shuffle=False, num_replicas=num_replicas,
                                rank=rank, num_workers=self.num_workers, pin_memory=self.rt.cuda,
                                packed=self.packed, max_len=self.max_len)
        return loader

    def __call__(self, dataset, desc="scoring", verbose=True):
        """(N, ...) float32 outputs for every item of the dataset, in its order."""
        return self.run(self.loader(dataset), len(dataset), desc, verbose=verbose)

    def step_fn(self, n_batches):
        """fn, or fn compiled (once, then reused) when this job is worth it."""
        if self.compile_mode == "off" or (self.auto_compile and n_batches < self.MIN_COMPILED_BATCHES):
            return self.fn, False
        if self._compiled is None:
            self._compiled = compiled(self.fn, self.compile_mode)
        return self._compiled, True

    @torch.no_grad()
    def run(self, loader, n, desc="scoring", gather=False, verbose=True):
        """fn over a loader of a dataset of n items: (n, ...) float32 in dataset order. Fill items
        (index -1) are dropped; under DDP (gather) each process ran its shard and every process
        gets all n outputs. A non-finite output is a UserError (metrics on NaN mean nothing)."""
        rt = self.rt
        fn, is_compiled = self.step_fn(len(loader))
        bar = progress_bar(n, desc, self.unit)
        t0 = time.time()
        index, on_device, values = [], [], []
        with rt.autocast():
            for batch in loader:
                index.append(batch["index"].numpy())  # still on the CPU: no sync
                batch = to_device(batch, rt.device)
                if is_compiled:
                    mark_dynamic(batch)
                    mark_step()
                # a copy: a CUDA graph reuses its output memory at the next replay
                on_device.append(fn(batch).float().clone())  # (B, ...)
                if len(on_device) == self.group:
                    values.append(torch.cat(on_device).cpu().numpy())  # one transfer per group
                    on_device = []
                bar.update(int((index[-1] >= 0).sum()))
        if on_device:
            values.append(torch.cat(on_device).cpu().numpy())
        bar.close()
        index = np.concatenate(index) if index else np.zeros(0, np.int64)
        values = np.concatenate(values) if values else np.zeros(0, np.float32)
        keep = index >= 0  # drop fill items here, on the CPU (a boolean index on the GPU would sync)
        index, values = index[keep], values[keep]
        if gather and rt.world > 1:
            parts = [None] * rt.world
            torch.distributed.all_gather_object(parts, (index, values))
            index = np.concatenate([p[0] for p in parts])
            values = np.concatenate([p[1] for p in parts])
        out = np.full((n, *values.shape[1:]), np.nan, np.float32)
        out[index] = values
        seconds = time.time() - t0
        if verbose and rt.master:
            print(f"{desc}: {n:,} {self.unit}s in {seconds:.1f} s ({n / max(seconds, 1e-9):,.0f} {self.unit}s/s)",
                  flush=True)
        if not np.isfinite(out).all():  # e.g. fp16 overflow: metrics on NaN would be meaningless
            bad = int((~np.isfinite(out.reshape(n, -1))).any(1).sum())
            raise UserError(f"{desc}: {bad} of {n:,} outputs are NaN or inf",
                            "retry with --precision fp32 (or --device cpu) to rule out reduced precision")
        return out
