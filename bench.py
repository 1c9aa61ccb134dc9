"""How fast this toolkit is against the notebook's way, stage by stage: a table and a JSON report.

    # CPU, every stage (under 10 minutes on 2 cores; the bundled MiniLM, fp32):
    python bench.py
    # GPU, one short run (under 5 minutes on an H200; a DistilBERT-size encoder built from
    # transformers.DistilBertConfig(), 66M parameters, random weights; ours in bf16):
    python bench.py --device cuda --stages train,infer,gpu

Stages (--stages, comma-separated, or 'all'), each ours against the notebook's way:
  preprocess  a 404,290-row file synthesized from the real questions (synth_qqp.py), run through
              preprocess.py in a subprocess: wall time, question slots per second, peak RSS. The
              notebook had no such step; it tokenized all 808,580 question slots again every epoch
              with two tokenizer calls per batch: that work, timed (tokenizing only), is its column.
  data        one training batch of --batch_size pairs: ours = bucketed sampler + memory-mapped
              dataset + Collator (+ pinned memory and the copy to the device) from data.make_loader;
              the notebook's = two tokenizer(..., padding=True) calls on the same pairs' texts (+ its
              copy to the device).
  padding     real tokens / padded tokens over one epoch of the real rows: ours (bucketed sampler,
              Collator) against the notebook's (random order, q1 and q2 each padded to their batch max).
  train       pairs per second over --train_steps steps after --warmup_steps, same encoder weights,
              same batch size, the same fixed random sample of pairs on both sides. Ours is
              train.py's step with its default settings (make_loader, autocast, loss_fn, backward,
              unscale, clip, AdamW step, zero_grad, schedule; its default head, pooling and pair
              features); the notebook's is its train() loop re-implemented below.
  infer       pairs per second of evaluate.score_dataset against the notebook's get_predictions.
  gpu         on CUDA: model FLOPs utilization (6 x non-embedding parameters x real tokens over the
              measured bf16 matmul rate; attention adds < 1% at these lengths), the share of step time
              blocked in next(loader), peak GPU memory, and the projected time of one 461,792-pair
              epoch (the notebook's training set). With 'all' on a machine without CUDA it is skipped
              (not yet measured); named explicitly it runs on the CPU as a smoke check of its code.
Every ratio reads "times better than the notebook" (> 1: ours ahead), whatever the unit.

The notebook is re-implemented as written (NotebookModel, notebook_train_epoch,
notebook_get_predictions): python random shuffling of lists, two tokenizer calls per batch, a
one-hot label loop, two encoder calls, [CLS] vectors concatenated, 2 x (Linear, PReLU, Dropout),
Linear, LogSoftmax(dim=0) (sic), a per-example Python loss loop, clip 1.0, Adam, fp32, and no
torch.no_grad() in get_predictions. Where it differs, it is in the notebook's favour: the fast Rust
tokenizer (the notebook's DistilBertTokenizer was the pure-Python one in transformers 4.12; the data
stage also times that kind), TF32 matmuls on GPU (PyTorch 1.10's default then), our encoder module
with its SDPA attention, zero_grad that frees gradients (today's default), no progress bars, and the
raw questions instead of its word lists.
"""
import copy
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from functools import cached_property

import numpy as np
import torch
from torch import nn, optim

ROOT = os.path.dirname(os.path.abspath(__file__))
STAGES = ("preprocess", "data", "padding", "train", "infer", "gpu")
NOTEBOOK_EPOCH_PAIRS = 461_792         # the notebook's training set (80% of 577,240 augmented pairs)
NOTEBOOK_EPOCH_MINUTES = 21.6          # its logged epoch time on Colab's GPU (3608 steps in 21:36)
DISTILBERT_CONFIG = "distilbert-config"


@dataclass
class BenchConfig:
    stages: str = "all"               # comma-separated, from: preprocess,data,padding,train,infer,gpu
    model: str = "auto"               # auto: bundled MiniLM on CPU, distilbert-config on CUDA; or
                                      # distilbert-config (random 66M DistilBERT), an HF name, a folder
    device: str = "auto"              # auto: cuda > mps > cpu
    batch_size: int = 128             # pairs per batch, both sides (the notebook's 128)
    warmup_steps: int = -1            # train: untimed steps first (-1: 2 on CPU, 30 on CUDA)
    train_steps: int = -1             # train: timed steps (-1: 10 on CPU, 400 on CUDA)
    data_batches: int = 200           # data: batches timed per side
    infer_pairs: int = -1             # infer: pairs scored per side (-1: 1,024 on CPU, 65,536 on CUDA)
    rows: int = 404_290               # preprocess: rows of the synthesized file (Kaggle's train.csv)
    notebook_rows: int = 0            # preprocess: rows the notebook's way tokenizes, scaled to --rows (0: all)
    data: str = os.path.join(ROOT, "..", "shared", "data", "qqp", "qqp_first8k.csv.gz")  # real rows
    num_workers: int = -1             # ours: DataLoader workers in train/infer (-1: 0 on CPU, 4 on CUDA)
    compile: bool = False             # ours: torch.compile, as train.py --compile
    seed: int = 0                     # pair sample, shuffles, weights
    out: str = "bench.json"           # the JSON report


