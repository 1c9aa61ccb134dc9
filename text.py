"""From files of question pairs to token ids: reading, validating, tokenizing, and the vocabulary
contract between a data folder and a model.

- read_pairs: Kaggle's train.csv, Quora's .tsv, GLUE's QQP .tsv, or any CSV/TSV (plain or gzipped)
  with two question columns (and a 0/1 label where needed). Bad files are a one-line UserError
  naming the file and line; unusable rows come back as rejects (row, line, reason), never dropped.
- vocab_hash / check_vocab / checkpoint_tokenizer: a data folder records the hash of the vocabulary
  it was tokenized with; a model may only read data made with its own vocabulary (tokenizers are
  loaded by hub.load_tokenizer).
- read_question_file: questions alone (an index's inputs, search queries): a CSV/TSV with a
  question column, a .txt with one a line, or a pairs file's distinct questions; the same reader.
- tokenize / encode_pairs: each distinct text once, in large Rust batches, into flat arrays.
"""
import csv
import gzip
import hashlib
import json
import os
import zlib
from dataclasses import dataclass

import numpy as np

from cli import UserError

# Column names accepted for each field, first match wins (Kaggle/Quora, GLUE, generic).
QUESTION1_COLUMNS = ("question1", "sentence1", "q1", "text1", "text_a")
QUESTION2_COLUMNS = ("question2", "sentence2", "q2", "text2", "text_b")
LABEL_COLUMNS = ("is_duplicate", "label", "duplicate", "is_paraphrase")
QID1_COLUMNS, QID2_COLUMNS = ("qid1",), ("qid2",)
ID_COLUMNS = ("id", "test_id", "pair_id")
# The one "no label" value: a pair read without one (prediction inputs), a mined pair, a batch's
# fill pair. Cross-entropy ignores it (model.pair_loss), mnrl never takes such a pair as a negative.
NO_LABEL = -1
# Questions are truncated to --max_len tokens anyway; a field may be as long as it likes (csv's
# default limit of 131,072 characters would abort the whole file on one long question).
MAX_FIELD_CHARS = 2 ** 31 - 1


# ----------------------------------------------------------------------------- reading

