"""Finding the questions already asked that a new question duplicates: the library behind index.py,
search.py and bench.py's search stage.

- read_questions: a Kaggle train.csv or any pairs CSV/TSV (each distinct question once, by qid where
  the file has qids: text.index_questions), a CSV/TSV with a question column, a .txt with one
  question a line, or a preprocessed data folder (it keeps token ids only, so its texts are re-read
  from the source it records: question i of the folder is row i of the index). Unusable rows come
  back as rejects, never dropped silently.
- QuestionEncoder: a siamese checkpoint's encoder (and its pair classifier, for reranking) or an
  untuned encoder (--encoder), with its tokenizer, max length and a fingerprint of its weights.
- The index folder, written at once by data.write_data_dir (temp folder, then one rename):
      vectors.npy      (N, H) float16  L2-normalized question vectors, memory-mapped when read
      norms.npy        (N,)   float32  their norms before normalizing: the classifier head was
                                       trained on the unnormalized pooled vectors
      questions.jsonl  one {"id", "text"} per row
      ann.npy          optional: a serialized faiss IVF index over the same vectors (fp16 codes)
      manifest.json    format, model record and fingerprint, count, dimension, sources, ANN settings
- Search: exact (chunked torch matmul, fp32 on the CPU where fp16 matmuls are slow, fp16 on a GPU),
  ANN (faiss IVF; nprobe calibrated at build time to recall@10 >= 0.95 of exact), BM25 (bm25s, the
  lexical baseline); rerank re-scores the top candidates with the checkpoint's pair classifier.
- The retrieval benchmark (eval_protocol, ranking_metrics) and speed (measure_speed, bench_search).
"""
import csv
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from functools import cached_property, partial

import numpy as np
import torch

import engine
from cli import UserError
from data import SPLITS, PairDataset, QuestionDataset, file_sha256, fingerprint, load_manifest, write_data_dir
from report import file_stem
from text import (QUESTION1_COLUMNS, find_column, index_questions, open_lines, read_pairs, tokenize,
                  vocab_hash)

INDEX_FORMAT = "qqp-question-index-v1"
QUESTION_COLUMNS = ("question", "text", "question_text", "title", "sentence", "query")
QUESTION_ID_COLUMNS = ("qid", "id", "question_id")
ANN_RECALL_TARGET = 0.95  # of exact top-10: the nprobe an index is built with reaches this on its own rows
DEFAULT_MAX_LEN = 128     # tokens per question for an untuned --encoder (preprocess.py's default)
KAGGLE_ROWS, KAGGLE_QUESTIONS = 404_290, 537_933  # Kaggle's train.csv: rows and distinct qids


# ----------------------------------------------------------------------------- questions in

@dataclass
class Questions:
    """The usable questions of one input, in file order. ids: the file's question ids where it has
    them (by_id), else where each question was found (file:line). An index keeps one row per
    distinct id (by_id) or distinct text."""
    texts: list
    ids: list
    by_id: bool
    rejects: list       # (row, line, reason)
    rows_read: int
    source: dict        # path, kind and a content hash: what an index records about its inputs


def read_questions(path, distinct=True):
    """Questions of a folder or file (see the module docstring). distinct=False keeps every usable
    row of a question file (queries: one result block per row); pairs files always give their
    distinct questions."""
    if os.path.isdir(path):
        return data_folder_questions(path)
    if os.path.basename(path).lower().endswith((".txt", ".txt.gz")):
        qs = text_file_questions(path)
    else:
        qs = table_questions(path)
    return first_of_each(qs) if distinct else qs


def text_file_questions(path):
    texts, ids, rejects, line_no = [], [], [], 0
    for line_no, line in enumerate(open_lines(path), 1):
        if line.strip():
            texts.append(line.strip())
            ids.append(f"{file_stem(path)}:{line_no}")
        else:
            rejects.append((line_no, line_no, "empty line"))
    if not texts:
        raise UserError(f"{path}: {'no lines' if not line_no else 'every line is empty'}",
                        "pass a .txt with one question a line")
    return Questions(texts, ids, False, rejects, line_no, source_record(path, "text file"))


