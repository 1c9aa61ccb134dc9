"""A teacher's probabilities for the student to learn from (AugSBERT, Thakur et al. 2021): the
library behind teach.py and train.py --teacher_file.

- mine_pairs: unlabelled pairs among the training split's questions only, each question with its
  nearest neighbours (cosine of an encoder's mean-pooled vectors, or BM25), minus identical
  questions and pairs the split already labels. Validation and test questions never take part.
  mining_encoder loads and checks its encoder first.
- load_teachers / teacher_probabilities: p(duplicate) of one or more checkpoints (their mean: an
  ensemble), each checked first to have been trained on this very folder (so none of them saw its
  validation or test pairs), for the training pairs and the mined ones, plus each teacher's
  validation metrics.
- The teacher file (.npz, written by teach.py):
      pairs   (M, 3) int64    q1, q2, label: the training split's pairs in order (their gold
                              labels), then the mined pairs (label text.NO_LABEL, -1)
      probs   (M,)   float32  the teacher's p(duplicate) of each pair: the student's target
      record  JSON            format, the data folder's fingerprint, teachers, mining, metrics
  load_teacher_file checks that it belongs to the data folder a run trains on.
"""
import json
import os
import zipfile

import numpy as np
import torch

import engine
from cli import UserError
from data import InMemoryPairs, PairDataset, QuestionDataset, fingerprint
from metrics import compute_metrics
from model import load_model, load_question_encoder
from retrieval import BM25, question_inference
from text import NO_LABEL, file_sha256

FORMAT = "qqp-teacher-v1"


# ----------------------------------------------------------------------------- mining

def training_questions(pairs):
    """(Q,) the distinct question ids of a split's (N, 3) pairs, sorted."""
    return np.unique(np.asarray(pairs[:, :2], dtype=np.int64))


def neighbour_pairs(vectors, k, chunk=4096):
    """(P, 2) row pairs (i, j): each row with its k nearest other rows by cosine. vectors (N, H)."""
    v = torch.nn.functional.normalize(torch.from_numpy(np.asarray(vectors, np.float32)), dim=-1)
    k = min(k, len(v) - 1)
    out = []
    for start in range(0, len(v), chunk):
        sim = v[start:start + chunk] @ v.T  # (c, N)
        rows = torch.arange(len(sim))
        sim[rows, rows + start] = -torch.inf  # not itself
        top = sim.topk(k, dim=1).indices  # (c, k)
        out.append(torch.stack([(rows + start)[:, None].expand(-1, k), top], -1).reshape(-1, 2))
    return torch.cat(out).numpy() if out else np.zeros((0, 2), np.int64)


def bm25_pairs(texts, k):
    """(P, 2) row pairs (i, j): each text with its k best other texts by BM25."""
    _, rows = BM25(texts).search(texts, k + 1)  # (N, k+1): itself usually first
    pairs = [(i, j) for i, row in enumerate(rows.tolist()) for j in row if j != i and j >= 0]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def select_mined(candidates, qids, tokens, offsets, labelled, n, seed):
    """From candidate (P, 2) rows into qids, up to n distinct unordered pairs of question ids, at
    random (seeded), none labelled already (either order), none two copies of one text."""
    a, b = qids[candidates[:, 0]], qids[candidates[:, 1]]
    a, b = np.minimum(a, b), np.maximum(a, b)
    pairs = np.unique(np.stack([a, b], 1), axis=0)  # (P', 2), unordered and distinct
    known = {(min(x, y), max(x, y)) for x, y in np.asarray(labelled[:, :2], dtype=np.int64).tolist()}
    text = lambda q: tokens[offsets[q]:offsets[q + 1]].tobytes()
    keep = [(x, y) not in known and text(x) != text(y) for x, y in pairs.tolist()]
    pairs = pairs[np.array(keep, dtype=bool)] if len(pairs) else pairs
    rng = np.random.default_rng(seed)
    pairs = pairs[rng.permutation(len(pairs))[:n]]
    return np.concatenate([pairs, np.full((len(pairs), 1), NO_LABEL)], 1).astype(np.int64)  # (n', 3)


def question_subset(tokens, offsets, qids):
    """Flat tokens and offsets of the questions qids, in that order."""
    lengths = np.diff(offsets)[qids]
    sub = np.concatenate([tokens[offsets[q]:offsets[q + 1]] for q in qids]) if len(qids) else tokens[:0]
    return sub, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def mining_encoder(train, encoder=""):
    """The untuned encoder (model.QuestionEncoder) mine_pairs embeds with (default: the one the
    folder was tokenized for), after checking that it shares the folder's vocabulary: the folder's
    token ids are embedded as they are."""
    manifest = train.manifest
    qe = load_question_encoder(encoder=encoder or manifest["tokenizer"], max_len=manifest["max_len"])
    if qe.record["vocab_hash"] != manifest["vocab_hash"]:
        raise UserError(f"--encoder {encoder}: its vocabulary differs from the one {train.data_dir} was "
                        "tokenized with", "pass an encoder with the folder's vocabulary, or --mine_by bm25")
    return qe