def parse_args(argv=None):
    from train import dataclass_parser
    p = dataclass_parser(BenchConfig, __doc__)
    cfg = BenchConfig(**vars(p.parse_args(argv)))
    unknown = set(cfg.stages.split(",")) - set(STAGES) - {"all"}
    if unknown:
        p.error(f"--stages: unknown {', '.join(sorted(unknown))}; use 'all' or some of {','.join(STAGES)}")
    return cfg


@dataclass
class Run:
    """Values derived once from the config (never written back into it)."""
    stages: tuple
    gpu_named: bool                   # 'gpu' named explicitly: runs even without CUDA (smoke check)
    device: torch.device
    amp_dtype: object                 # ours' autocast dtype; None = fp32
    model_name: str                   # what --model resolved to
    tokenizer_name: str
    warmup_steps: int
    train_steps: int
    infer_pairs: int
    num_workers: int


def resolve(cfg):
    from model import BUNDLED_MODEL, pick_device, pick_precision
    device = pick_device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {cfg.device}: no CUDA GPU here. Fix: use --device auto or cpu")
    cuda = device.type == "cuda"
    model_name = cfg.model if cfg.model != "auto" else DISTILBERT_CONFIG if cuda else BUNDLED_MODEL
    named = cfg.stages.split(",")

    def pick(value, on_cpu, on_cuda):
        return value if value >= 0 else on_cuda if cuda else on_cpu

    return Run(stages=STAGES if "all" in named else tuple(s for s in STAGES if s in named),
               gpu_named="gpu" in named, device=device, amp_dtype=pick_precision(device),
               model_name=model_name,
               # A random DistilBERT uses the bundled vocabulary: the same 30,522 uncased WordPieces.
               tokenizer_name=BUNDLED_MODEL if model_name == DISTILBERT_CONFIG else model_name,
               warmup_steps=pick(cfg.warmup_steps, 2, 30), train_steps=pick(cfg.train_steps, 10, 400),
               infer_pairs=pick(cfg.infer_pairs, 1024, 65_536), num_workers=pick(cfg.num_workers, 0, 4))


