"""Find the questions already asked that a new question duplicates, in an index of index.py.

    # CPU smoke, on the index of index.py's smoke run (seconds):
    python search.py runs/idx8k "How can I learn Python quickly?" --k 5
    # the retrieval benchmark of the real 8k rows (fine-tuned encoder, classifier rerank), ~2 min:
    python index.py out/qqp8k/ckpt.pt data/qqp8k --out_dir runs/index_ft8k
    python search.py runs/index_ft8k --eval data/qqp8k --rerank
    python search.py runs/index_ft8k --eval data/qqp8k --split validation   # to choose a model (test: report)
    # GPU, a file of new questions against Kaggle's 538k, through the ANN index:
    python search.py runs/index --queries new_questions.csv --out matches.csv --ann --batch_size 2048

Modes:
    one query        the top --k questions by cosine, printed (stdout holds only the answer)
    --queries FILE   a CSV/TSV with a question column, a .txt (one a line) or a pairs file -> --out CSV,
                     --k rows per usable query; unusable rows counted, listed in <out>.rejects.tsv
                     (only beside results that had some: an earlier run's is removed)
    --eval DATA_DIR  the benchmark (index of that folder): every question of --split (test) with a
                     labelled duplicate in that split is a query, its duplicates (transitive closure
                     inside the split) are the answers, the corpus is every question of every split but
                     the query; recall@1/5/10, MRR@10, nDCG@10 -> results.json, per_query.csv, a table
                     row. --split validation is the one to choose models, flags or recipes on
    --speed          exact and ANN latency on this index, 200 of its rows as queries -> speed.json

Search is exact by default: cosine of L2-normalized vectors, a chunked matmul over the whole index
(on the GPU when there is one). --ann searches the index's faiss IVF index instead (index.py --ann)
and reports its recall@k against exact search on (up to 1,000 of) the same queries. --bm25 is the
lexical baseline over the question texts. --rerank re-scores the top --rerank_depth candidates with
the checkpoint's pair classifier and orders them by its duplicate probability, printed next to the
cosine.

Queries are embedded with the model the index was built with (its manifest names it); a checkpoint
that changed since, or another model, is refused: their vectors are not comparable. A query the
vocabulary cannot read (emoji, other scripts: nothing but [UNK]) gets a warning on stderr: its
answers mean nothing. Every output place is checked for writing before any work.
"""
import csv
import os
import sys
from dataclasses import asdict, dataclass
from functools import partial
from typing import Literal

import numpy as np

import engine
import report
import retrieval
from cli import WORKERS_RANGE, UserError, arg, check_ranges, parse_config, require_packages, run
from data import check_out_file, check_writable
from measure import measure_speed
from model import describe_model
from search_eval import EVAL_SPLITS, check_index_of_folder, eval_protocol, excluded_rows, ranking_metrics
from text import write_table


# What each numeric flag may be: (test, the rule in words).
RANGES = {"k": (lambda v: v >= 1, "at least 1"), "nprobe": (lambda v: v >= 0, "0 (as calibrated) or more"),
          "rerank_depth": (lambda v: v >= 1, "at least 1"), "batch_size": (lambda v: v >= 1, "at least 1"),
          "num_workers": WORKERS_RANGE}


