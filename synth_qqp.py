"""Write a Kaggle-shaped train.csv of any size, synthesized from real QQP questions.

    python synth_qqp.py ../shared/data/qqp/qqp_first8k.csv.gz /tmp/synth404k.csv --rows 404290

For full-scale tests and benchmarks only (Kaggle's file cannot be downloaded here): the text of
every question is a real question with one word swapped for a word of another real question, so
token lengths look like QQP's. Qids are reused with preferential attachment at Kaggle's rate (808,580
question slots, 537,933 distinct qids), so some questions become hubs as in QQP; 36.9% of the
labels are 1. The labels carry no meaning: never train on this file to measure accuracy.
"""
import csv
import os
from dataclasses import dataclass

import numpy as np

from cli import arg, check_ranges, parse_config, run
from data import check_out_file, check_writable
from text import read_pairs

KAGGLE_REUSE = 1 - 537_933 / 808_580   # share of question slots that reuse an earlier qid
KAGGLE_POSITIVE = 149_263 / 404_290
# What each numeric flag may be: (test, the rule in words).
RANGES = {"rows": (lambda v: 1 <= v <= 20_000_000, "in [1, 20,000,000] (50x Kaggle's; about 2 GB of memory)"),
          "seed": (lambda v: 0 <= v <= 2 ** 32 - 1, f"in [0, {2 ** 32 - 1}]")}


@dataclass
class SynthConfig:
    source: str = arg("", "real pairs file to take questions from")
    out: str = arg("", "CSV to write")
    rows: int = arg(404_290, "rows to write (Kaggle's train.csv: 404,290)")
    seed: int = arg(0, "random seed")
    overwrite: bool = arg(False, "replace an existing --out file")


def main(argv=None):
    run(synthesize, parse_config(SynthConfig, argv, __doc__, positional=("source", "out")))


def synthesize(cfg):
    check_ranges(cfg, RANGES)
    check_out_file(cfg.out, (cfg.source,), cfg.overwrite, example="synth.csv")  # never over its source
    check_writable(cfg.out, "--out")
    pairs, _, _ = read_pairs(cfg.source)
    real = sorted(set(pairs["q1"]) | set(pairs["q2"]))
    split_real = [q.split() for q in real]
    vocab = sorted({w for words in split_real for w in words})
    rng = np.random.default_rng(cfg.seed)

    slots = 2 * cfg.rows
    reuse = rng.random(slots) < KAGGLE_REUSE
    base = rng.integers(len(real), size=slots)
    swap_word = rng.integers(len(vocab), size=slots)
    swap_at = rng.random(slots)
    pick = rng.random(slots)
    labels = (rng.random(cfg.rows) < KAGGLE_POSITIVE).astype(int)

    texts = []         # text of each qid (qid = index + 1)
    slot_qid = np.zeros(slots, np.int64)

    def new_question(k):
        words = list(split_real[base[k]])
        words[int(swap_at[k] * len(words))] = vocab[swap_word[k]]
        texts.append(" ".join(words))
        return len(texts)

    tmp = f"{cfg.out}.tmp-{os.getpid()}"  # renamed at the end: a half-written file is never taken for a whole one
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", "qid1", "qid2", "question1", "question2", "is_duplicate"])
            for r in range(cfg.rows):
                qids = []
                for k in (2 * r, 2 * r + 1):
                    if reuse[k] and k > 0:  # an earlier slot's qid: popular questions get popular
                        qid = int(slot_qid[int(pick[k] * k)])
                    else:
                        qid = new_question(k)
                    slot_qid[k] = qid
                    qids.append(qid)
                if qids[0] == qids[1]:
                    qids[1] = slot_qid[2 * r + 1] = new_question(2 * r + 1)
                w.writerow([r, qids[0], qids[1], texts[qids[0] - 1], texts[qids[1] - 1], labels[r]])
        os.replace(tmp, cfg.out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    print(f"wrote {cfg.out}: {cfg.rows:,} rows, {len(texts):,} distinct qids, "
          f"{labels.mean():.1%} positive")


if __name__ == "__main__":
    main()
