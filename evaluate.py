"""Evaluate a trained checkpoint: the notebook's metrics at argmax and at validation-tuned thresholds.

    # CPU smoke, on the checkpoint of train.py's smoke run (800 validation + 800 test pairs):
    python evaluate.py out/smoke/ckpt.pt --batch_size 64
    # GPU, the real run's checkpoint on every split of Kaggle's 404k pairs:
    python evaluate.py out/ckpt.pt --split all --batch_size 1024 --num_workers 4

The model is rebuilt from the checkpoint alone (config + weights, no pretrained download). Input is
a split of a preprocessed folder (default: the folder the model was trained on) or a raw labelled
CSV/TSV (--csv), tokenized with the checkpoint's own tokenizer.

Each reported split gets the notebook's printout (accuracy, F1, precision, recall, confusion matrix,
plus ROC-AUC, average precision, log loss) at three thresholds:
    argmax          0.5, what the model says by itself
    best_f1         the threshold maximizing F1 on the VALIDATION split, applied unchanged
    best_accuracy   the threshold maximizing accuracy on the VALIDATION split, applied unchanged
A threshold picked on the split it is scored on flatters that split, so tuned thresholds never come
from the reported split; on --split validation they are in-sample and labelled so.

Writes into --out_dir (default <ckpt dir>/eval_<split or csv stem>): results.json, scores_<name>.npz
(per-pair scores and labels in split/file order, for error analysis) and per reported split four
PNGs: precision-recall curve, ROC curve, confusion matrices, score histogram per class.

The pieces baseline_cosine.py and predict.py share live here: fail, setup_device, load_model,
checkpoint_tokenizer, read_raw_pairs, open_splits, score_dataset, report_datasets, write_results.
"""
import argparse
import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
import torch
from tqdm import tqdm

import metrics
import preprocess
from data import (SPLITS, DataError, InMemoryPairs, PairDataset, check_tokenizer, fingerprint,
                  load_manifest, make_loader, to_device)
from model import load_checkpoint, model_from_checkpoint, pick_device, pick_precision


@dataclass
class EvalConfig:
    checkpoint: str = ""       # ckpt.pt written by train.py
    split: str = "test"        # test | train | validation | all (ignored with --csv)
    data_dir: str = ""         # preprocessed folder; default: the one the checkpoint was trained on
    csv: str = ""              # raw labelled CSV/TSV to evaluate instead of a split
    out_dir: str = ""          # default: <ckpt dir>/eval_<split or csv stem>
    batch_size: int = 256      # pairs per forward pass
    num_workers: int = 0       # DataLoader processes collating batches (4 keeps a GPU busy)
    device: str = "auto"       # auto = cuda > mps > cpu, or a torch device such as cuda:1


# ----------------------------------------------------------------------------- shared helpers

def fail(message):
    """Bad input: one line on stderr, exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def setup_device(name, file=None):
    """Device and autocast dtype, decided once and printed as one banner line."""
    try:
        device = pick_device(name)
    except RuntimeError:
        raise DataError(f"--device {name}: not a device. Fix: use auto, cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {name}: no CUDA GPU here. Fix: use --device auto or cpu")
    amp_dtype = pick_precision(device)
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    precision = str(amp_dtype).removeprefix("torch.") if amp_dtype else "off (fp32)"
    print(f"device {device}{gpu} | autocast {precision}", file=file or sys.stdout)
    return device, amp_dtype


def load_model(path, device="cpu"):
    """(model in eval mode on device, checkpoint dict without its weights), rebuilt from the
    checkpoint alone. Any unreadable or foreign file becomes a one-line DataError."""
    try:
        ckpt = load_checkpoint(path)
    except ValueError as e:
        raise DataError(str(e)) from None
    try:
        model = model_from_checkpoint(ckpt)
        ckpt["data"]["vocab_hash"], ckpt["data"]["max_len"]  # fail here, not halfway through
    except (KeyError, TypeError, RuntimeError) as e:
        detail = (str(e).splitlines() or [""])[0][:200]
        raise DataError(f"{path}: the checkpoint is incomplete or its weights do not fit its config "
                        f"({type(e).__name__}: {detail}). Fix: pass a ckpt.pt written by train.py") from None
    del ckpt["model"]  # the weights live in the model now
    return model.to(device).eval(), ckpt


def checkpoint_tokenizer(ckpt_path, data):
    """The tokenizer the model was trained with: <ckpt dir>/hf when train.py saved it there, else
    the one named in the checkpoint. Its vocabulary must be the training data's."""
    hf_dir = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), "hf")
    name = hf_dir if os.path.isfile(os.path.join(hf_dir, "tokenizer_config.json")) else data["tokenizer"]
    tok = preprocess.load_tokenizer(name)
    if preprocess.vocab_hash(tok) != data["vocab_hash"]:
        raise DataError(f"the tokenizer '{name}' differs from the one {ckpt_path} was trained with. "
                        f"HINT: restore {hf_dir} from the training run, or install the training tokenizer")
    return tok