@dataclass
class SearchConfig:
    index: str = arg("", "index folder written by index.py")
    query: str = arg("", "one question, in quotes")
    queries: str = arg("", "many questions: a CSV/TSV with a question column, a .txt, or a pairs file")
    out: str = arg("search_results.csv", "where --queries results go (never over an input or an existing file)")
    overwrite: bool = arg(False, "replace an existing --out file, or another run's results in --out_dir")
    eval: str = arg("", "the retrieval benchmark on this data folder (the index must be of this folder)")
    split: Literal[EVAL_SPLITS] = arg("test", "--eval: the split whose questions are the queries (validation: "
                                      "to choose a model; test: to report it, once)")
    speed: bool = arg(False, "measure exact and ANN latency on this index")
    out_dir: str = arg("", "--eval / --speed results (default runs/search/<index>_<system>)")
    k: int = arg(10, "answers per query")
    ann: bool = arg(False, "search the index's ANN index (index.py --ann) instead of all vectors")
    nprobe: int = arg(0, "IVF lists probed with --ann (0: the one calibrated when the index was built)")
    bm25: bool = arg(False, "the lexical baseline: BM25 over the question texts instead of the vectors")
    rerank: bool = arg(False, "re-score the top --rerank_depth with the checkpoint's pair classifier")
    rerank_depth: int = arg(50, "candidates --rerank re-scores")
    checkpoint: str = arg("", "the index's checkpoint where it is now, if it moved (fingerprint-checked)")
    batch_size: int = arg(256, "queries per encoder pass", aliases=["--bs"])
    num_workers: int = arg(0, "DataLoader workers collating batches")
    device: str = arg("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = arg("auto", "auto: bf16 (else fp16) on GPU, fp32 on CPU")
    shapes: Literal[engine.SHAPES] = arg("auto", engine.SHAPES_HELP)
    compile: Literal[engine.COMPILE_MODES] = arg("auto", engine.COMPILE_HELP)


def main(argv=None):
    cfg = parse_config(SearchConfig, argv, __doc__, positional=("index", "query"), optional=("query",))
    run(search, cfg)


def search(cfg):
    check_config(cfg)
    if cfg.eval or cfg.speed:  # a results folder of its own, held for the run (no other run's results in it)
        with report.results_folder(cfg.out_dir or results_dir(cfg), this_run(cfg), cfg.overwrite,
                                   input_paths(cfg)) as clear:
            return answer(cfg, clear)
    return answer(cfg)


def input_paths(cfg):
    return [os.path.realpath(p) for p in (cfg.index, cfg.queries, cfg.eval, cfg.checkpoint) if p]


def answer(cfg, clear=None):
    """clear: for --eval / --speed, deletes another run's results (--overwrite) when called, once
    this run's results are computed."""
    index = retrieval.Index(cfg.index)
    if cfg.ann:
        index.ann  # fail now, not after the queries are embedded, if it has none
    if cfg.eval:
        check_index_of_folder(index, cfg.eval)
    elif not cfg.speed:
        check_k(cfg.k, len(index))
    needs_model = not cfg.speed and (not cfg.bm25 or cfg.rerank)
    qe = retrieval.load_index_model(index, cfg.checkpoint, cfg.rerank) if needs_model else None
    qs = retrieval.read_questions(cfg.queries, distinct=False) if cfg.queries else None
    # Inputs are valid: now the device, its banner on stderr (stdout holds the answer).
    rt = engine.setup_runtime(cfg.device, cfg.precision, file=sys.stderr)
    if qe is not None:
        qe.to(rt.device)
    if cfg.speed:
        return speed(cfg, index, rt, clear)
    if cfg.eval:
        return evaluate(cfg, index, qe, rt, clear)
    texts = qs.texts if qs else [cfg.query.strip()]
    scores, rows, probs, ann_recall = retrieve(cfg, index, qe, texts, rt, np.zeros((len(texts), 0), np.int64))
    score_name = "bm25" if cfg.bm25 else "cosine"
    if qs is None:
        print_answers(texts[0], scores[0], rows[0], None if probs is None else probs[0], *index.questions,
                      score_name)
    else:
        write_answers(cfg.out, texts, qs.ids, scores, rows, probs, *index.questions, score_name, qs.rejects)
        print(f"{cfg.queries}: {qs.rows_read:,} rows, {len(qs.rejects):,} rejected"
              f"{' (see ' + cfg.out + '.rejects.tsv)' if qs.rejects else ''}; wrote the top {cfg.k} of "
              f"{len(index):,} questions for {len(texts):,} queries to {cfg.out}")
    if ann_recall is not None:
        print(f"ANN recall@{cfg.k} vs exact search on these queries: {ann_recall:.3f}", file=sys.stderr)


def check_config(cfg):
    """Every flag checked, and the output places made safe, before any work."""
    modes = [m for m, on in (("a query", cfg.query.strip()), ("--queries", cfg.queries), ("--eval", cfg.eval),
                             ("--speed", cfg.speed)) if on]
    if not modes:
        raise UserError("no question to search for (the query is empty or missing)",
                        'pass a question in quotes, e.g. search.py runs/index "How do I learn Python?", or '
                        "--queries FILE, --eval DATA_DIR or --speed")
    if len(modes) > 1:
        raise UserError(f"{' and '.join(modes)} together", "pass one of them")
    check_ranges(cfg, RANGES)
    if cfg.split != "test" and not cfg.eval:
        raise UserError(f"--split {cfg.split} without --eval", "add --eval DATA_DIR (the split is the benchmark's)")
    if cfg.bm25:
        require_packages(("bm25s",), "--bm25", "drop --bm25")
    if cfg.ann and cfg.bm25:
        raise UserError("--ann and --bm25 together", "--ann searches the vectors approximately, --bm25 the "
                        "texts: pick one")
    if cfg.nprobe and not (cfg.ann or cfg.speed):
        raise UserError("--nprobe without --ann", "add --ann (nprobe is the ANN index's search width)")
    if cfg.queries:
        check_out_file(cfg.out, input_paths(cfg), cfg.overwrite, "matches.csv", side_files=(".rejects.tsv",))
        if os.path.exists(f"{cfg.out}.rejects.tsv") and not cfg.overwrite:
            raise UserError(f"--out {cfg.out}: {cfg.out}.rejects.tsv exists (an earlier run's rejected rows)",
                            "pass --overwrite to replace both, or another --out")
        check_writable(cfg.out, "--out")


def check_k(k, corpus):
    if k > corpus:
        raise UserError(f"--k {k}: the corpus holds only {corpus:,} questions", f"use --k {corpus} or less")


def retrieve(cfg, index, qe, texts, rt, exclude):
    """Top --k rows of the index for each query text, without its excluded rows (exclude (Q, E)):
    (scores, rows, probabilities or None, ANN recall@k vs exact or None)."""
    depth = min(max(cfg.k, cfg.rerank_depth) if cfg.rerank else cfg.k, len(index))
    pooled = None
    if qe is not None:
        inference = retrieval.question_inference(qe, rt, cfg.batch_size, cfg.shapes, cfg.compile, cfg.num_workers)
        pooled = retrieval.embed_texts(qe, inference, texts, "embedding queries", verbose=len(texts) > 1)
    queries = None if pooled is None else retrieval.unit(pooled)[0]
    exact = None if cfg.bm25 else partial(retrieval.exact_search, index.matrix(rt.device))
    if cfg.bm25:
        search_fn = partial(retrieval.BM25(index.questions[1]).search, texts)
    elif cfg.ann:
        search_fn = partial(retrieval.ann_search, index.ann, queries,
                            nprobe=cfg.nprobe or index.manifest["ann"]["nprobe"])
    else:
        search_fn = partial(exact, queries)
    scores, rows = retrieval.exclude_rows(search_fn, depth, exclude)
    ann_recall = None
    if cfg.ann:  # against exact search, on at most 1,000 of the queries (exact costs what ANN saves)
        few = slice(0, 1000)
        exact_rows = retrieval.exclude_rows(partial(exact, queries[few]), cfg.k, exclude[few])[1]
        ann_recall = retrieval.overlap(rows[few, :cfg.k], exact_rows)
    probs = None
    if cfg.rerank:
        scores, rows, probs = retrieval.rerank(qe.classifier, pooled, index, scores, rows, rt)
        probs = probs[:, :cfg.k]
    return scores[:, :cfg.k], rows[:, :cfg.k], probs, ann_recall


def print_answers(query, scores, rows, probs, ids, texts, score_name):
    print(f"query: {query}")
    print(f"{'rank':>4}  {score_name:>6}  " + ("p(dup)  " if probs is not None else "") + f"{'id':>10}  question")
    for rank, (s, r) in enumerate(zip(scores, rows), 1):
        if r >= 0:
            prob = f"{probs[rank - 1]:.4f}  " if probs is not None else ""
            print(f"{rank:>4}  {s:6.4f}  {prob}{ids[r]:>10}  {texts[r]}")


def write_answers(path, queries, query_ids, scores, rows, probs, ids, texts, score_name, rejects=()):
    """--k rows per query (fewer where the ANN's probed lists held fewer); rejected query rows
    beside it (text.write_table: atomic, one run's)."""
    header = ["query_id", "query", "rank", score_name, *(["probability"] if probs is not None else []), "id",
              "question"]
    table = ([qid, text, rank, f"{scores[q, rank - 1]:.6f}",
              *([f"{probs[q, rank - 1]:.6f}"] if probs is not None else []), ids[r], texts[r]]
             for q, (qid, text) in enumerate(zip(query_ids, queries))
             for rank, r in enumerate(rows[q].tolist(), 1) if r >= 0)
    write_table(path, header, table, rejects)


def system_label(cfg, index):
    """The system's name in the results table."""
    label = "BM25 (bm25s, lexical)" if cfg.bm25 else \
        f"{describe_model(index.manifest['model'])}, {'ANN (faiss IVF)' if cfg.ann else 'exact cosine'}"
    return label + (f" + classifier rerank of the top {cfg.rerank_depth}" if cfg.rerank else "")


def run_tag(cfg):
    tag = "speed" if cfg.speed else "bm25" if cfg.bm25 else "ann" if cfg.ann else "exact"
    tag += "_rerank" if cfg.rerank and not cfg.speed else ""
    return tag + ("_validation" if cfg.eval and cfg.split == "validation" else "")  # test's keeps its name


def results_dir(cfg):
    return os.path.join("runs", "search", f"{os.path.basename(os.path.normpath(cfg.index))}_{run_tag(cfg)}")


def this_run(cfg):
    """What names an --eval or --speed run in its results.json / speed.json: a folder holding another
    run's is refused (report.check_results_dir), a re-run replaces its own."""
    return {"script": "search.py", "run": run_tag(cfg), "index": os.path.abspath(cfg.index),
            "data_dir": os.path.abspath(cfg.eval) if cfg.eval else None}


def evaluate(cfg, index, qe, rt, clear):
    """The retrieval benchmark of the data folder --eval, on an index of exactly that folder."""
    queries, relevant, outside = eval_protocol(cfg.eval, len(index), cfg.split)
    check_k(cfg.k, len(index) - len(outside) - 1)
    ids, texts = index.questions
    exclude = excluded_rows(queries, outside)
    scores, rows, probs, ann_recall = retrieve(cfg, index, qe, [texts[q] for q in queries.tolist()], rt, exclude)
    metrics, per_query = ranking_metrics(rows, relevant)
    label = system_label(cfg, index)
    out_dir = cfg.out_dir or results_dir(cfg)
    clear()
    os.makedirs(out_dir, exist_ok=True)
    results = {**this_run(cfg), "system": label, "config": asdict(cfg), "model": index.manifest["model"],
               "split": cfg.split,
               "protocol": f"queries: {cfg.split} questions with a labelled duplicate in the {cfg.split} split; "
                           f"relevant: their duplicates (transitive closure of the {cfg.split} positives); corpus: "
                           "every question of every split except the query",
               "queries": len(queries), "corpus": len(index) - len(outside) - 1,
               "relevant_per_query": float(np.mean([len(r) for r in relevant])),
               "metrics": metrics, "ann_recall_at_k_vs_exact": ann_recall,
               "ann": index.manifest.get("ann") if cfg.ann else None}
    with open(os.path.join(out_dir, "per_query.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)  # for error analysis: which queries miss their duplicates
        w.writerow(["row", "id", "relevant", *per_query, "question"])
        for i, q in enumerate(queries.tolist()):
            w.writerow([q, ids[q], len(relevant[i]), *(f"{v[i]:.4g}" for v in per_query.values()), texts[q]])
    report.write_results(out_dir, results, say=False)  # last: a folder with it holds a finished run
    print(f"retrieval benchmark of {cfg.eval}, {cfg.split} split: {len(queries):,} queries, "
          f"{results['relevant_per_query']:.2f} "
          f"relevant each on average, corpus {results['corpus']:,} questions"
          + (f"; ANN recall@{cfg.k} vs exact {ann_recall:.3f}" if ann_recall is not None else ""))
    names = [m for m in metrics if m != "queries"]
    header = [m.replace("mrr", "MRR").replace("ndcg", "nDCG") for m in names]
    print("| system | queries | " + " | ".join(header) + " |\n|---|---:|" + "---:|" * len(names))
    print(f"| {label} | {len(queries):,} | " + " | ".join(f"{metrics[m]:.3f}" for m in names) + " |")
    print(f"wrote {os.path.join(out_dir, 'results.json')} and per_query.csv")
    return results


def speed(cfg, index, rt, clear):
    """Latency of exact and ANN search on this index: 200 of its rows as queries, each kept out of
    its own answers."""
    rows = np.sort(np.random.default_rng(0).choice(len(index), min(200, len(index)), replace=False))
    check_k(cfg.k, len(index) - 1)
    built = None  # the index's own ANN; measure_speed builds one if it has none
    if index.manifest.get("ann") is not None:
        built = index.ann, {**index.manifest["ann"], "nprobe": cfg.nprobe or index.manifest["ann"]["nprobe"]}
    result = measure_speed(index.vectors, np.asarray(index.vectors[rows], np.float32), rt, k=cfg.k,
                           exclude=rows[:, None], ann=built)
    out_dir = cfg.out_dir or results_dir(cfg)
    clear()
    os.makedirs(out_dir, exist_ok=True)
    report.write_results(out_dir, {**this_run(cfg), **result}, "speed.json", say=False)
    ex, ann = result["exact"], result["ann"]
    print(f"{len(index):,} vectors, top {cfg.k}, {rt.device}: exact {ex['single_p50_ms']:.1f} / "
          f"{ex['single_p95_ms']:.1f} ms p50/p95 one query at a time, {ex['batched_p50_ms']:.2f} / "
          f"{ex['batched_p95_ms']:.2f} ms per query in batches of {ex['query_batch']}; ANN (nprobe "
          f"{ann['nprobe']}) "
          f"{ann['p50_ms']:.2f} / {ann['p95_ms']:.2f} ms, recall@{cfg.k} vs exact "
          f"{ann[f'recall_at_{cfg.k}_vs_exact']:.3f}; {result['disk_mb']:.0f} MB on disk (vectors, norms, ANN), "
          f"{sum(result['memory_mb'].values()):.0f} MB held in memory; wrote "
          f"{os.path.join(out_dir, 'speed.json')}")
    return result


if __name__ == "__main__":
    main()