def table_questions(path):
    """A CSV/TSV with a question column (and maybe an id column); a pairs file (question1 and
    question2 columns) gives its distinct questions."""
    lines = open_lines(path)
    first = next(lines, "")
    if not first.strip():
        raise UserError(f"{path}: the file is empty", "pass a CSV/TSV with a question column, or a .txt "
                        "with one question a line")
    delimiter = "\t" if ".tsv" in os.path.basename(path).lower() or first.count("\t") > first.count(",") else ","
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL  # as text.read_pairs reads TSVs
    header = next(csv.reader([first], delimiter=delimiter, quoting=quoting))
    if find_column(header, QUESTION1_COLUMNS, path, None) is not None:
        return pair_file_questions(path)
    col = find_column(header, QUESTION_COLUMNS, path, None)
    if col is None:
        raise UserError(f"{path}: no question column (looked for {', '.join(QUESTION_COLUMNS)}, and for "
                        f"question1/question2 of a pairs file; found {', '.join(header)})",
                        "name the column 'question', or pass a .txt with one question a line")
    id_col = find_column(header, QUESTION_ID_COLUMNS, path, None)
    texts, ids, rejects, row_no, start = [], [], [], 0, 2
    reader = csv.reader(lines, delimiter=delimiter, quoting=quoting, strict=False)
    try:
        for row_no, fields in enumerate(reader, 1):
            if len(fields) != len(header):
                rejects.append((row_no, start, "blank line" if not fields else
                                f"malformed: {len(fields)} fields, header has {len(header)}"))
            elif not fields[col].strip():
                rejects.append((row_no, start, "empty question"))
            elif id_col is not None and not fields[id_col].strip():
                rejects.append((row_no, start, "empty id"))
            else:
                texts.append(fields[col].strip())
                ids.append(fields[id_col].strip() if id_col is not None else f"{file_stem(path)}:{start}")
            start = reader.line_num + 2  # the file line where the next row starts (header is line 1)
    except csv.Error as e:
        raise UserError(f"{path}: cannot parse the row starting at line {start} ({e})",
                        "check the quoting on that line") from None
    if not texts:
        raise UserError(f"{path}: none of its {row_no} rows is usable" + (
            f" (first: row {rejects[0][0]}, {rejects[0][2]})" if rejects else ""), "check the question column")
    return Questions(texts, ids, id_col is not None, rejects, row_no, source_record(path, "question file"))


def pair_file_questions(path, require_label=False):
    """The distinct questions of a pairs file in text.index_questions' order (a data folder's)."""
    pairs, rejects, rows_read = read_pairs(path, require_label=require_label)
    q1, q2, texts, _ = index_questions(pairs)
    by_id = pairs["qid1"] is not None
    ids = [None] * len(texts)
    for col, qids, which in ((q1, pairs["qid1"], "q1"), (q2, pairs["qid2"], "q2")):
        for i, j in enumerate(col.tolist()):
            if ids[j] is None:  # the first place it occurs, in index_questions' order
                ids[j] = qids[i] if by_id else f"{file_stem(path)}:{pairs['row'][i]}:{which}"
    return Questions(texts, ids, by_id, rejects, rows_read, source_record(path, "pairs file"))


def data_folder_questions(data_dir):
    """A preprocessed folder's questions, texts[i] = its question i, re-read from its source."""
    manifest = load_manifest(data_dir)
    source = manifest["source"]
    if not os.path.isfile(source) or file_sha256(source) != manifest["source_sha256"]:
        raise UserError(f"{data_dir} keeps token ids only, and the file it was made from ({source}), "
                        "whose texts the index needs, is missing or has changed",
                        f"restore {source}, or pass a pairs or question file instead of the folder")
    # preprocess.py reads with labels required: rows with a bad label are not in the folder either.
    qs = pair_file_questions(source, require_label=True)
    if len(qs.texts) != manifest["counts"]["questions"]:
        raise UserError(f"{data_dir} holds {manifest['counts']['questions']:,} questions, its source now "
                        f"reads as {len(qs.texts):,}: the folder was made by other code",
                        f"re-run python preprocess.py {source} --out_dir {data_dir}")
    qs.source = {"path": os.path.abspath(data_dir), "kind": "data folder", "content": folder_content(manifest)}
    return qs


def folder_content(manifest):
    """What identifies a data folder's questions among an index's sources."""
    return hashlib.sha256(fingerprint(manifest).encode()).hexdigest()[:16]


def source_record(path, kind):
    return {"path": os.path.abspath(path), "kind": kind, "content": file_sha256(path)[:16]}


