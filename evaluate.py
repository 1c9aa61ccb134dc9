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

A data folder other than the one the model was trained on (another source, options or split) may
hold its training questions in its validation and test splits: --data_dir of such a folder is refused
unless --allow_other_data (then a note says so). A question the vocabulary cannot read (emoji, other
scripts: nothing but [UNK]) gives a score that means nothing: --csv counts such pairs on stderr.

Writes into --out_dir (default: one folder per input in the checkpoint's folder: eval_<split> for
the training folder's splits, eval_<split>_<folder>_<hash> for another folder's, and
eval_csv_<file stem>_<hash> for --csv, the hash naming the file's content): results.json,
scores_<name>.npz (per-pair scores and labels in split/file order, for error analysis) and per
reported split four PNGs: precision-recall curve, ROC curve, confusion matrices, score histogram per
class. A folder holding another checkpoint's or input's results is refused unless --overwrite.
"""
import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

import engine
import report
from cli import WORKERS_RANGE, UserError, arg, check_ranges, parse_config, run
from data import PairDataset, fingerprint, open_data_dir, open_splits, pairs_from_file, unreadable_pairs
from model import load_model
from text import checkpoint_tokenizer, file_sha256, file_stem, write_rejects


# What each numeric flag may be: (test, the rule in words).
RANGES = {"batch_size": (lambda v: v >= 1, "at least 1"), "num_workers": WORKERS_RANGE}


@dataclass
class EvalConfig:
    checkpoint: str = arg("", "ckpt.pt written by train.py")
    split: Literal["test", "train", "validation", "all"] = arg("test", "split to report (ignored with --csv)")
    data_dir: str = arg("", "preprocessed folder (default: the one the checkpoint was trained on)")
    allow_other_data: bool = arg(False, "accept a --data_dir the checkpoint was not trained on (its validation "
                                        "and test questions may have been in training: optimistic metrics)")
    csv: str = arg("", "a raw labelled CSV/TSV to evaluate instead of a split")
    out_dir: str = arg("", "default: <ckpt dir>/eval_<split> (the training folder), eval_<split>_<folder>_<hash> "
                           "(another folder), eval_csv_<file stem>_<hash> (--csv)")
    overwrite: bool = arg(False, "replace the results of another checkpoint or input in --out_dir")
    batch_size: int = arg(256, "pairs per forward pass", aliases=["--bs"])
    num_workers: int = arg(0, "DataLoader workers collating batches (4 keep a GPU busy)")
    device: str = arg("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = arg("auto", "auto: bf16 (else fp16) on GPU, fp32 on CPU")
    shapes: Literal[engine.SHAPES] = arg("auto", engine.SHAPES_HELP)
    compile: Literal[engine.COMPILE_MODES] = arg("auto", engine.COMPILE_HELP)


def main(argv=None):
    cfg = parse_config(EvalConfig, argv, __doc__, positional=("checkpoint",))
    run(evaluate, cfg)


def evaluate(cfg):
    check_ranges(cfg, RANGES)
    if cfg.csv and not os.path.isfile(cfg.csv):
        raise UserError(f"--csv {cfg.csv}: no such file", "pass a labelled CSV/TSV of question pairs")
    rt = engine.setup_runtime(cfg.device, cfg.precision)
    model, ckpt = load_model(cfg.checkpoint)
    data = ckpt["data"]
    print(f"checkpoint {cfg.checkpoint}: step {ckpt.get('step')}, arch {model.cfg.arch}, "
          f"encoder {model.cfg.encoder_config.get('model_type')}, trained on {data['data_dir']}")
    # Every input checked and the output place made safe before any scoring.
    data_dir, data_id, own = pick_data_dir(cfg, data)
    this_run = {"script": "evaluate.py", "checkpoint": os.path.abspath(cfg.checkpoint),
                "input": {"csv_sha256": file_sha256(cfg.csv), "data": data_id} if cfg.csv else
                {"split": cfg.split, "data": data_id}}
    out_dir = cfg.out_dir or default_out_dir(cfg, this_run["input"], own, data_dir)
    with report.results_folder(out_dir, this_run, cfg.overwrite, inputs=(cfg.checkpoint, cfg.csv, data_dir)) as clear:
        if cfg.csv:
            datasets, extra, rejects = read_csv(cfg, data)
            validation = PairDataset(data_dir, "validation") if data_dir else None
        else:
            (datasets, validation), extra, rejects = open_splits(data_dir, cfg.split), {}, None
        clear()  # the inputs are good: another run's results (--overwrite) may go now
        os.makedirs(out_dir, exist_ok=True)
        if rejects is not None:
            write_rejects(os.path.join(out_dir, "rejects.tsv"), rejects)
        model.to(rt.device)
        scores_of = engine.Inference(model.probability, model.cfg.arch, rt, cfg.batch_size, cfg.shapes, cfg.compile,
                                     cfg.num_workers, max_len=data["max_len"])
        thresholds, results = report.report_datasets(scores_of, datasets, validation, {"argmax": 0.5}, out_dir)
        report.write_results(out_dir, {**this_run, "score": "probability", "config": asdict(cfg),
                                       "step": ckpt.get("step"), "split": cfg.csv or cfg.split, "data_dir": data_dir,
                                       **extra, "thresholds": thresholds, "results": results})


def pick_data_dir(cfg, data):
    """The data folder whose splits are reported (or, with --csv, whose validation split tunes the
    thresholds): (its absolute path, a short hash of its fingerprint, whether the model was trained
    on it). A folder the model was not trained on is refused unless --allow_other_data: its
    validation and test questions may have been training questions. (None, None, True) with --csv
    when the training folder is gone and no --data_dir is given: no tuned thresholds then."""
    data_dir = os.path.abspath(cfg.data_dir or data["data_dir"])
    if cfg.csv and not cfg.data_dir and not os.path.exists(os.path.join(data_dir, "manifest.json")):
        print(f"note: {data_dir} (the training data) is missing: no validation-tuned thresholds. "
              "Pass --data_dir to tune them on its validation split")
        return None, None, True
    manifest = open_data_dir(data_dir, data["vocab_hash"], data["tokenizer"])
    own = fingerprint(manifest) == data.get("fingerprint")
    if not own:
        use = "tuning thresholds on its validation split" if cfg.csv else f"its {cfg.split} metrics"
        if not cfg.allow_other_data:
            raise UserError(f"--data_dir {data_dir} is not the folder {cfg.checkpoint} was trained on "
                            f"({data['data_dir']}; other source, options or split): its validation and test "
                            f"questions may have been in training, so {use} would be optimistic",
                            "drop --data_dir to use the training folder, or pass --allow_other_data to go on")
        print(f"note: {data_dir} is not the exact folder the model was trained on (other source, options or "
              f"split): its validation/test questions may have been in training (--allow_other_data)")
    return data_dir, report.data_id(manifest), own


def default_out_dir(cfg, input_id, own, data_dir):
    """One folder per input beside the checkpoint, so that no input's results replace another's:
    eval_<split> for the training folder, eval_<split>_<folder>_<hash> for another folder,
    eval_csv_<file stem>_<hash> for a file (the hash names its content and tuning folder)."""
    if cfg.csv:
        name = f"eval_csv_{file_stem(cfg.csv)}_{hashlib.sha256(json.dumps(input_id).encode()).hexdigest()[:8]}"
    elif own:
        name = f"eval_{cfg.split}"
    else:
        name = f"eval_{cfg.split}_{os.path.basename(data_dir)}_{input_id['data'][:8]}"
    return os.path.join(os.path.dirname(os.path.abspath(cfg.checkpoint)), name)


def read_csv(cfg, data):
    """({file stem: its pairs}, extra fields for results.json, its unusable rows for rejects.tsv);
    pairs with a question the vocabulary cannot read are counted."""
    tok = checkpoint_tokenizer(cfg.checkpoint, data)
    dataset, pairs, rejects, rows_read = pairs_from_file(cfg.csv, tok, data["max_len"], data["pad_token_id"])
    print(f"{cfg.csv}: {rows_read:,} rows, {len(rejects):,} rejected{' (see rejects.tsv)' if rejects else ''}, "
          f"{len(dataset):,} pairs evaluated")
    unreadable = unreadable_pairs(tok, dataset)
    if unreadable.any():
        print(f"warning: {cfg.csv}: {int(unreadable.sum()):,} of {len(dataset):,} pairs have a question the "
              "vocabulary cannot read (nothing but [UNK]: emoji, other scripts; the first in row "
              f"{pairs['row'][int(np.flatnonzero(unreadable)[0])]}): their scores mean nothing",
              file=sys.stderr)
    return {file_stem(cfg.csv): dataset}, {"rows_read": rows_read, "rows_rejected": len(rejects),
                                           "pairs_unreadable": int(unreadable.sum())}, rejects


if __name__ == "__main__":
    main()
