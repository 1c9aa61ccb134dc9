"""Fine-tune a duplicate-question classifier on the folder preprocess.py wrote.

    # CPU smoke run, under a minute (bundled MiniLM):
    python preprocess.py ../shared/data/qqp/qqp_first8k.csv.gz --out_dir data/qqp8k
    python train.py --data_dir data/qqp8k --epochs 1 --max_steps 20 --bs 32 --out_dir out/smoke
    # The real run on one GPU (Kaggle's train.csv), or on N GPUs with torchrun:
    python train.py --epochs 5 --bs 128
    torchrun --nproc_per_node 8 train.py --epochs 5 --bs 128

The loop, per optimizer step: lr from the schedule, forward under autocast, backward (accumulated
over --grad_accum_steps micro-batches), unscale, clip, step, zero_grad, log. Evaluates on the
validation split every --eval_every_steps (0: each epoch) and keeps the best checkpoint; at the end
the best one is evaluated on the test split. Writes to --out_dir:

    ckpt.pt        best checkpoint (weights, config, data fingerprint; torch.load(weights_only=True))
    last.pt        latest checkpoint with optimizer/scheduler/scaler/sampler/RNG state, for --resume
    hf/            the best encoder and its tokenizer in Hugging Face format, for other tools
    metrics.jsonl  one JSON line per evaluation
"""
import argparse
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from data import DataError, PairDataset, check_tokenizer, fingerprint, make_loader, to_device
from metrics import compute_metrics, format_report
from model import (BUNDLED_MODEL, ModelConfig, build_model, load_checkpoint, loss_fn,
                   model_from_checkpoint, pick_device, pick_precision, save_checkpoint)


@dataclass
class TrainConfig:
    # data and output
    data_dir: str = "data/qqp"        # folder written by preprocess.py
    out_dir: str = "out"              # checkpoints, metrics.jsonl, hf/
    # model (see model.ModelConfig)
    encoder: str = BUNDLED_MODEL      # HF name or local folder; the notebook used distilbert-base-uncased
    arch: str = "siamese"             # 'siamese' (notebook) or 'cross'
    # The notebook's head read [CLS] and concatenated [u, v]; MiniLM is trained for mean pooling,
    # and |u-v|, u*v hand the head the similarity directly (on the real 8k rows, validation
    # accuracy 0.74 -> 0.82). --pooling cls --features concat gives the notebook's head.
    pooling: str = "mean"             # 'mean' over real tokens, or 'cls' (notebook)
    features: str = "rich"            # 'rich' (u, v, |u-v|, u*v) or 'concat' (notebook: u, v)
    hidden: int = 300
    dropout: float = 0.25
    freeze_encoder: bool = False      # the notebook's "static BERT": train the head only
    symmetric: bool = False           # siamese: average the logits of both question orders
    # optimization (notebook: Adam, lr 1e-4, batch 128, clip 1.0)
    epochs: int = 5
    bs: int = 128                     # pairs per micro-batch per process
    grad_accum_steps: int = 1         # micro-batches per optimizer step
    max_steps: int = 0                # stop after this many optimizer steps (0: run all epochs)
    lr: float = 1e-4
    weight_decay: float = 0.0         # AdamW; 0 is the notebook's Adam
    warmup_ratio: float = 0.06        # share of steps with linear warmup, then linear decay to 0
    clip: float = 1.0                 # max gradient norm
    seed: int = 0
    # evaluation, checkpoints, logging
    eval_every_steps: int = 0         # 0: evaluate at the end of each epoch
    metric_for_best: str = "accuracy" # validation metric that picks ckpt.pt
    early_stopping_patience: int = 0  # stop after this many evaluations without improvement (0: off)
    save_every_steps: int = 0         # also write last.pt this often (0: at evaluations only)
    log_every_steps: int = 20
    resume: bool = False              # continue from out_dir/last.pt
    # hardware
    device: str = "auto"              # auto: cuda > mps > cpu
    precision: str = "auto"           # auto: bf16 (or fp16 + grad scaler) on GPU, fp32 on CPU
    compile: bool = False             # torch.compile; pads lengths to multiples of 16 (few shapes)
    num_workers: int = 2              # DataLoader workers (0: load in the training process)
    max_chunks: int = 2               # siamese: encoder calls per batch (see data.Collator)