def open_lines(path):
    """Decoded lines of a plain or gzipped UTF-8 file (BOM tolerated), one at a time, so that a bad
    byte or a truncated archive is reported with its exact line number. The file is opened once
    (a pipe, such as bash's <(zcat f), is read as it comes); a UTF-16 file is named as such."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file", "pass the path to Kaggle's train.csv (or a CSV/TSV "
                        "of question pairs)")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a folder, not a file", "pass the CSV/TSV file inside it")
    line_no = 0
    try:
        with open(path, "rb") as f:
            gzipped = f.peek(2)[:2] == b"\x1f\x8b"  # peek: a pipe cannot be read twice
            with (gzip.GzipFile(fileobj=f, mode="rb") if gzipped else f) as raw:
                for line_no, line in enumerate(raw, 1):
                    if line_no == 1 and (line.startswith((b"\xff\xfe", b"\xfe\xff")) or
                                         line.count(b"\x00") > len(line) // 4):
                        raise UserError(f"{path}: the file is UTF-16 (a BOM or NUL bytes in its first line), "
                                        "not UTF-8", "re-save it as UTF-8, e.g. iconv -f utf-16 -t utf-8 "
                                        "in.csv > out.csv")
                    if line_no == 1 and not line.endswith(b"\n") and b"\r" in line.rstrip(b"\r"):  # no LF at all
                        raise UserError(f"{path}: its lines end in a bare carriage return (classic Mac line "
                                        "breaks), which this reader does not split on", "convert them, e.g. "
                                        "tr '\\r' '\\n' < in.csv > out.csv")
                    try:
                        yield line.decode("utf-8-sig" if line_no == 1 else "utf-8")
                    except UnicodeDecodeError as e:
                        raise UserError(f"{path}: line {line_no} is not valid UTF-8 ({e.reason} at byte "
                                        f"{e.start})", "re-save the file as UTF-8, e.g. iconv -f latin1 "
                                        "-t utf-8 in.csv > out.csv") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise UserError(f"{path}: the gzip archive is truncated or corrupt after line {line_no} "
                        f"({type(e).__name__})", "download or copy the file again (gzip -t checks "
                        "it)") from None


def csv_reader(lines, delimiter):
    """The one CSV/TSV row reader: TSVs (GLUE, Quora's release) are unquoted, so a leading '"' is
    part of the question text; fields of any length. Sets the csv module's field limit when a file
    is read, not at import."""
    if csv.field_size_limit() < MAX_FIELD_CHARS:
        csv.field_size_limit(MAX_FIELD_CHARS)
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    return csv.reader(lines, delimiter=delimiter, quoting=quoting, strict=False)


def table_rows(lines, delimiter):
    """The data rows after a header line, one at a time: (row number, the file line it starts on,
    the line after it, fields, None), or (..., None, why) for a row the csv module cannot parse (a
    stray carriage return in an unquoted field): that row is rejected, the file goes on."""
    reader = csv_reader(lines, delimiter)
    row_no, line = 0, 2  # line: where the next row starts (the header is line 1)
    while True:
        try:
            fields, problem = next(reader), None
        except StopIteration:
            return
        except csv.Error as e:
            fields, problem = None, f"cannot be parsed ({str(e).split(' - ')[0]})"
        row_no, start, line = row_no + 1, line, reader.line_num + 2
        yield row_no, start, line, fields, problem


def sniff_delimiter(path, first_line):
    """Tab for a .tsv name or a header with more tabs than commas, else comma."""
    tsv = ".tsv" in os.path.basename(path).lower() or first_line.count("\t") > first_line.count(",")
    return "\t" if tsv else ","


def read_header(path, lines, fix):
    """(delimiter, header fields) of a table's first line; an empty file is a UserError."""
    first = next(lines, None)
    if first is None:
        raise UserError(f"{path}: the file is empty", fix)
    if not first.strip():
        raise UserError(f"{path}: line 1 is blank, and a table's header must be its first line",
                        "delete the blank line(s) at the top of the file")
    delimiter = sniff_delimiter(path, first)
    try:
        return delimiter, next(csv_reader([first], delimiter))
    except csv.Error as e:  # a stray carriage return in it
        raise UserError(f"{path}: line 1, the header, cannot be parsed ({str(e).split(' - ')[0]})",
                        "remove the carriage return from the header line") from None


def find_column(header, names, path, what):
    """Index of the first of `names` in the header; None if absent and optional (what=None). A
    name the header holds twice is a UserError: which of the two is meant cannot be told."""
    lowered = [h.strip().lower() for h in header]
    for name in names:
        if name in lowered:
            at = [i + 1 for i, h in enumerate(lowered) if h == name]
            if len(at) > 1:
                raise UserError(f"{path}: the header names the column '{name}' twice (columns "
                                f"{' and '.join(map(str, at[:2]))})", "rename or remove one of them")
            return lowered.index(name)
    if what is None:
        return None
    raise UserError(f"{path}: no {what} column (looked for {', '.join(names)}; found "
                    f"{', '.join(header) or 'nothing'})", "rename the column, or pass a file with a "
                    "header like id,qid1,qid2,question1,question2,is_duplicate")


def read_pairs(path, require_label=True):
    """Read and validate a pairs file.

    Returns (pairs, rejects, rows_read): pairs is a dict of lists q1, q2, qid1, qid2 (None when the
    file has no qids), label (None when the file has no label column; NO_LABEL for an empty
    label when not required), row (1-based data row number), line (the file line where the row
    starts), id (the file's pair id column, None when absent); rejects is a list of (row, line,
    reason) for rows that cannot be used. Without require_label a label column is not read at all
    (a prediction needs none).
    """
    lines = open_lines(path)
    delimiter, header = read_header(path, lines, "pass Kaggle's train.csv, which starts with the header "
                                    "id,qid1,qid2,question1,question2,is_duplicate")
    c1 = find_column(header, QUESTION1_COLUMNS, path, "question1")
    c2 = find_column(header, QUESTION2_COLUMNS, path, "question2")
    cl = find_column(header, LABEL_COLUMNS, path, "0/1 label") if require_label else None
    ci1 = find_column(header, QID1_COLUMNS, path, None)
    ci2 = find_column(header, QID2_COLUMNS, path, None)
    cid = find_column(header, ID_COLUMNS, path, None)
    has_qids = ci1 is not None and ci2 is not None
    width = len(header)

    pairs = {"q1": [], "q2": [], "qid1": [] if has_qids else None,
             "qid2": [] if has_qids else None, "label": [] if cl is not None else None, "row": [],
             "line": [], "id": [] if cid is not None else None}
    rejects = []
    row_no = 0
    for row_no, start, line, fields, problem in table_rows(lines, delimiter):
        if problem:
            rejects.append((row_no, start, problem))
            continue
        if not fields:  # blank line
            rejects.append((row_no, start, "blank line"))
            continue
        if len(fields) != width:
            if line - start > 1:  # an opening quote never closed swallows the lines after it
                raise UserError(f"{path}: the row starting at line {start} has an unbalanced quote "
                                f"that runs over {line - start} lines", "close or remove the quote "
                                "on that line")
            rejects.append((row_no, start, f"malformed: {len(fields)} fields, header has {width}"))
            continue
        q1, q2 = fields[c1].strip(), fields[c2].strip()
        if not q1 or not q2:
            rejects.append((row_no, start, f"empty question{'1' if not q1 else '2'}"))
            continue
        if cl is not None:
            label = fields[cl].strip()
            if label not in ("0", "1"):
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
            pairs["label"].append(int(label))
        pairs["row"].append(row_no)
        pairs["line"].append(start)
        if cid is not None:
            pairs["id"].append(fields[cid].strip())
    if row_no == 0:
        raise UserError(f"{path}: has a header but no rows", "pass the full file")
    if not pairs["q1"]:
        raise UserError(f"{path}: none of its {row_no} rows is usable (first: row {rejects[0][0]}, "
                        f"{rejects[0][2]})", "check the columns and labels")
    return pairs, rejects, row_no


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_rejects(path, rejects):
    """rejects.tsv: one line per unusable row, with its row number, file line and reason."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("row\tline\treason\n")
        for row, line, reason in rejects:
            f.write(f"{row}\t{line}\t{reason}\n")


def write_table(path, header, rows, rejects):
    """A CSV of results and, where input rows were rejected, <path>.rejects.tsv beside it (an earlier
    run's is removed: the two files are always one run's). Both are written to temp files renamed
    at the end, so an interrupted run leaves nothing half-written, and a failed write (a full
    disk) removes its temp files."""
    side = f"{path}.rejects.tsv"
    tmp, tmp_side = f"{path}.tmp-{os.getpid()}", f"{side}.tmp-{os.getpid()}"  # two runs never share one
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            for row in rows:
                w.writerow(row)
        if rejects:
            write_rejects(tmp_side, rejects)
        os.replace(tmp, path)
        if rejects:
            os.replace(tmp_side, side)
        elif os.path.exists(side):
            os.remove(side)
    except BaseException:
        for t in (tmp, tmp_side):
            if os.path.exists(t):
                os.remove(t)
        raise


# ----------------------------------------------------------------------------- question files

QUESTION_COLUMNS = ("question", "text", "question_text", "title", "sentence", "query")


QUESTION_ID_COLUMNS = ("qid", "id", "question_id")


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


def read_question_file(path, distinct=True):
    """The usable questions of a file: a .txt (one a line), a CSV/TSV with a question column, or a
    pairs file (its distinct questions). distinct=False keeps every usable row of a question file
    (queries: one result block per row)."""
    if os.path.basename(path).lower().endswith((".txt", ".txt.gz")):
        qs = text_file_questions(path)
    else:
        qs = table_questions(path)
    return first_of_each(qs) if distinct else qs


def text_file_questions(path):
    texts, ids, rejects, line_no = [], [], [], 0
    for line_no, line in enumerate(open_lines(path), 1):
        if "\r" in line.rstrip("\r\n"):  # a line break this reader does not split on: two questions, maybe
            rejects.append((line_no, line_no, "a carriage return inside the line (a classic Mac line break?)"))
        elif line.strip():
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
    delimiter, header = read_header(path, lines, "pass a CSV/TSV with a question column, or a .txt with one "
                                    "question a line")
    if find_column(header, QUESTION1_COLUMNS, path, None) is not None:
        return pair_file_questions(path)
    col = find_column(header, QUESTION_COLUMNS, path, None)
    if col is None:
        raise UserError(f"{path}: no question column (looked for {', '.join(QUESTION_COLUMNS)}, and for "
                        f"question1/question2 of a pairs file; found {', '.join(header)})",
                        "name the column 'question', or pass a .txt with one question a line")
    id_col = find_column(header, QUESTION_ID_COLUMNS, path, None)
    texts, ids, rejects, row_no = [], [], [], 0
    for row_no, start, _, fields, problem in table_rows(lines, delimiter):
        if problem:
            rejects.append((row_no, start, problem))
        elif len(fields) != len(header):
            rejects.append((row_no, start, "blank line" if not fields else
                            f"malformed: {len(fields)} fields, header has {len(header)}"))
        elif not fields[col].strip():
            rejects.append((row_no, start, "empty question"))
        elif id_col is not None and not fields[id_col].strip():
            rejects.append((row_no, start, "empty id"))
        else:
            texts.append(fields[col].strip())
            ids.append(fields[id_col].strip() if id_col is not None else f"{file_stem(path)}:{start}")
    if not texts:
        raise UserError(f"{path}: none of its {row_no} rows is usable" + (
            f" (first: row {rejects[0][0]}, {rejects[0][2]})" if rejects else ""), "check the question column")
    return Questions(texts, ids, id_col is not None, rejects, row_no, source_record(path, "question file"))


def pair_file_questions(path, require_label=False):
    """The distinct questions of a pairs file in text.index_questions' order (a data folder's)."""
    pairs, rejects, rows_read = read_pairs(path, require_label=require_label)
    pairs, conflicts = drop_qid_conflicts(pairs)  # as preprocess.py does: question i is the folder's
    rejects = sorted(rejects + conflicts)
    q1, q2, texts, _ = index_questions(pairs)
    by_id = pairs["qid1"] is not None
    ids = [None] * len(texts)
    for col, qids, which in ((q1, pairs["qid1"], "q1"), (q2, pairs["qid2"], "q2")):
        for i, j in enumerate(col.tolist()):
            if ids[j] is None:  # the first place it occurs, in index_questions' order
                ids[j] = qids[i] if by_id else f"{file_stem(path)}:{pairs['row'][i]}:{which}"
    return Questions(texts, ids, by_id, rejects, rows_read, source_record(path, "pairs file"))


def source_record(path, kind):
    return {"path": os.path.abspath(path), "kind": kind, "content": file_sha256(path)[:16]}


def first_of_each(qs, known=None):
    """The questions whose key (id, or text for files without ids) is neither in `known` ({key:
    text} of the questions already there) nor earlier in the file; the others are counted in
    qs.source["skipped"], and of those an id that comes back with another text (one id for two
    questions: which one it names cannot be told) in qs.source["conflicts"], the first of them in
    "first_conflict"."""
    seen, keep, conflicts = dict(known or {}), [], []
    for i, key in enumerate(qs.ids if qs.by_id else qs.texts):
        if key not in seen:
            seen[key] = qs.texts[i]
            keep.append(i)
        elif seen[key] != qs.texts[i]:
            conflicts.append(key)
    skipped = len(qs.texts) - len(keep)
    source = {**qs.source, "skipped": qs.source.get("skipped", 0) + skipped,
              "conflicts": qs.source.get("conflicts", 0) + len(conflicts)}
    if conflicts and "first_conflict" not in source:
        source["first_conflict"] = conflicts[0]
    return Questions([qs.texts[i] for i in keep], [qs.ids[i] for i in keep], qs.by_id, qs.rejects,
                     qs.rows_read, source)


def file_stem(path):
    """'dir/pairs.csv.gz' -> 'pairs'."""
    name = os.path.basename(path)
    name = name[:-3] if name.endswith(".gz") else name
    return os.path.splitext(name)[0]


# ----------------------------------------------------------------------------- the vocabulary

def vocab_hash(tok):
    """16 hex digits identifying a tokenizer's vocabulary (token -> id)."""
    vocab = json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False).encode()
    return hashlib.sha256(vocab).hexdigest()[:16]