def read_raw_pairs(path, tok, data, require_label=True):
    """A raw CSV/TSV, tokenized like the training data.
    Returns (dataset, pairs dict of preprocess.read_pairs, rejects, rows_read)."""
    pairs, rejects, rows_read = preprocess.read_pairs(path, require_label=require_label)
    labels = pairs["label"] if pairs["label"] is not None else [-1] * len(pairs["q1"])  # -1: unknown
    tokens, offsets, triples = preprocess.encode_pairs(tok, pairs["q1"], pairs["q2"], labels,
                                                       data["max_len"])
    return InMemoryPairs(tokens, offsets, triples, data["pad_token_id"]), pairs, rejects, rows_read


def open_data_dir(data_dir, vocab_hash, model_name):
    """The folder's manifest, after checking its format and that the model's vocabulary made it."""
    manifest = load_manifest(data_dir)
    check_tokenizer(manifest, vocab_hash, model_name, data_dir)
    if manifest["split_policy"] == "random":
        print(f"note: {data_dir} was split at random (the notebook's policy): its validation and test "
              "questions also occur in train, so their metrics are optimistic")
    return manifest


def open_splits(data_dir, split):
    """({name: dataset} to report, validation dataset to tune thresholds on)."""
    names = SPLITS if split == "all" else (split,)
    validation = PairDataset(data_dir, "validation")
    return {s: validation if s == "validation" else PairDataset(data_dir, s) for s in names}, validation


def progress_bar(total, desc):
    """tqdm on a terminal only: in logs a bar is noise, one line at the end says the same."""
    return tqdm(total=total, desc=desc, unit="pair", disable=not sys.stderr.isatty())


def score_dataset(score_batch, dataset, layout, batch_size, device, amp_dtype, num_workers=0,
                  desc="scoring", verbose=True):
    """Score every pair: (N,) float32 in dataset order.

    Batches come length-sorted (least padding; order is irrelevant here) and each batch's scores
    are put back by batch["index"]. Scores go to the CPU batch by batch, so memory stays flat at
    4 bytes per pair whatever N is. score_batch(batch on device) -> (B,) scores."""
    loader, _ = make_loader(dataset, layout, batch_size, shuffle=False, num_workers=num_workers,
                            pin_memory=device.type == "cuda")  # pinned: non_blocking copies overlap
    scores = np.empty(len(dataset), np.float32)
    bar = progress_bar(len(dataset), desc)
    t0 = time.time()
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    with torch.inference_mode(), autocast:
        for batch in loader:
            index = batch.pop("index").numpy()  # (B,) dataset rows, kept on the CPU for the put-back
            scores[index] = score_batch(to_device(batch, device)).float().cpu().numpy()  # (B,)
            bar.update(len(index))
    bar.close()
    seconds = time.time() - t0
    if verbose:
        print(f"{desc}: {len(dataset):,} pairs in {seconds:.1f} s "
              f"({len(dataset) / max(seconds, 1e-9):,.0f} pairs/s)")
    if not np.isfinite(scores).all():  # e.g. fp16 overflow: metrics on NaN would be meaningless
        raise DataError(f"{desc}: {int((~np.isfinite(scores)).sum())} scores are NaN or inf. "
                        "HINT: retry with --device cpu to rule out reduced precision")
    return scores