def sync(device):
    """Timings end only when the GPU has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- the notebook's way

def shuffle_data(input_1, input_2, labels):
    shuffled_input_1 = []
    shuffled_input_2 = []
    shuffled_labels = []
    indices = list(range(len(input_1)))
    random.shuffle(indices)
    for i in indices:
        shuffled_input_1.append(input_1[i])
        shuffled_input_2.append(input_2[i])
        shuffled_labels.append(labels[i])
    return (shuffled_input_1, shuffled_input_2, shuffled_labels)


class NotebookModel(nn.Module):
    """The notebook's SimilarityModelFineTuneBert, line for line, around a given encoder (so both
    sides start from the same weights); .cuda() calls became .to(device)."""

    def __init__(self, encoder, device, dropout_rate=0.25):
        super().__init__()
        self.bert = encoder
        self.device = device
        h = encoder.config.hidden_size  # the notebook hard-coded DistilBERT's 768
        self.dropout = nn.Dropout(p=dropout_rate)
        self.feedforward_1 = nn.Linear(h * 2, 300)
        self.non_lin_1 = nn.PReLU()
        self.feedforward_2 = nn.Linear(300, 300)
        self.non_lin_2 = nn.PReLU()
        self.feedforward_3 = nn.Linear(300, 2)
        self.log_softmax = nn.LogSoftmax(dim=0)  # sic: over the batch, as in the notebook

    def forward(self, encoded_input_1, encoded_input_2, train=False):
        if train:
            self.train()
        else:
            self.eval()
        d = self.device
        pooler_output_1 = self.bert(encoded_input_1["input_ids"].to(d),
                                    encoded_input_1["attention_mask"].to(d)).last_hidden_state[:, 0, :]
        pooler_output_2 = self.bert(encoded_input_2["input_ids"].to(d),
                                    encoded_input_2["attention_mask"].to(d)).last_hidden_state[:, 0, :]
        concatenated_output = torch.cat([pooler_output_1, pooler_output_2], axis=1).to(d)
        f1 = self.dropout(self.non_lin_1(self.feedforward_1(concatenated_output)))
        f2 = self.dropout(self.non_lin_2(self.feedforward_2(f1)))
        return self.log_softmax(self.feedforward_3(f2))


def notebook_train_epoch(model, tokenizer, optimizer, X_1, X_2, Y, batch_size, device, num_classes=2):
    """One epoch of the notebook's train(); Adam is passed in so warm-up and timing share it.
    Returns (mean loss tensor, stats): stats has the seconds spent tokenizing and the tokens."""
    stats = {"data_wait_s": 0.0, "real_tokens": 0, "padded_tokens": 0, "pairs": 0}
    total_loss = 0.0
    (shuffled_input_1, shuffled_input_2, shuffled_labels) = shuffle_data(X_1, X_2, Y)
    for batch in range(0, len(X_1), batch_size):
        t0 = time.perf_counter()
        input_1 = shuffled_input_1[batch:(batch + batch_size)]
        input_2 = shuffled_input_2[batch:(batch + batch_size)]
        encoded_input_1 = tokenizer(input_1, return_tensors="pt", is_split_into_words=False, padding=True)
        encoded_input_2 = tokenizer(input_2, return_tensors="pt", is_split_into_words=False, padding=True)
        stats["data_wait_s"] += time.perf_counter() - t0
        for enc in (encoded_input_1, encoded_input_2):
            stats["real_tokens"] += int(enc["attention_mask"].sum())
            stats["padded_tokens"] += enc["attention_mask"].numel()
        labels = shuffled_labels[batch:(batch + batch_size)]
        labels_onehot = torch.zeros(len(labels), num_classes).to(device)
        for i in range(len(labels)):
            labels_onehot[i][labels[i]] = 1.0
        model.zero_grad()
        log_probs = model.forward(encoded_input_1, encoded_input_2, train=True)
        loss_batch = 0
        for idx in range(labels_onehot.shape[0]):
            loss_iteration = torch.neg(log_probs[idx]).dot(labels_onehot[idx])
            loss_batch += loss_iteration
        loss_batch /= labels_onehot.shape[0]
        loss_batch.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        total_loss += loss_batch.detach()
        stats["pairs"] += len(labels)
    num_batches = math.ceil(len(X_1) / batch_size)
    return total_loss / num_batches, stats


def notebook_get_predictions(model, tokenizer, X_1, X_2, batch_size=8):
    """The notebook's get_predictions (its tokenizer was a global; here an argument)."""
    all_predictions = np.array([])
    for batch in range(0, len(X_1), batch_size):
        encoded_input_1 = tokenizer(X_1[batch:batch + batch_size], return_tensors="pt",
                                    is_split_into_words=False, padding=True)
        encoded_input_2 = tokenizer(X_2[batch:batch + batch_size], return_tensors="pt",
                                    is_split_into_words=False, padding=True)
        log_probs = model.forward(encoded_input_1, encoded_input_2, train=False)
        prediction_batch = torch.argmax(log_probs, dim=1)
        all_predictions = np.concatenate((all_predictions, prediction_batch.cpu().numpy()))
    return all_predictions