def check_vocab(manifest, tok_hash, encoder, data_dir):
    """The data must have been tokenized with the model's own vocabulary."""
    if manifest["vocab_hash"] != tok_hash:
        raise UserError(f"{data_dir} was tokenized with '{manifest['tokenizer']}', whose vocabulary "
                        f"differs from '{encoder}'s", f"re-run python preprocess.py "
                        f"{manifest['source']} --encoder {encoder} --out_dir {data_dir}")


# ----------------------------------------------------------------------------- tokenizing

def unreadable(tok, tokens, offsets):
    """(N,) bool: the texts tokens[offsets[i]:offsets[i+1]] made of [UNK] and special tokens only
    (emoji, other scripts): the model sees nothing of them, so what it says of them means nothing."""
    empty_ids = [i for i in (tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.bos_token_id,
                             tok.eos_token_id) if i is not None]  # ids that carry no content
    content = np.r_[0, np.cumsum(~np.isin(tokens, empty_ids))]  # content tokens before each position
    return content[offsets[1:]] == content[offsets[:-1]]


def tokenize(tok, texts, max_len, batch_size=16384):
    """Tokenize texts once, in large Rust batches: (tokens (T,), offsets (N+1,), n_truncated,
    n_unreadable). Text i is tokens[offsets[i]:offsets[i+1]], [CLS] ... [SEP] included; an
    unreadable text tokenizes to nothing but [UNK] and special tokens."""
    backend = tok.backend_tokenizer
    backend.no_padding()
    backend.enable_truncation(max_len)
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # skips char offsets
    dtype = np.uint16 if len(tok) <= np.iinfo(np.uint16).max + 1 else np.int32
    chunks, lengths, n_truncated, n_unreadable = [], [], 0, 0
    for start in range(0, len(texts), batch_size):
        # Encodings are heavy Python objects: turn each batch into one flat array right away.
        encodings = encode(texts[start:start + batch_size])
        ids = [e.ids for e in encodings]
        n_truncated += sum(1 for e in encodings if e.overflowing)
        lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter((t for seq in ids for t in seq), dtype=dtype, count=int(lens.sum()))
        n_unreadable += int(unreadable(tok, flat, np.r_[0, np.cumsum(lens)]).sum())
        lengths.append(lens)
        chunks.append(flat)
        del encodings, ids
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype)
    return tokens, offsets, n_truncated, n_unreadable


