"""Fine-tune a duplicate-question classifier on the folder preprocess.py wrote.

    # CPU smoke run, under a minute (bundled MiniLM):
    python preprocess.py ../shared/data/qqp/qqp_first8k.csv.gz --out_dir data/qqp8k
    python train.py --data_dir data/qqp8k --epochs 1 --max_steps 20 --batch_size 32 --out_dir out/smoke
    # The real run on one GPU (Kaggle's train.csv), or on N GPUs with torchrun:
    python train.py --epochs 5 --batch_size 128
    torchrun --nproc_per_node 8 train.py --epochs 5 --batch_size 128

The loop, per optimizer step (engine.train_step): forward under autocast, backward (accumulated over
--grad_accum_steps micro-batches, each weighted by its pairs), unscale, clip, step, zero_grad, next
lr; one device-to-host sync per --log_every_steps. The siamese classifier starts from the encoder's
own cosine (--cosine_prior, model.py) and the head learns the rest. The loss is the classifier's
cross-entropy; --loss adds in-batch negatives (mnrl, which shapes the vectors for search.py) or an
online contrastive term, --both_orders trains on both question orders, and --loss distill learns a
teacher's probabilities of the training pairs and of mined ones (--teacher_file from teach.py)
instead of the labels (objectives.py); the logged loss is that objective, val loss is the
cross-entropy. Evaluates on the validation split every --eval_every_steps (0: each epoch) and keeps
the best checkpoint; at the end the best one is evaluated on the test split. What is validated, kept
and tested has its encoder mixed back toward the pretrained one (--wise_alpha, WiSE-FT): fine-tuning
alone makes a better classifier but a worse search engine than the encoder it started from; at 0.75
the mix keeps the validation accuracy and gives back part of the search, for a little AP (chosen on
validation, docs/recipe_2026-11-30.md). On a GPU it is fast by default: few fixed batch shapes
(data.Collator), compiled once, replayed as CUDA graphs.
Writes to --out_dir:

    ckpt.pt            best checkpoint (weights, config, data fingerprint; weights_only loadable)
    last.pt            latest checkpoint with optimizer/scheduler/scaler/sampler/RNG state (--resume)
    hf/                the best encoder and tokenizer in Hugging Face / sentence-transformers format
    metrics.jsonl      one JSON line per evaluation
    test_results.json  the best checkpoint's metrics on the test split

--resume continues the run in --out_dir from its last.pt, with its saved config; flags that can
change safely (more --epochs or --max_steps, intervals, workers, the data folder's path) apply and
are named; any other flag that differs from the saved run is refused. One run at a time holds
--out_dir (a lock beside it, <out_dir>.lock): a second one is refused, naming the first one's pid.
Ctrl-C or SIGTERM: the step finishes, last.pt is saved, and the process ends by that signal ($? is
130 or 143, not 0), so `train.py && evaluate.py`, and a shell loop of runs, stop there.
"""
import json
import math
import os
import shutil
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import Literal

import numpy as np
import torch

import distill
import engine
import objectives
from cli import (MAX_WORKERS, UserError, arg, check_ranges, end_by_signal, given_flags, interval, is_program,
                 parse_config, run)
from data import (FolderLock, PairDataset, check_apart_from_inputs, check_writable, fingerprint, make_loader,
                  shapes_of, to_device)
from metrics import compute_metrics, format_report, json_safe
from model import (SAVED_BEFORE, ModelConfig, build_model, check_positions, export_hf, interpolated,
                   load_checkpoint, pretrained_weights, save_checkpoint)
from objectives import Objective
from hub import load_tokenizer
from text import check_vocab, file_sha256, vocab_hash

RUN_FILES = ("ckpt.pt", "last.pt", "metrics.jsonl", "test_results.json", "hf")
RESUME_STATE = ("optimizer", "scheduler", "scaler", "rng")  # what last.pt holds beyond a ckpt.pt (save_last)
LOWER_IS_BETTER = ("log_loss",)
# May differ from the saved config on --resume: they change how long or how visibly the run goes
# on, not what it computes up to now.
RESUME_MAY_CHANGE = {"out_dir", "data_dir", "resume", "epochs", "max_steps", "eval_every_steps",
                     "save_every_steps", "log_every_steps", "early_stopping_patience", "num_workers"}
# Fields added after runs were first saved, with the value those runs had (as model.SAVED_BEFORE):
# a run saved before --wise_alpha shipped its fine-tuned encoder as is.
# (cosine_shift came with cosine_prior: unused while the prior is off, its default then as now.)
TRAIN_SAVED_BEFORE = {**SAVED_BEFORE, "cosine_shift": ModelConfig.cosine_shift, "wise_alpha": 1.0, "encoder_lr": 0.0,
                      "freeze_layers": 0}