def mine_pairs(train, by, k, n, seed, rt, qe=None, batch_size=256, texts=None, shapes="auto", compile="auto"):
    """(n', 3) mined pairs (q1, q2, NO_LABEL) among the training split's questions, n' <= n.
    by "encoder": cosine of mean-pooled vectors of qe (mining_encoder's); by "bm25": texts[qid]."""
    qids = training_questions(train.pairs)  # (Q,)
    manifest, tokens, offsets = train.manifest, train.tokens, train.offsets
    if by == "encoder":
        qe.to(rt.device)
        sub_tokens, sub_offsets = question_subset(tokens, offsets, qids)
        inference = question_inference(qe, rt, batch_size, shapes, compile)  # qe.max_len is the folder's
        vectors = inference(QuestionDataset(sub_tokens, sub_offsets, manifest["pad_token_id"], qe.max_len),
                            "mining: embedding")
        candidates = neighbour_pairs(vectors, k)
    else:
        candidates = bm25_pairs([texts[q] for q in qids], k)
    return select_mined(candidates, qids, tokens, offsets, train.pairs, n, seed)


# ----------------------------------------------------------------------------- the teacher

def load_teachers(checkpoints, train):
    """[(path, model on the CPU, checkpoint dict)] of each teacher, after checking that it loads and
    was trained on this very folder (train: its training split): one trained elsewhere may have
    seen its validation or test questions."""
    teachers = []
    for path in checkpoints:
        model, ckpt = load_model(path)
        if ckpt["data"].get("fingerprint") != fingerprint(train.manifest):
            raise UserError(f"{path} was trained on {ckpt['data'].get('data_dir')}, not on {train.data_dir} "
                            "(other source, options or split): it may have seen this folder's validation "
                            "or test pairs", f"train the teacher on {train.data_dir} (train.py --data_dir "
                            f"{train.data_dir} --arch cross)")
        teachers.append((path, model, ckpt))
    return teachers


def teacher_probabilities(teachers, train, pairs, rt, batch_size, num_workers=0, shapes="auto", compile="auto"):
    """((M,) mean p(duplicate) of the teachers (load_teachers') over pairs (M, 3) of the folder's
    questions, {"teachers": [...], "validation": metrics of the mean})."""
    manifest = train.manifest
    dataset = InMemoryPairs(train.tokens, train.offsets, pairs, manifest["pad_token_id"])
    validation = PairDataset(train.data_dir, "validation")
    probs, val_probs, records = [], [], []
    for path, model, ckpt in teachers:
        model.to(rt.device)
        score = engine.Inference(model.probability, model.cfg.arch, rt, batch_size, shapes, compile, num_workers,
                                 max_len=ckpt["data"]["max_len"])
        probs.append(score(dataset, f"teacher {os.path.basename(os.path.dirname(os.path.abspath(path)))}"))
        val_probs.append(score(validation, "teacher on validation"))
        m = compute_metrics(validation.labels, val_probs[-1], 0.5)
        records.append({"checkpoint": os.path.abspath(path), "sha256": file_sha256(path), "arch": model.cfg.arch,
                        "step": ckpt.get("step"), "validation": summary_metrics(m)})
        model.cpu()  # one teacher on the device at a time
    mean_val = compute_metrics(validation.labels, np.mean(val_probs, 0), 0.5)
    return np.mean(probs, 0).astype(np.float32), {"teachers": records, "validation": summary_metrics(mean_val)}


def summary_metrics(m):
    return {k: round(float(m[k]), 5) for k in ("accuracy", "f1", "average_precision", "log_loss")}


# ----------------------------------------------------------------------------- the file

def save_teacher_file(path, pairs, probs, record):
    """Written whole or not at all: a temp file, then one rename; a failed write (a full disk)
    removes the temp file."""
    tmp = f"{path}.tmp-{os.getpid()}.npz"  # two runs never share one
    try:
        np.savez(tmp, pairs=pairs.astype(np.int64), probs=probs.astype(np.float32),
                 record=np.array(json.dumps({"format": FORMAT, **record})))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_teacher_file(path, train):
    """(pairs (M, 3), probs (M,), record) of a teacher file, after checking that it belongs to the
    data folder of `train` (the training split's PairDataset) and is intact."""
    fix = f"re-run python teach.py --data_dir {train.data_dir} --teacher CKPT --out {path} --overwrite"
    if not os.path.isfile(path):
        raise UserError(f"--teacher_file {path}: no such file", f"make it with python teach.py --data_dir "
                        f"{train.data_dir} --teacher CKPT --out {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            pairs, probs, record = f["pairs"], f["probs"], json.loads(str(f["record"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # BadZipFile: a truncated .npz
        raise UserError(f"{path}: not a teacher file teach.py wrote ({type(e).__name__})", fix) from None
    if not isinstance(record, dict) or probs.ndim != 1 or not np.issubdtype(probs.dtype, np.floating) or \
            not np.issubdtype(pairs.dtype, np.integer):
        raise UserError(f"{path}: not a teacher file teach.py wrote (its record, probs or pairs are of another kind)",
                        fix)
    if record.get("format") != FORMAT:
        raise UserError(f"{path}: format {record.get('format')}, this code reads {FORMAT}", fix)
    if record.get("data_fingerprint") != fingerprint(train.manifest):
        raise UserError(f"{path} was made for {record.get('data_dir')}, not for {train.data_dir}",
                        f"pass the --data_dir it was made for, or {fix}")
    n = len(train)
    if pairs.ndim != 2 or pairs.shape[1] != 3 or len(probs) != len(pairs) or len(pairs) < n or \
            not np.array_equal(pairs[:n], np.asarray(train.pairs, dtype=np.int64)) or \
            (pairs[n:, 2] != NO_LABEL).any() or pairs[:, :2].max() >= len(train.offsets) - 1 or \
            pairs[:, :2].min() < 0 or \
            not (np.isfinite(probs) & (probs >= 0) & (probs <= 1)).all():
        raise UserError(f"{path}: its pairs or probabilities do not fit {train.data_dir}'s training split: "
                        "the file is damaged", fix)
    return pairs, probs, record
