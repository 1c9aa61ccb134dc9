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
an empty question) are listed in <out>.rejects.tsv, which exists only beside predictions that had
some (an earlier run's is removed). Both are written to temp files and renamed at the end; the output
place is checked for writing before any work.

A question the vocabulary cannot read (emoji, other scripts: nothing but [UNK] to the model) gives a
probability that means nothing: such pairs are counted in a warning on stderr.

The threshold is --threshold (default 0.5, the argmax), or with --threshold_from the best-F1
threshold that evaluate.py chose on the validation split (never on the data it is applied to).
"""
import os
import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np

import engine
from cli import WORKERS_RANGE, UserError, arg, check_ranges, parse_config, run
from data import InMemoryPairs, check_out_file, check_writable, pairs_from_file, unreadable_pairs
from metrics import tuned_threshold
from model import load_model
from text import NO_LABEL, checkpoint_tokenizer, encode_pairs, write_table


# What each numeric flag may be: (test, the rule in words).
RANGES = {"threshold": (lambda v: 0 <= v <= 1, "in [0, 1] (a probability threshold)"),
          "batch_size": (lambda v: v >= 1, "at least 1"), "num_workers": WORKERS_RANGE}


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
    warn_unreadable(tok, dataset, pairs, cfg.csv)
    # Inputs are valid: now the device, its banner on stderr (stdout is for the answer).
    rt = engine.setup_runtime(cfg.device, cfg.precision, file=sys.stderr)
    model.to(rt.device)
    scorer = engine.Inference(model.probability, model.cfg.arch, rt, cfg.batch_size, cfg.shapes, cfg.compile,
                              cfg.num_workers, max_len=data["max_len"])
    probs = scorer(dataset, "predicting", verbose=bool(cfg.csv))
    if not cfg.csv:
        print(f"{probs[0]:.6f}")
        return
    write_predictions(cfg.out, pairs, probs, threshold, rejects)
    print(f"{cfg.csv}: {rows_read:,} rows, {len(rejects):,} rejected"
          f"{' (see ' + cfg.out + '.rejects.tsv)' if rejects else ''}; wrote {len(probs):,} predictions "
          f"to {cfg.out} at threshold {threshold:.4f}, {int((probs >= threshold).sum()):,} duplicates")


def check_config(cfg):
    """Every flag checked, and the output place made safe, before any work."""
    if bool(cfg.csv) == bool(cfg.question1 or cfg.question2):
        raise UserError("give either two questions or --csv FILE", 'e.g. predict.py out/ckpt.pt "Q1?" "Q2?"')
    check_ranges(cfg, RANGES)
    if not cfg.csv:
        if not cfg.question2:  # one positional question only (an empty second one reads the same)
            raise UserError("one question given: a pair needs two", 'pass two questions in quotes, e.g. predict.py '
                            'out/ckpt.pt "How do I learn Python?" "What is the best way to learn Python?"')
        return
    check_out_file(cfg.out, (cfg.csv, cfg.checkpoint, cfg.threshold_from), cfg.overwrite, "preds.csv",
                   side_files=(".rejects.tsv",))
    if os.path.exists(f"{cfg.out}.rejects.tsv") and not cfg.overwrite:
        raise UserError(f"--out {cfg.out}: {cfg.out}.rejects.tsv exists (an earlier run's rejected rows)",
                        "pass --overwrite to replace both, or another --out")
    check_writable(cfg.out, "--out")


def one_pair(question1, question2, tok, data):
    """The two command-line questions as a one-pair dataset, tokenized like the training data."""
    if not question1.strip() or not question2.strip():
        raise UserError("a question is empty", "pass two non-empty questions in quotes")
    tokens, offsets, triples = encode_pairs(tok, [question1], [question2], [NO_LABEL], data["max_len"])
    return InMemoryPairs(tokens, offsets, triples, data["pad_token_id"]), None, [], 1


def warn_unreadable(tok, dataset, pairs, from_csv):
    """A warning on stderr (stdout holds the answer) for pairs with a question the vocabulary cannot
    read: the model sees such a question as nothing, so its probability means nothing."""
    bad = np.flatnonzero(unreadable_pairs(tok, dataset))
    if not len(bad):
        return
    if from_csv:
        ids = pairs.get("id") or pairs["row"]
        print(f"warning: {len(bad):,} of {len(dataset):,} pairs have a question the vocabulary cannot read "
              f"(nothing but [UNK]: emoji, other scripts; the first: {'id' if pairs.get('id') else 'row'} "
              f"{ids[bad[0]]}): their probabilities mean nothing", file=sys.stderr)
    else:
        print("warning: a question the vocabulary cannot read (nothing but [UNK]: emoji, other scripts): "
              "this probability means nothing", file=sys.stderr)


def write_predictions(path, pairs, probs, threshold, rejects):
    """One row per usable input row: id (or row), probability, prediction; rejects beside it
    (text.write_table: atomic, one run's)."""
    ids = pairs.get("id") or pairs["row"]  # read_pairs gives 1-based row numbers; ids where it has them
    write_table(path, ["id" if pairs.get("id") else "row", "probability", "prediction"],
                ([i, f"{p:.6f}", int(p >= threshold)] for i, p in zip(ids, probs.tolist())), rejects)


if __name__ == "__main__":
    main()