def dataclass_parser(config_cls, description):
    """One flag per config field, named like the field; booleans are switches."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(config_cls):
        if f.type is bool or f.type == "bool":
            p.add_argument(f"--{f.name}", action="store_true")
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    return p


def parse_args(argv=None):
    return TrainConfig(**vars(dataclass_parser(TrainConfig, __doc__).parse_args(argv)))


class Stop(Exception):
    """A reason to stop the run early that the user should see as one line."""


# ----------------------------------------------------------------------------- set-up helpers

def setup_distributed():
    """(rank, world_size, local_rank); initializes the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend)
    return torch.distributed.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def lr_lambda(total_steps, warmup_steps):
    def f(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return f


def optimizer_step(model, optimizer, scheduler, scaler, clip):
    """After backward: unscale (fp16), clip, step, update the scaler, zero grads, next lr."""
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


def rng_state():
    """Every RNG the run draws from, in types torch.load(weights_only=True) accepts."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                       "has_gauss": has_gauss, "gauss": gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def data_fingerprint(manifest, data_dir):
    return {"data_dir": os.path.abspath(data_dir), "fingerprint": fingerprint(manifest),
            "tokenizer": manifest["tokenizer"], "tokenizer_path": manifest["tokenizer_path"],
            "vocab_hash": manifest["vocab_hash"], "pad_token_id": manifest["pad_token_id"],
            "max_len": manifest["max_len"], "split_policy": manifest["split_policy"]}


@torch.inference_mode()
def predict_probs(model, loader, device, amp_dtype, n, world=1):
    """Duplicate probability (n,) for every pair of the loader's split, streamed to the CPU batch by
    batch; with DDP each rank does its shard and the shards are gathered. Also returns mean loss."""
    model.eval()
    probs = np.zeros(n, np.float32)
    index, chunks, loss_sum = [], [], 0.0
    for batch in loader:
        batch = to_device(batch, device)
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
            logits = model(batch)  # (B, 2)
        if (batch["labels"] >= 0).all():
            loss_sum += loss_fn(logits, batch["labels"]).item() * len(batch["labels"])
        index.append(batch["index"].cpu().numpy())
        chunks.append(logits.float().softmax(-1)[:, 1].cpu().numpy())
    index, chunk_probs = np.concatenate(index), np.concatenate(chunks)
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, (index, chunk_probs, loss_sum))
        index = np.concatenate([g[0] for g in gathered])
        chunk_probs = np.concatenate([g[1] for g in gathered])
        loss_sum = sum(g[2] for g in gathered)  # includes the few pairs repeated to even out shards
    probs[index] = chunk_probs
    return probs, loss_sum / max(1, len(index))


def eta(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ----------------------------------------------------------------------------- main

def main(argv=None):
    cfg = parse_args(argv)
    try:
        train(cfg)
    except (DataError, Stop, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def train(cfg):
    rank, world, local_rank = setup_distributed()
    master = rank == 0
    say = print if master else (lambda *a, **k: None)

    # --- resume: the saved config wins, so the continued run is the same run
    last_path = os.path.join(cfg.out_dir, "last.pt")
    state = None
    if cfg.resume:
        if not os.path.exists(last_path):
            raise Stop(f"--resume: no {last_path} yet. Fix: run without --resume to start")
        state = load_checkpoint(last_path)
        cfg = TrainConfig(**{**state["train_config"], "resume": True})
        say(f"resuming from {last_path} at step {state['step']} (its saved config is used)")
    elif os.path.exists(last_path):
        say(f"note: starting a new run in {cfg.out_dir}: its last.pt will be overwritten "
            "(--resume continues it instead)")

    # --- device and precision, decided once
    device = pick_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: free speed on Ampere+
        torch.backends.cudnn.allow_tf32 = True
    amp_dtype = pick_precision(device, cfg.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext

    # --- data
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    train_ds = PairDataset(cfg.data_dir, "train")
    val_ds = PairDataset(cfg.data_dir, "validation")
    test_ds = PairDataset(cfg.data_dir, "test")
    manifest = train_ds.manifest
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise Stop(f"{cfg.data_dir}: the train or validation split is empty. Fix: re-run "
                   "preprocess.py with --val_frac > 0")
    data_info = data_fingerprint(manifest, cfg.data_dir)
    if state is not None and state["data"]["fingerprint"] != data_info["fingerprint"]:
        raise Stop(f"{cfg.data_dir} changed since {last_path} was written. Fix: restore the data "
                   "folder, or start a new run in another --out_dir")
    pin = device.type == "cuda"
    loader_args = dict(num_workers=cfg.num_workers, pin_memory=pin, max_chunks=1 if cfg.compile else cfg.max_chunks,
                       pad_multiple=16 if cfg.compile else 1)
    train_loader, sampler = make_loader(train_ds, cfg.arch, cfg.bs, shuffle=True, seed=cfg.seed,
                                        num_replicas=world, rank=rank, **loader_args)
    val_loader, _ = make_loader(val_ds, cfg.arch, cfg.bs * 2, shuffle=False, num_replicas=world,
                                rank=rank, **loader_args)

    # --- model; the tokenizer must be the one the data was made with
    from preprocess import load_tokenizer, vocab_hash
    model_cfg = ModelConfig(encoder=cfg.encoder, arch=cfg.arch, pooling=cfg.pooling, features=cfg.features,
                            hidden=cfg.hidden, dropout=cfg.dropout, freeze_encoder=cfg.freeze_encoder,
                            symmetric=cfg.symmetric)
    tokenizer = load_tokenizer(cfg.encoder)
    check_tokenizer(manifest, vocab_hash(tokenizer), cfg.encoder, cfg.data_dir)
    model = build_model(model_cfg).to(device)
    if state is not None:
        model.load_state_dict(state["model"])
    raw_model = model  # unwrapped and uncompiled: what checkpoints hold
    if cfg.compile:
        model = torch.compile(model)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None)

    decay, no_decay = [], []
    for name, p in raw_model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)  # no decay on biases, LayerNorm, PReLU
    fused = device.type == "cuda"  # one kernel for the whole update instead of one per tensor
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, fused=fused)
    batches_per_epoch = len(sampler)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum_steps)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, int(cfg.warmup_ratio * total_steps)))

    step, best, bad_evals = 0, None, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, best, bad_evals = state["step"], state["best"], state["bad_evals"]
        set_rng_state(state["rng"])

    n_params = sum(p.numel() for p in raw_model.parameters())
    n_trainable = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    say(f"device {device} | precision {amp_dtype or 'fp32'} | processes {world} | "
        f"encoder {cfg.encoder} ({cfg.arch}, {cfg.pooling} pooling, frozen={cfg.freeze_encoder})")
    say(f"pairs: train {len(train_ds):,} | validation {len(val_ds):,} | test {len(test_ds):,} "
        f"(split '{manifest['split_policy']}', {cfg.data_dir})")
    say(f"batch {cfg.bs} per process x {world} processes x {cfg.grad_accum_steps} accumulation = "
        f"{cfg.bs * world * cfg.grad_accum_steps} pairs per step | {steps_per_epoch} steps per epoch | "
        f"{total_steps} steps in all | parameters {n_params:,} ({n_trainable:,} trainable)")

    os.makedirs(cfg.out_dir, exist_ok=True)
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if master:
        trim_metrics(metrics_path, step)  # drop lines a killed run wrote after its last checkpoint

    def checkpoint(path, full):
        ckpt = {"model": raw_model.state_dict(), "model_config": asdict(raw_model.cfg),
                "train_config": asdict(cfg), "data": data_info, "step": step, "best": best}
        if full:
            ckpt.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                        scaler=scaler.state_dict(), bad_evals=bad_evals, rng=rng_state(),
                        epoch=epoch, batches_done=batches_done)
        save_checkpoint(path, ckpt)

    def evaluate():
        """Validation metrics; keeps ckpt.pt and hf/ at the best so far. True = stop early."""
        nonlocal best, bad_evals
        probs, val_loss = predict_probs(model, val_loader, device, amp_dtype, len(val_ds), world)
        m = compute_metrics(val_ds.labels, probs)
        record = {"step": step, "epoch": round(step / steps_per_epoch, 3), "val_loss": round(val_loss, 5),
                  **{k: round(m[k], 5) for k in ("accuracy", "f1", "precision", "recall", "roc_auc",
                                                 "average_precision")}}
        improved = best is None or m[cfg.metric_for_best] > best
        if improved:
            best, bad_evals = m[cfg.metric_for_best], 0
        else:
            bad_evals += 1
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            say(f"eval step {step}: val loss {val_loss:.4f} | accuracy {m['accuracy']:.4f} | f1 {m['f1']:.4f} | "
                f"auc {m['roc_auc']:.4f}{' | best so far' if improved else ''}")
            if improved:
                checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), full=False)
                raw_model.encoder.save_pretrained(os.path.join(cfg.out_dir, "hf"))
                tokenizer.save_pretrained(os.path.join(cfg.out_dir, "hf"))
        model.train()
        return cfg.early_stopping_patience and bad_evals >= cfg.early_stopping_patience

    # Ctrl-C / SIGTERM: finish the current step, save last.pt, exit cleanly.
    interrupted = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: interrupted.append(signum))

    # --- the loop
    epoch, batches_done = (state["epoch"], state["batches_done"]) if state is not None else (0, 0)
    show_bar = master and sys.stderr.isatty()
    bar = None
    if show_bar:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True)
    model.train()
    t_last, pairs_since, loss_since, steps_since = time.time(), 0, torch.zeros((), device=device), 0
    stop_reason = None
    while step < total_steps and stop_reason is None:
        sampler.set_epoch(epoch, start_batch=batches_done)
        batches = iter(train_loader)
        # With DDP, ranks may hold unequal slices of the last global batch; weighting each rank's
        # mean loss by its share makes DDP's gradient average the mean over the global batch.
        global_sizes = sampler.global_sizes(epoch) if world > 1 else None
        while batches_done < batches_per_epoch and step < total_steps:
            # One optimizer step over up to grad_accum_steps micro-batches (fewer at the epoch end;
            # the loss is divided by the real count so every step averages its pairs' losses).
            n_micro = min(cfg.grad_accum_steps, batches_per_epoch - batches_done)
            shapes = []
            for micro in range(n_micro):
                batch = to_device(next(batches), device)
                shapes.append(tuple(t.shape[1] for t in batch.get("q_ids", [batch.get("input_ids")])))
                sync = micro == n_micro - 1 or world == 1
                with (nullcontext() if sync else model.no_sync()), autocast():
                    logits = model(batch)  # (B, 2)
                    loss = loss_fn(logits, batch["labels"]) / n_micro
                    if world > 1:
                        loss = loss * len(batch["labels"]) * world / global_sizes[batches_done + micro]
                scaler.scale(loss).backward()
                loss_since += loss.detach()
                pairs_since += len(batch["labels"]) * world
            optimizer_step(raw_model, optimizer, scheduler, scaler, cfg.clip)
            step += 1
            steps_since += 1
            batches_done += n_micro

            if step % cfg.log_every_steps == 0 or step == total_steps:
                mean_loss = loss_since.item() / steps_since  # the one sync point per log interval
                if not math.isfinite(mean_loss):
                    raise Stop(f"non-finite loss ({mean_loss}) between steps {step - steps_since + 1} and "
                               f"{step}, lr {scheduler.get_last_lr()[0]:.3g}, last batch lengths {shapes}. "
                               "Fix: lower --lr, or use --precision fp32")
                now = time.time()
                rate = pairs_since / (now - t_last)
                if bar is not None:
                    bar.set_postfix(loss=f"{mean_loss:.4f}", pairs_s=f"{rate:.0f}", epoch=epoch)
                    bar.update(steps_since)
                else:
                    left = (total_steps - step) * cfg.bs * world * cfg.grad_accum_steps / max(rate, 1e-9)
                    say(f"step {step:>6}/{total_steps} | epoch {epoch} | loss {mean_loss:.4f} | "
                        f"lr {scheduler.get_last_lr()[0]:.2e} | {rate:,.0f} pairs/s | eta {eta(left)}", flush=True)
                t_last, pairs_since, loss_since, steps_since = now, 0, torch.zeros((), device=device), 0

            end_of_epoch = batches_done == batches_per_epoch
            if (cfg.eval_every_steps and step % cfg.eval_every_steps == 0) or (
                    not cfg.eval_every_steps and end_of_epoch) or step == total_steps:
                if evaluate():
                    stop_reason = f"early stopping: no better {cfg.metric_for_best} for " \
                                  f"{cfg.early_stopping_patience} evaluations"
            if end_of_epoch:
                epoch, batches_done = epoch + 1, 0
            saving = (cfg.save_every_steps and step % cfg.save_every_steps == 0) or interrupted or \
                stop_reason or step == total_steps or end_of_epoch or \
                (cfg.eval_every_steps and step % cfg.eval_every_steps == 0)
            if saving and master:
                checkpoint(last_path, full=True)
            if interrupted:
                stop_reason = f"interrupted by signal {interrupted[0]}: saved {last_path}; continue with --resume"
            if stop_reason:
                break
            if end_of_epoch:
                break
    if bar is not None:
        bar.close()
    if stop_reason:
        say(stop_reason)
    if world > 1:
        torch.distributed.barrier()
    if interrupted:
        return None

    # --- the best checkpoint on the test split, in the notebook's format
    test_metrics = None
    if master and len(test_ds):
        best_model = model_from_checkpoint(load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))).to(device)
        test_loader, _ = make_loader(test_ds, cfg.arch, cfg.bs * 2, shuffle=False, **loader_args)
        probs, _ = predict_probs(best_model, test_loader, device, amp_dtype, len(test_ds))
        test_metrics = compute_metrics(test_ds.labels, probs)
        say(format_report(test_metrics, f"Evaluating the best checkpoint ({cfg.out_dir}/ckpt.pt) on the test split"))
        with open(os.path.join(cfg.out_dir, "test_results.json"), "w") as f:
            json.dump(test_metrics, f, indent=1)
    if world > 1:
        torch.distributed.destroy_process_group()
    return test_metrics


def trim_metrics(path, step):
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(keep)


if __name__ == "__main__":
    main()
