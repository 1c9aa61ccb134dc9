"""The one metrics function, shared by train.py's validation, evaluate.py and baseline_cosine.py,
and the validation-tuned threshold that predict.py and serve.py read from evaluate.py's results.

Scores are duplicate probabilities (or cosine similarities for the baseline): higher = duplicate.
Thresholds are chosen on one split (validation) and applied unchanged to another (test).
"""
import json
import math
import os
import sys

import numpy as np
from sklearn import metrics as skm

from cli import UserError


def compute_metrics(labels, scores, threshold=0.5, probabilistic=True):
    """labels (N,) 0/1, scores (N,) -> dict of the notebook's metrics and threshold-free ones.
    With one class in labels, roc_auc and average_precision are undefined: NaN (json_safe makes
    them null for JSON files)."""
    labels = np.asarray(labels).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    preds = (scores >= threshold).astype(np.int64)
    both = len(np.unique(labels)) == 2
    out = {
        "n": int(len(labels)),
        "threshold": float(threshold),
        "accuracy": float(skm.accuracy_score(labels, preds)),
        "f1": float(skm.f1_score(labels, preds, zero_division=0)),
        "precision": float(skm.precision_score(labels, preds, zero_division=0)),
        "recall": float(skm.recall_score(labels, preds, zero_division=0)),
        "confusion_matrix": skm.confusion_matrix(labels, preds, labels=[0, 1]).tolist(),
        "positive_rate": float(labels.mean()) if len(labels) else float("nan"),
        "predicted_positive_rate": float(preds.mean()) if len(preds) else float("nan"),
        "roc_auc": float(skm.roc_auc_score(labels, scores)) if both else float("nan"),
        "average_precision": float(skm.average_precision_score(labels, scores)) if both else float("nan"),
    }
    if probabilistic:  # log loss needs probabilities, not cosine similarities
        p = np.clip(scores, 1e-7, 1 - 1e-7)
        out["log_loss"] = float(skm.log_loss(labels, p, labels=[0, 1]))
    return out


def json_safe(value):
    """value (dicts, lists, numbers) with NaN and infinities as None: json.dumps writes those as
    NaN / Infinity, which is not JSON, and readers outside Python (jq, JavaScript) refuse the file."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def best_threshold(labels, scores, by="f1"):
    """The threshold that maximizes `by` ('f1' or 'accuracy') on these labels and scores."""
    labels = np.asarray(labels).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    # Predicting positive for the top k scores, for every k at once.
    tp = np.concatenate([[0], np.cumsum(y)])
    fp = np.concatenate([[0], np.cumsum(1 - y)])
    pos, n = y.sum(), len(y)
    # Only cut between distinct scores (k = 0 or after the last of a run of equal scores).
    valid = np.concatenate([[True], np.r_[s[1:] != s[:-1], True]])
    if by == "f1":
        value = np.where(tp + fp + pos > 0, 2 * tp / np.maximum(tp + fp + pos, 1), 0.0)
    elif by == "accuracy":
        value = (tp + (n - pos - fp)) / max(n, 1)
    else:
        raise ValueError(f"by '{by}': use 'f1' or 'accuracy'")
    value = np.where(valid, value, -np.inf)
    k = int(np.argmax(value))
    if k == 0:
        return float(s[0]) + 1e-6 if n else 0.5  # predict nothing positive
    # Threshold halfway to the next lower score, so `score >= threshold` takes exactly the top k.
    return float(s[k - 1] if k == n else (s[k - 1] + s[k]) / 2)


def format_report(m, title):
    """The notebook's printout (accuracy, F1, precision, recall, confusion matrix) plus the rest."""
    cm = m["confusion_matrix"]
    lines = [title,
             f"Accuracy: {m['accuracy']:.4f}",
             f"F1 score: {m['f1']:.4f}",
             f"Precision: {m['precision']:.4f}",
             f"Recall: {m['recall']:.4f}",
             f"Confusion matrix (rows: true 0/1, columns: predicted 0/1, threshold {m['threshold']:.6g}):",
             f" [[{cm[0][0]} {cm[0][1]}]",
             f"  [{cm[1][0]} {cm[1][1]}]]",
             f"ROC-AUC: {m['roc_auc']:.4f}  average precision: {m['average_precision']:.4f}  "
             f"positive rate: {m['positive_rate']:.4f}" +
             (f"  log loss: {m['log_loss']:.4f}" if "log_loss" in m else "")]
    return "\n".join(lines)


def tuned_threshold(results_path, ckpt_path):
    """The best-F1 threshold evaluate.py chose on the validation split, for probabilities."""
    if not os.path.isfile(results_path):
        what = "a folder, not a file" if os.path.isdir(results_path) else "no such file"
        raise UserError(f"--threshold_from {results_path}: {what}", "pass the results.json of evaluate.py on this "
                        "checkpoint")
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
