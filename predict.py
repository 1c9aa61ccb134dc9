"""Duplicate probability of question pairs from a trained checkpoint.

    # CPU, one pair, on the checkpoint of train.py's smoke run (seconds):
    python predict.py out/smoke/ckpt.pt "How do I learn Python?" "What is the best way to learn Python?"
    # GPU, Kaggle's 2.3M test pairs, at the F1 threshold evaluate.py tuned on validation:
    python predict.py out/ckpt.pt --csv test.csv --out preds.csv \
        --threshold_from out/eval_test/results.json --batch_size 1024 --num_workers 4

One pair: prints its probability of being a duplicate (a number in [0, 1], nothing else on stdout).
--csv: any CSV/TSV with two question columns (a label column is not needed) -> a CSV with, per
usable input row, its id (where text.read_pairs reports one, else its 1-based data row
number), the probability and the predicted label (probability >= threshold). Unusable rows (e.g.
an empty question) are listed in <out>.rejects.tsv.

The threshold is --threshold (default 0.5, the argmax), or with --threshold_from the best-F1
threshold that evaluate.py chose on the validation split (never on the data it is applied to).
"""
import csv
import json
import os
import sys
from dataclasses import dataclass
from typing import Literal

import engine
from cli import UserError, arg, parse_config, run
from data import InMemoryPairs, check_out_file, pairs_from_file
from model import load_model
from text import NO_LABEL, checkpoint_tokenizer, encode_pairs, write_rejects


@dataclass
class PredictConfig:
    checkpoint: str = arg("", "ckpt.pt written by train.py")
    question1: str = arg("", "one pair: the first question")
    question2: str = arg("", "one pair: the second question")
    csv: str = arg("", "many pairs: a CSV/TSV with question1/question2 columns")
    out: str = arg("preds.csv", "where --csv predictions go (never over an input or an existing file)")
    overwrite: bool = arg(False, "replace an existing --out file")
    threshold: float = arg(0.5, "probability >= threshold -> predicted duplicate")
    threshold_from: str = arg("", "evaluate.py's results.json: use its validation-tuned best-F1 threshold")
    batch_size: int = arg(256, "pairs per forward pass", aliases=["--bs"])
    num_workers: int = arg(0, "DataLoader workers collating batches (4 keep a GPU busy)")
    device: str = arg("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = arg("auto", "auto: bf16 (else fp16) on GPU, fp32 on CPU")
    shapes: Literal[engine.SHAPES] = arg("auto", engine.SHAPES_HELP)
    compile: Literal[engine.COMPILE_MODES] = arg("auto", engine.COMPILE_HELP)


def main(argv=None):
    cfg = parse_config(PredictConfig, argv, __doc__, positional=("checkpoint", "question1", "question2"),
                       optional=("question1", "question2"))
    run(predict, cfg)


def predict(cfg):
    check_config(cfg)
    threshold = tuned_threshold(cfg.threshold_from, cfg.checkpoint) if cfg.threshold_from else cfg.threshold
    model, ckpt = load_model(cfg.checkpoint)
    data = ckpt["data"]
    tok = checkpoint_tokenizer(cfg.checkpoint, data)
    if cfg.csv:
        dataset, pairs, rejects, rows_read = pairs_from_file(cfg.csv, tok, data["max_len"], data["pad_token_id"],
                                                             require_label=False)
    else:
        dataset, pairs, rejects, rows_read = one_pair(cfg.question1, cfg.question2, tok, data)
    # Inputs are valid: now the device, its banner on stderr (stdout is for the answer).
    rt = engine.setup_runtime(cfg.device, cfg.precision, file=sys.stderr)
    model.to(rt.device)
    scorer = engine.Inference(model.probability, model.cfg.arch, rt, cfg.batch_size, cfg.shapes, cfg.compile,
                              cfg.num_workers, max_len=data["max_len"])
    probs = scorer(dataset, "predicting", verbose=bool(cfg.csv))
    if not cfg.csv:
        print(f"{probs[0]:.6f}")
        return
    write_predictions(cfg.out, pairs, probs, threshold)
    if rejects:
        write_rejects(f"{cfg.out}.rejects.tsv", rejects)
    print(f"{cfg.csv}: {rows_read:,} rows, {len(rejects):,} rejected"
          f"{' (see ' + cfg.out + '.rejects.tsv)' if rejects else ''}; wrote {len(probs):,} predictions "
          f"to {cfg.out} at threshold {threshold:.4f}, {int((probs >= threshold).sum()):,} duplicates")


def check_config(cfg):
    """Every flag checked, and the output place made safe, before any work."""
    if bool(cfg.csv) == bool(cfg.question1 or cfg.question2):
        raise UserError("give either two questions or --csv FILE", 'e.g. predict.py out/ckpt.pt "Q1?" "Q2?"')
    if not 0 <= cfg.threshold <= 1:
        raise UserError(f"--threshold {cfg.threshold}: a probability threshold must be in [0, 1]",
                        "e.g. --threshold 0.5")
    if cfg.batch_size < 1 or cfg.num_workers < 0:
        raise UserError(f"--batch_size {cfg.batch_size} --num_workers {cfg.num_workers}: out of range",
                        "batch_size >= 1, num_workers >= 0")
    if not cfg.csv:
        return
    check_out_file(cfg.out, (cfg.csv, cfg.checkpoint, cfg.threshold_from), cfg.overwrite, "preds.csv",
                   side_files=(".rejects.tsv",))


def one_pair(question1, question2, tok, data):
    """The two command-line questions as a one-pair dataset, tokenized like the training data."""
    if not question1.strip() or not question2.strip():
        raise UserError("a question is empty", "pass two non-empty questions in quotes")
    tokens, offsets, triples = encode_pairs(tok, [question1], [question2], [NO_LABEL], data["max_len"])
    return InMemoryPairs(tokens, offsets, triples, data["pad_token_id"]), None, [], 1


def tuned_threshold(results_path, ckpt_path):
    """The best-F1 threshold evaluate.py chose on the validation split, for probabilities."""
    try:
        with open(results_path) as f:
            results = json.load(f)
        t = results["thresholds"]["best_f1"]
        value = float(t["value"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{results_path}: no validation-tuned threshold in it", "pass the results.json "
                        "of an evaluate.py run that had a data folder") from None
    if results.get("score") != "probability":
        raise UserError(f"{results_path}: its thresholds are for {results.get('score') or 'unknown'} "
                        f"scores ({results.get('script')}), not a classifier's probabilities",
                        "pass the results.json of evaluate.py on this checkpoint")
    if t.get("chosen_on") != "validation" or not 0 <= value <= 1:
        raise UserError(f"{results_path}: its best_f1 threshold {value} was chosen on {t.get('chosen_on')}",
                        "pass the results.json of an evaluate.py run that tuned on validation")
    if results.get("checkpoint") != os.path.abspath(ckpt_path):
        print(f"note: {results_path} was computed for {results.get('checkpoint')}, not "
              f"{os.path.abspath(ckpt_path)}: its threshold may not suit this model", file=sys.stderr)
    return value


def write_predictions(path, pairs, probs, threshold):
    """One row per usable input row: id (or row), probability, prediction; written to a temp file
    and renamed, so an interrupted run leaves no half-written predictions."""
    ids = pairs.get("id") or pairs["row"]  # read_pairs gives 1-based row numbers; ids where it has them
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id" if pairs.get("id") else "row", "probability", "prediction"])
        for i, p in zip(ids, probs.tolist()):
            w.writerow([i, f"{p:.6f}", int(p >= threshold)])
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
