"""Does the untuned encoder's cosine add anything to a fine-tuned classifier? (issue 21, the study of
docs/recipe_2026-11-30.md.) For each checkpoint: its duplicate logit on the validation pairs, and
the untuned encoder's cosine of the same pairs, combined by a logistic regression fitted two ways:
out-of-fold on validation (5 folds: a fair estimate of what the pair could do), and on the training
split (what training both together would see: the classifier's training-split logits are overfit).
Prints accuracy at 0.5 and AP for the classifier alone and for each fit.

    python tools/stack_untuned_cosine.py --data_dir data/qqp8k --checkpoints out/s0/ckpt.pt out/s1/ckpt.pt
"""
import os
import sys
from dataclasses import dataclass
from typing import List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import engine  # noqa: E402
import retrieval  # noqa: E402
from cli import UserError, arg, parse_config, run  # noqa: E402
from data import PairDataset  # noqa: E402
from metrics import compute_metrics  # noqa: E402
from model import ModelConfig, load_question_encoder  # noqa: E402


@dataclass
class StackConfig:
    data_dir: str = arg("data/qqp8k", "the folder the checkpoints were trained on")
    checkpoints: List[str] = arg([], "siamese ckpt.pt files")
    encoder: str = arg(ModelConfig.encoder, "the untuned encoder whose cosine is stacked")
    folds: int = arg(5, "folds of the out-of-fold fit on validation")


def main(argv=None):
    run(stack, parse_config(StackConfig, argv, __doc__))


def logit(p):
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def stack(cfg):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    if not cfg.checkpoints:
        raise UserError("no checkpoints", "pass --checkpoints out/s0/ckpt.pt ...")
    rt = engine.setup_runtime("cpu", "fp32")
    texts = retrieval.data_folder_questions(cfg.data_dir).texts
    val, train = PairDataset(cfg.data_dir, "validation"), PairDataset(cfg.data_dir, "train")
    untuned = load_question_encoder(encoder=cfg.encoder)
    unit, _ = retrieval.unit(retrieval.embed_texts(untuned, retrieval.question_inference(untuned, rt), texts))

    def cosine(pairs):  # (P,) the untuned cosine of each pair
        rows = pairs.pairs.astype(np.int64)
        return (unit[rows[:, 0]] * unit[rows[:, 1]]).sum(1)

    cos_val, cos_train = cosine(val), cosine(train)
    alone = compute_metrics(val.labels, (cos_val + 1) / 2)
    print(f"untuned cosine alone: AP {alone['average_precision']:.4f}")
    for path in cfg.checkpoints:
        qe = load_question_encoder(checkpoint=path)
        qe.module.eval()
        scores = engine.Inference(qe.classifier.probability, "siamese", rt, 256, "exact", "off", max_len=qe.max_len)
        x_val = np.stack([logit(scores(val, "pairs")), cos_val], 1)  # (P, 2): the logit, the untuned cosine
        x_train = np.stack([logit(scores(train, "pairs")), cos_train], 1)
        base = compute_metrics(val.labels, 1 / (1 + np.exp(-x_val[:, 0])))
        out_of_fold = np.zeros(len(x_val))
        for fit, held in StratifiedKFold(cfg.folds, shuffle=True, random_state=0).split(x_val, val.labels):
            model = LogisticRegression(C=10).fit(x_val[fit], val.labels[fit])
            out_of_fold[held] = model.predict_proba(x_val[held])[:, 1]
        oof = compute_metrics(val.labels, out_of_fold)
        on_train = LogisticRegression(C=10).fit(x_train, train.labels)
        fitted = compute_metrics(val.labels, on_train.predict_proba(x_val)[:, 1])
        print(f"{path}: alone acc {base['accuracy']:.4f} AP {base['average_precision']:.4f} | with the untuned "
              f"cosine, {cfg.folds}-fold on validation: acc {oof['accuracy']:.4f} AP {oof['average_precision']:.4f}"
              f" | fitted on train: acc {fitted['accuracy']:.4f} AP {fitted['average_precision']:.4f} "
              f"(weights logit, cosine: {on_train.coef_[0].round(2).tolist()})", flush=True)


if __name__ == "__main__":
    main()
