"""The question index, the library behind index.py and search.py: finding the questions already
asked that a new question duplicates.

- read_questions: a data folder's questions (re-read from the source it records: question i of
  the folder is row i of the index), or any file text.read_question_file reads.
- question_inference / embed_texts: question texts -> vectors of a model.QuestionEncoder, through
  the one inference road (engine.Inference), each distinct text once; quantize_int8 and use_onnx
  (model.OnnxEncoder) swap the encoder for serve.py's --int8 and --runtime onnx.
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
The retrieval benchmark's protocol is search_eval.py's; search speed is timed in measure.py.
"""
import hashlib
import json
import math
import os
import sys
import time
from functools import cached_property, partial

import numpy as np
import torch

import engine
from cli import UserError, missing_packages, require_packages
from data import QuestionDataset, fingerprint, load_manifest, write_data_dir
from model import OnnxEncoder, describe_model, load_question_encoder
from text import file_sha256, pair_file_questions, read_question_file, tokenize, unreadable

INDEX_FORMAT = "qqp-question-index-v1"
INDEX_MANIFEST_KEYS = ("model", "sources", "count", "dim", "files")  # what readers take as given
ANN_RECALL_TARGET = 0.95  # of exact top-10: the nprobe an index is built with reaches this on its own rows


# ----------------------------------------------------------------------------- questions in

def read_questions(path, distinct=True):
    """Questions of a data folder (its own order: question i = row i) or of a file
    (text.read_question_file)."""
    return data_folder_questions(path) if os.path.isdir(path) else read_question_file(path, distinct)


def data_folder_questions(data_dir):
    """A preprocessed folder's questions, texts[i] = its question i, re-read from its source."""
    if is_index_folder(data_dir):
        raise UserError(f"{data_dir}: an index folder, not questions", "pass a question or pairs file, or a data "
                        "folder preprocess.py wrote")
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


# ----------------------------------------------------------------------------- question vectors

def question_inference(qe, rt, batch_size=256, shapes="auto", compile="auto", num_workers=0):
    """The one inference road (engine.Inference) to the vectors of qe's questions."""
    return engine.Inference(qe.module.question_vectors, "questions", rt, batch_size, shapes, compile, num_workers,
                            max_len=qe.max_len)


def embed_texts(qe, inference, texts, desc="embedding", verbose=True):
    """(N, H) float32 pooled vectors of texts, each distinct text tokenized and encoded once, by
    question_inference(qe, ...)."""
    return embed_and_check(qe, inference, texts, desc, verbose)[0]


def embed_and_check(qe, inference, texts, desc="embedding", verbose=True):
    """embed_texts, and (N,) bool: the texts that tokenize to nothing but [UNK] (emoji, other
    scripts), whose vectors mean nothing (warned about on stderr too)."""
    unique, inverse = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
    inverse = inverse.reshape(-1)
    tokens, offsets, _, n_unreadable = tokenize(qe.tokenizer, unique.tolist(), qe.max_len)
    bad = unreadable(qe.tokenizer, tokens, offsets) if n_unreadable else np.zeros(len(unique), bool)
    if n_unreadable:  # whatever verbose says (one query too), on stderr: stdout may hold the answer
        who = "the question tokenizes" if len(unique) == 1 else \
            f"{n_unreadable:,} of {len(unique):,} distinct questions tokenize"
        print(f"warning: {who} to nothing but [UNK] (emoji, other scripts): no content reaches the model, so "
              "what such a question matches means nothing", file=sys.stderr)
    pooled = inference(QuestionDataset(tokens, offsets, qe.pad_id, qe.max_len), desc, verbose)
    return pooled[inverse], bad[inverse]


def unreadable_texts(qe, texts):
    """The texts that tokenize to nothing but [UNK] (emoji, other scripts): no content reaches the
    model, so any question would be as near to them as to any other."""
    tokens, offsets, _, n = tokenize(qe.tokenizer, list(texts), qe.max_len)
    return [t for t, bad in zip(texts, unreadable(qe.tokenizer, tokens, offsets)) if bad] if n else []


