"""Tokenize a QQP pairs file once into memory-mapped arrays, split it without leaks.

    python preprocess.py ../shared/data/qqp/qqp_first8k.csv.gz --out_dir data/qqp8k   # CPU, seconds
    python preprocess.py train.csv --out_dir data/qqp          # Kaggle's 404k rows, < 1 min

Reads Kaggle's train.csv, the original quora_duplicate_questions.tsv, GLUE's QQP tsv files, or any
CSV/TSV (plain or gzipped) with two question columns and a 0/1 label. Writes into --out_dir, all
at once (built in a temp folder, then renamed into place):

    tokens.npy      (T,)   uint16/int32  every distinct question's token ids, concatenated
    offsets.npy     (Q+1,) int64         question i is tokens[offsets[i]:offsets[i+1]]
    train.npy, validation.npy, test.npy   (N, 3) int32   rows of (q1 index, q2 index, label)
    rejects.tsv     rows that could not be used, with row number, line and reason
    conflicts.tsv   the file rows of pairs given with both labels (kept, as in the file), and of
                    rows whose qid names another question's text (rejected), with the conflict
    manifest.json   format marker and version, tokenizer, options, counts, length stats, leak
                    audit, and the size and sha256 of every file

The default split (`--split questions`) keeps every question, by qid and by normalized text, in one
split only: the notebook split pairs at random after transitive augmentation, so its test questions
(and test labels implied by training labels) were seen in training. Re-running with the same input,
options and code reuses the folder after checking every file's hash; anything else rebuilds it.
--out_dir must be new, empty, or a data folder this script wrote holding nothing else (never one
holding the input); one run writes into it at a time (a lock beside it), and a failed or
interrupted write (SIGTERM, Ctrl-C: exit 143, 130) leaves no temp folder and the earlier folder
in place.
"""
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

import splits
import text
from cli import UserError, arg, parse_config, run
from data import (ARRAY_FILES, FORMAT_VERSION, SPLITS, FolderLock, check_out_dir, check_writable, load_manifest,
                  write_data_dir)
from hub import BUNDLED_MODEL, load_tokenizer, resolve_model

LIBRARY = ("preprocess.py", "text.py", "splits.py", "data.py", "hub.py")  # the code the output depends on
# The manifest's marker: a folder this script wrote (index.py's manifests say "qqp-question-index-v1").
DATA_FORMAT = "qqp-pair-data"


@dataclass
class PreprocessConfig:
    input: str = arg("", "pairs file: Kaggle's train.csv, Quora/GLUE .tsv, plain or .gz")
    out_dir: str = arg("data/qqp", "folder for the arrays and manifest (new, or one this script wrote)")
    encoder: str = arg(BUNDLED_MODEL, "whose tokenizer: the bundled offline MiniLM, an HF name or a folder")
    max_len: int = arg(128, "tokens per question incl. [CLS]/[SEP]; longer ones are truncated")
    split: Literal["questions", "random"] = arg(
        "questions", "'questions': no question in two splits; 'random': the notebook's pair split")
    val_frac: float = arg(0.1, "share of pairs for validation")
    test_frac: float = arg(0.1, "share of pairs for test")
    seed: int = arg(0, "split seed")
    transitive: bool = arg(False, "add the notebook's transitive-closure positives (--split questions: to "
                           "the training split only; random: before splitting, as the notebook)")
    force: bool = arg(False, "rebuild even if the folder is up to date")


def main(argv=None):
    cfg = parse_config(PreprocessConfig, argv, __doc__, positional=("input",))
    manifest = run(preprocess, cfg)  # Ctrl-C or SIGTERM: nothing half-written is left in or beside out_dir
    print_summary(manifest, cfg.out_dir)


def preprocess(cfg):
    """Every check that needs no work first (flags, the output place), then the work, under the
    output folder's lock."""
    check_config(cfg)
    check_out(cfg)
    with FolderLock(cfg.out_dir):
        return build(cfg)