def encode_pairs(tok, q1_texts, q2_texts, labels, max_len):
    """Tokenize raw pairs for evaluation or prediction, each distinct text once.
    Returns (tokens, offsets, pairs (N, 3) int64 of q1 index, q2 index, label)."""
    index = {}
    ids = [[index.setdefault(t, len(index)) for t in col] for col in (q1_texts, q2_texts)]
    tokens, offsets, _, _ = tokenize(tok, list(index), max_len)
    pairs = np.stack([np.array(ids[0]), np.array(ids[1]), np.asarray(labels)], axis=1).astype(np.int64)
    return tokens, offsets, pairs


def checkpoint_tokenizer(ckpt_path, data):
    """The tokenizer a checkpoint was trained with: <ckpt dir>/hf when train.py saved it there,
    else the one named in the checkpoint's data record. Its vocabulary must be the training data's."""
    hf_dir = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), "hf")
    name = hf_dir if os.path.isfile(os.path.join(hf_dir, "tokenizer_config.json")) else data["tokenizer"]
    from hub import load_tokenizer
    tok = load_tokenizer(name)
    if vocab_hash(tok) != data["vocab_hash"]:
        raise UserError(f"the tokenizer '{name}' differs from the one {ckpt_path} was trained with",
                        f"restore {hf_dir} from the training run, or install the training tokenizer")
    return tok


