"""The retrieval benchmark of a data folder (search.py --eval): which questions of a split are
queries, which questions are their duplicates, what the corpus is, and the ranking metrics. The
split is test for reported numbers and validation for choosing among models (train.py's recipe was
chosen there, docs/recipe_2026-11-30.md), so that test is read once.

    queries   every question of the split (test by default) with a labelled duplicate in that split
    relevant  its duplicates: the transitive closure of the split's positive pairs, never itself
    corpus    every question of every split except the query (an index of exactly that folder:
              question i of the folder = row i of the index; check_index_of_folder)
    metrics   recall@1/5/10, MRR@10, nDCG@10 (binary gains), means over queries and per query
"""
from functools import partial

import numpy as np
import torch

from cli import UserError
from data import SPLITS, PairDataset, load_manifest
from retrieval import exact_search, exclude_rows, folder_content, rebuild_command

EVAL_SPLITS = ("validation", "test")  # the train split's questions are what the model learnt from


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


def eval_protocol(data_dir, n_questions, split="test"):
    """The retrieval benchmark of a data folder (question i = index row i). Queries: every
    question of `split` with a labelled duplicate in that split; relevant: its duplicates, the
    transitive closure of the split's positive pairs, never itself; the corpus: every question of
    every split except the query. Returns (queries (Q,), relevant: list of Q arrays, outside (O,):
    rows in no split, kept out of the corpus too)."""
    from splits import components
    if split not in EVAL_SPLITS:
        raise UserError(f"--split {split}: the benchmark reads one of {', '.join(EVAL_SPLITS)}",
                        "pass --split validation (to choose a model) or --split test (to report it)")
    pairs = PairDataset(data_dir, split).pairs.astype(np.int64)
    pos = pairs[(pairs[:, 2] == 1) & (pairs[:, 0] != pairs[:, 1])][:, :2]
    if len(pos) == 0:
        raise UserError(f"{data_dir}: the {split} split has no duplicate pair, so the benchmark has no query",
                        "re-run preprocess.py with a larger --val_frac / --test_frac, or pass the other --split")
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


def excluded_rows(queries, outside):
    """(Q, 1 + O) rows each query's search must skip: the query itself and the rows in no split."""
    return np.concatenate([queries[:, None], np.broadcast_to(outside, (len(queries), len(outside)))], axis=1)


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


def folder_benchmark(unit_vectors, data_dir, split="test", k=10):
    """The benchmark of `split` by exact cosine, from the L2-normalized vectors (N, H) of every
    question of the folder (row i = its question i): what search.py --eval reports for an index of
    that folder, without writing one (tools/recipe_study.py compares many models this way).
    Returns (mean metrics, per-query metrics), as ranking_metrics."""
    queries, relevant, outside = eval_protocol(data_dir, len(unit_vectors), split)
    matrix = torch.as_tensor(np.ascontiguousarray(unit_vectors, np.float32))
    _, rows = exclude_rows(partial(exact_search, matrix, matrix[torch.from_numpy(queries)].numpy()), k,
                           excluded_rows(queries, outside))
    return ranking_metrics(rows, relevant)
