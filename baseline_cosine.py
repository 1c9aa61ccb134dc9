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
with the same metrics, results.json and plots as evaluate.py (into --out_dir; a folder holding the
results of another encoder, pooling, split or data folder is refused unless --overwrite).

Caveat: the bundled default encoder, all-MiniLM-L6-v2, is not untuned for this task: its
sentence-embedding training data include ~100k Quora duplicate-question pairs (see its model card),
so it flatters this baseline and may have seen these very test pairs. The notebook's untuned
encoder was distilbert-base-uncased (--encoder distilbert-base-uncased, with the data preprocessed
with that --encoder too; it needs the model's files in the HF cache or a local folder).
"""
import os
from dataclasses import asdict, dataclass
from typing import Literal

import engine
import report
from cli import WORKERS_RANGE, arg, check_ranges, parse_config, run
from data import open_data_dir, open_splits
from hub import BUNDLED_MODEL, load_tokenizer
from model import Encoder, ModelConfig, load_encoder
from text import vocab_hash


# What each numeric flag may be: (test, the rule in words).
RANGES = {"threshold": (lambda v: -1 <= v <= 1, "in [-1, 1] (a cosine)"),
          "batch_size": (lambda v: v >= 1, "at least 1"), "num_workers": WORKERS_RANGE}


@dataclass
class BaselineConfig:
    data_dir: str = arg("data/qqp", "preprocessed folder, tokenized with --encoder's tokenizer")
    encoder: str = arg(BUNDLED_MODEL, "encoder + tokenizer: HF name or local folder (default: bundled MiniLM)")
    pooling: Literal["cls", "mean"] = arg("cls", "cls (the notebook) or mean over real tokens")
    threshold: float = arg(0.96, "the notebook's fixed cosine threshold")
    split: Literal["test", "train", "validation", "all"] = arg("test", "split to report")
    out_dir: str = arg("runs/baseline_cosine", "results.json, scores, plots")
    overwrite: bool = arg(False, "replace the results of another encoder or input in --out_dir")
    batch_size: int = arg(256, "pairs per batch (2x as many questions per encoder pass)", aliases=["--bs"])
    num_workers: int = arg(0, "DataLoader workers collating batches (4 keep a GPU busy)")
    device: str = arg("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = arg("auto", "auto: bf16 (else fp16) on GPU, fp32 on CPU")
    shapes: Literal[engine.SHAPES] = arg("auto", engine.SHAPES_HELP)
    compile: Literal[engine.COMPILE_MODES] = arg("auto", engine.COMPILE_HELP)


def main(argv=None):
    cfg = parse_config(BaselineConfig, argv, __doc__)
    run(baseline, cfg)


def baseline(cfg):
    check_ranges(cfg, RANGES)
    tok = load_tokenizer(cfg.encoder)
    manifest = open_data_dir(cfg.data_dir, vocab_hash(tok), cfg.encoder)
    this_run = {"script": "baseline_cosine.py", "encoder": cfg.encoder, "pooling": cfg.pooling,
                "input": {"split": cfg.split, "data": report.data_id(manifest)}}
    with report.results_folder(cfg.out_dir, this_run, cfg.overwrite, inputs=(cfg.data_dir,)) as clear:
        score_and_report(cfg, manifest, this_run, clear)


def score_and_report(cfg, manifest, this_run, clear):
    datasets, validation = open_splits(cfg.data_dir, cfg.split)
    rt = engine.setup_runtime(cfg.device, cfg.precision)
    encoder = Encoder(load_encoder(ModelConfig(encoder=cfg.encoder)), cfg.pooling).to(rt.device).eval()
    print(f"cosine baseline: {cfg.encoder} ({encoder.encoder.config.model_type}, "
          f"{sum(p.numel() for p in encoder.parameters()):,} parameters, untuned), {cfg.pooling} pooling")
    clear()  # the inputs are good: another run's results (--overwrite) may go now
    os.makedirs(cfg.out_dir, exist_ok=True)
    # The cosine of each pair's two vectors, through the one inference road (model.Encoder).
    scores_of = engine.Inference(encoder.pair_cosine, "siamese", rt, cfg.batch_size, cfg.shapes, cfg.compile,
                                 cfg.num_workers, max_len=manifest["max_len"])
    thresholds, results = report.report_datasets(scores_of, datasets, validation, {"notebook": cfg.threshold},
                                                 cfg.out_dir, probabilistic=False)  # cosines are not probabilities
    report.write_results(cfg.out_dir, {**this_run, "score": "cosine", "config": asdict(cfg), "split": cfg.split,
                                       "data_dir": os.path.abspath(cfg.data_dir),
                                       "thresholds": thresholds, "results": results})


if __name__ == "__main__":
    main()
