"""Label the training pairs, and pairs mined among the training questions, with a teacher's
probabilities: the file train.py --teacher_file distils into a siamese student (AugSBERT).

    # the cross-encoder teacher (validation-chosen, trained on this folder), then the student:
    python train.py --data_dir data/qqp8k --arch cross --epochs 2 --batch_size 64 --out_dir out/cross8k
    python teach.py --data_dir data/qqp8k --teacher out/cross8k/ckpt.pt --out runs/teacher8k.npz
    python train.py --data_dir data/qqp8k --teacher_file runs/teacher8k.npz --loss distill \
        --epochs 1 --eval_every_steps 100 --batch_size 64 --out_dir out/distill8k

Mining (distill.py): each training question with its --k nearest other training questions, by the
cosine of an untuned encoder (--mine_by encoder; default the one the folder was tokenized for) or
by BM25 (--mine_by bm25); pairs already labelled and copies of one text left out; --mine of them
kept at random (default: as many as the training split has pairs). Validation and test questions
never take part. Several --teacher checkpoints are averaged (an ensemble); each must have been
trained on this folder, so none saw its validation or test pairs. The student's targets are these
probabilities, never a label of the validation or test split.

Every input is checked before any work (mining alone takes minutes): the data folder, each teacher
(it loads, and was trained on --data_dir), the mining encoder's vocabulary (or the folder's texts for
bm25), and that --out can be written.

Writes --out (.npz: the training pairs, then the mined ones; the teacher's p(duplicate) of each;
a record of the folder, teachers, mining and the teachers' validation metrics), at once.
"""
import os
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

import distill
import engine
from cli import WORKERS_RANGE, UserError, arg, check_ranges, parse_config, run
from data import PairDataset, check_out_file, check_writable, fingerprint


# What each numeric flag may be: (test, the rule in words).
RANGES = {"mine": (lambda v: v == -1 or v >= 0, "-1 (as many as the training pairs) or 0 or more"),
          "k": (lambda v: v >= 1, "at least 1"), "batch_size": (lambda v: v >= 1, "at least 1"),
          "num_workers": WORKERS_RANGE,
          "seed": (lambda v: 0 <= v <= 2 ** 32 - 1, f"in [0, {2 ** 32 - 1}]")}


@dataclass
class TeachConfig:
    data_dir: str = arg("data/qqp", "folder written by preprocess.py (the one the student trains on)")
    teacher: list[str] = arg([], "ckpt.pt of train.py trained on --data_dir (several: their mean)")
    out: str = arg("runs/teacher.npz", "the teacher file for train.py --teacher_file")
    overwrite: bool = arg(False, "replace an existing --out file")
    mine: int = arg(-1, "unlabelled pairs to mine among the training questions (-1: as many as the training "
                        "split has pairs; 0: none, the teacher relabels the training pairs only)")
    mine_by: Literal["encoder", "bm25"] = arg("encoder", "neighbours by an untuned encoder's cosine, or by BM25")
    encoder: str = arg("", "--mine_by encoder: HF name or folder (default: the folder's own encoder)")
    k: int = arg(2, "neighbours of each training question that are candidates")
    batch_size: int = arg(256, "pairs (questions) per forward pass", aliases=["--bs"])
    num_workers: int = arg(0, "DataLoader workers collating batches (4 keep a GPU busy)")
    device: str = arg("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = arg("auto", "auto: bf16 (else fp16) on GPU, fp32 on CPU")
    shapes: Literal[engine.SHAPES] = arg("auto", engine.SHAPES_HELP)
    compile: Literal[engine.COMPILE_MODES] = arg("auto", engine.COMPILE_HELP)
    seed: int = arg(0, "which mined pairs are kept")


def main(argv=None):
    cfg = parse_config(TeachConfig, argv, __doc__)
    run(teach, cfg)


def teach(cfg):
    check_config(cfg)
    rt = engine.setup_runtime(cfg.device, cfg.precision)
    # --- every input, before any work
    train = PairDataset(cfg.data_dir, "train")  # (N, 3) q1, q2, label
    n_mine = len(train) if cfg.mine < 0 else cfg.mine
    teachers = distill.load_teachers(cfg.teacher, train)
    miner, texts = None, None
    if n_mine and cfg.mine_by == "encoder":
        miner = distill.mining_encoder(train, cfg.encoder)
    elif n_mine:
        from retrieval import data_folder_questions
        texts = data_folder_questions(cfg.data_dir).texts

    # --- mined pairs: training questions only
    mined = distill.mine_pairs(train, cfg.mine_by, cfg.k, n_mine, cfg.seed, rt, miner, cfg.batch_size,
                               texts, cfg.shapes, cfg.compile) if n_mine else np.zeros((0, 3), np.int64)
    print(f"mined {len(mined):,} pairs among {len(distill.training_questions(train.pairs)):,} training "
          f"questions ({cfg.mine_by}, {cfg.k} neighbours each){'' if len(mined) == n_mine else f'; asked {n_mine:,}'}")
    pairs = np.concatenate([np.asarray(train.pairs, dtype=np.int64), mined])  # (M, 3)

    # --- the teacher's probabilities
    probs, record = distill.teacher_probabilities(teachers, train, pairs, rt, cfg.batch_size, cfg.num_workers,
                                                  cfg.shapes, cfg.compile)
    n = len(train)
    agree = float(((probs[:n] >= 0.5) == (train.labels == 1)).mean())
    v = record["validation"]
    print(f"teacher{'s (mean of ' + str(len(cfg.teacher)) + ')' if len(cfg.teacher) > 1 else ''} on validation: "
          f"accuracy {v['accuracy']:.4f}, F1 {v['f1']:.4f}, AP {v['average_precision']:.4f} | agrees with "
          f"{agree:.1%} of the training labels | calls {float((probs[n:] >= 0.5).mean()) if len(mined) else 0:.1%} "
          "of the mined pairs duplicates")
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    distill.save_teacher_file(cfg.out, pairs, probs, {
        "data_dir": os.path.abspath(cfg.data_dir), "data_fingerprint": fingerprint(train.manifest),
        "train_pairs": n, "mined_pairs": len(mined), "config": asdict(cfg), "train_label_agreement": agree,
        **record})
    print(f"wrote {cfg.out}: {len(pairs):,} pairs ({n:,} training + {len(mined):,} mined)")


def check_config(cfg):
    """Every flag checked, and the output place made safe, before any work."""
    check_ranges(cfg, RANGES)
    if not cfg.teacher:
        raise UserError("no --teacher given", "pass --teacher out/cross8k/ckpt.pt (a checkpoint of train.py "
                        "trained on --data_dir)")
    check_out_file(cfg.out, (cfg.data_dir, *cfg.teacher), cfg.overwrite, "runs/teacher.npz", make_folder=True)
    if not cfg.out.endswith(".npz"):
        raise UserError(f"--out {cfg.out}: a teacher file ends in .npz", f"e.g. --out {cfg.out}.npz")
    check_writable(cfg.out, "--out")


if __name__ == "__main__":
    main()
