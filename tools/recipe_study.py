"""The recipe study of docs/recipe_2026-11-30.md: each checkpoint, its encoder mixed back toward
the pretrained one at several weights (WiSE-FT, model.interpolated), scored at both jobs on one
split of its data folder: the pair classifier (accuracy at argmax, F1, AP, ROC-AUC) and search
(search_eval.folder_benchmark: the search.py --eval protocol, exact cosine, without writing an
index). --soup adds the uniform average of the checkpoints' weights (same recipe, other seeds).
--untuned adds the encoder the checkpoints started from, with mean pooling; --mix_untuned W also
searches by W * its cosine + (1 - W) * each model's (an ensemble: two encoder passes). One JSON line per
(model, alpha) is appended to --out as it is measured, so an interrupted study keeps what it did.

    python tools/recipe_study.py --data_dir data/qqp8k --checkpoints out/s0/ckpt.pt out/s1/ckpt.pt \\
        out/s2/ckpt.pt --alphas 1 0.7 0.5 --soup --untuned --out runs/study.jsonl

Choose on --split validation (the default); read test once, for the chosen recipe.
"""
import json
import os
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import List, Literal

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import engine  # noqa: E402
import retrieval  # noqa: E402
from cli import UserError, arg, check_ranges, interval, parse_config, run  # noqa: E402
from data import PairDataset, check_out_file, check_writable  # noqa: E402
from metrics import best_threshold, compute_metrics  # noqa: E402
from model import (ModelConfig, interpolated, load_encoder, load_question_encoder,  # noqa: E402
                   pretrained_weights)
from search_eval import EVAL_SPLITS, eval_protocol, excluded_rows, folder_benchmark, ranking_metrics  # noqa: E402


RANGES = {name: interval(spec) for name, spec in {"batch_size": "[1, inf)", "refit_epochs": "[0, inf)",
                                                  "refit_lr": "(0, inf)"}.items()}


@dataclass
class StudyConfig:
    data_dir: str = arg("data/qqp8k", "the folder the checkpoints were trained on")
    checkpoints: List[str] = arg([], "siamese ckpt.pt files (one recipe's seeds)")
    alphas: List[float] = arg([1.0], "encoder mixing weights (1: as trained)")
    soup: bool = arg(False, "also the uniform average of the checkpoints' weights")
    soup_only: bool = arg(False, "with --soup: score the soup, not each checkpoint again")
    untuned: bool = arg(False, "also the encoder they started from (search only: it has no classifier)")
    split: Literal[EVAL_SPLITS] = arg("validation", "the split both jobs are scored on")
    out: str = arg("runs/recipe_study.jsonl", "JSON lines, appended")
    batch_size: int = arg(256, "questions or pairs per forward pass")
    refit_epochs: int = arg(0, "also re-fit the head (and the cosine prior's scalars) for the mixed encoder: "
                            "epochs over the training pairs' cached vectors (0: off)")
    refit_lr: float = arg(1e-3, "the re-fit's AdamW learning rate")
    rerank: bool = arg(False, "also search.py --rerank's metrics: the classifier re-orders the top 50")
    mix_untuned: List[float] = arg([], "also search by w * the untuned encoder's cosine + (1 - w) * this "
                                       "model's, for each w here (both vectors, concatenated)")


def main(argv=None):
    run(study, parse_config(StudyConfig, argv, __doc__))


def check_out(cfg):
    """--out: no input, and new or a JSON-lines file of this tool's (it is appended to)."""
    check_out_file(cfg.out, (cfg.data_dir, *cfg.checkpoints), overwrite=True, example="recipe_study.jsonl",
                   make_folder=True)
    if os.path.isfile(cfg.out) and os.path.getsize(cfg.out):
        try:
            with open(cfg.out) as f:
                first = json.loads(f.readline())
            ok = isinstance(first, dict) and "model" in first
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise UserError(f"--out {cfg.out}: not a recipe_study.py results file (JSON lines), and it is appended "
                            "to", "pass a new file or one this tool wrote")
    check_writable(cfg.out, "--out")