def python_tokenizer(fast, folder):
    """The kind of tokenizer the notebook ran: transformers 4.12's DistilBertTokenizer was BERT's
    pure-Python WordPiece. Built from the fast one's vocabulary; None if that is not WordPiece."""
    import transformers
    from tokenizers.models import WordPiece
    vocab = fast.get_vocab()
    if not isinstance(fast.backend_tokenizer.model, WordPiece) or sorted(vocab.values()) != list(range(len(vocab))):
        return None
    path = os.path.join(folder, "vocab.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(sorted(vocab, key=vocab.get)) + "\n")
    cls = getattr(transformers, "BertTokenizerLegacy", None) or transformers.BertTokenizer  # v5 renamed it
    tok = cls(vocab_file=path, do_lower_case=getattr(fast, "do_lower_case", True))
    return None if tok.is_fast else tok


# ----------------------------------------------------------------------------- shared set-up

class Workspace:
    """What several stages need, built on first use: the real rows preprocessed (all in one split;
    splits do not matter for speed), their texts, the tokenizer, the two models."""

    def __init__(self, cfg, run, tmp):
        self.cfg, self.run, self.tmp = cfg, run, tmp

    @cached_property
    def tokenizer(self):
        from preprocess import load_tokenizer
        return load_tokenizer(self.run.tokenizer_name)

    @cached_property
    def dataset(self):
        from data import PairDataset
        from preprocess import PreprocessConfig, preprocess
        out = os.path.join(self.tmp, "real")
        preprocess(PreprocessConfig(input=self.cfg.data, out_dir=out, model=self.run.tokenizer_name,
                                    split="random", val_frac=0.0, test_frac=0.0))
        return PairDataset(out, "train")

    @cached_property
    def texts(self):
        """(q1 texts, q2 texts, labels) aligned with dataset rows: with the random split and no
        validation/test share, train.npy keeps the file's usable rows in order. Checked."""
        from preprocess import read_pairs
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
    def train_defaults(self):
        from train import TrainConfig
        return TrainConfig()

    @property
    def layout(self):
        return self.train_defaults.arch  # the Collator's layout is the architecture's

    @cached_property
    def models(self):
        """(ours, the notebook's), the same encoder weights in both. Ours is built as train.py
        builds it with its default settings (head, pooling, features)."""
        from model import ModelConfig, build_model
        model_fields = {f.name for f in fields(ModelConfig)} - {"encoder", "encoder_config"}
        head = {k: v for k, v in asdict(self.train_defaults).items() if k in model_fields}
        torch.manual_seed(self.cfg.seed)
        if self.run.model_name == DISTILBERT_CONFIG:
            from transformers import DistilBertConfig
            hf = {k: v for k, v in DistilBertConfig().to_dict().items()
                  if not k.startswith("_") and k != "transformers_version"}
            mc = ModelConfig(encoder_config=hf, **head)
        else:
            mc = ModelConfig(encoder=self.run.model_name, **head)
        ours = build_model(mc)
        notebook = NotebookModel(copy.deepcopy(ours.encoder), self.run.device)
        return ours.to(self.run.device), notebook.to(self.run.device)

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


# ----------------------------------------------------------------------------- stages

def stage_preprocess(ws, cfg, run):
    import synth_qqp
    from preprocess import read_pairs
    synth = os.path.join(ws.tmp, "synth.csv")
    synth_qqp.main([cfg.data, synth, "--rows", str(cfg.rows), "--seed", str(cfg.seed)])
    out = os.path.join(ws.tmp, "synth_prep")
    log_path = os.path.join(ws.tmp, "preprocess.log")
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "preprocess.py"), synth,
                                 "--out_dir", out, "--model", run.tokenizer_name],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS, not earlier children's
        seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        with open(log_path) as f:
            raise RuntimeError(f"preprocess.py failed (exit {proc.returncode}):\n{f.read()[-2000:]}")
    with open(os.path.join(out, "manifest.json")) as f:
        counts = json.load(f)["counts"]
    peak_gb = usage.ru_maxrss * 1024 / 1e9  # Linux reports kilobytes
    slots = 2 * counts["pairs_kept"]

    # The notebook's way: every question slot tokenized in batches, two calls per batch, each epoch.
    pairs, _, _ = read_pairs(synth)
    n = min(cfg.notebook_rows or len(pairs["q1"]), len(pairs["q1"]))
    tok, bs = ws.tokenizer, cfg.batch_size
    t0 = time.perf_counter()
    for b in range(0, n, bs):
        tok(pairs["q1"][b:b + bs], return_tensors="pt", is_split_into_words=False, padding=True)
        tok(pairs["q2"][b:b + bs], return_tensors="pt", is_split_into_words=False, padding=True)
    nb_seconds = (time.perf_counter() - t0) * len(pairs["q1"]) / n
    rows = [
        row("preprocess", f"{cfg.rows:,} rows: wall s", seconds, nb_seconds, nb_seconds / seconds,
            "< 60 s", seconds < 60),
        row("preprocess", "question slots / s", slots / seconds, slots / nb_seconds,
            nb_seconds / seconds, "-", None),
        row("preprocess", "peak memory GB", peak_gb, None, None, "< 2 GB", peak_gb < 2),
    ]
    return {"ours": {"seconds": seconds, "peak_rss_gb": peak_gb, "question_slots_per_sec": slots / seconds,
                     "rows_read": counts["rows_read"], "pairs_kept": counts["pairs_kept"],
                     "distinct_questions": counts["questions"]},
            "notebook": {"seconds": nb_seconds, "question_slots_per_sec": slots / nb_seconds,
                         "rows_tokenized": n, "scaled_to_rows": len(pairs["q1"]),
                         "what": "two tokenizer(padding=True) calls per batch over every slot "
                                 "(one epoch's worth; it repeated each epoch); tokenizing only"},
            "ratio": nb_seconds / seconds, "rows": rows}


