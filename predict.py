"""Duplicate probability of question pairs from a trained checkpoint.

    # CPU, one pair, on the checkpoint of train.py's smoke run (seconds):
    python predict.py out/smoke/ckpt.pt "How do I learn Python?" "What is the best way to learn Python?"
    # GPU, Kaggle's 2.3M test pairs, at the F1 threshold evaluate.py tuned on validation:
    python predict.py out/ckpt.pt --csv test.csv --out preds.csv \
        --threshold_from out/eval_test/results.json --batch_size 1024 --num_workers 4

One pair: prints its probability of being a duplicate (a number in [0, 1], nothing else on stdout).
--csv: any CSV/TSV with two question columns (a label column is not needed) -> a CSV with, per
usable input row, its id (where preprocess.read_pairs reports one, else its 1-based data row
number), the probability and the predicted label (probability >= threshold). Unusable rows (e.g.
an empty question) are listed in <out>.rejects.tsv.

The threshold is --threshold (default 0.5, the argmax), or with --threshold_from the best-F1
threshold that evaluate.py chose on the validation split (never on the data it is applied to).
"""
import argparse
import csv
import json
import os
import sys
from dataclasses import dataclass

import preprocess
from data import DataError, InMemoryPairs
from evaluate import (checkpoint_tokenizer, fail, load_model, model_probability, read_raw_pairs,
                      score_dataset, setup_device)


@dataclass
class PredictConfig:
    checkpoint: str = ""       # ckpt.pt written by train.py
    question1: str = ""        # one pair: the two questions, as positional arguments
    question2: str = ""
    csv: str = ""              # many pairs: a CSV/TSV with question1/question2 columns
    out: str = "preds.csv"     # where --csv predictions go
    threshold: float = 0.5     # probability >= threshold -> predicted duplicate
    threshold_from: str = ""   # evaluate.py's results.json: use its validation-tuned best-F1 threshold
    batch_size: int = 256      # pairs per forward pass
    num_workers: int = 0       # DataLoader processes collating batches (4 keeps a GPU busy)
    device: str = "auto"       # auto = cuda > mps > cpu


def parse_args(argv=None):
    d = PredictConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="ckpt.pt written by train.py")
    p.add_argument("question1", nargs="?", default=d.question1)
    p.add_argument("question2", nargs="?", default=d.question2)
    p.add_argument("--csv", default=d.csv)
    p.add_argument("--out", default=d.out)
    p.add_argument("--threshold", type=float, default=d.threshold)
    p.add_argument("--threshold_from", default=d.threshold_from)
    p.add_argument("--batch_size", type=int, default=d.batch_size)
    p.add_argument("--num_workers", type=int, default=d.num_workers)
    p.add_argument("--device", default=d.device)
    args = p.parse_args(argv)
    if bool(args.csv) == bool(args.question1 or args.question2):
        p.error("give either two questions or --csv FILE")
    return PredictConfig(**vars(args))


def main(argv=None):
    cfg = parse_args(argv)
    try:
        predict(cfg)
    except DataError as e:
        fail(e)


def predict(cfg):
    threshold = tuned_threshold(cfg.threshold_from, cfg.checkpoint) if cfg.threshold_from else cfg.threshold
    model, ckpt = load_model(cfg.checkpoint)
    tok = checkpoint_tokenizer(cfg.checkpoint, ckpt["data"])
    if cfg.csv:
        dataset, pairs, rejects, rows_read = read_raw_pairs(cfg.csv, tok, ckpt["data"], require_label=False)
    else:
        dataset, pairs, rejects, rows_read = one_pair(cfg.question1, cfg.question2, tok, ckpt["data"])
    # Inputs are valid: now the device, its banner on stderr (stdout is for the answer).
    device, amp_dtype = setup_device(cfg.device, file=sys.stderr)
    model.to(device)
    probs = score_dataset(model_probability(model), dataset, model.cfg.arch, cfg.batch_size, device,
                          amp_dtype, cfg.num_workers, desc="predicting", verbose=bool(cfg.csv))
    if not cfg.csv:
        print(f"{probs[0]:.6f}")
        return
    write_predictions(cfg.out, pairs, probs, threshold)
    if rejects:
        preprocess.write_rejects(f"{cfg.out}.rejects.tsv", rejects)
    print(f"{cfg.csv}: {rows_read:,} rows, {len(rejects):,} rejected"
          f"{' (see ' + cfg.out + '.rejects.tsv)' if rejects else ''}; wrote {len(probs):,} predictions "
          f"to {cfg.out} at threshold {threshold:.4f}, {int((probs >= threshold).sum()):,} duplicates")


def one_pair(question1, question2, tok, data):
    """The two command-line questions as a one-pair dataset, tokenized like the training data."""
    if not question1.strip() or not question2.strip():
        raise DataError("a question is empty. Fix: pass two non-empty questions in quotes")
    tokens, offsets, triples = preprocess.encode_pairs(tok, [question1], [question2], [-1], data["max_len"])
    return InMemoryPairs(tokens, offsets, triples, data["pad_token_id"]), None, [], 1


def tuned_threshold(results_path, ckpt_path):
    """The best-F1 threshold evaluate.py chose on the validation split."""
    try:
        with open(results_path) as f:
            results = json.load(f)
        t = results["thresholds"]["best_f1"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{results_path}: no validation-tuned threshold in it. Fix: pass the "
                        "results.json of an evaluate.py run that had a data folder") from None
    if t.get("chosen_on") != "validation":
        raise DataError(f"{results_path}: its best_f1 threshold was chosen on {t.get('chosen_on')}, "
                        "not on validation")
    if results.get("checkpoint") != os.path.abspath(ckpt_path):
        print(f"note: {results_path} was computed for {results.get('checkpoint')}, not "
              f"{os.path.abspath(ckpt_path)}: its threshold may not suit this model", file=sys.stderr)
    return float(t["value"])


def write_predictions(path, pairs, probs, threshold):
    """One row per usable input row: id (or row), probability, prediction."""
    ids = pairs.get("id") or pairs["row"]  # read_pairs gives 1-based row numbers; ids where it has them
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id" if pairs.get("id") else "row", "probability", "prediction"])
        for i, p in zip(ids, probs.tolist()):
            w.writerow([i, f"{p:.6f}", int(p >= threshold)])


if __name__ == "__main__":
    main()