def study(cfg):
    if not cfg.checkpoints and not cfg.untuned:
        raise UserError("nothing to study", "pass --checkpoints and/or --untuned")
    check_ranges(cfg, RANGES)
    bad = [a for a in cfg.alphas if not a == a or a < 0]  # above 1 extrapolates, on purpose
    if bad:
        raise UserError(f"--alphas {' '.join(map(str, bad))}: a weight must be 0 or more", "e.g. --alphas 1 0.75")
    check_out(cfg)
    if any(not 0 <= w <= 1 for w in cfg.mix_untuned):
        raise UserError(f"--mix_untuned {' '.join(map(str, cfg.mix_untuned))}: each weight is in [0, 1]",
                        "pass weights such as 0.5 0.75")
    rt = engine.setup_runtime("cpu", "fp32")
    texts = retrieval.data_folder_questions(cfg.data_dir).texts
    pairs = PairDataset(cfg.data_dir, cfg.split)
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    qes = [load_question_encoder(checkpoint=path) for path in cfg.checkpoints]
    models = [] if cfg.soup_only else list(zip(cfg.checkpoints, qes))
    if cfg.soup and len(qes) > 1:
        soup = load_question_encoder(checkpoint=cfg.checkpoints[0])
        states = [qe.module.state_dict() for qe in qes]
        soup.module.load_state_dict({k: sum(s[k] for s in states) / len(states) if v.is_floating_point() else v
                                     for k, v in states[0].items()})
        models.append(("soup of " + ", ".join(cfg.checkpoints), soup))
    untuned_unit = None  # (N, H) the untuned encoder's unit vectors, for --mix_untuned
    if cfg.untuned or cfg.mix_untuned:
        name = qes[0].module.cfg.encoder if qes else ModelConfig.encoder
        untuned_unit = score(cfg, rt, texts, pairs, f"untuned {name}", load_question_encoder(encoder=name), None)
    for name, qe in models:
        pretrained = pretrained_weights(load_encoder(ModelConfig(encoder=qe.module.cfg.encoder)))
        for alpha in cfg.alphas:
            with interpolated(qe.module.encoder, pretrained, alpha):
                score(cfg, rt, texts, pairs, name, qe, alpha, untuned_unit)


class Vectors:
    """What retrieval.rerank reads of an index, from vectors in memory."""
    def __init__(self, pooled):
        self.pooled = pooled

    def rerank_vectors(self, rows):
        return self.pooled[np.maximum(rows, 0)]


def rerank_benchmark(cfg, rt, classifier, pooled, unit, depth=50):
    """search.py --eval --rerank on these vectors: exact top `depth`, re-ordered by the classifier."""
    queries, relevant, outside = eval_protocol(cfg.data_dir, len(unit), cfg.split)
    matrix = torch.from_numpy(np.ascontiguousarray(unit, np.float32))
    scores, rows = retrieval.exclude_rows(partial(retrieval.exact_search, matrix, unit[queries]), depth,
                                          excluded_rows(queries, outside))
    _, rows, _ = retrieval.rerank(classifier, pooled[queries], Vectors(pooled), scores, rows, rt)
    return ranking_metrics(rows[:, :10], relevant)[0]


def refit_head(cfg, classifier, pooled, pairs):
    """The head and the cosine scalars trained on, then scored with, the vectors of this encoder
    (the search pass has them for every folder question: no extra encoder pass); the encoder's
    weights are not touched. Returns the validation metrics; the classifier keeps its own head."""
    import copy
    import torch.nn.functional as F
    torch.manual_seed(0)
    head = copy.deepcopy(classifier.head)
    scalars = {k: copy.deepcopy(getattr(classifier, k)) for k in ("cosine_scale", "cosine_shift")
               if hasattr(classifier, k)}
    own = classifier.head, {k: getattr(classifier, k) for k in scalars}
    classifier.head = head
    for k, v in scalars.items():
        setattr(classifier, k, v)
    vecs = torch.from_numpy(pooled)
    train = PairDataset(cfg.data_dir, "train").pairs.astype(np.int64)
    params = list(head.parameters()) + list(scalars.values())
    opt = torch.optim.AdamW(params, lr=cfg.refit_lr, weight_decay=0.01)
    try:
        for _ in range(cfg.refit_epochs):
            head.train()
            for b in torch.randperm(len(train)).split(64):
                rows = torch.from_numpy(train[b.numpy()])
                logits = classifier.pair_logits(vecs[rows[:, 0]], vecs[rows[:, 1]])
                loss = F.cross_entropy(logits.float(), rows[:, 2])
                opt.zero_grad()
                loss.backward()
                opt.step()
        head.eval()
        with torch.no_grad():
            val = torch.from_numpy(pairs.pairs.astype(np.int64))
            probs = classifier.pair_logits(vecs[val[:, 0]], vecs[val[:, 1]]).float().softmax(-1)[:, 1].numpy()
        m = compute_metrics(pairs.labels, probs)
        return {k: m[k] for k in ("accuracy", "f1", "average_precision", "roc_auc", "log_loss")}
    finally:
        classifier.head = own[0]
        for k, v in own[1].items():
            setattr(classifier, k, v)