# Every numeric flag's range ("[" and "]" include the end, "(" and ")" leave it out); check_config
# refuses the rest, NaN included. The seed seeds numpy too, which takes 0 .. 2**32 - 1.
RANGES = {name: interval(spec) for name, spec in {
          "hidden": "[1, inf)", "dropout": "[0, 1)", "cosine_prior": "[0, inf)", "cosine_shift": "[-1, 1]",
          "aux_weight": "(0, inf)", "mnrl_scale": "(0, inf)", "contrastive_margin": "(0, 2]",
          "freeze_layers": "[0, inf)",
          "epochs": "[1, inf)", "batch_size": "[1, inf)", "grad_accum_steps": "[1, inf)", "max_steps": "[0, inf)",
          "lr": "(0, inf)", "encoder_lr": "[0, inf)", "weight_decay": "[0, inf)", "warmup_ratio": "[0, 1]",
          "clip": "(0, inf)",
          "wise_alpha": "[0, 1]", "seed": f"[0, {2 ** 32 - 1}]", "eval_every_steps": "[0, inf)",
          "early_stopping_patience": "[0, inf)",
          "save_every_steps": "[0, inf)", "log_every_steps": "[1, inf)",
          "num_workers": f"[0, {MAX_WORKERS}]"}.items()}