def encoder_batch_size(runtime, max_batch=64):
    """serve.py's questions per encoder call: the exact layout sorts a batch by length before cutting
    it into calls, so smaller calls pad less. On ONNX Runtime, calls of 8 serve 1.12x the requests/s
    of one call per batch (bench.py's serve stage; served questions are 16 tokens on average, a
    batch's longest 40); torch gained little in a microbenchmark (1.08x at best), so at least 64
    there, that a request of many (a /score of 256 pairs) is not cut into calls of 1 when batching
    across requests is off (max_batch 1)."""
    return 8 if runtime == "onnx" else max(max_batch, 64)


def quantize_int8(qe):
    """The encoder's linear layers in int8 (torch's dynamic quantization: weights int8 per output
    channel, activations quantized per batch), in place, CPU only; the classifier head stays fp32.
    Faster matmuls on x86 CPUs, but its vectors differ from the fp32 ones an index holds (per
    channel: cosine 0.98 to the fp32 vector on the real rows with MiniLM, against 0.95 per tensor),
    which bench.py's serve stage measures (measure.encoder_agreement)."""
    import warnings
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    with warnings.catch_warnings():  # torch deprecates quantized tensors in favour of torchao; still works
        warnings.simplefilter("ignore")
        quantize_dynamic(qe.module.encoder, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8,
                         inplace=True)
    return qe


ONNX_PACKAGES = ("onnx", "onnxruntime")  # use_onnx: torch.onnx.export writes with onnx; onnxruntime runs it


def onnx_missing():
    """The packages use_onnx needs that are not installed."""
    return missing_packages(ONNX_PACKAGES)


def require_onnx():
    """The one-line error of a run that asks for ONNX Runtime without onnx and onnxruntime installed."""
    require_packages(ONNX_PACKAGES, "--runtime onnx", "pass --runtime torch")


def use_onnx(qe, threads):
    """qe's encoder run by ONNX Runtime from now on (in place; CPU only; the classifier head stays
    torch), `threads` threads per call. Its vectors equal torch's fp32 ones to about 1e-5 (tests)."""
    qe.module.encoder = OnnxEncoder(qe.module.encoder, threads)  # (the model's Encoder keeps its pooling)
    return qe


def unit(vectors):
    """(N, H) -> L2-normalized rows, and the norms they had."""
    norms = np.linalg.norm(vectors, axis=1).astype(np.float32)
    return vectors / np.maximum(norms, 1e-12)[:, None], norms


# ----------------------------------------------------------------------------- the index folder

def load_index_model(index, checkpoint="", need_classifier=False):
    """The model the index was built with (its manifest names it; checkpoint: where that checkpoint
    is now, if it moved), refused unless its fingerprint is the index's: another model's, or a
    retrained checkpoint's, vectors are not comparable. need_classifier: refused without a pair
    classifier (an untuned encoder has none)."""
    rec = index.manifest["model"]
    if checkpoint or rec["kind"] == "checkpoint":
        path = checkpoint or rec["checkpoint"]
        if not os.path.isfile(path):
            raise UserError(f"the index's checkpoint {path} is missing", "pass --checkpoint where it is now")
        qe = load_question_encoder(checkpoint=path)
    else:
        qe = load_question_encoder(encoder=rec["encoder"], max_len=rec["max_len"])
    if qe.record["fingerprint"] != rec["fingerprint"]:
        raise UserError(f"{index.path} was built with {describe_model(rec)} (fingerprint "
                        f"{rec['fingerprint']}), but {describe_model(qe.record)} has fingerprint "
                        f"{qe.record['fingerprint']}: another model, or the checkpoint changed since",
                        rebuild_fix({**index.manifest, "model": qe.record}, index.path))
    if need_classifier and qe.classifier is None:
        raise UserError(f"--rerank needs a checkpoint's pair classifier; {index.path} was built with "
                        f"{describe_model(rec)}", "index with a siamese checkpoint: python "
                        "index.py out/ckpt.pt INPUT --out_dir NEW_INDEX")
    return qe