def score(cfg, rt, texts, pairs, name, qe, alpha, untuned_unit=None):
    """Both jobs of one model, appended to --out as a JSON line; returns its (N, H) unit vectors."""
    t0 = time.perf_counter()
    record = {"model": name, "alpha": alpha, "split": cfg.split, "data_dir": os.path.abspath(cfg.data_dir)}
    qe.module.eval()
    if qe.classifier is not None:
        scores_of = engine.Inference(qe.classifier.probability, "siamese", rt, cfg.batch_size, "exact", "off",
                                     max_len=qe.max_len)
        m = compute_metrics(pairs.labels, scores_of(pairs, "pairs", verbose=False))
        record["classifier"] = {k: m[k] for k in ("accuracy", "f1", "average_precision", "roc_auc", "log_loss")}
        if cfg.split != "validation":  # as evaluate.py: thresholds chosen on validation, applied here
            val = PairDataset(cfg.data_dir, "validation")
            val_probs = scores_of(val, "pairs", verbose=False)
            split_probs = scores_of(pairs, "pairs", verbose=False)
            for by in ("accuracy", "f1"):
                t = best_threshold(val.labels, val_probs, by)
                tuned = compute_metrics(pairs.labels, split_probs, t)
                record["classifier"][f"at_best_{by}_threshold"] = {"threshold": t, "accuracy": tuned["accuracy"],
                                                                   "f1": tuned["f1"]}
    inference = retrieval.question_inference(qe, rt, cfg.batch_size, "exact", "off")
    pooled = retrieval.embed_texts(qe, inference, texts, verbose=False)  # (N, H): every folder question
    unit, _ = retrieval.unit(pooled)
    record["retrieval"], _ = folder_benchmark(unit, cfg.data_dir, cfg.split)
    if untuned_unit is not None:
        for w in cfg.mix_untuned:  # [sqrt(w) u, sqrt(1 - w) t] . [sqrt(w) u', sqrt(1 - w) t'] = the mixed cosine
            mixed = np.concatenate([np.sqrt(w) * untuned_unit, np.sqrt(1 - w) * unit], axis=1)  # (N, 2H)
            record.setdefault("retrieval_mix_untuned", {})[str(w)] = folder_benchmark(mixed, cfg.data_dir,
                                                                                      cfg.split)[0]
    if qe.classifier is not None and cfg.rerank:
        record["retrieval_rerank"] = rerank_benchmark(cfg, rt, qe.classifier, pooled, unit)
    if qe.classifier is not None and cfg.refit_epochs:
        record["classifier_refit"] = refit_head(cfg, qe.classifier, pooled, pairs)
    record["seconds"] = round(time.perf_counter() - t0, 1)
    with open(cfg.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    cls, rr, refit = record.get("classifier"), record.get("retrieval_rerank"), record.get("classifier_refit")
    print(f"{name} alpha {alpha}: " + (f"acc {cls['accuracy']:.4f} AP {cls['average_precision']:.4f} | " if cls else "")
          + f"nDCG@10 {record['retrieval']['ndcg@10']:.4f} R@1 {record['retrieval']['recall@1']:.4f} "
          f"({record['seconds']:.0f} s)"
          + (f" | rerank R@1 {rr['recall@1']:.4f} nDCG@10 {rr['ndcg@10']:.4f}" if rr else "")
          + (f" | refit acc {refit['accuracy']:.4f} AP {refit['average_precision']:.4f}" if refit else "")
          + "".join(f" | mix {w}: nDCG@10 {m['ndcg@10']:.4f} R@1 {m['recall@1']:.4f}"
                    for w, m in record.get("retrieval_mix_untuned", {}).items()), flush=True)
    return unit


if __name__ == "__main__":
    main()
