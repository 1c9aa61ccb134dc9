"""Tests of preprocess.py: reading pairs files, one-line errors, rejects, the written arrays and
manifest, leak-free splits, transitive closure, truncation and the cache.

Every pairs file here is invented (conftest.synthetic_rows or hand-written); the real 8k QQP rows
are only read from ../shared, by tests marked needs_real_data.
"""
import collections
import csv
import gzip
import hashlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import data
import preprocess
import text
from cli import UserError
from conftest import REAL_8K, ROOT, needs_real_data, synthetic_rows, write_csv
from data import FORMAT_VERSION, SPLITS
from hub import load_tokenizer

KAGGLE_HEADER = ("id", "qid1", "qid2", "question1", "question2", "is_duplicate")
SPLIT_PAIRS = list(itertools.combinations(SPLITS, 2))


# ----------------------------------------------------------------------------- helpers

def run(src, out, *options):
    """preprocess.main in this process; returns the manifest now in `out`."""
    preprocess.main([str(src), "--out_dir", str(out), *map(str, options)])
    with open(os.path.join(out, "manifest.json")) as f:
        return json.load(f)


def load_splits(out):
    return {s: np.load(os.path.join(out, f"{s}.npy")) for s in SPLITS}


def load_tokens(out):
    return np.load(os.path.join(out, "tokens.npy")), np.load(os.path.join(out, "offsets.npy"))