def build(cfg):
    t0 = time.time()
    source_sha = text.file_sha256(cfg.input) if os.path.isfile(cfg.input) else None
    if source_sha is None and os.path.exists(cfg.input) and not os.path.isdir(cfg.input):
        print(f"note: {cfg.input} is not a regular file (a pipe?): it is read once and not hashed, so this "
              "folder is never reused by a later run, and index.py cannot re-read its questions from it")
    tok = load_tokenizer(cfg.encoder)
    check_max_len(cfg, tok)
    key = cache_key(cfg, source_sha, text.vocab_hash(tok))
    reused = reuse(cfg, key) if source_sha else None
    if reused:
        return reused

    pairs_read, rejects, rows_read = text.read_pairs(cfg.input)
    t_read = time.time()
    # A row whose qid names another question's text is rejected: keyed by qid, it would pair a
    # question it does not hold.
    pairs, qid_rejects = text.drop_qid_conflicts(pairs_read)
    rejects = sorted(rejects + qid_rejects)
    q1, q2, texts, _ = text.index_questions(pairs)
    labels = np.array(pairs["label"], np.int64)
    duplicates, conflict_rows = splits.pair_duplicates(q1, q2, labels, np.array(pairs["row"]), pairs["id"])
    norm_index = {}
    text_id = np.array([norm_index.setdefault(splits.normalize(t), len(norm_index)) for t in texts], np.int64)
    norm_texts = list(norm_index)
    question_norm = [norm_texts[i] for i in text_id.tolist()]
    del norm_index

    tokens, offsets, n_truncated, n_unreadable = text.tokenize(tok, texts, cfg.max_len)
    t_tok = time.time()

    # --- split: each pair to train (0), validation (1), test (2), or dropped (-1)
    fracs = (1 - cfg.val_frac - cfg.test_frac, cfg.val_frac, cfg.test_frac)
    split_stats, n_closure = {}, 0
    if cfg.split == "random":
        if cfg.transitive:  # notebook order: closure on everything, then split pairs at random
            a, b = splits.transitive_positives(q1, q2, labels)
            n_closure = len(a)
            q1, q2 = np.concatenate([q1, a]), np.concatenate([q2, b])
            labels = np.concatenate([labels, np.ones(len(a), np.int64)])
        pair_split = splits.split_random(len(q1), fracs, cfg.seed)
    else:
        pair_split, split_stats = splits.split_questions(q1, q2, labels, text_id, len(texts), fracs, cfg.seed)
    split_pairs = {}
    for s, name in enumerate(SPLITS):
        m = pair_split == s
        arr = np.stack([q1[m], q2[m], labels[m]], axis=1).astype(np.int32)  # (N, 3)
        if cfg.split == "questions" and cfg.transitive and name == "train":
            # Closure positives for training only: validation and test keep the labelled pairs,
            # so their metrics stay comparable with runs without --transitive.
            a, b = splits.transitive_positives(arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64), arr[:, 2])
            n_closure += len(a)
            arr = np.concatenate([arr, np.stack([a, b, np.ones(len(a), np.int64)], 1).astype(np.int32)])
        split_pairs[name] = arr
    audit = splits.leak_audit(split_pairs, question_norm)

    lengths = np.diff(offsets)
    manifest = {
        "format": DATA_FORMAT, "format_version": FORMAT_VERSION,
        "cache_key": key,
        "source": os.path.abspath(cfg.input), "source_sha256": source_sha,
        "tokenizer": cfg.encoder, "tokenizer_path": tok.name_or_path, "vocab_hash": key["vocab_hash"],
        "vocab_size": len(tok), "token_dtype": str(tokens.dtype),
        "pad_token_id": tok.pad_token_id, "cls_token_id": tok.cls_token_id,
        "sep_token_id": tok.sep_token_id,
        "max_len": cfg.max_len, "split_policy": cfg.split, "seed": cfg.seed,
        "fractions": dict(zip(SPLITS, fracs)), "transitive": cfg.transitive,
        "counts": {
            "rows_read": rows_read, "rows_rejected": len(rejects), "pairs_kept": len(pairs["q1"]),
            "questions": len(texts), "normalized_texts": len(norm_texts),
            "unreadable_questions": n_unreadable, "qid_text_conflicts": len(qid_rejects),
            "self_pairs": int((q1 == q2).sum()), **duplicates,
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
    arrays = {"tokens.npy": tokens, "offsets.npy": offsets, **{f"{n}.npy": a for n, a in split_pairs.items()}}
    files = {"rejects.tsv": tsv(("row", "line", "reason"), rejects),
             "conflicts.tsv": tsv(("row", "question1", "question2", "label", "conflict"),
                                  conflict_lines(conflict_rows, texts, pairs_read, qid_rejects))}
    return write_data_dir(cfg.out_dir, arrays, files, manifest)


def conflict_lines(conflict_rows, texts, pairs_read, qid_rejects):
    """conflicts.tsv's rows in file order, each with the texts its row holds: pairs given with both
    labels (kept) and rows whose qid names another question's text (rejected)."""
    lines = [(row, texts[i], texts[j], y, "kept: this pair is given with both labels")
             for row, i, j, y in conflict_rows]
    at = {row: i for i, row in enumerate(pairs_read["row"])} if qid_rejects else {}
    lines += [(row, *(pairs_read[k][at[row]] for k in ("q1", "q2", "label")), f"rejected: {reason}")
              for row, _, reason in qid_rejects]
    return sorted(lines)


def check_config(cfg):
    """Every flag checked before any work."""
    if not (0 <= cfg.val_frac < 1 and 0 <= cfg.test_frac < 1 and cfg.val_frac + cfg.test_frac < 1):
        raise UserError(f"--val_frac {cfg.val_frac} --test_frac {cfg.test_frac}: each must be in "
                        "[0, 1) and their sum below 1", "e.g. --val_frac 0.1 --test_frac 0.1")
    if cfg.max_len < 3:
        raise UserError(f"--max_len {cfg.max_len}: too short", "use at least 3 (e.g. 128)")
    if not 0 <= cfg.seed <= 2 ** 32 - 1:  # numpy's seed range
        raise UserError(f"--seed {cfg.seed}: out of range", f"use a seed in [0, {2 ** 32 - 1}]")


def is_data_manifest(m):
    """A manifest of a folder this script wrote: its marker, or (written before the marker) a
    format version and cache key and no other format."""
    if not isinstance(m, dict):
        return False
    if "format" in m:
        return m["format"] == DATA_FORMAT
    return isinstance(m.get("format_version"), int) and "cache_key" in m


def check_out(cfg):
    """--out_dir is new, empty, or a data folder this script wrote that holds nothing else (a
    rebuild replaces it whole), never the input's folder; and it can be written."""
    check_out_dir(cfg.out_dir, (cfg.input,))
    path = os.path.join(cfg.out_dir, "manifest.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                m = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"--out_dir {cfg.out_dir}: its manifest.json is unreadable ({type(e).__name__}), so "
                            "it cannot be told for a data folder preprocess.py wrote, and rebuilding would "
                            "replace it", "delete the folder if it is one, or pass another --out_dir") from None
        if not is_data_manifest(m):
            found = m.get("format", "none") if isinstance(m, dict) else type(m).__name__
            raise UserError(f"--out_dir {cfg.out_dir} is not a data folder preprocess.py wrote (its manifest.json "
                            f"says format {found}), and rebuilding would replace it",
                            "pass a new or empty folder, or one preprocess.py wrote")
        ours = set(m.get("files") or (*ARRAY_FILES, "rejects.tsv", "conflicts.tsv")) | {"manifest.json"}
        foreign = sorted(set(os.listdir(cfg.out_dir)) - ours)
        if foreign:
            raise UserError(f"--out_dir {cfg.out_dir} holds files preprocess.py did not write "
                            f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}), and rebuilding "
                            "would delete them", "move them out of the folder, or pass another --out_dir")
    check_writable(cfg.out_dir)