def qid_conflicts(pairs):
    """Rows whose qid names another text than where that qid first occurs (file order: each row's
    qid1, then its qid2): {row position: reason}. Such a row cannot be trusted (is its qid wrong, or
    its text?), and keying its question by qid would pair a text it did not hold."""
    if pairs["qid1"] is None:
        return {}
    first, bad = {}, {}
    for i, (k1, k2, t1, t2) in enumerate(zip(pairs["qid1"], pairs["qid2"], pairs["q1"], pairs["q2"])):
        for which, qid, question in (("qid1", k1, t1), ("qid2", k2, t2)):
            text, row = first.setdefault(qid, (question, pairs["row"][i]))
            if text != question and i not in bad:
                bad[i] = f"{which} {qid} names another question in row {row}"
    return bad


def select_rows(pairs, keep):
    """The pairs dict (read_pairs') of the rows at positions `keep`, in that order."""
    return {k: None if v is None else [v[i] for i in keep] for k, v in pairs.items()}


def drop_qid_conflicts(pairs):
    """(pairs without the rows of qid_conflicts, those rows as rejects: (row, line, reason))."""
    bad = qid_conflicts(pairs)
    if not bad:
        return pairs, []
    kept = select_rows(pairs, [i for i in range(len(pairs["q1"])) if i not in bad])
    return kept, [(pairs["row"][i], pairs["line"][i], reason) for i, reason in bad.items()]


def index_questions(pairs):
    """One index per distinct question: by qid where the file has them, else by exact text.
    Returns (q1 (N,), q2 (N,) int64 question indices, texts of the questions, conflicts: qids
    seen with more than one text). A question is keyed by (qid, text), so a row's index always
    holds its own text; drop_qid_conflicts first leaves one text per qid, the order by qid alone."""
    by_qid = pairs["qid1"] is not None
    keys1, keys2 = (pairs["qid1"], pairs["qid2"]) if by_qid else (pairs["q1"], pairs["q2"])
    index, texts, first_text, conflicted = {}, [], {}, set()
    q1, q2 = np.empty(len(keys1), np.int64), np.empty(len(keys2), np.int64)
    for col, keys, qtexts in ((q1, keys1, pairs["q1"]), (q2, keys2, pairs["q2"])):
        for i, (k, text) in enumerate(zip(keys, qtexts)):
            key = (k, text) if by_qid else k
            j = index.get(key)
            if j is None:
                j = index[key] = len(texts)
                texts.append(text)
                if by_qid and first_text.setdefault(k, text) != text:
                    conflicted.add(k)
            col[i] = j
    return q1, q2, texts, len(conflicted)