class Index:
    """An index folder opened for searching: the manifest checked, the vectors memory-mapped."""

    def __init__(self, path):
        manifest = read_index_manifest(path)
        if manifest is None:
            if os.path.exists(path) and not os.path.isdir(path):
                raise UserError(f"{path}: a file, not an index folder", "pass the --out_dir of an index.py run (the "
                                "questions to search for come after it, or with --queries)")
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
            if not torch.isfinite(self._matrix).all():  # sizes match the manifest, contents do not
                raise UserError(f"{os.path.join(self.path, 'vectors.npy')} holds NaN or infinite values: the index "
                                "is damaged", rebuild_fix(self.manifest, self.path))
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


def is_index_folder(path):
    try:
        return read_index_manifest(path) is not None
    except UserError:  # a folder of another kind (a data folder), or a damaged manifest
        return False


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
    missing = [k for k in INDEX_MANIFEST_KEYS if k not in manifest]
    if missing:
        raise UserError(f"{mpath}: damaged (no {', '.join(missing)})", "delete the folder and build the index again")
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


# ----------------------------------------------------------------------------- added questions

ADDED_FORMAT = "qqp-added-questions-v1"


class IdTaken(UserError):
    """A question posted under an id that names another question."""


def added_path(index_dir):
    """Where the questions posted to serve.py live: beside the index folder, not in it (index.py
    replaces the folder in one rename; a database inside would go with it)."""
    return os.path.abspath(index_dir).rstrip(os.sep) + ".added.sqlite"