def stage_data(ws, cfg, run):
    """Interleaved batch by batch (ours makes batch k, then the notebook tokenizes the same pairs),
    so that drift in a shared machine's speed hits both sides alike."""
    from data import make_loader, to_device
    device = run.device
    loader, sampler = make_loader(ws.dataset, ws.layout, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                  pin_memory=device.type == "cuda", max_chunks=ws.train_defaults.max_chunks)

    def ours_batches():  # epoch after epoch, as training draws them
        epoch = 0
        while True:
            epoch += 1
            sampler.set_epoch(epoch)
            yield from loader

    def notebook_batch(tok, q1, q2):
        e1 = tok(q1, return_tensors="pt", is_split_into_words=False, padding=True)
        e2 = tok(q2, return_tensors="pt", is_split_into_words=False, padding=True)
        for enc in (e1, e2):  # the notebook's .cuda() inside forward
            enc["input_ids"].to(device), enc["attention_mask"].to(device)

    tokenizers = {"notebook": ws.tokenizer}
    slow = python_tokenizer(ws.tokenizer, ws.tmp)
    q1, q2, _ = ws.pair_texts(range(cfg.batch_size))
    if slow is not None and slow(q1)["input_ids"] == ws.tokenizer(q1)["input_ids"]:
        tokenizers["notebook_python_tokenizer"] = slow  # only if it splits words the same way
    for tok in tokenizers.values():
        notebook_batch(tok, q1, q2)  # warm-up
    batches = ours_batches()
    to_device(next(batches), device)  # warm-up
    seconds = {"ours": [], **{name: [] for name in tokenizers}}
    for _ in range(cfg.data_batches):
        sync(device)
        t0 = time.perf_counter()
        batch = next(batches)  # sampler + memmap dataset + Collator (+ pinning)
        to_device(batch, device)
        sync(device)
        seconds["ours"].append(time.perf_counter() - t0)
        q1, q2, _ = ws.pair_texts(batch["index"].tolist())
        for name, tok in tokenizers.items():
            t0 = time.perf_counter()
            notebook_batch(tok, q1, q2)
            sync(device)
            seconds[name].append(time.perf_counter() - t0)
    ms = {name: 1e3 * float(np.mean(s)) for name, s in seconds.items()}
    median_ms = {name: 1e3 * float(np.median(s)) for name, s in seconds.items()}
    ratio = ms["notebook"] / ms["ours"]
    rows = [row("data", f"ms per batch of {cfg.batch_size}", ms["ours"], ms["notebook"], ratio,
                ">= 10x", ratio >= 10)]
    slow_ms = ms.get("notebook_python_tokenizer")
    if slow_ms is not None:
        rows.append(row("data", "  vs its Python tokenizer", ms["ours"], slow_ms, slow_ms / ms["ours"],
                        "-", None))
    return {"ours": {"ms_per_batch": ms["ours"], "median_ms": median_ms["ours"], "batches": cfg.data_batches},
            "notebook": {"ms_per_batch": ms["notebook"], "median_ms": median_ms["notebook"],
                         "tokenizer": f"{type(ws.tokenizer).__name__} (fast, Rust)",
                         "python_tokenizer": type(slow).__name__ if slow_ms else None,
                         "python_tokenizer_ms_per_batch": slow_ms,
                         "python_tokenizer_median_ms": median_ms.get("notebook_python_tokenizer")},
            "ratio": ratio, "ratio_vs_python_tokenizer": slow_ms / ms["ours"] if slow_ms else None,
            "rows": rows}


def stage_padding(ws, cfg, run):
    from data import make_loader, padding_stats
    loader, _ = make_loader(ws.dataset, ws.layout, cfg.batch_size, shuffle=True, seed=cfg.seed,
                            max_chunks=ws.train_defaults.max_chunks)
    ours = np.array([padding_stats(batch) for batch in loader]).sum(0)  # (real, padded)
    q1, q2, labels = ws.texts
    random.seed(cfg.seed)
    s1, s2, _ = shuffle_data(q1, q2, labels)
    notebook = np.zeros(2, np.int64)
    for b in range(0, len(s1), cfg.batch_size):
        for texts in (s1[b:b + cfg.batch_size], s2[b:b + cfg.batch_size]):
            mask = ws.tokenizer(texts, return_tensors="pt", padding=True)["attention_mask"]
            notebook += (int(mask.sum()), mask.numel())
    eff_ours, eff_nb = ours[0] / ours[1], notebook[0] / notebook[1]
    rows = [row("padding", "real / padded tokens", eff_ours, eff_nb, eff_ours / eff_nb, ">= 0.90",
                eff_ours >= 0.90)]
    return {"ours": {"efficiency": eff_ours, "real_tokens": int(ours[0]), "padded_tokens": int(ours[1])},
            "notebook": {"efficiency": eff_nb, "real_tokens": int(notebook[0]),
                         "padded_tokens": int(notebook[1])},
            "ratio": eff_ours / eff_nb, "pairs": len(ws.dataset), "rows": rows}


