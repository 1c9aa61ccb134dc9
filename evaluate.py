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

Writes into --out_dir (default <ckpt dir>/eval_<split>, or eval_csv_<file stem> for --csv: one
folder per input): results.json, scores_<name>.npz (per-pair scores and labels in split/file order,
for error analysis) and per reported split four PNGs: precision-recall curve, ROC curve, confusion
matrices, score histogram per class.
"""
import os
from dataclasses import asdict, dataclass
from typing import Literal

import engine
import report
from cli import UserError, arg, parse_config, run
from data import PairDataset, fingerprint, open_data_dir, open_splits, pairs_from_file
from model import load_model
from text import checkpoint_tokenizer, file_stem, write_rejects


@dataclass
class EvalConfig:
    checkpoint: str = arg("", "ckpt.pt written by train.py")
    split: Literal["test", "train", "validation", "all"] = arg("test", "split to report (ignored with --csv)")
    data_dir: str = arg("", "preprocessed folder (default: the one the checkpoint was trained on)")
    csv: str = arg("", "a raw labelled CSV/TSV to evaluate instead of a split")
    out_dir: str = arg("", "default: <ckpt dir>/eval_<split>, or eval_csv_<file stem> for --csv")
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
    if cfg.batch_size < 1 or cfg.num_workers < 0:
        raise UserError(f"--batch_size {cfg.batch_size} --num_workers {cfg.num_workers}: out of range",
                        "batch_size >= 1, num_workers >= 0")
    rt = engine.setup_runtime(cfg.device, cfg.precision)
    model, ckpt = load_model(cfg.checkpoint)
    model.to(rt.device)
    data = ckpt["data"]
    print(f"checkpoint {cfg.checkpoint}: step {ckpt.get('step')}, arch {model.cfg.arch}, "
          f"encoder {model.cfg.encoder_config.get('model_type')}, trained on {data['data_dir']}")
    out_dir = cfg.out_dir or os.path.join(os.path.dirname(os.path.abspath(cfg.checkpoint)),
                                          f"eval_csv_{file_stem(cfg.csv)}" if cfg.csv else f"eval_{cfg.split}")
    datasets, validation, data_dir, extra = pick_datasets(cfg, ckpt, out_dir)
    os.makedirs(out_dir, exist_ok=True)
    scores_of = engine.Inference(model.probability, model.cfg.arch, rt, cfg.batch_size, cfg.shapes, cfg.compile,
                                 cfg.num_workers, max_len=data["max_len"])
    thresholds, results = report.report_datasets(scores_of, datasets, validation, {"argmax": 0.5}, out_dir)
    report.write_results(out_dir, {"script": "evaluate.py", "score": "probability", "config": asdict(cfg),
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
    dataset, _, rejects, rows_read = pairs_from_file(cfg.csv, tok, data["max_len"], data["pad_token_id"])
    os.makedirs(out_dir, exist_ok=True)
    write_rejects(os.path.join(out_dir, "rejects.tsv"), rejects)
    print(f"{cfg.csv}: {rows_read:,} rows, {len(rejects):,} rejected"
          f"{' (see ' + os.path.join(out_dir, 'rejects.tsv') + ')' if rejects else ''}, "
          f"{len(dataset):,} pairs evaluated")
    extra = {"rows_read": rows_read, "rows_rejected": len(rejects)}
    name = file_stem(cfg.csv)
    if not cfg.data_dir and not os.path.exists(os.path.join(data_dir, "manifest.json")):
        # The training folder is gone (checkpoint copied elsewhere): report at 0.5 only.
        print(f"note: {data_dir} (the training data) is missing: no validation-tuned thresholds. "
              "Pass --data_dir to tune them on its validation split")
        return {name: dataset}, None, None, extra
    open_data_dir(data_dir, data["vocab_hash"], data["tokenizer"])
    return {name: dataset}, PairDataset(data_dir, "validation"), data_dir, extra


if __name__ == "__main__":
    main()