@dataclass
class TrainConfig:
    # data and output
    data_dir: str = arg("data/qqp", "folder written by preprocess.py")
    out_dir: str = arg("out", "run folder: checkpoints, metrics.jsonl, hf/")
    overwrite_output_dir: bool = arg(False, "start over in an out_dir that holds an earlier run (deletes it)")
    resume: bool = arg(False, "continue the run in out_dir from its last.pt")
    # model (see model.ModelConfig, which holds the defaults). The notebook read [CLS] and
    # concatenated [u, v]; MiniLM is trained for mean pooling, and |u-v|, u*v hand the head the
    # similarity directly (validation accuracy 0.71 -> 0.80 on the real 8k rows).
    encoder: str = arg(ModelConfig.encoder, "HF name or local folder (the notebook: distilbert-base-uncased)")
    arch: Literal["siamese", "cross"] = arg(ModelConfig.arch, "siamese (the notebook) or cross (one joined sequence)")
    pooling: Literal["mean", "cls"] = arg(ModelConfig.pooling, "mean over real tokens, or cls (the notebook)")
    features: Literal["rich", "concat"] = arg(ModelConfig.features, "siamese head input: rich (u, v, |u-v|, u*v) "
                                              "or concat (u, v; the notebook)")
    hidden: int = arg(ModelConfig.hidden, "head width (the notebook: 300)")
    dropout: float = arg(ModelConfig.dropout, "head dropout (the notebook: 0.25)")
    freeze_encoder: bool = arg(ModelConfig.freeze_encoder, "the notebook's static BERT: train the head only")
    freeze_layers: int = arg(engine.Recipe.freeze_layers, "keep the bottom layers as pretrained, the embeddings "
                             "counted as the first (1: the embeddings, a better classifier at the same search: "
                             "docs/recipe_2026-11-30.md; 3: they and 2 transformer layers; 0: none)")
    symmetric: bool = arg(ModelConfig.symmetric, "siamese: average the logits of both question orders")
    cosine_prior: float = arg(ModelConfig.cosine_prior, "siamese: start from the encoder's cosine: add "
                              "scale * (cos(u, v) - shift) to the logit margin; initial scale, learnt (0: off)")
    cosine_shift: float = arg(ModelConfig.cosine_shift, "siamese: initial shift, learnt; another encoder: "
                              "its best_accuracy threshold from baseline_cosine.py")
    # objective (objectives.py holds the defaults and what each term does)
    loss: Literal[objectives.LOSSES] = arg(Objective.loss, "ce: the classifier alone; +mnrl: in-batch negatives "
                                           "(vectors for search); +contrastive: online contrastive (siamese)")
    aux_weight: float = arg(Objective.aux_weight, "weight of the mnrl / contrastive terms next to ce")
    mnrl_scale: float = arg(Objective.mnrl_scale, "mnrl: cosine -> logit scale")
    contrastive_margin: float = arg(Objective.contrastive_margin, "contrastive: non-duplicates pushed to "
                                    "1 - cosine >= margin")
    both_orders: bool = arg(Objective.both_orders, "siamese: train the classifier on (q1, q2) and (q2, q1), "
                            "half weight each")
    teacher_file: str = arg("", "teach.py's file: train on its pairs (the training split, then mined ones) "
                            "toward its teacher's probabilities (--loss distill or ce+distill)")
    # optimization (engine.Recipe holds the defaults)
    epochs: int = arg(5, "passes over the training split")
    batch_size: int = arg(128, "pairs per micro-batch per process (the notebook: 128)", aliases=["--bs"])
    grad_accum_steps: int = arg(1, "micro-batches per optimizer step")
    max_steps: int = arg(0, "stop after this many optimizer steps (0: run all epochs)")
    lr: float = arg(engine.Recipe.lr, "peak learning rate (AdamW)")
    encoder_lr: float = arg(engine.Recipe.encoder_lr, "the encoder's peak learning rate (0: --lr); the head's "
                                                      "is --lr")
    weight_decay: float = arg(engine.Recipe.weight_decay, "AdamW weight decay (0: the notebook's Adam)")
    warmup_ratio: float = arg(engine.Recipe.warmup_ratio, "share of steps with linear warmup from 0, then "
                                                          "linear decay to 0")
    clip: float = arg(engine.Recipe.clip, "max gradient norm")
    wise_alpha: float = arg(0.75, "siamese: what ckpt.pt holds (validated, tested, exported): the encoder's "
                            "weights pretrained + wise_alpha * (fine-tuned - pretrained), the head as trained "
                            "(WiSE-FT; 1: the fine-tuned encoder; last.pt always holds it)")
    seed: int = arg(0, "weights of the head, dropout, batch order")
    # evaluation, checkpoints, logging
    eval_every_steps: int = arg(0, "validate every N steps (0: at the end of each epoch)")
    metric_for_best: Literal["accuracy", "f1", "average_precision", "roc_auc", "log_loss"] = arg(
        "accuracy", "validation metric that picks ckpt.pt (log_loss: lower is better)")
    early_stopping_patience: int = arg(0, "stop after N evaluations without improvement (0: off)")
    save_every_steps: int = arg(0, "also write last.pt every N steps (0: at evaluations and epoch ends)")
    log_every_steps: int = arg(20, "log (and sync with the GPU) every N steps")
    # hardware
    device: str = arg("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = arg("auto", "auto: bf16 (else fp16) on GPU, fp32 on CPU")
    compile: Literal[engine.COMPILE_MODES] = arg("auto", engine.COMPILE_HELP)
    shapes: Literal[engine.SHAPES] = arg("auto", engine.SHAPES_HELP)
    num_workers: int = arg(2, "DataLoader worker processes (0: collate in the training process)")


def main(argv=None):
    cfg = parse_config(TrainConfig, argv, __doc__)
    try:
        # a signal outside the training loop (which saves and raises Stopped): before it, or in the test pass
        run(train, cfg, given_flags(TrainConfig, argv), again="run it again, with --resume where it has saved "
            "last.pt (the test pass runs then)")
    except Stopped as e:  # last.pt saved and everything closed; not 0, so `train.py && ...` stops here
        end_by_signal(e.signum, is_program(train))


class Stopped(Exception):
    """A signal stopped the run; it has saved last.pt and cleaned up. main ends by that signal
    (cli.end_by_signal: $? is 130 or 143, not 0, so `train.py && evaluate.py` stops there)."""

    def __init__(self, signum):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def train(cfg, given=()):
    """Every flag and the output place checked, then the run, holding --out_dir for its life."""
    check_config(cfg)
    check_output(cfg)
    rt = engine.setup_runtime(cfg.device, cfg.precision, distributed=True)
    with ExitStack() as held:  # the lock and the signal handlers go back however the run ends
        hold_out_dir(held, cfg.out_dir, rt)
        return fit(cfg, set(given), rt, held)


def fit(cfg, given, rt, held):
    say = print if rt.master else (lambda *a, **k: None)
    cfg, state = start_or_resume(cfg, given, rt, say)
    engine.seed_everything(cfg.seed)

    # --- data; the tokenizer must be the one the data was made with
    train_ds, val_ds = PairDataset(cfg.data_dir, "train"), PairDataset(cfg.data_dir, "validation")
    manifest = train_ds.manifest
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise UserError(f"{cfg.data_dir}: the train or validation split is empty",
                        "re-run preprocess.py with --val_frac > 0")
    check_validation_classes(val_ds, cfg, say)
    data_info = data_record(manifest, cfg.data_dir)
    teacher_probs = None
    if cfg.teacher_file:  # the training pairs, then the mined ones; the teacher's p(duplicate) of each
        train_ds.pairs, probs, _ = distill.load_teacher_file(cfg.teacher_file, train_ds)  # (M, 3), (M,)
        teacher_probs = torch.from_numpy(probs).to(rt.device)
        data_info["teacher_file_sha256"] = file_sha256(cfg.teacher_file)
    if state is not None and (state["data"]["fingerprint"], state["data"].get("teacher_file_sha256")) != \
            (data_info["fingerprint"], data_info.get("teacher_file_sha256")):
        raise UserError(f"{cfg.data_dir} (or --teacher_file) is not what the run in {cfg.out_dir} was trained on",
                        "pass its --data_dir and --teacher_file, or start a new run in another --out_dir")
    tokenizer = load_tokenizer(cfg.encoder)
    check_vocab(manifest, vocab_hash(tokenizer), cfg.encoder, cfg.data_dir)
    model_cfg = ModelConfig(**{f.name: getattr(cfg, f.name) for f in fields(ModelConfig) if hasattr(cfg, f.name)})
    check_positions(model_cfg, manifest["max_len"], cfg.data_dir)  # before a run that would fail on a long question
    if state is None:
        start_fresh(cfg, rt, say)  # the inputs are good: an earlier run in out_dir may go now
    packed = engine.batch_layout(rt, cfg.shapes)
    objective = Objective(**{f.name: getattr(cfg, f.name) for f in fields(Objective)})
    train_loader, sampler = make_loader(train_ds, cfg.arch, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                        question_keys="mnrl" in objective.terms, num_replicas=rt.world,
                                        rank=rt.rank, num_workers=cfg.num_workers, pin_memory=rt.cuda, packed=packed)

    # --- model, optimizer, schedule; restored from last.pt on --resume
    raw_model = build_model(model_cfg)
    raw_model.to(rt.device)
    # The pretrained encoder, before any step (or last.pt) moves it: what --wise_alpha mixes back in.
    pretrained = pretrained_weights(raw_model.encoder) if shipped_alpha(cfg) < 1 else None
    compile_mode = engine.resolve_compile(cfg.compile, rt, cfg.grad_accum_steps, packed=packed)
    model = engine.prepare_model(raw_model, rt, compile_mode)  # what checkpoints hold: raw_model
    optimizer = engine.build_optimizer(raw_model, cfg.lr, cfg.weight_decay, rt, cfg.encoder_lr)
    loss_fn = partial(objectives.batch_loss, objective=objective, teacher_probs=teacher_probs)
    batches_per_epoch = len(sampler)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum_steps)
    total_steps = min(cfg.epochs * steps_per_epoch, cfg.max_steps or math.inf)
    scheduler = engine.build_scheduler(optimizer, total_steps, cfg.warmup_ratio)
    scaler = engine.build_scaler(rt)
    # Validation and the test pass: the one inference road, in the training layout, compiled as
    # training is (its own graphs: no gradients, no dropout).
    inference = engine.Inference(raw_model.probability, cfg.arch, rt, 2 * cfg.batch_size, cfg.shapes, cfg.compile,
                                 cfg.num_workers, max_len=manifest["max_len"])
    val_loader = inference.loader(val_ds, num_replicas=rt.world, rank=rt.rank)
    progress = {"step": 0, "epoch": 0, "batches_done": 0, "best": None, "bad_evals": 0}
    if state is not None:
        raw_model.load_state_dict(state["model"])
        engine.load_optimizer_state(optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty where nothing was scaled (fp32, bf16): a fresh scaler is right
            scaler.load_state_dict(state["scaler"])
        progress = {k: state[k] for k in progress}
        engine.set_rng_state(state["rng"])
    say(summary(cfg, rt, raw_model, manifest, len(train_ds), len(val_ds), steps_per_epoch, total_steps,
                compile_mode, packed))

    ctx = Run(cfg, rt, raw_model, inference, data_info, tokenizer, progress, steps_per_epoch, say, pretrained)

    def save_last():  # the full state, for --resume
        save_run(ctx, "last.pt", optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                 scaler=scaler.state_dict(), rng=engine.rng_state())

    # --- the loop
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if rt.master:
        trim_metrics(metrics_path, progress["step"], say)  # lines a killed run wrote after last.pt
    stop, stop_reason, shapes = held.enter_context(engine.StopSignal(rt)), None, set()
    log = Log(cfg, rt, total_steps, progress["step"], say)
    model.train()
    while progress["step"] < total_steps and stop_reason is None:
        sampler.set_epoch(progress["epoch"], start_batch=progress["batches_done"])
        batches = iter(train_loader)
        global_sizes = sampler.global_sizes(progress["epoch"])  # pairs per batch, all processes
        while progress["batches_done"] < batches_per_epoch and progress["step"] < total_steps:
            done = progress["batches_done"]
            n_micro = min(cfg.grad_accum_steps, batches_per_epoch - done)  # fewer at the epoch end
            t_wait = time.perf_counter()
            micro = [to_device(next(batches), rt.device) for _ in range(n_micro)]
            log.data_wait += time.perf_counter() - t_wait
            shapes.update(s for b in micro for s in shapes_of(b))
            step_pairs = sum(global_sizes[done:done + n_micro])
            log.loss_sum += engine.train_step(model, micro, step_pairs, optimizer, scheduler, scaler, rt, cfg.clip,
                                              loss_fn)
            log.pairs += step_pairs
            progress["step"] += 1
            progress["batches_done"] += n_micro
            step = progress["step"]
            if step % cfg.log_every_steps == 0 or step == total_steps:
                log.write(step, progress["epoch"], scheduler.get_last_lr()[0], micro)
            end_of_epoch = progress["batches_done"] == batches_per_epoch
            eval_now = (step % cfg.eval_every_steps == 0) if cfg.eval_every_steps else end_of_epoch
            if eval_now or step == total_steps:
                if validate(ctx, val_loader, val_ds):
                    stop_reason = f"early stopping: no better {cfg.metric_for_best} for " \
                                  f"{cfg.early_stopping_patience} evaluations"
                model.train()
            if end_of_epoch:
                progress["epoch"], progress["batches_done"] = progress["epoch"] + 1, 0
            interrupted = stop()  # the signal's number (0: none), the same on every process
            if rt.master and (interrupted or stop_reason or eval_now or end_of_epoch or step == total_steps or
                              (cfg.save_every_steps and step % cfg.save_every_steps == 0)):
                save_last()
            if interrupted:
                stop_reason = f"stopped by signal {interrupted}: saved {cfg.out_dir}/last.pt; continue with --resume"
            if stop_reason or end_of_epoch:
                break
    log.close()
    signum = stop()  # also a signal after the last step's check (every process asks once more)
    stop.close()
    say(f"batch shapes seen by the encoder: {len(shapes)} distinct")
    if stop_reason:
        say(stop_reason)
    elif signum:
        say(f"stopped by signal {signum} after the last step (saved in {cfg.out_dir}/last.pt): the test pass "
            "did not run; --resume runs it")
    if rt.world > 1:
        torch.distributed.barrier()  # rank 0 has saved before any process leaves
    test_metrics = None
    if not signum and rt.master:
        test_metrics = test_best(ctx)
    if rt.world > 1:
        torch.distributed.destroy_process_group()
    if signum:
        raise Stopped(signum)
    return test_metrics


@dataclass
class Run:
    """What validation, checkpoints and the test pass need to know about the run."""
    cfg: TrainConfig
    rt: engine.Runtime
    raw_model: torch.nn.Module       # unwrapped and uncompiled: what checkpoints hold
    inference: engine.Inference      # scores raw_model's probability (validation, test)
    data_info: dict                  # the data record every checkpoint carries
    tokenizer: object
    progress: dict                   # step, epoch, batches_done, best, bad_evals
    steps_per_epoch: int
    say: object                      # print on the main process, nothing elsewhere
    pretrained: dict = None          # the encoder's pretrained weights (--wise_alpha < 1)


# ----------------------------------------------------------------------------- set-up

def check_config(cfg):
    """Every flag checked before any work."""
    check_ranges(cfg, RANGES)
    if cfg.arch == "cross" and (set(cfg.loss.split("+")) - {"ce", "distill"} or cfg.both_orders):
        raise UserError(f"--loss {cfg.loss}{' --both_orders' if cfg.both_orders else ''} with --arch cross: a "
                        "cross-encoder has no vector per question and reads one order", "use them with "
                        "--arch siamese, or --loss ce (or distill) with --arch cross")
    if ("distill" in cfg.loss) != bool(cfg.teacher_file):
        raise UserError(f"--loss {cfg.loss}{' --teacher_file ' + cfg.teacher_file if cfg.teacher_file else ''}: "
                        "distillation needs both, the other losses neither", "pass --loss distill (or ce+distill) "
                        "with --teacher_file FILE from teach.py")
    if cfg.both_orders and cfg.symmetric:
        raise UserError("--both_orders with --symmetric: the symmetric model already averages both orders",
                        "pick one")


def check_output(cfg):
    """--out_dir can be written (a folder, or a new one where folders can be made), apart from every
    input, and is no data or index folder (a run there would mix its files into one), before any work."""
    out_dir = cfg.out_dir
    if os.path.isfile(out_dir):
        raise UserError(f"--out_dir {out_dir} is a file", "pass a folder path")
    check_apart_from_inputs(out_dir, (cfg.data_dir, cfg.teacher_file, cfg.encoder if os.path.exists(cfg.encoder)
                                      else ""))
    if os.path.isfile(os.path.join(out_dir, "manifest.json")):
        raise UserError(f"--out_dir {out_dir} holds a manifest.json: a data or index folder, not a run's",
                        "pass a folder of its own")
    check_writable(out_dir)


def hold_out_dir(held, out_dir, rt):
    """One run per out_dir: the master process takes its lock (data.FolderLock) before anything in
    it is read, deleted or written, and `held` keeps it for the run's life; under DDP the others
    share the run, wait here until the lock is held, and leave too when another run holds it
    (rank 0 says why, in one line)."""
    refused = None
    if rt.master:
        try:
            held.enter_context(FolderLock(out_dir))
        except UserError as e:
            refused = e
    if engine.all_sum([float(refused is not None)], rt)[0]:  # one collective: every process agrees
        if refused:
            raise refused
        sys.exit(2)


def earlier_run(out_dir):
    return [f for f in RUN_FILES if os.path.exists(os.path.join(out_dir, f))]


def start_fresh(cfg, rt, say):
    """A new run's out_dir: the earlier run deleted (--overwrite_output_dir), only now that every
    input has been checked, so that a typo in a flag never costs the run it would replace."""
    earlier = earlier_run(cfg.out_dir)
    if earlier and rt.master:
        say(f"note: --overwrite_output_dir: deleting the earlier run in {cfg.out_dir} ({', '.join(earlier)})")
        for f in earlier:
            path = os.path.join(cfg.out_dir, f)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if rt.world > 1:
        torch.distributed.barrier()  # no process may see the old files after this
    if rt.master:
        os.makedirs(cfg.out_dir, exist_ok=True)


def check_validation_classes(val_ds, cfg, say):
    """One class in the validation labels: ROC-AUC and average precision are undefined (null in
    metrics.jsonl), so they cannot pick checkpoints; the other metrics still can. Said once."""
    classes = np.unique(val_ds.labels)
    if len(classes) > 1:
        return
    if cfg.metric_for_best in ("roc_auc", "average_precision"):
        raise UserError(f"--metric_for_best {cfg.metric_for_best}: the validation split of {cfg.data_dir} has one "
                        f"class (every label {classes[0]}), so it is undefined", "use --metric_for_best accuracy "
                        "or log_loss, or re-run preprocess.py on data with both classes")
    say(f"warning: the validation split of {cfg.data_dir} has one class (every label {classes[0]}): ROC-AUC and "
        "average precision are undefined (null in metrics.jsonl)")


def start_or_resume(cfg, given, rt, say):
    """(config, saved state or None). A new run needs an out_dir without an earlier run (or
    --overwrite_output_dir: start_fresh deletes it once the inputs are checked); --resume takes
    the saved config, applies the flags that may change, and refuses the ones that may not."""
    last_path = os.path.join(cfg.out_dir, "last.pt")
    if not cfg.resume:
        earlier = earlier_run(cfg.out_dir)
        if earlier and not cfg.overwrite_output_dir:
            raise UserError(f"{cfg.out_dir} holds an earlier run ({', '.join(earlier)})",
                            "continue it with --resume, start over with --overwrite_output_dir, "
                            "or pass another --out_dir")
        return cfg, None
    if not os.path.exists(last_path):
        raise UserError(f"--resume: {last_path} does not exist", "run without --resume to start, or "
                        "pass the --out_dir of the run to continue")
    state = load_checkpoint(last_path, fix="it cannot be resumed: start over with --overwrite_output_dir (copy "
                            "ckpt.pt, the best weights so far, out of the folder first to keep it)")
    missing = [k for k in RESUME_STATE if k not in state]
    if missing:
        raise UserError(f"--resume: {last_path} holds no {', '.join(missing)} (a ckpt.pt copied over it, or "
                        "a damaged file)", "resume from the last.pt train.py wrote, or start over with "
                        "--overwrite_output_dir")
    # A field the run was saved without had the value TRAIN_SAVED_BEFORE names: compare with that.
    saved = {**TRAIN_SAVED_BEFORE, **state["train_config"]}
    refused = sorted(k for k in given if k not in RESUME_MAY_CHANGE and k in saved and getattr(cfg, k) != saved[k])
    if refused:
        raise UserError("--resume: " + ", ".join(f"--{k} {getattr(cfg, k)} differs from the saved run's "
                                                 f"{saved[k]}" for k in refused),
                        "drop these flags to continue the saved run, or start a new run in another --out_dir")
    applied = sorted(k for k in given if k in RESUME_MAY_CHANGE and k != "resume" and k in saved
                     and getattr(cfg, k) != saved[k])
    resumed = TrainConfig(**{**saved, **{k: getattr(cfg, k) for k in applied},
                             "out_dir": cfg.out_dir, "resume": True})
    say(f"resuming {last_path} at step {state['step']} (its saved config"
        + (", with " + ", ".join(f"--{k} {getattr(cfg, k)} (was {saved[k]})" for k in applied) if applied else "")
        + ")")
    return resumed, state


def shipped_alpha(cfg):
    """The encoder mix ckpt.pt ships (--wise_alpha). It gives back search, which only a siamese
    model does; a cross-encoder has no vector per question, so it ships as trained."""
    return cfg.wise_alpha if cfg.arch == "siamese" else 1.0


def data_record(manifest, data_dir):
    """What a checkpoint records of its data: enough to tokenize new text the same way and to
    recognize the folder."""
    return {"data_dir": os.path.abspath(data_dir), "fingerprint": fingerprint(manifest),
            "tokenizer": manifest["tokenizer"], "tokenizer_path": manifest["tokenizer_path"],
            "vocab_hash": manifest["vocab_hash"], "pad_token_id": manifest["pad_token_id"],
            "max_len": manifest["max_len"], "split_policy": manifest["split_policy"]}


def summary(cfg, rt, model, manifest, n_train, n_val, steps_per_epoch, total_steps, compile_mode, packed):
    """The start-of-run block: model, data, batch arithmetic, how it runs."""
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_step = cfg.batch_size * rt.world * cfg.grad_accum_steps
    frozen = "all" if cfg.freeze_encoder else "none" if not cfg.freeze_layers else "the embeddings" + (
        f" and {cfg.freeze_layers - 1} layers" if cfg.freeze_layers > 1 else "")
    return "\n".join([
        f"encoder {cfg.encoder} ({cfg.arch}, {cfg.pooling} pooling, {cfg.features} features, "
        f"frozen={frozen}) | parameters {n_params:,} ({n_trainable:,} trainable)",
        f"pairs: train {n_train:,}{' (training split + mined, from ' + cfg.teacher_file + ')' if cfg.teacher_file else ''}"
        f" | validation {n_val:,} (split '{manifest['split_policy']}', {cfg.data_dir})",
        f"objective {cfg.loss}" + (f" (aux weight {cfg.aux_weight})" if "+" in cfg.loss else "")
        + (", both question orders" if cfg.both_orders else "")
        + (f" | ckpt.pt: encoder {cfg.wise_alpha:g} of the way from pretrained to fine-tuned (WiSE-FT)"
           if shipped_alpha(cfg) < 1 else ""),
        f"batch {cfg.batch_size} per process x {rt.world} processes x {cfg.grad_accum_steps} accumulation = "
        f"{per_step} pairs per step | {steps_per_epoch} steps per epoch | {total_steps} steps in all",
        f"batches {'packed' if packed else 'exact'} | compile {compile_mode} | "
        f"attention {rt.attention} | workers {cfg.num_workers}"])


# ----------------------------------------------------------------------------- during the run

class Log:
    """Loss, speed and data wait since the last log line; a progress bar on a terminal, a
    fixed-format line otherwise. write() is the one device-to-host sync of a log interval."""

    def __init__(self, cfg, rt, total_steps, step, say):
        self.cfg, self.rt, self.total_steps, self.say = cfg, rt, total_steps, say
        self.bar = None
        if rt.master and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True)
        self.last_step = step
        self.reset()

    def reset(self):
        self.t0, self.pairs, self.data_wait = time.perf_counter(), 0, 0.0
        self.loss_sum = torch.zeros((), device=self.rt.device)

    def write(self, step, epoch, lr, last_batches):
        loss_sum, = engine.all_sum([self.loss_sum.item()], self.rt)  # self.pairs counts all processes
        mean_loss = loss_sum / max(self.pairs, 1)
        if not math.isfinite(mean_loss):
            shapes = [shapes_of(b) for b in last_batches]
            raise UserError(f"non-finite loss ({mean_loss}) between steps {self.last_step + 1} and {step}, "
                            f"lr {lr:.3g}, last batch shapes {shapes}", "lower --lr, or use --precision fp32")
        seconds = time.perf_counter() - self.t0
        rate, wait = self.pairs / seconds, self.data_wait / seconds
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{mean_loss:.4f}", pairs_s=f"{rate:.0f}", epoch=epoch)
            self.bar.update(step - self.last_step)
        else:
            left = (self.total_steps - step) * seconds / (step - self.last_step)
            self.say(f"step {step:>6}/{self.total_steps} | epoch {epoch} | loss {mean_loss:.4f} | lr {lr:.2e} | "
                     f"{rate:,.0f} pairs/s | data wait {wait:.0%} | eta {eta(left)}", flush=True)
        self.last_step = step
        self.reset()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def eta(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def validate(ctx, val_loader, val_ds):
    """Validation metrics into metrics.jsonl; ckpt.pt and hf/ follow the best so far. What is
    validated and saved is what ships: with --wise_alpha < 1 the encoder mixed back toward its
    pretrained weights (the training weights come back after, for the next steps and last.pt).
    Returns True when early stopping says stop (the same answer on every process: all of them
    score the gathered predictions)."""
    with interpolated(ctx.raw_model.encoder, ctx.pretrained, shipped_alpha(ctx.cfg)):
        return validate_shipped(ctx, val_loader, val_ds)


def validate_shipped(ctx, val_loader, val_ds):
    cfg, progress = ctx.cfg, ctx.progress
    ctx.raw_model.eval()
    probs = ctx.inference.run(val_loader, len(val_ds), "validation", gather=True, verbose=False)
    m = compute_metrics(val_ds.labels, probs)
    value, best = m[cfg.metric_for_best], progress["best"]
    improved = best is None or (value < best if cfg.metric_for_best in LOWER_IS_BETTER else value > best)
    progress["best"], progress["bad_evals"] = (value, 0) if improved else (best, progress["bad_evals"] + 1)
    if ctx.rt.master:
        step = progress["step"]
        record = {"step": step, "epoch": round(step / ctx.steps_per_epoch, 3), "val_loss": round(m["log_loss"], 5),
                  **{k: round(m[k], 5) for k in ("accuracy", "f1", "precision", "recall", "roc_auc",
                                                 "average_precision")},
                  **({"wise_alpha": cfg.wise_alpha} if shipped_alpha(cfg) < 1 else {})}
        with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(json_safe(record)) + "\n")  # undefined (NaN) -> null: still JSON
        ctx.say(f"eval step {step}: val loss {m['log_loss']:.4f} | accuracy {m['accuracy']:.4f} | "
                f"f1 {m['f1']:.4f} | auc {m['roc_auc']:.4f}{' | best so far' if improved else ''}", flush=True)
        if improved:
            save_run(ctx, "ckpt.pt")
            export_hf(ctx.raw_model, ctx.tokenizer, os.path.join(cfg.out_dir, "hf"), ctx.data_info["max_len"])
    return bool(cfg.early_stopping_patience) and progress["bad_evals"] >= cfg.early_stopping_patience