def ours_train(ws, cfg, run, warm_rows, timed_rows):
    """train.py's step with its default settings, timed over one pass of timed_rows after one of
    warm_rows."""
    from data import make_loader, padding_stats, to_device
    from model import loss_fn
    from train import lr_lambda, optimizer_step
    tc = ws.train_defaults
    device, amp_dtype = run.device, run.amp_dtype
    raw_model = ws.models[0]
    model = torch.compile(raw_model) if cfg.compile else raw_model
    decay = [p for p in raw_model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in raw_model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr,
                                  fused=device.type == "cuda")
    total = run.warmup_steps + run.train_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, int(tc.warmup_ratio * total)))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    model.train()

    def one_pass(rows, seed):
        loader, _ = make_loader(ws.subset(rows), ws.layout, cfg.batch_size, shuffle=True, seed=seed,
                                num_workers=run.num_workers, pin_memory=device.type == "cuda",
                                max_chunks=1 if cfg.compile else tc.max_chunks,
                                pad_multiple=16 if cfg.compile else 1)
        stats = {"data_wait_s": 0.0, "real_tokens": 0, "padded_tokens": 0, "pairs": 0}
        loss_sum = torch.zeros((), device=device)
        batches = iter(loader)  # worker start-up (once per epoch in train.py) is not timed
        sync(device)
        t0 = time.perf_counter()
        while True:
            tw = time.perf_counter()
            batch = next(batches, None)
            stats["data_wait_s"] += time.perf_counter() - tw
            if batch is None:
                break
            real, padded = padding_stats(batch)
            batch = to_device(batch, device)
            with autocast():
                logits = model(batch)  # (B, 2)
                loss = loss_fn(logits, batch["labels"])
            scaler.scale(loss).backward()
            loss_sum += loss.detach()
            optimizer_step(raw_model, optimizer, scheduler, scaler, tc.clip)  # train.py's own
            stats["real_tokens"] += real
            stats["padded_tokens"] += padded
            stats["pairs"] += len(batch["labels"])
        sync(device)
        stats["seconds"] = time.perf_counter() - t0
        stats["mean_loss"] = loss_sum.item() / max(1, -(-len(rows) // cfg.batch_size))
        return stats

    one_pass(warm_rows, cfg.seed + 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stats = one_pass(timed_rows, cfg.seed)
    if device.type == "cuda":
        stats["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return stats


def notebook_train(ws, cfg, run, warm_rows, timed_rows):
    model, device = ws.models[1], run.device
    optimizer = optim.Adam(model.parameters(), lr=0.0001)
    random.seed(cfg.seed)
    notebook_train_epoch(model, ws.tokenizer, optimizer, *ws.pair_texts(warm_rows), cfg.batch_size, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    loss, stats = notebook_train_epoch(model, ws.tokenizer, optimizer, *ws.pair_texts(timed_rows),
                                       cfg.batch_size, device)
    sync(device)
    stats["seconds"] = time.perf_counter() - t0
    stats["mean_loss"] = float(loss)
    if device.type == "cuda":
        stats["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return stats


def measure_train(ws, cfg, run):
    """Both sides over the same pairs: warm-up rows, then timed rows (a fixed random sample)."""
    bs = cfg.batch_size
    rows = ws.sample((run.warmup_steps + run.train_steps) * bs, salt=1)
    warm_rows, timed_rows = rows[:run.warmup_steps * bs], rows[run.warmup_steps * bs:]
    ours = ours_train(ws, cfg, run, warm_rows, timed_rows)
    notebook = notebook_train(ws, cfg, run, warm_rows, timed_rows)
    for s in (ours, notebook):
        s["pairs_per_sec"] = s["pairs"] / s["seconds"]
        s["data_wait_share"] = s["data_wait_s"] / s["seconds"]
        s["padding_efficiency"] = s["real_tokens"] / s["padded_tokens"]
        if not math.isfinite(s["mean_loss"]):
            raise RuntimeError(f"non-finite training loss in the benchmark: {s['mean_loss']}")
    return ours, notebook


def stage_train(ws, cfg, run):
    ours, notebook = measure_train(ws, cfg, run)
    ratio = ours["pairs_per_sec"] / notebook["pairs_per_sec"]
    if run.device.type == "cuda":
        target, ok = ">= 20,000 pairs/s", ours["pairs_per_sec"] >= 20_000
    else:
        target, ok = ">= 1.5x", ratio >= 1.5
    rows = [row("train", f"pairs / s ({run.train_steps} steps)", ours["pairs_per_sec"],
                notebook["pairs_per_sec"], ratio, target, ok)]
    ours_model = {k: v for k, v in asdict(ws.models[0].cfg).items() if k != "encoder_config"}
    return {"ours": ours, "notebook": notebook, "ratio": ratio, "steps": run.train_steps,
            "warmup_steps": run.warmup_steps, "ours_model": ours_model, "rows": rows}


def stage_infer(ws, cfg, run):
    from evaluate import model_probability, score_dataset
    ours_model, nb_model = ws.models
    ours_model.eval()
    rows = ws.sample(run.infer_pairs, salt=2)
    warm = rows[:2 * cfg.batch_size]

    def ours(r):
        return score_dataset(model_probability(ours_model), ws.subset(r), ws.layout, cfg.batch_size,
                             run.device, run.amp_dtype, num_workers=run.num_workers, verbose=False)

    def notebook(r):
        q1, q2, _ = ws.pair_texts(r)
        return notebook_get_predictions(nb_model, ws.tokenizer, q1, q2, batch_size=cfg.batch_size)

    result = {}
    for name, fn in (("ours", ours), ("notebook", notebook)):
        fn(warm)
        sync(run.device)
        t0 = time.perf_counter()
        fn(rows)
        sync(run.device)
        seconds = time.perf_counter() - t0
        result[name] = {"seconds": seconds, "pairs": len(rows), "pairs_per_sec": len(rows) / seconds}
    ratio = result["ours"]["pairs_per_sec"] / result["notebook"]["pairs_per_sec"]
    return {**result, "ratio": ratio, "batch_size": cfg.batch_size,
            "rows": [row("infer", f"pairs / s ({len(rows):,} pairs)", result["ours"]["pairs_per_sec"],
                         result["notebook"]["pairs_per_sec"], ratio, "-", None)]}


def matmul_tflops(device, dtype, n, reps):
    """Measured dense matmul rate, the denominator of MFU."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def stage_gpu(ws, cfg, run, train_result):
    cuda = run.device.type == "cuda"
    ours, notebook = ((train_result["ours"], train_result["notebook"]) if train_result
                      else measure_train(ws, cfg, run))
    dtype = run.amp_dtype or torch.float32
    peak = matmul_tflops(run.device, dtype, 8192 if cuda else 512, 50 if cuda else 5)
    # 6 FLOPs per parameter per token (forward + backward); embeddings are lookups, not matmuls.
    n_params = sum(p.numel() for name, p in ws.models[0].named_parameters() if "embeddings" not in name)
    for s in (ours, notebook):
        s["mfu"] = 6 * n_params * s["real_tokens"] / s["seconds"] / (peak * 1e12)
        s["hardware_flops_utilization"] = s["mfu"] * s["padded_tokens"] / s["real_tokens"]
        s["epoch_seconds"] = NOTEBOOK_EPOCH_PAIRS / s["pairs_per_sec"]
    smoke = "" if cuda else " [cpu smoke]"
    target = (lambda t: t) if cuda else (lambda t: "n/a (no GPU)")
    epoch_ratio = notebook["epoch_seconds"] / ours["epoch_seconds"]
    rows = [
        row("gpu", f"MFU vs measured {str(dtype)[6:]}{smoke}", ours["mfu"], notebook["mfu"],
            ours["mfu"] / notebook["mfu"], "-", None),
        row("gpu", "data wait / step time", ours["data_wait_share"], notebook["data_wait_share"], None,
            target("< 5%"), ours["data_wait_share"] < 0.05 if cuda else None),
        row("gpu", "peak GPU memory GB", ours.get("peak_memory_gb"), notebook.get("peak_memory_gb"), None,
            "-", None),
        row("gpu", f"{NOTEBOOK_EPOCH_PAIRS:,}-pair epoch, s", ours["epoch_seconds"], notebook["epoch_seconds"],
            epoch_ratio, target("< 25 s"), ours["epoch_seconds"] < 25 if cuda else None),
    ]
    return {"measured_matmul_tflops": peak, "matmul_dtype": str(dtype), "non_embedding_params": n_params,
            "smoke_check_on": None if cuda else run.device.type,
            "ours": {k: ours[k] for k in ("mfu", "hardware_flops_utilization", "data_wait_share",
                                          "epoch_seconds", "pairs_per_sec") if k in ours}
            | {"peak_memory_gb": ours.get("peak_memory_gb")},
            "notebook": {k: notebook[k] for k in ("mfu", "hardware_flops_utilization", "data_wait_share",
                                                  "epoch_seconds", "pairs_per_sec")}
            | {"peak_memory_gb": notebook.get("peak_memory_gb"),
               "logged_epoch_seconds_on_colab": NOTEBOOK_EPOCH_MINUTES * 60},
            "ratio": epoch_ratio, "rows": rows}


STAGE_FUNCTIONS = {"preprocess": stage_preprocess, "data": stage_data, "padding": stage_padding,
                   "train": stage_train, "infer": stage_infer}  # gpu takes the train results too


# ----------------------------------------------------------------------------- report

def row(stage, measure, ours, notebook, ratio, target, passed):
    def num(v):  # numpy scalars -> plain JSON numbers and booleans
        return v if v is None or isinstance(v, str) else float(v)
    return {"stage": stage, "measure": measure, "ours": num(ours), "notebook": num(notebook),
            "ratio": num(ratio), "target": target,
            "pass": passed if passed is None or isinstance(passed, str) else bool(passed)}


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"


def format_table(rows):
    head = ("stage", "measure", "ours", "notebook", "ratio", "target", "result")
    cells = [[r["stage"], r["measure"], fmt(r["ours"]), fmt(r["notebook"]),
              "-" if r["ratio"] is None else f"{r['ratio']:.2f}x", r["target"],
              {True: "PASS", False: "FAIL", None: "-"}.get(r["pass"], r["pass"])] for r in rows]
    widths = [max(len(str(c[i])) for c in [head, *cells]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in
                       enumerate(zip(line, widths))) for line in [head, *cells]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def machine_info(device):
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
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
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
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}{' (uncommitted changes)' if dirty else ''}" if rev else None


# ----------------------------------------------------------------------------- main

def main(argv=None):
    cfg = parse_args(argv)
    run = resolve(cfg)
    # Set, the variable silences the Rust tokenizer's warning at each DataLoader fork; "true" is its
    # default anyway (the notebook's tokenizer keeps its threads), and workers never tokenize.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    if run.device.type == "cuda":
        # Both sides: TF32 matmuls were PyTorch 1.10's default when the notebook ran, and train.py's.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    gpu_name = f" ({torch.cuda.get_device_name(run.device)})" if run.device.type == "cuda" else ""
    print(f"device {run.device}{gpu_name} | ours {str(run.amp_dtype or 'fp32').removeprefix('torch.')}, "
          f"notebook fp32 | model {run.model_name} | batch {cfg.batch_size} | stages {','.join(run.stages)}")
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": machine_info(run.device),
              "versions": versions(), "git": git_commit(),
              "settings": {**asdict(cfg), "resolved": {k: str(v) if k in ("device", "amp_dtype") else v
                                                       for k, v in asdict(run).items()}},
              "stages": {}}
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        ws = Workspace(cfg, run, tmp)
        for stage in run.stages:
            t0 = time.time()
            if stage == "gpu" and run.device.type != "cuda" and not run.gpu_named:
                report["stages"]["gpu"] = {"skipped": "not yet measured: no CUDA device here",
                                           "rows": [row("gpu", "MFU, data wait, memory, epoch", None, None,
                                                        None, "-", "not yet measured: no GPU")]}
                continue
            print(f"== {stage}", flush=True)
            if stage == "gpu":
                result = stage_gpu(ws, cfg, run, report["stages"].get("train"))
            else:
                result = STAGE_FUNCTIONS[stage](ws, cfg, run)
            result["stage_seconds"] = round(time.time() - t0, 1)
            report["stages"][stage] = result
            print(format_table(result["rows"]), flush=True)
    report["total_seconds"] = round(time.time() - t_start, 1)
    # Other jobs on the same cores make every number here slower: judge the run by these.
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["table"] = [r for s in report["stages"].values() for r in s["rows"]]
    print(f"\n{format_table(report['table'])}")
    with open(cfg.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"wrote {cfg.out} ({report['total_seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