def first_of_each(qs, known=()):
    """The questions whose key (id, or text for files without ids) is neither in `known` nor
    earlier in the file; the others are counted in qs.source["skipped"]."""
    seen, keep = set(known), []
    for i, key in enumerate(qs.ids if qs.by_id else qs.texts):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    skipped = len(qs.texts) - len(keep)
    return Questions([qs.texts[i] for i in keep], [qs.ids[i] for i in keep], qs.by_id, qs.rejects,
                     qs.rows_read, {**qs.source, "skipped": qs.source.get("skipped", 0) + skipped})


# ----------------------------------------------------------------------------- the encoder

@dataclass
class QuestionEncoder:
    """What turns question texts into vectors, and what an index records about it."""
    module: torch.nn.Module   # the weights (the whole classifier for a checkpoint)
    encode: object            # (ids (n, L), mask (n, L)) -> (n, H) pooled vectors
    tokenizer: object
    max_len: int
    pad_id: int
    record: dict              # kind, checkpoint or encoder, pooling, max_len, vocab_hash, fingerprint
    classifier: object = None  # the checkpoint's SiameseClassifier; None for an untuned encoder

    def to(self, device):
        self.module.to(device)
        return self


def load_question_encoder(checkpoint="", encoder="", max_len=0):
    """A siamese checkpoint's encoder and classifier, or an untuned HF encoder with mean pooling
    (what sentence-embedding models such as the bundled MiniLM are trained with)."""
    from model import ModelConfig, encode, load_encoder, load_model
    from text import checkpoint_tokenizer, load_tokenizer
    if checkpoint:
        model, ckpt = load_model(checkpoint)
        if model.cfg.arch != "siamese":
            raise UserError(f"{checkpoint} is a cross-encoder: it reads both questions together and has "
                            "no vector per question", "index with a siamese checkpoint (train.py's default "
                            "--arch), or with --encoder for an untuned one")
        data = ckpt["data"]
        record = {"kind": "checkpoint", "checkpoint": os.path.abspath(checkpoint), "step": ckpt.get("step"),
                  "encoder": model.cfg.encoder, "pooling": model.cfg.pooling, "max_len": data["max_len"],
                  "vocab_hash": data["vocab_hash"]}
        qe = QuestionEncoder(model, model.encode, checkpoint_tokenizer(checkpoint, data), data["max_len"],
                             data["pad_token_id"], record, classifier=model)
    else:
        module = load_encoder(ModelConfig(encoder=encoder)).eval()
        tok = load_tokenizer(encoder)
        max_len = max_len or DEFAULT_MAX_LEN
        record = {"kind": "encoder", "encoder": encoder, "pooling": "mean", "max_len": max_len,
                  "vocab_hash": vocab_hash(tok)}
        qe = QuestionEncoder(module, partial(encode, module, pooling="mean"), tok, max_len,
                             tok.pad_token_id or 0, record)
    qe.record["fingerprint"] = weights_fingerprint(qe.module, qe.record)
    return qe