def question_tokens(out):
    tokens, offsets = load_tokens(out)
    return [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def squash(text):
    """What survives tokenizing and decoding with the uncased MiniLM: lowercase, no whitespace
    (decode puts spaces around punctuation)."""
    return "".join(text.lower().split())


def normalize(text):
    """The split's notion of 'same question text': lowercased, whitespace collapsed."""
    return " ".join(text.lower().split())


def decoded_questions(out, tok):
    return [squash(tok.decode(q, skip_special_tokens=True)) for q in question_tokens(out)]


def folder_pairs(out, tok):
    """Multiset of (question1, question2, label) over all splits, questions decoded from tokens."""
    texts = decoded_questions(out, tok)
    return collections.Counter((texts[a], texts[b], int(y))
                               for arr in load_splits(out).values() for a, b, y in arr.tolist())


def source_pairs(rows):
    """Multiset of (question1, question2, label) of Kaggle-shaped rows, squashed like decoding."""
    return collections.Counter((squash(r[3]), squash(r[4]), int(r[5])) for r in rows)


def index_texts(src, out, tok, max_len):
    """The source text of each question index of a folder. Indices follow first appearance by qid
    (question1 column, then question2); re-tokenizing must give the folder's arrays exactly."""
    pairs, _, _ = text.read_pairs(src)
    first = {}
    for keys, texts in ((pairs["qid1"], pairs["q1"]), (pairs["qid2"], pairs["q2"])):
        for key, question in zip(keys, texts):
            first.setdefault(key, question)
    texts = list(first.values())
    tokens, offsets, *_ = text.tokenize(tok, texts, max_len)
    folder_tokens, folder_offsets = load_tokens(out)
    assert np.array_equal(offsets, folder_offsets) and np.array_equal(tokens, folder_tokens), \
        "cannot map question indices back to texts (did the index order change?)"
    return texts


def assert_no_question_in_two_splits(out, texts):
    """No question index and no normalized question text is in two splits."""
    splits = load_splits(out)
    index = {s: set(np.unique(a[:, :2]).tolist()) for s, a in splits.items()}
    norm = {s: {normalize(texts[i]) for i in index[s]} for s in SPLITS}
    for a, b in SPLIT_PAIRS:
        assert not index[a] & index[b], f"question indices shared by {a} and {b}"
        assert not norm[a] & norm[b], f"normalized texts shared by {a} and {b}"


def table(header, rows, sep=","):
    """File text: a quoted CSV, or an unquoted TSV as GLUE and Quora write them."""
    if sep == "\t":
        return "".join("\t".join(map(str, r)) + "\n" for r in [header, *rows])
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    return buf.getvalue()


def generic_csv(path, pairs):
    """question1,question2,is_duplicate rows without qids: questions are keyed by their text."""
    return write_csv(path, pairs, header=("question1", "question2", "is_duplicate"))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(preprocess.PreprocessConfig.encoder)


# ----------------------------------------------------------------------------- reading formats

# (qid1, qid2, question1, question2, label): invented; commas and quotes that TSVs keep verbatim.
PAIRS = [
    ("1", "2", "How do I cook rice without a cooker?", "What is the easiest way to cook rice?", 1),
    ("3", "4", '"Quoted" words, and a comma: why?', 'Why do people say "literally" so much?', 0),
    ("1", "5", "How do I cook rice without a cooker?", "Is brown rice healthier than white rice?", 0),
]
KAGGLE_ROWS = [(i, *p) for i, p in enumerate(PAIRS)]
KAGGLE_TEXT = table(KAGGLE_HEADER, KAGGLE_ROWS)
GENERIC_TEXT = table(("sentence1", "sentence2", "label"), [p[2:] for p in PAIRS])
FORMATS = {
    "kaggle.csv": KAGGLE_TEXT.encode(),
    "kaggle.csv.gz": gzip.compress(KAGGLE_TEXT.encode()),
    "glue.tsv": table(KAGGLE_HEADER, KAGGLE_ROWS, sep="\t").encode(),
    "glue_tab_sniffed.txt": table(KAGGLE_HEADER, KAGGLE_ROWS, sep="\t").encode(),
    "generic.csv": GENERIC_TEXT.encode(),
    "generic_bom_crlf.csv": b"\xef\xbb\xbf" + GENERIC_TEXT.replace("\n", "\r\n").encode(),
}


@pytest.mark.parametrize("name", FORMATS)
def test_read_pairs_formats(tmp_path, name):
    """Kaggle CSV, gzipped CSV, unquoted GLUE TSV (by extension or sniffed), generic
    sentence1/sentence2/label CSV, also with a UTF-8 BOM before its first (needed) column name and
    CRLF line ends, all give the same pairs, texts verbatim."""
    path = tmp_path / name
    path.write_bytes(FORMATS[name])
    pairs, rejects, rows_read = text.read_pairs(str(path))
    assert (rejects, rows_read) == ([], len(PAIRS))
    assert pairs["q1"] == [p[2] for p in PAIRS]
    assert pairs["q2"] == [p[3] for p in PAIRS]
    assert pairs["label"] == [p[4] for p in PAIRS]
    assert pairs["row"] == [1, 2, 3]
    if name.startswith("generic"):
        assert pairs["qid1"] is None and pairs["qid2"] is None
    else:
        assert pairs["qid1"] == [p[0] for p in PAIRS] and pairs["qid2"] == [p[1] for p in PAIRS]


# ----------------------------------------------------------------------------- bad inputs

HEADER_LINE = ",".join(KAGGLE_HEADER) + "\n"
GOOD_ROW = "0,1,2,How do I cook rice?,What is rice?,1\n"
LATIN1_ROW = b"1,3,4,Caf\xe9 or tea in the morning?,Is tea better than coffee?,0\n"
BAD_INPUTS = {  # kind: (file content; None = no file, "dir" = a folder), words the message must hold
    "missing": (None, "no such file"),
    "folder": ("dir", "folder"),
    "empty": (b"", "empty"),
    "header_only": (HEADER_LINE.encode(), "no rows"),
    "no_question2_column": (b"id,question1,answer,is_duplicate\n0,Why?,Because,1\n", "question2"),
    "no_label_column": (b"question1,question2,score\nWhy?,How?,0.5\n", "label"),
    "latin1_bytes": ((HEADER_LINE + GOOD_ROW).encode() + LATIN1_ROW, "UTF-8"),
    # past the text reader's first 8 KB buffer, so it fails inside the row loop, not on line 1
    "latin1_bytes_late": ((HEADER_LINE + GOOD_ROW * 400).encode() + LATIN1_ROW, "UTF-8"),
    "no_usable_row": ((HEADER_LINE + "0,1,2,,What is rice?,1\n").encode(), "usable"),
    "truncated_gz": (gzip.compress((HEADER_LINE + GOOD_ROW * 3000).encode())[:-100], "truncated or corrupt"),
    "corrupt_gz": (b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4, "truncated or corrupt"),
}


def make_bad_input(folder, kind):
    content = BAD_INPUTS[kind][0]
    path = os.path.join(folder, kind + ("" if content == "dir" else ".csv"))
    if content == "dir":
        os.mkdir(path)
    elif content is not None:
        with open(path, "wb") as f:
            f.write(content)
    return path


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_is_one_line_data_error(tmp_path, kind):
    """Each unusable file raises UserError: one line, naming the file, saying how to fix it."""
    path = make_bad_input(tmp_path, kind)
    with pytest.raises(UserError) as e:
        text.read_pairs(path)
    message = str(e.value)
    assert path in message and "Fix" in message and BAD_INPUTS[kind][1] in message
    assert "\n" not in message


def test_undecodable_bytes_error_names_their_line(tmp_path):
    """The UTF-8 error points at the line that holds the bad byte (line 3 here)."""
    path = make_bad_input(tmp_path, "latin1_bytes")
    with pytest.raises(UserError) as e:
        text.read_pairs(path)
    assert "line 3 is not valid UTF-8" in str(e.value)


CLI_CASES = ("missing", "latin1_bytes")


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """`python preprocess.py BAD --out_dir X` for each CLI case, run in parallel (each pays the
    transformers import): {kind: (exit code, stdout, stderr)}."""
    folder = tmp_path_factory.mktemp("cli")
    procs = {kind: subprocess.Popen(
        [sys.executable, "preprocess.py", make_bad_input(folder, kind), "--out_dir",
         str(folder / f"out_{kind}")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for kind in CLI_CASES}
    results = {}
    for kind, p in procs.items():
        out, err = p.communicate(timeout=120)
        results[kind] = (p.returncode, out, err)
    return results


@pytest.mark.parametrize("kind", CLI_CASES)
def test_cli_bad_input_exits_2_with_one_error_line(cli_results, kind):
    """The script turns a UserError into exit code 2 and a single 'error: ...' line, no traceback."""
    code, out, err = cli_results[kind]
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Fix" in lines[0], err
    assert "Traceback" not in out + err


# ----------------------------------------------------------------------------- rejects

def test_unusable_rows_go_to_rejects(tmp_path, tok):
    """Empty questions, labels other than 0/1 and rows with the wrong field count are listed in
    rejects.tsv with their row, line and reason and counted; every good row is kept."""
    rows = [list(r) for r in synthetic_rows(60, seed=1)]
    rows[4][3] = "   "
    rows[10][5] = 2
    rows[20][5] = "yes"
    rows[30] = rows[30][:4]
    rows[40][4] = ""
    expected = {5: "empty question1", 11: "label '2' is not 0 or 1", 21: "label 'yes' is not 0 or 1",
                31: "malformed: 4 fields, header has 6", 41: "empty question2"}
    out = tmp_path / "prep"
    manifest = run(write_csv(tmp_path / "pairs.csv", rows), out)

    with open(out / "rejects.tsv", encoding="utf-8") as f:
        rejects = list(csv.reader(f, delimiter="\t"))
    assert rejects[0] == ["row", "line", "reason"]
    assert {int(row): reason for row, _, reason in rejects[1:]} == expected
    assert all(int(line) == int(row) + 1 for row, line, _ in rejects[1:])  # header is line 1

    counts = manifest["counts"]
    assert (counts["rows_read"], counts["rows_rejected"], counts["pairs_kept"]) == (60, 5, 55)
    assert counts["rows_read"] == counts["pairs_kept"] + counts["rows_rejected"]
    good = [r for n, r in enumerate(rows, 1) if n not in expected]
    assert manifest["split_stats"]["pairs_dropped_crossing_splits"] == 0
    assert folder_pairs(out, tok) == source_pairs(good)


def test_stray_quote_does_not_swallow_later_rows(tmp_path):
    """A row with an unbalanced quote is either an error naming its line, or the only row lost."""
    path = tmp_path / "pairs.csv"
    path.write_text(HEADER_LINE + GOOD_ROW + '1,3,4,"Why is this open,Who knows?,0\n' + GOOD_ROW * 3)
    try:
        pairs, rejects, rows_read = text.read_pairs(str(path))
    except UserError as e:
        assert "line 3" in str(e)
    else:
        assert (rows_read, len(pairs["q1"]), [r[0] for r in rejects]) == (5, 4, [2])


# ----------------------------------------------------------------------------- arrays and manifest

def rows_with_text_variants(n):
    """synthetic_rows(n) plus 20 rows whose question1 repeats an earlier question under a new qid,
    in other case and spacing: the split must keep such twins together by normalized text."""
    rows = synthetic_rows(n)
    qid = max(max(r[1], r[2]) for r in rows)
    for k, question in enumerate(list(dict.fromkeys(r[3] for r in rows))[:20]):
        twin = "  " + question.upper().replace(" ", "  ")
        rows.append([n + k, qid + 2 * k + 1, qid + 2 * k + 2, twin, f"Unrelated question number {k}?", 0])
    return rows


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory):
    """420 invented Kaggle rows preprocessed with --max_len 32, recording what gets tokenized."""
    folder = tmp_path_factory.mktemp("kaggle")
    rows = rows_with_text_variants(400)
    src = write_csv(folder / "pairs.csv", rows)
    tokenized, real_tokenize = [], text.tokenize

    def spy(tok, texts, max_len, *args, **kwargs):
        tokenized.extend(texts)
        return real_tokenize(tok, texts, max_len, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(text, "tokenize", spy)
        manifest = run(src, folder / "prep", "--max_len", 32)
    return SimpleNamespace(rows=rows, src=src, out=str(folder / "prep"), manifest=manifest,
                           tokenized=tokenized)


def test_manifest_describes_the_arrays(kaggle, tok):
    """The manifest's version, tokenizer hash, options, source hash, counts and length stats agree
    with the tokenizer, the source file and the arrays written next to it."""
    m = kaggle.manifest
    assert m["format_version"] == FORMAT_VERSION
    assert m["vocab_hash"] == text.vocab_hash(tok)
    assert (m["max_len"], m["split_policy"], m["transitive"]) == (32, "questions", False)
    with open(kaggle.src, "rb") as f:
        assert m["source_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert (m["pad_token_id"], m["cls_token_id"], m["sep_token_id"]) == \
        (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id)

    splits = load_splits(kaggle.out)
    for s, arr in splits.items():
        assert arr.dtype == np.int32 and arr.shape[1] == 3
        assert m["counts"][f"{s}_pairs"] == len(arr)
        assert m["counts"][f"{s}_questions"] == len(np.unique(arr[:, :2]))
    lengths = np.diff(load_tokens(kaggle.out)[1])
    assert m["token_lengths"] == {"mean": round(float(lengths.mean()), 2),
                                  "p50": int(np.percentile(lengths, 50)),
                                  "p95": int(np.percentile(lengths, 95)),
                                  "max": int(lengths.max()), "truncated": 0}
    audit_keys = {f"{kind}_shared_{a}_{b}" for kind in ("questions", "normalized_texts")
                  for a, b in (("train", "test"), ("train", "validation"), ("validation", "test"))}
    assert audit_keys <= set(m["leak_audit"])
    assert all(isinstance(v, int) for v in m["leak_audit"].values())


def test_token_arrays_hold_each_question(kaggle, tok):
    """uint16 tokens for MiniLM's 30522-word vocabulary; monotone offsets; every question is
    [CLS] ... [SEP] and decodes back to a lowercased source question, each source question once."""
    tokens, offsets = load_tokens(kaggle.out)
    assert tokens.dtype == np.uint16 and kaggle.manifest["token_dtype"] == "uint16"
    assert offsets[0] == 0 and offsets[-1] == len(tokens) and np.all(np.diff(offsets) >= 2)
    for q in question_tokens(kaggle.out):
        assert q[0] == tok.cls_token_id and q[-1] == tok.sep_token_id
    decoded = decoded_questions(kaggle.out, tok)
    source = {squash(r[c]) for r in kaggle.rows for c in (3, 4)}
    assert set(decoded) == source


def test_pairs_match_source_rows(kaggle, tok):
    """Every source row comes back as one (question1, question2, label) of some split."""
    assert kaggle.manifest["split_stats"]["pairs_dropped_crossing_splits"] == 0
    assert folder_pairs(kaggle.out, tok) == source_pairs(kaggle.rows)


def test_each_question_tokenized_once(kaggle):
    """One tokenizer pass over one text per distinct qid: no question is tokenized twice."""
    qids = {r[c] for r in kaggle.rows for c in (1, 2)}
    assert len(kaggle.tokenized) == len(qids) == kaggle.manifest["counts"]["questions"]
    assert len(load_tokens(kaggle.out)[1]) == len(qids) + 1


# ----------------------------------------------------------------------------- splits

def test_questions_split_is_leak_free(kaggle, tok):
    """Default policy: no question, by index or by normalized text (twins under other qids
    included), is in two splits, and the leak audit agrees."""
    assert_no_question_in_two_splits(kaggle.out, index_texts(kaggle.src, kaggle.out, tok, 32))
    audit = kaggle.manifest["leak_audit"]
    assert all(audit[f"{k}_shared_{a}_{b}"] == 0 for k in ("questions", "normalized_texts")
               for a, b in SPLIT_PAIRS)


@needs_real_data
def test_questions_split_is_leak_free_on_real_8k(tmp_path, tok):
    """On the real first 8k QQP rows: disjoint questions and texts, an all-zero leak audit, and
    split sizes near 80/10/10."""
    out = tmp_path / "prep"
    m = run(REAL_8K, out)
    assert_no_question_in_two_splits(out, index_texts(REAL_8K, out, tok, m["max_len"]))
    assert all(v == 0 for v in m["leak_audit"].values()), m["leak_audit"]
    total = m["counts"]["pairs_kept"]
    for s, frac in zip(SPLITS, (0.8, 0.1, 0.1)):
        assert abs(m["counts"][f"{s}_pairs"] / total - frac) < 0.03, m["counts"]


def chain_pairs(n_chains=20, n_single=60):
    """Pairs without qids: chains a=b, b=c of duplicates (closure adds a=c) and unrelated
    non-duplicates. Returns (pairs, the closure pairs as unordered squashed texts)."""
    pairs, closure = [], set()
    for k in range(n_chains):
        a, b, c = (f"How does chain {k} reach step {s}?" for s in ("one", "two", "three"))
        pairs += [(a, b, 1), (b, c, 1)]
        closure.add(frozenset((squash(a), squash(c))))
    pairs += [(f"Where is town {k}?", f"Who painted picture {k}?", 0) for k in range(n_single)]
    return pairs, closure


def test_random_transitive_adds_closure_and_leaks(tmp_path, tok):
    """The notebook's policy: --transitive adds every a=c of an a=b, b=c chain as a positive, and
    the pair-level random split then shares questions between splits (the audit shows it)."""
    pairs, closure = chain_pairs()
    out = tmp_path / "prep"
    m = run(generic_csv(tmp_path / "pairs.csv", pairs), out, "--split", "random", "--transitive")
    assert m["counts"]["transitive_pairs_added"] == len(closure)
    found = folder_pairs(out, tok)
    positives = {frozenset((a, b)) for (a, b, y) in found if y == 1}
    assert closure <= positives
    assert sum(found.values()) == len(pairs) + len(closure)
    audit = m["leak_audit"]
    assert sum(audit[f"questions_shared_{a}_{b}"] for a, b in SPLIT_PAIRS) > 0


def test_questions_transitive_closure_only_in_train(tmp_path, tok):
    """With the default policy, closure pairs are added to the training split only: each chain's
    pairs sit in one split, chains reach several splits, the training chains gain their a=c pair,
    validation and test keep exactly their labelled pairs, and splits stay disjoint."""
    pairs, closure = chain_pairs()
    out = tmp_path / "prep"
    src = generic_csv(tmp_path / "pairs.csv", pairs)
    m = run(src, out, "--transitive")
    texts = decoded_questions(out, tok)
    split_of_chain = collections.defaultdict(list)
    for s, arr in load_splits(out).items():
        for a, b, _ in arr.tolist():
            chain = re.search(r"chain(\d+)", texts[a])
            if chain:
                split_of_chain[chain.group(1)].append(s)
    assert len(split_of_chain) == len(closure)
    assert all(len(set(v)) == 1 for v in split_of_chain.values())
    reached = {v[0] for v in split_of_chain.values()}
    assert "train" in reached and len(reached) >= 2
    for v in split_of_chain.values():
        assert len(v) == (3 if v[0] == "train" else 2)  # a=b, b=c (+ a=c in train)
    in_train = sum(v[0] == "train" for v in split_of_chain.values())
    assert m["counts"]["transitive_pairs_added"] == in_train > 0
    plain = tmp_path / "plain"
    run(src, plain)
    for s in ("validation", "test"):
        assert np.array_equal(load_splits(out)[s], load_splits(plain)[s])
    index = {s: set(np.unique(a[:, :2]).tolist()) for s, a in load_splits(out).items()}
    assert all(not index[a] & index[b] for a, b in SPLIT_PAIRS)


# ----------------------------------------------------------------------------- truncation

def test_max_len_truncates_long_questions(tmp_path, tok):
    """A question longer than --max_len is cut to max_len tokens, still ending in [SEP], and is
    counted once in token_lengths.truncated even when it appears in two pairs."""
    long_q = "Why is " + "this question very " * 40 + "long?"
    pairs = [(long_q, "Is it short?", 0), ("How long is it?", long_q, 1),
             ("Where is the station?", "Where is the train station?", 1),
             ("Who wrote it?", "When was it written?", 0)]
    out = tmp_path / "prep"
    m = run(generic_csv(tmp_path / "pairs.csv", pairs), out, "--max_len", 16)
    questions = question_tokens(out)
    lengths = [len(q) for q in questions]
    assert max(lengths) == 16 and lengths.count(16) == 1
    assert m["token_lengths"]["truncated"] == 1 and m["token_lengths"]["max"] == 16
    cut = questions[lengths.index(16)]
    assert cut[0] == tok.cls_token_id and cut[-1] == tok.sep_token_id
    assert squash(long_q).startswith(squash(tok.decode(cut, skip_special_tokens=True)))


# ----------------------------------------------------------------------------- cache

@pytest.fixture
def built(tmp_path, capsys):
    """A folder built from 60 invented rows, its tokens.npy mtime set to 0 to spot any rewrite."""
    src, out = write_csv(tmp_path / "pairs.csv", synthetic_rows(60)), tmp_path / "prep"
    run(src, out, "--max_len", 32)
    os.utime(out / "tokens.npy", ns=(0, 0))
    capsys.readouterr()
    return SimpleNamespace(src=src, out=out, tokens=out / "tokens.npy")


def test_cache_reused_when_nothing_changed(built, capsys):
    """Same input and options: 'up to date', tokens.npy untouched; a touched but unchanged input
    file is still up to date (the cache keys on content)."""
    for _ in range(2):
        run(built.src, built.out, "--max_len", 32)
        assert "up to date" in capsys.readouterr().out
        assert os.stat(built.tokens).st_mtime_ns == 0
        os.utime(built.src)


def _rewrite_input(b):
    write_csv(b.src, synthetic_rows(60, seed=5))
    return ["--max_len", 32]


CHANGES = {  # name: (options after the change, given the fixture; manifest check)
    "max_len": (lambda b: ["--max_len", 24], lambda m, b: m["max_len"] == 24),
    "seed": (lambda b: ["--max_len", 32, "--seed", 1], lambda m, b: m["seed"] == 1),
    "input": (_rewrite_input, lambda m, b: m["source_sha256"] == data.file_sha256(b.src)),
    "force": (lambda b: ["--max_len", 32, "--force"], lambda m, b: True),
}


@pytest.mark.parametrize("change", CHANGES)
def test_cache_rebuilds_on_change(built, capsys, change):
    """Another --max_len, --seed, input content, or --force rebuilds the folder."""
    options, check = CHANGES[change]
    m = run(built.src, built.out, *options(built))
    assert "up to date" not in capsys.readouterr().out
    assert os.stat(built.tokens).st_mtime_ns != 0
    assert check(m, built)