def check_max_len(cfg, tok):
    """--max_len within what the encoder takes: its tokenizer's model_max_length (when it is a
    real number, not transformers' huge 'no limit' value) and its config's
    max_position_embeddings (when it has a config). A longer one fails only at train time."""
    limits = {}
    if isinstance(tok.model_max_length, (int, float)) and 0 < tok.model_max_length < 1_000_000:
        limits["the tokenizer's model_max_length"] = int(tok.model_max_length)
    try:
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(resolve_model(cfg.encoder), local_files_only=True)
    except (OSError, ValueError, KeyError):
        config = None  # a tokenizer alone: nothing more to check
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits["the encoder's max_position_embeddings"] = positions
    if limits:
        what, limit = min(limits.items(), key=lambda kv: kv[1])
        if cfg.max_len > limit:
            raise UserError(f"--max_len {cfg.max_len}: over the {limit} tokens {cfg.encoder} takes ({what})",
                            f"pass --max_len {limit} or less (e.g. 128)")


def cache_key(cfg, source_sha, tok_hash):
    """Everything the output depends on; a folder whose manifest has the same key is reused."""
    options = {k: v for k, v in asdict(cfg).items() if k not in ("input", "out_dir", "force")}
    here = os.path.dirname(os.path.abspath(__file__))
    code = "".join(text.file_sha256(os.path.join(here, name)) for name in LIBRARY)
    return {"format_version": FORMAT_VERSION, "source_sha256": source_sha,
            "code_sha256": hashlib.sha256(code.encode()).hexdigest()[:16],
            "vocab_hash": tok_hash, **options}