class AddedQuestions:
    """The questions added to an index after it was built (serve.py's POST /questions), in SQLite:
    a real embedded database, so that an acknowledged question survives kill -9 and power loss
    (WAL, synchronous=FULL: the commit is on disk before serve.py replies), and several server
    processes on one machine share one file (WAL: one writer at a time, readers never blocked;
    each process reads the rows the others committed, rows(after=seq)). Each row holds the
    question's float16 unit vector and its norm, as the index folder does, under the model
    fingerprint recorded in the file: a file of another model's vectors is refused. index.py
    --fold moves the rows into the index folder and deletes them here.

    Table questions: seq (increasing, the order of commits), id (unique), text, vector (H float16
    bytes), norm, added (unix time)."""

    def __init__(self, path, model, dim, create=True):
        import sqlite3
        self.path, self.dim = path, dim
        self._version, self._own_commit = None, False  # None: the first look finds every row new
        if not create and not os.path.isfile(path):
            raise UserError(f"{path}: no such database", "nothing was added to this index")
        try:
            # isolation_level=None: transactions are the explicit BEGIN IMMEDIATE .. COMMIT below.
            # check_same_thread=False: serve.py opens it at start, its worker thread uses it.
            self.db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self.db.execute("CREATE TABLE IF NOT EXISTS questions (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                            "id TEXT NOT NULL UNIQUE, text TEXT NOT NULL, vector BLOB NOT NULL, "
                            "norm REAL NOT NULL, added REAL NOT NULL)")
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)",
                                [("format", ADDED_FORMAT), ("fingerprint", model["fingerprint"]),
                                 ("dim", str(dim))])
            self.db.execute("COMMIT")
            meta = dict(self.db.execute("SELECT key, value FROM meta"))
        except sqlite3.OperationalError as e:  # cannot open or write: a read-only place, a full disk, a lock
            raise UserError(f"{path}: cannot open or write the database of added questions ({e})",
                            "make its folder writable (it lies beside the index folder) and free space") from None
        except sqlite3.DatabaseError as e:
            raise UserError(f"{path}: not a database of added questions ({e})",
                            "move the file away (it is not this index's), then start again") from None
        if meta.get("format") != ADDED_FORMAT or meta.get("dim") != str(dim):
            raise UserError(f"{path}: not a database of added questions for this index (format "
                            f"{meta.get('format')}, dim {meta.get('dim')})", "move the file away, then start again")
        if meta["fingerprint"] != model["fingerprint"]:
            n = self.db.execute("SELECT count(*) FROM questions").fetchone()[0]
            raise UserError(f"{path} holds {n:,} questions embedded by a model with fingerprint "
                            f"{meta['fingerprint']}, but the index's model is {model['fingerprint']}: the "
                            "index was rebuilt since, and their vectors do not mix",
                            "fold them before rebuilding (python index.py --fold --out_dir INDEX), or move "
                            "the file away and post them again")

    def changed(self):
        """Whether rows were committed since the last look: by this connection (add), or by another
        (PRAGMA data_version moves only for those; cheap, no table read)."""
        version = self.db.execute("PRAGMA data_version").fetchone()[0]
        changed = self._own_commit or version != self._version
        self._version, self._own_commit = version, False
        return changed

    def add(self, requests, known):
        """Commit the questions of several requests in one transaction (group commit: one fsync for
        a batch of requests), durable before it returns. requests: [(ids, texts, unit vectors,
        norms)]. An id already held (here, by another process, or in the index: known(id) -> its
        text or None) with the same text is left as it is ("exists": a client's retry is
        harmless); with another text it is a conflict, and nothing of that request is written (a
        savepoint), the others are. Returns per request its ids' statuses, or its UserError."""
        answers = []
        self.db.execute("BEGIN IMMEDIATE")  # the write lock: no other process adds between check and insert
        try:
            for ids, texts, vectors, norms in requests:
                self.db.execute("SAVEPOINT request")
                try:
                    answers.append(self._insert(ids, texts, vectors, norms, known))
                except IdTaken as e:
                    self.db.execute("ROLLBACK TO request")
                    answers.append(e)
                self.db.execute("RELEASE request")
            self.db.execute("COMMIT")
            self._own_commit = True
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        return answers

    def _insert(self, ids, texts, vectors, norms, known):
        statuses = []
        for qid, text in zip(ids, texts):
            row = self.db.execute("SELECT text FROM questions WHERE id = ?", (qid,)).fetchone()
            held = row[0] if row else known(qid)
            if held is not None and held != text:
                raise IdTaken(f"id {qid} is taken by another question ({held[:80]!r})",
                              "post it under a new id, or without an id")
            statuses.append("exists" if held is not None else "added")
        now = time.time()
        self.db.executemany("INSERT INTO questions (id, text, vector, norm, added) VALUES (?, ?, ?, ?, ?)",
                            [(qid, text, np.asarray(v, np.float16).tobytes(), float(n), now)
                             for qid, text, v, n, s in zip(ids, texts, vectors, norms, statuses) if s == "added"])
        return statuses

    def rows(self, after=0):
        """Rows committed after seq `after`: (seqs, ids, texts, unit vectors (n, H) float16, norms)."""
        got = self.db.execute("SELECT seq, id, text, vector, norm FROM questions WHERE seq > ? ORDER BY seq",
                              (after,)).fetchall()
        vectors = np.frombuffer(b"".join(r[3] for r in got), np.float16).reshape(len(got), self.dim)
        return ([r[0] for r in got], [r[1] for r in got], [r[2] for r in got], vectors,
                np.array([r[4] for r in got], np.float32))

    def delete_through(self, seq):
        """Delete the rows up to seq (index.py --fold, once they are in the index folder)."""
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("DELETE FROM questions WHERE seq <= ?", (seq,))
        self.db.execute("COMMIT")

    def close(self):
        self.db.close()


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
        require_packages(("bm25s",), "BM25, the lexical baseline")
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







# ----------------------------------------------------------------------------- speed