def save_run(ctx, name, **full_state):
    """A checkpoint of the unwrapped, uncompiled model; full_state adds what --resume needs."""
    save_checkpoint(os.path.join(ctx.cfg.out_dir, name), {
        "model": ctx.raw_model.state_dict(), "model_config": asdict(ctx.raw_model.cfg),
        "train_config": asdict(ctx.cfg), "data": ctx.data_info, **ctx.progress, **full_state})


def trim_metrics(path, step, say):
    """Keep the metrics lines up to `step` (a killed run may have written more after its last
    checkpoint); a torn last line (killed mid-write) is dropped with a note."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        lines = f.readlines()
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                say(f"note: {path}: dropped its unreadable last line (the run was killed while writing it)")
                continue
            raise UserError(f"{path}: line {i + 1} is not JSON", f"delete that line from {path}") from None
        if record["step"] <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    with open(path, "w") as f:
        f.writelines(keep)


def test_best(ctx):
    """The best checkpoint on the test split, in the notebook's format; test_results.json. Its
    weights are copied into the model in place, so the compiled scorer (and its CUDA graphs, which
    hold the weights' addresses) serve the test pass too."""
    cfg = ctx.cfg
    test_ds = PairDataset(cfg.data_dir, "test")
    if len(test_ds) == 0:
        return None
    ctx.raw_model.load_state_dict(load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))["model"])
    ctx.raw_model.eval()
    probs = ctx.inference(test_ds, "test", verbose=False)
    test_metrics = compute_metrics(test_ds.labels, probs)
    ctx.say(format_report(test_metrics, f"Evaluating the best checkpoint ({cfg.out_dir}/ckpt.pt) on the test split"))
    with open(os.path.join(cfg.out_dir, "test_results.json"), "w") as f:
        json.dump(json_safe(test_metrics), f, indent=1)
    return test_metrics


if __name__ == "__main__":
    main()