def weights_fingerprint(module, record):
    """16 hex digits over every weight and what shapes the vectors (pooling, max length, vocabulary):
    equal fingerprints give equal vectors, wherever the checkpoint file lives."""
    h = hashlib.sha256(json.dumps([record[k] for k in ("pooling", "max_len", "vocab_hash")]).encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def describe_model(record):
    if record["kind"] == "checkpoint":
        return f"checkpoint {record['checkpoint']} (step {record.get('step')}, {record['pooling']} pooling)"
    return f"untuned encoder {record['encoder']} ({record['pooling']} pooling)"


def embed_texts(qe, texts, rt, batch_size=256, num_workers=0, desc="embedding", verbose=True):
    """(N, H) float32 pooled vectors of texts, each distinct text encoded once, through
    engine.embed (length-sorted batches, the scoring device path)."""
    unique, inverse = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
    tokens, offsets, _, n_unreadable = tokenize(qe.tokenizer, unique.tolist(), qe.max_len)
    if n_unreadable and verbose:
        print(f"note: {n_unreadable:,} questions tokenize to nothing but [UNK] (emoji, other scripts): "
              "their vectors carry no content")
    pooled = engine.embed(qe.encode, QuestionDataset(tokens, offsets, qe.pad_id), rt, batch_size,
                          num_workers, qe.max_len, desc, verbose)
    if not np.isfinite(pooled).all():
        raise UserError(f"{desc}: {int((~np.isfinite(pooled).all(1)).sum())} vectors are NaN or inf",
                        "retry with --precision fp32 to rule out reduced precision")
    return pooled[inverse.reshape(-1)]


def unit(vectors):
    """(N, H) -> L2-normalized rows, and the norms they had."""
    norms = np.linalg.norm(vectors, axis=1).astype(np.float32)
    return vectors / np.maximum(norms, 1e-12)[:, None], norms


# ----------------------------------------------------------------------------- the index folder

class Index:
    """An index folder opened for searching: the manifest checked, the vectors memory-mapped."""

    def __init__(self, path):
        manifest = read_index_manifest(path)
        if manifest is None:
            raise UserError(f"{path}: not an index folder (no manifest.json)",
                            f"build one: python index.py out/ckpt.pt questions.csv --out_dir {path}")
        damaged = [name for name, rec in manifest["files"].items()
                   if not os.path.isfile(os.path.join(path, name))
                   or os.path.getsize(os.path.join(path, name)) != rec["bytes"]]
        if damaged:
            raise UserError(f"{os.path.join(path, damaged[0])} is missing or not the size the manifest "
                            "records: the index is damaged", rebuild_fix(manifest, path))
        self.path, self.manifest = path, manifest
        self.vectors = np.load(os.path.join(path, "vectors.npy"), mmap_mode="r")  # (N, H) float16
        self.norms = np.load(os.path.join(path, "norms.npy"))  # (N,)
        self._matrix = None

    def __len__(self):
        return len(self.vectors)

    @cached_property
    def questions(self):
        """(ids, texts) of every row."""
        with open(os.path.join(self.path, "questions.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        return [r["id"] for r in rows], [r["text"] for r in rows]

    def matrix(self, device):
        """The vectors as one torch matrix for exact search (search_matrix), made once."""
        if self._matrix is None or self._matrix.device != device:
            self._matrix = search_matrix(self.vectors, device)
        return self._matrix

    @cached_property
    def ann(self):
        if self.manifest.get("ann") is None:
            raise UserError(f"{self.path} has no ANN index", f"add one (the vectors are reused): "
                            f"{rebuild_command(self.manifest, self.path)} --ann")
        faiss = import_faiss()
        return faiss.deserialize_index(np.load(os.path.join(self.path, "ann.npy")))

    def rerank_vectors(self, rows):
        """(..., H) float32 unnormalized vectors of these rows, as the classifier head takes them."""
        safe = np.maximum(rows, 0)
        return np.asarray(self.vectors[safe.reshape(-1)], np.float32).reshape(*rows.shape, -1) * \
            self.norms[safe][..., None]


def search_matrix(vectors, device):
    """Unit vectors (N, H) as one torch matrix for exact search: fp32 on the CPU (measured on 2
    AVX2 cores: fp16 matmuls ~4x slower than fp32, and converting chunk by chunk per search costs
    more than the search), fp16 on a GPU. Always a copy: the memory-mapped file stays read-only."""
    dtype = np.float32 if device.type == "cpu" else np.float16
    return torch.from_numpy(np.array(vectors, dtype)).to(device)


def read_index_manifest(path):
    """The manifest of an index folder; None where there is none; a UserError for a folder that is
    something else (a data folder, other files), which an index must never replace."""
    mpath = os.path.join(path, "manifest.json")
    if not os.path.isfile(mpath):
        return None
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{mpath}: unreadable ({type(e).__name__})", "delete the folder and build the "
                        "index again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        found = manifest.get("format", "a data folder" if "format_version" in manifest else None) \
            if isinstance(manifest, dict) else None
        raise UserError(f"{path}: not a question index of this code (its manifest says {found})",
                        "pass an index folder index.py wrote (and never a data folder as --out_dir)")
    return manifest


def rebuild_command(manifest, path):
    m = manifest["model"]
    model = m["checkpoint"] if m["kind"] == "checkpoint" else f"--encoder {m['encoder']}"
    return f"python index.py {model} {manifest['sources'][0]['path']} --out_dir {path}"


def rebuild_fix(manifest, path):
    more = " (then --add its other sources)" if len(manifest["sources"]) > 1 else ""
    return f"rebuild it: {rebuild_command(manifest, path)} --rebuild{more}"


def write_index(out_dir, vectors, norms, ids, texts, manifest, ann=None, rejects=None):
    """The index folder, written at once (data.write_data_dir: temp folder, rename): vectors as
    float16 unit rows, their norms, the questions, an optional ANN index, rejects.tsv (text) where
    an input had unusable rows, the manifest."""
    manifest = {k: v for k, v in manifest.items() if k != "files"}  # write_data_dir lists them anew
    manifest.update(format=INDEX_FORMAT, count=len(vectors), dim=int(vectors.shape[1]), dtype="float16")
    arrays = {"vectors.npy": np.asarray(vectors, np.float16), "norms.npy": np.asarray(norms, np.float32)}
    if ann is not None:
        arrays["ann.npy"] = import_faiss().serialize_index(ann)  # uint8 bytes
    files = {"questions.jsonl": "".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n"
                                        for i, t in zip(ids, texts))}
    if rejects:
        files["rejects.tsv"] = rejects
    return write_data_dir(out_dir, arrays, files, manifest)


def index_rejects(base, questions=None):
    """rejects.tsv of an index: the unusable rows of each of its inputs (base: the index it extends,
    or None), with the input they came from; None when there are none."""
    old = ""
    if base is not None and os.path.isfile(os.path.join(base.path, "rejects.tsv")):
        with open(os.path.join(base.path, "rejects.tsv"), encoding="utf-8") as f:
            old = "".join(f.readlines()[1:])
    new = "".join(f"{questions.source['path']}\t{row}\t{line}\t{reason}\n"
                  for row, line, reason in (questions.rejects if questions is not None else []))
    return "source\trow\tline\treason\n" + old + new if old or new else None


# ----------------------------------------------------------------------------- search

@torch.inference_mode()
def exact_search(matrix, queries, k, query_batch=256, chunk_rows=65_536):
    """Top-k cosines of unit queries (Q, H) against the unit matrix (N, H) (Index.matrix), a chunk
    of rows at a time so the (Q, N) scores never exist at once: (Q, k) float32 scores, int64 rows."""
    out_scores, out_rows = [], []
    for qs in range(0, len(queries), query_batch):
        q = torch.as_tensor(np.asarray(queries[qs:qs + query_batch]), device=matrix.device).to(matrix.dtype)
        best_s = torch.empty(len(q), 0, device=matrix.device)
        best_r = torch.empty(len(q), 0, dtype=torch.int64, device=matrix.device)
        for start in range(0, len(matrix), chunk_rows):
            s, r = (q @ matrix[start:start + chunk_rows].T).float().topk(min(k, len(matrix) - start), dim=1)
            s, pick = torch.cat([best_s, s], 1).topk(min(k, best_s.shape[1] + s.shape[1]), dim=1)
            best_r, best_s = torch.cat([best_r, r + start], 1).gather(1, pick), s
        out_scores.append(best_s.cpu())
        out_rows.append(best_r.cpu())
    return torch.cat(out_scores).numpy(), torch.cat(out_rows).numpy()


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise UserError("the ANN backend needs faiss", "pip install faiss-cpu (or faiss-gpu)") from None
    return faiss


def build_ann(vectors, seed=0, n_calibration=200):
    """An IVF index (faiss, inner product, fp16 codes) over unit vectors (N, H): 2 sqrt(N) lists
    (at least 39 training vectors each), trained on a sample; then the smallest nprobe whose
    recall@10 against exact search reaches ANN_RECALL_TARGET on a sample of the index's own rows
    (each excluded from its own answers). Returns (index, record for the manifest)."""
    faiss = import_faiss()
    t0 = time.perf_counter()
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = x.shape
    nlist = max(1, min(int(2 * math.sqrt(n)), n // 39))
    rng = np.random.default_rng(seed)
    # fp16 codes: half IndexIVFFlat's memory, measured as fast (the scan is memory-bound)
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, nlist, faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.train(x[np.sort(rng.choice(n, min(n, 64 * nlist), replace=False))])
    index.add(x)
    k = min(10, n - 1)
    rows = np.sort(rng.choice(n, min(n, n_calibration), replace=False))
    exact = exclude_rows(partial(exact_search, torch.from_numpy(x), x[rows]), k, rows[:, None])[1]
    recalls, nprobe = {}, 1
    while True:
        index.nprobe = nprobe
        found = exclude_rows(partial(ann_search, index, x[rows], nprobe=nprobe), k, rows[:, None])[1]
        recalls[nprobe] = round(overlap(found, exact), 4)
        if recalls[nprobe] >= ANN_RECALL_TARGET or nprobe >= nlist:
            break
        nprobe = min(2 * nprobe, nlist)
    return index, {"kind": "faiss IndexIVFScalarQuantizer (fp16)", "nlist": nlist, "nprobe": nprobe, "seed": seed,
                   "calibration": {"queries": len(rows), f"recall_at_{k}_vs_exact_by_nprobe": recalls},
                   "build_seconds": round(time.perf_counter() - t0, 2)}


def ann_search(index, queries, k, nprobe):
    """(Q, k) inner products and rows from a faiss IVF index; rows -1 where the probed lists hold
    fewer than k vectors."""
    index.nprobe = nprobe
    scores, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return scores, rows.astype(np.int64)


class BM25:
    """The lexical baseline: bm25s (Lucene's BM25, k1 1.5, b 0.75) over lower-cased words, English
    stop words removed, no stemming."""

    def __init__(self, texts):
        import bm25s
        self.bm25s = bm25s
        self.retriever, self.n = bm25s.BM25(), len(texts)
        self.retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)

    def search(self, texts, k):
        tokens = self.bm25s.tokenize(texts, stopwords="en", show_progress=False)
        rows, scores = self.retriever.retrieve(tokens, k=min(k, self.n), show_progress=False)
        return scores.astype(np.float32), rows.astype(np.int64)


def exclude_rows(search_fn, k, exclude):
    """Top-k of search_fn(k') -> (Q, k') scores, rows, without each query's excluded rows
    (exclude (Q, E); E may be 0): fetches k + E, drops them, keeps the first k (rows -1 where
    fewer are left)."""
    scores, rows = search_fn(k=k + exclude.shape[1])
    keep = (rows >= 0) & ~(rows[:, :, None] == exclude[:, None, :]).any(2)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept ones first, in rank order
    scores, rows = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
    dropped = ~np.take_along_axis(keep, order, 1)
    return np.where(dropped, -np.inf, scores).astype(np.float32), np.where(dropped, -1, rows)


def overlap(found, exact):
    """Mean share of each query's exact top-k rows that `found` also returns (recall vs exact)."""
    return float(np.mean([len(set(f[f >= 0]) & set(e[e >= 0])) / max(1, (e >= 0).sum())
                          for f, e in zip(found, exact)]))


@torch.inference_mode()
def duplicate_probability(classifier, queries_pooled, candidates, rt):
    """The pair classifier's duplicate probability of each (query, candidate): queries_pooled (Q, H)
    unnormalized pooled query vectors, candidates (Q, C, H) unnormalized index vectors -> (Q, C)."""
    q, c, h = candidates.shape
    u = torch.from_numpy(np.ascontiguousarray(queries_pooled, np.float32))[:, None].expand(q, c, h)
    u, v = u.reshape(-1, h).to(rt.device), torch.from_numpy(candidates.reshape(-1, h)).to(rt.device)
    with rt.autocast():
        logits = classifier.pair_logits(u, v)  # (Q*C, 2)
        if classifier.cfg.symmetric:  # as SiameseClassifier.forward: both orders averaged
            logits = (logits + classifier.pair_logits(v, u)) / 2
    return logits.float().softmax(-1)[:, 1].reshape(q, c).cpu().numpy()


def rerank(classifier, queries_pooled, index, scores, rows, rt, query_batch=256):
    """Candidates (Q, C) reordered by the classifier's probability (cosine breaks ties): (scores,
    rows, probabilities), each (Q, C); missing candidates (row -1) stay last. query_batch queries
    at a time: their (query_batch, C, H) candidate vectors are what memory holds."""
    probs = np.concatenate([duplicate_probability(classifier, queries_pooled[b:b + query_batch],
                                                  index.rerank_vectors(rows[b:b + query_batch]), rt)
                            for b in range(0, len(rows), query_batch)])
    probs = np.where(rows >= 0, probs, -np.inf)
    order = np.lexsort((-scores, -probs), axis=1)
    return tuple(np.take_along_axis(a, order, 1) for a in (scores, rows, probs))


# ----------------------------------------------------------------------------- the benchmark

def check_index_of_folder(index, data_dir):
    """The benchmark reads question i of the folder as row i of the index: the index must hold
    exactly that folder's questions."""
    sources = index.manifest["sources"]
    if len(sources) != 1 or sources[0]["kind"] != "data folder" or \
            sources[0]["content"] != folder_content(load_manifest(data_dir)):
        raise UserError(f"the benchmark needs an index of exactly {data_dir}'s questions (row i = its question "
                        f"i); {index.path} holds those of {', '.join(s['path'] for s in sources)}",
                        "build one: " + rebuild_command({**index.manifest, "sources": [{"path": data_dir}]},
                                                        "NEW_INDEX"))


def eval_protocol(data_dir, n_questions):
    """The retrieval benchmark of a data folder (question i = index row i). Queries: every test
    question with a labelled duplicate in the test split; relevant: its duplicates, the transitive
    closure of the test split's positive pairs, never itself; the corpus: every question of every
    split except the query. Returns (queries (Q,), relevant: list of Q arrays, outside (O,): rows
    in no split, kept out of the corpus too)."""
    from splits import components
    test = PairDataset(data_dir, "test").pairs.astype(np.int64)
    pos = test[(test[:, 2] == 1) & (test[:, 0] != test[:, 1])][:, :2]
    group = components(n_questions, pos[:, 0], pos[:, 1])
    queries = np.unique(pos)
    members = {}
    for q in queries.tolist():
        members.setdefault(group[q], []).append(q)
    relevant = [np.array([m for m in members[group[q]] if m != q], np.int64) for q in queries.tolist()]
    in_split = np.zeros(n_questions, bool)
    for split in SPLITS:
        in_split[PairDataset(data_dir, split).pairs[:, :2].reshape(-1)] = True
    return queries, relevant, np.flatnonzero(~in_split)


def ranking_metrics(rows, relevant, ks=(1, 5, 10)):
    """Retrieval metrics of ranked rows (Q, K) (-1: nothing) against each query's relevant rows:
    recall@k (share of its relevant rows in the top k), MRR@K (1 / rank of the first relevant one,
    0 if none in the top K), nDCG@K (binary gains). Means over queries, and per-query values."""
    hits = np.array([np.isin(r, rel) & (r >= 0) for r, rel in zip(rows, relevant)])  # (Q, K)
    n_rel = np.array([len(rel) for rel in relevant])
    depth = rows.shape[1]
    ks = [k for k in ks if k <= depth]
    discount = 1 / np.log2(np.arange(2, depth + 2))
    first = np.where(hits.any(1), hits.argmax(1) + 1, 0)  # 1-based rank of the first hit, 0 = none
    per_query = {f"recall@{k}": hits[:, :k].sum(1) / n_rel for k in ks}
    per_query[f"mrr@{depth}"] = np.where(first > 0, 1 / np.maximum(first, 1), 0.0)
    per_query[f"ndcg@{depth}"] = (hits * discount).sum(1) / np.cumsum(discount)[np.minimum(n_rel, depth) - 1]
    means = {name: float(v.mean()) for name, v in per_query.items()}
    return {**means, "queries": len(rows)}, {**per_query, "first_relevant_rank": first}


# ----------------------------------------------------------------------------- speed

def percentiles_ms(seconds):
    return {"p50_ms": 1e3 * float(np.percentile(seconds, 50)), "p95_ms": 1e3 * float(np.percentile(seconds, 95))}


def measure_speed(vectors, queries, rt, k=10, query_batch=64, n_single=30, exclude=None, ann=None, seed=0):
    """Latency of top-k search over unit vectors (N, H) for unit queries (Q, H): exact one query at
    a time and in batches of query_batch (per query: batch time / its queries), ANN one query at a
    time (its use), each as p50/p95 ms over the queries (batches); ANN recall@k against exact on
    the same queries; sizes on disk (fp16 vectors, norms, serialized ANN) and held in memory by a
    search process (the exact matrix, the ANN index). exclude (Q, E): rows kept out of each query's
    answers (its own row when queries are index rows). ann: (index, record), built here if None."""
    exclude = np.zeros((len(queries), 0), np.int64) if exclude is None else exclude
    matrix = search_matrix(vectors, rt.device)
    exact_fn = partial(exact_search, matrix)
    exclude_rows(partial(exact_fn, queries[:query_batch]), k, exclude[:query_batch])  # warm-up
    single = []
    for i in range(min(n_single, len(queries))):
        t0 = time.perf_counter()
        exclude_rows(partial(exact_fn, queries[i:i + 1]), k, exclude[i:i + 1])
        single.append(time.perf_counter() - t0)
    batched, exact_rows = [], []
    for b in range(0, len(queries), query_batch):
        t0 = time.perf_counter()
        exact_rows.append(exclude_rows(partial(exact_fn, queries[b:b + query_batch], query_batch=query_batch), k,
                                       exclude[b:b + query_batch])[1])
        if len(exact_rows[-1]) == query_batch or b == 0:  # a short last batch is not what batching costs
            batched.append((time.perf_counter() - t0) / len(exact_rows[-1]))
    exact_rows = np.concatenate(exact_rows)
    index, record = ann if ann is not None else build_ann(vectors, seed, n_calibration=100)
    ann_times, ann_rows = [], []
    for i in range(len(queries)):
        t0 = time.perf_counter()
        ann_rows.append(exclude_rows(partial(ann_search, index, queries[i:i + 1], nprobe=record["nprobe"]), k,
                                     exclude[i:i + 1])[1])
        ann_times.append(time.perf_counter() - t0)
    ann_bytes = import_faiss().serialize_index(index).nbytes
    n, dim = vectors.shape
    return {"vectors": n, "dim": dim, "queries": len(queries), "k": k, "device": str(rt.device),
            "exact": {**{f"single_{p}": v for p, v in percentiles_ms(single).items()},
                      **{f"batched_{p}": v for p, v in percentiles_ms(batched).items()},
                      "single_queries": len(single), "query_batch": query_batch, "batches": len(batched)},
            "ann": {**percentiles_ms(ann_times), **record,
                    f"recall_at_{k}_vs_exact": overlap(np.concatenate(ann_rows), exact_rows)},
            "disk_mb": (n * dim * 2 + n * 4 + ann_bytes) / 1e6,
            "memory_mb": {"exact_matrix": matrix.numel() * matrix.element_size() / 1e6, "ann": ann_bytes / 1e6}}


def bench_search(encoder, questions_path, rt, batch_size=256, seed=0, rows=404_290, sample=4096, n_queries=256,
                 embed_all=False, index_path=""):
    """bench.py's search stage. Index build speed: questions/s of tokenizing and embedding `sample`
    distinct questions of questions_path with `encoder` (all of them with embed_all; a small sample
    pads more: its length-sorted batches each span a wider range of lengths). Search speed
    over the questions of a Kaggle-like file of `rows` rows (537,933 for Kaggle's 404,290): the
    embedded questions with embed_all (their own rows as queries, each excluded from its answers),
    the vectors of an index.py folder with index_path (and its own ANN index), else random unit
    vectors of the encoder's dimension as corpus and queries (embedding 538k questions took 52
    minutes on 2 CPU cores; exact search costs the same on any vectors, while ANN is at its worst
    on random ones, which have no neighbourhoods)."""
    corpus_size = round(rows * KAGGLE_QUESTIONS / KAGGLE_ROWS)
    qs = read_questions(questions_path)
    rng = np.random.default_rng(seed)
    texts = qs.texts if embed_all else [qs.texts[i] for i in rng.choice(len(qs.texts), min(sample, len(qs.texts)),
                                                                        replace=False)]
    qe = load_question_encoder(encoder=encoder).to(rt.device)
    embed_texts(qe, texts[:batch_size], rt, batch_size, verbose=False)  # warm-up: first-call imports, kernels
    t0 = time.perf_counter()
    vectors, _ = unit(embed_texts(qe, texts, rt, batch_size, verbose=False))
    build = {"questions": len(texts), "seconds": time.perf_counter() - t0, "encoder": encoder}
    build["questions_per_sec"] = build["questions"] / build["seconds"]
    ann = None
    if index_path:
        index = Index(index_path)
        kind = f"{len(index):,} embedded questions of the index {index_path} ({describe_model(index.manifest['model'])})"
        picks = np.sort(rng.choice(len(index), min(n_queries, len(index)), replace=False))
        vectors, queries, exclude = index.vectors, np.asarray(index.vectors[picks], np.float32), picks[:, None]
        if index.manifest.get("ann") is not None:
            ann = index.ann, index.manifest["ann"]
    elif embed_all:
        kind = f"{len(texts):,} embedded questions of {os.path.basename(questions_path)}"
        picks = np.sort(rng.choice(len(vectors), min(n_queries, len(vectors)), replace=False))
        queries, exclude = vectors[picks], picks[:, None]
    else:
        kind = f"{corpus_size:,} random unit vectors (dimension {vectors.shape[1]})"
        vectors = random_unit_vectors(corpus_size, vectors.shape[1], rng)
        queries, exclude = random_unit_vectors(n_queries, vectors.shape[1], rng), None
    return {"build": build, "corpus": kind,
            **measure_speed(np.asarray(vectors, np.float16), queries, rt, exclude=exclude, ann=ann, seed=seed)}


def random_unit_vectors(n, dim, rng):
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)