def reuse(cfg, key):
    """The folder's manifest if it is up to date and intact (every file's hash checked), else None."""
    if cfg.force or not os.path.isfile(os.path.join(cfg.out_dir, "manifest.json")):
        return None
    try:
        old = load_manifest(cfg.out_dir, verify="hash")
    except UserError as e:
        print(f"note: rebuilding {cfg.out_dir}: {str(e).split('. Fix:')[0]}")
        return None
    if old.get("cache_key") != key:
        return None
    print(f"{cfg.out_dir}: up to date with {cfg.input} and these options, every file checked; "
          "reusing it (--force rebuilds)")
    return old


def tsv(header, rows):
    """Tab-separated text; tabs and newlines inside fields become spaces."""
    def clean(v):
        return " ".join(str(v).split()) if isinstance(v, str) else str(v)
    return "".join("\t".join(map(clean, r)) + "\n" for r in [header, *rows])


def length_stats(lengths, n_truncated):
    if len(lengths) == 0:
        return {}
    return {"mean": round(float(lengths.mean()), 2), "p50": int(np.percentile(lengths, 50)),
            "p95": int(np.percentile(lengths, 95)), "max": int(lengths.max()),
            "truncated": int(n_truncated)}


def print_summary(m, out_dir):
    c, L, a = m["counts"], m["token_lengths"], m["leak_audit"]
    print(f"read {c['rows_read']:,} rows, rejected {c['rows_rejected']:,}"
          f"{' (see ' + os.path.join(out_dir, 'rejects.tsv') + ')' if c['rows_rejected'] else ''}, "
          f"{c['questions']:,} distinct questions tokenized with {m['tokenizer']}")
    if c["transitive_pairs_added"]:
        print(f"transitive closure added {c['transitive_pairs_added']:,} positive pairs")
    repeats = {k: c[k] for k in ("duplicate_ids", "duplicate_pairs", "pairs_with_conflicting_labels",
                                 "self_pairs") if c.get(k)}
    if repeats:
        print("kept as in the file: " + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in repeats.items())
              + (f" (see {os.path.join(out_dir, 'conflicts.tsv')})" if c.get("pairs_with_conflicting_labels") else ""))
    if c.get("qid_text_conflicts"):
        print(f"rejected {c['qid_text_conflicts']:,} rows whose qid names another question's text "
              f"(see {os.path.join(out_dir, 'conflicts.tsv')})")
    if c.get("unreadable_questions"):
        print(f"warning: {c['unreadable_questions']:,} questions tokenize to nothing but [UNK] "
              f"(emoji, other scripts): the model sees no content in them")
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
    print(f"{out_dir}: built in {m['seconds']['total']} s")


if __name__ == "__main__":
    main()