def model_probability(model):
    """score_batch for a pair classifier: probability of duplicate, softmax over the classes."""
    return lambda batch: model(batch).float().softmax(-1)[:, 1]  # (B, 2) logits -> (B,)


# ----------------------------------------------------------------------------- reporting

def tune_thresholds(labels, scores):
    """Thresholds maximizing F1 and accuracy on these labels and scores (the validation split)."""
    return {f"best_{by}": metrics.best_threshold(labels, scores, by=by) for by in ("f1", "accuracy")}


def report_datasets(scores_of, datasets, validation, fixed, out_dir, probabilistic=True):
    """Score and report each dataset at the `fixed` thresholds ({name: value}) and at the ones
    tuned on `validation` (None: no tuning). scores_of(dataset, desc=name) -> (N,) scores.
    Returns (thresholds, results) for results.json."""
    thresholds = {name: {"value": float(t), "chosen_on": "fixed"} for name, t in fixed.items()}
    scores = {}
    if validation is not None and len(validation) > 0:
        scores["validation"] = scores_of(validation, desc="validation")
        save_scores(out_dir, "validation", validation.labels, scores["validation"])
        for name, t in tune_thresholds(validation.labels, scores["validation"]).items():
            thresholds[name] = {"value": t, "chosen_on": "validation", "validation_n": len(validation)}
    results = {}
    for name, ds in datasets.items():
        in_sample = ds is validation  # tuned on this very split
        if not in_sample:
            scores[name] = scores_of(ds, desc=name)
            save_scores(out_dir, name, ds.labels, scores[name])
        results[name] = report(name, ds.labels, scores["validation" if in_sample else name],
                               thresholds, out_dir, probabilistic, in_sample)
    return thresholds, results


def report(name, labels, scores, thresholds, out_dir, probabilistic, in_sample):
    """Print the notebook's report at each threshold, save the plots; the entry for results.json."""
    metrics_at = {}
    for how, t in thresholds.items():
        m = metrics.compute_metrics(labels, scores, t["value"], probabilistic=probabilistic)
        where = "fixed" if t["chosen_on"] == "fixed" else "chosen on validation"
        if in_sample and t["chosen_on"] == "validation":
            where += ", IN-SAMPLE: tuned on this split, optimistic"
        print(metrics.format_report(m, f"== {name} ({len(labels):,} pairs), threshold "
                                       f"{t['value']:.6g} [{how}, {where}]") + "\n")
        metrics_at[how] = m
    save_plots(out_dir, name, labels, scores, metrics_at)
    return {"n": int(len(labels)), "tuned_thresholds_in_sample": in_sample, "metrics": metrics_at}


def save_scores(out_dir, name, labels, scores):
    np.savez(os.path.join(out_dir, f"scores_{name}.npz"), scores=scores, labels=np.asarray(labels))


