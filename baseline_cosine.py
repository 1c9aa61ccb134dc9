"""The notebook's cosine baseline: an untuned encoder's vectors, cosine similarity as the score.

    # CPU, 1.6k validation+test pairs of the real 8k rows, under a minute:
    python preprocess.py ../shared/data/qqp/qqp_first8k.csv.gz --out_dir data/qqp8k
    python baseline_cosine.py --data_dir data/qqp8k --out_dir runs/baseline_cosine_8k
    # GPU, Kaggle's train.csv preprocessed into data/qqp (validation tunes, test is reported):
    python baseline_cosine.py --data_dir data/qqp --batch_size 1024 --num_workers 4

Each question is encoded alone; its vector is the [CLS] position of the last layer, as in the
notebook (--pooling mean averages the real tokens instead, which is how sentence-embedding models
such as MiniLM are trained). A pair's score is the cosine similarity of its two vectors. The
reported split (default test) gets the notebook's printout at
    notebook        its fixed threshold 0.96 (chosen by hand; the notebook never says on what)
    best_f1         the threshold maximizing F1 on the VALIDATION split, applied unchanged
    best_accuracy   the threshold maximizing accuracy on the VALIDATION split, applied unchanged
with the same metrics, results.json and plots as evaluate.py (into --out_dir).

Caveat: the bundled default encoder, all-MiniLM-L6-v2, is not untuned for this task: its
sentence-embedding training data include ~100k Quora duplicate-question pairs (see its model card),
so it flatters this baseline and may have seen these very test pairs. The notebook's untuned
encoder was distilbert-base-uncased (--model distilbert-base-uncased, with the data preprocessed
with that --model too; it needs the model's files in the HF cache or a local folder).
"""
import argparse
import os
from dataclasses import asdict, dataclass
from functools import partial

import torch
from torch.nn import functional as F

import preprocess
from data import SPLITS, DataError
from evaluate import (fail, open_data_dir, open_splits, report_datasets, score_dataset, setup_device,
                      write_results)
from model import BUNDLED_MODEL, ModelConfig, load_encoder, pool


@dataclass
class BaselineConfig:
    data_dir: str = "data/qqp"        # preprocessed folder, tokenized with --model's tokenizer
    model: str = BUNDLED_MODEL        # encoder + tokenizer: HF name or local folder (default: bundled MiniLM)
    pooling: str = "cls"              # 'cls' (notebook) or 'mean' over real tokens
    threshold: float = 0.96           # the notebook's fixed cosine threshold
    split: str = "test"               # reported split: test | train | validation | all
    out_dir: str = "runs/baseline_cosine"  # results.json, scores, plots
    batch_size: int = 256             # pairs per batch (2x as many questions per encoder pass)
    num_workers: int = 0              # DataLoader processes collating batches (4 keeps a GPU busy)
    device: str = "auto"              # auto = cuda > mps > cpu


def parse_args(argv=None):
    d = BaselineConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=d.data_dir)
    p.add_argument("--model", default=d.model)
    p.add_argument("--pooling", default=d.pooling, choices=("cls", "mean"))
    p.add_argument("--threshold", type=float, default=d.threshold)
    p.add_argument("--split", default=d.split, choices=(*SPLITS, "all"))
    p.add_argument("--out_dir", default=d.out_dir)
    p.add_argument("--batch_size", type=int, default=d.batch_size)
    p.add_argument("--num_workers", type=int, default=d.num_workers)
    p.add_argument("--device", default=d.device)
    return BaselineConfig(**vars(p.parse_args(argv)))


def main(argv=None):
    cfg = parse_args(argv)
    try:
        baseline(cfg)
    except DataError as e:
        fail(e)


def baseline(cfg):
    tok = preprocess.load_tokenizer(cfg.model)
    open_data_dir(cfg.data_dir, preprocess.vocab_hash(tok), cfg.model)
    datasets, validation = open_splits(cfg.data_dir, cfg.split)
    device, amp_dtype = setup_device(cfg.device)
    encoder = load_pretrained(cfg.model).to(device).eval()
    print(f"cosine baseline: {cfg.model} ({encoder.config.model_type}, "
          f"{sum(p.numel() for p in encoder.parameters()):,} parameters, untuned), {cfg.pooling} pooling")
    os.makedirs(cfg.out_dir, exist_ok=True)
    scores_of = partial(score_dataset, cosine_similarity(encoder, cfg.pooling), layout="siamese",
                        batch_size=cfg.batch_size, device=device, amp_dtype=amp_dtype,
                        num_workers=cfg.num_workers)
    thresholds, results = report_datasets(scores_of, datasets, validation, {"notebook": cfg.threshold},
                                          cfg.out_dir, probabilistic=False)  # cosines are not probabilities
    write_results(cfg.out_dir, {"script": "baseline_cosine.py", "config": asdict(cfg),
                                "model": cfg.model, "split": cfg.split,
                                "data_dir": os.path.abspath(cfg.data_dir),
                                "thresholds": thresholds, "results": results})


def load_pretrained(name):
    """The pretrained encoder as downloaded, no head; a missing model is a one-line error."""
    try:
        return load_encoder(ModelConfig(encoder=name))
    except OSError as e:
        raise DataError(str(e)) from None


def cosine_similarity(encoder, pooling):
    """score_batch for the siamese layout: cosine of each pair's two question vectors."""
    def score(batch):
        # The batch's 2B questions come length-sorted in 1-2 padded groups (data.Collator).
        emb = torch.cat([pool(encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask, pooling)
                         for ids, mask in zip(batch["q_ids"], batch["q_mask"])]).float()  # (2B, H)
        # The notebook's eps; in fp32, as near-duplicates differ in the third decimal of the cosine.
        return F.cosine_similarity(emb[batch["q1_pos"]], emb[batch["q2_pos"]], dim=-1, eps=1e-6)  # (B,)
    return score


if __name__ == "__main__":
    main()