def save_plots(out_dir, name, labels, scores, metrics_at):
    """<name>_{pr_curve,roc_curve,confusion_matrix,score_histogram}.png, marking each threshold."""
    import matplotlib
    matplotlib.use("Agg")  # files only; no display needed (imported here: predict.py never pays)
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve
    labels = np.asarray(labels)

    def path(kind):
        return os.path.join(out_dir, f"{name}_{kind}.png")

    both = len(np.unique(labels)) == 2  # curves need both classes

    if both:
        precision, recall, _ = precision_recall_curve(labels, scores)
        fig, ax = plt.subplots(figsize=(5.5, 5))
        ax.plot(recall, precision, lw=1.5,
                label=f"AP {next(iter(metrics_at.values()))['average_precision']:.3f}")
        ax.axhline(labels.mean(), ls=":", c="gray", label=f"chance ({labels.mean():.3f})")
        for how, m in metrics_at.items():
            ax.plot(m["recall"], m["precision"], "o", label=f"{how} @ {m['threshold']:.3f}")
        ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
               title=f"{name}: precision-recall ({len(labels):,} pairs)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left")
        fig.savefig(path("pr_curve"), dpi=120, bbox_inches="tight")
        plt.close(fig)

        fpr, tpr, _ = roc_curve(labels, scores)
        fig, ax = plt.subplots(figsize=(5.5, 5))
        ax.plot(fpr, tpr, lw=1.5, label=f"AUC {next(iter(metrics_at.values()))['roc_auc']:.3f}")
        ax.plot([0, 1], [0, 1], ls=":", c="gray", label="chance")
        for how, m in metrics_at.items():
            (tn, fp), _ = m["confusion_matrix"]
            ax.plot(fp / max(tn + fp, 1), m["recall"], "o", label=f"{how} @ {m['threshold']:.3f}")
        ax.set(xlabel="false positive rate", ylabel="true positive rate (recall)", xlim=(0, 1),
               ylim=(0, 1.02), title=f"{name}: ROC ({len(labels):,} pairs)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.savefig(path("roc_curve"), dpi=120, bbox_inches="tight")
        plt.close(fig)
    else:
        print(f"note: {name} holds one class only: no precision-recall or ROC curve")

    fig, axes = plt.subplots(1, len(metrics_at), figsize=(3.6 * len(metrics_at), 3.8), squeeze=False,
                             layout="constrained")
    for ax, (how, m) in zip(axes[0], metrics_at.items()):
        cm = np.array(m["confusion_matrix"])  # rows: true 0/1, columns: predicted 0/1
        ax.imshow(cm, cmap="Blues")
        for (i, j), count in np.ndenumerate(cm):
            ax.text(j, i, f"{count:,}", ha="center", va="center",
                    color="white" if count > cm.max() / 2 else "black")
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["not dup", "dup"],
               yticklabels=["not dup", "dup"], xlabel="predicted",
               title=f"{how} @ {m['threshold']:.3f}\nacc {m['accuracy']:.3f}  F1 {m['f1']:.3f}")
    axes[0][0].set_ylabel("true")
    fig.suptitle(f"{name}: confusion matrices ({len(labels):,} pairs)")
    fig.savefig(path("confusion_matrix"), dpi=120, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    bins = np.linspace(float(scores.min()), float(scores.max()) + 1e-6, 51)
    for cls, label in ((0, "not duplicate"), (1, "duplicate")):
        if (labels == cls).any():  # density: the classes differ in size (QQP: 37% duplicates)
            ax.hist(scores[labels == cls], bins=bins, density=True, histtype="step", lw=1.5,
                    label=f"{label} ({int((labels == cls).sum()):,})")
    for k, (how, m) in enumerate(metrics_at.items()):
        ax.axvline(m["threshold"], ls="--", c=f"C{k + 2}", label=f"{how} @ {m['threshold']:.3f}")
    ax.set(xlabel="score", ylabel="density", title=f"{name}: scores per true class")
    ax.legend(fontsize="small")
    fig.savefig(path("score_histogram"), dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_results(out_dir, results):
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {path}, per-pair scores and plots in {out_dir}")
    return path


def file_stem(path):
    """'dir/pairs.csv.gz' -> 'pairs'."""
    name = os.path.basename(path)
    name = name[:-3] if name.endswith(".gz") else name
    return os.path.splitext(name)[0]


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    d = EvalConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="ckpt.pt written by train.py")
    p.add_argument("--split", default=d.split, choices=(*SPLITS, "all"))
    p.add_argument("--data_dir", default=d.data_dir, help="default: the checkpoint's training data")
    p.add_argument("--csv", default=d.csv, help="raw labelled CSV/TSV instead of a split")
    p.add_argument("--out_dir", default=d.out_dir, help="default: <ckpt dir>/eval_<split or csv stem>")
    p.add_argument("--batch_size", type=int, default=d.batch_size)
    p.add_argument("--num_workers", type=int, default=d.num_workers)
    p.add_argument("--device", default=d.device)
    return EvalConfig(**vars(p.parse_args(argv)))


def main(argv=None):
    cfg = parse_args(argv)
    try:
        evaluate(cfg)
    except DataError as e:
        fail(e)


def evaluate(cfg):
    device, amp_dtype = setup_device(cfg.device)
    model, ckpt = load_model(cfg.checkpoint, device)
    data = ckpt["data"]
    print(f"checkpoint {cfg.checkpoint}: step {ckpt.get('step')}, arch {model.cfg.arch}, "
          f"encoder {model.cfg.encoder_config.get('model_type')}, trained on {data['data_dir']}")
    out_dir = cfg.out_dir or os.path.join(os.path.dirname(os.path.abspath(cfg.checkpoint)),
                                          f"eval_{file_stem(cfg.csv) if cfg.csv else cfg.split}")
    datasets, validation, data_dir, extra = pick_datasets(cfg, ckpt, out_dir)
    os.makedirs(out_dir, exist_ok=True)
    scores_of = partial(score_dataset, model_probability(model), layout=model.cfg.arch,
                        batch_size=cfg.batch_size, device=device, amp_dtype=amp_dtype,
                        num_workers=cfg.num_workers)
    thresholds, results = report_datasets(scores_of, datasets, validation, {"argmax": 0.5}, out_dir)
    write_results(out_dir, {"script": "evaluate.py", "config": asdict(cfg),
                            "checkpoint": os.path.abspath(cfg.checkpoint), "step": ckpt.get("step"),
                            "split": cfg.csv or cfg.split, "data_dir": data_dir, **extra,
                            "thresholds": thresholds, "results": results})


def pick_datasets(cfg, ckpt, out_dir):
    """(datasets to report, validation dataset or None, data_dir, extra fields for results.json)."""
    data = ckpt["data"]
    data_dir = os.path.abspath(cfg.data_dir or data["data_dir"])
    if not cfg.csv:
        manifest = open_data_dir(data_dir, data["vocab_hash"], data["tokenizer"])
        if fingerprint(manifest) != data.get("fingerprint"):
            print(f"note: {data_dir} is not the exact folder the model was trained on (other source, "
                  "options or split): its validation/test questions may have been in training")
        return (*open_splits(data_dir, cfg.split), data_dir, {})

    tok = checkpoint_tokenizer(cfg.checkpoint, data)
    dataset, _, rejects, rows_read = read_raw_pairs(cfg.csv, tok, data)
    os.makedirs(out_dir, exist_ok=True)
    preprocess.write_rejects(os.path.join(out_dir, "rejects.tsv"), rejects)
    print(f"{cfg.csv}: {rows_read:,} rows, {len(rejects):,} rejected"
          f"{' (see ' + os.path.join(out_dir, 'rejects.tsv') + ')' if rejects else ''}, "
          f"{len(dataset):,} pairs evaluated")
    extra = {"rows_read": rows_read, "rows_rejected": len(rejects)}
    if not cfg.data_dir and not os.path.exists(os.path.join(data_dir, "manifest.json")):
        # The training folder is gone (checkpoint copied elsewhere): report at 0.5 only.
        print(f"note: {data_dir} (the training data) is missing: no validation-tuned thresholds. "
              "Pass --data_dir to tune them on its validation split")
        return {file_stem(cfg.csv): dataset}, None, None, extra
    open_data_dir(data_dir, data["vocab_hash"], data["tokenizer"])
    return {file_stem(cfg.csv): dataset}, PairDataset(data_dir, "validation"), data_dir, extra


if __name__ == "__main__":
    main()
