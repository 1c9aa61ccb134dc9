"""The retrieval benchmark of a data folder (search.py --eval): which test questions are queries,
which questions are their duplicates, what the corpus is, and the ranking metrics.

    queries   every test question with a labelled duplicate in the test split
    relevant  its duplicates: the transitive closure of the test split's positive pairs, never itself
    corpus    every question of every split except the query (an index of exactly that folder:
              question i of the folder = row i of the index; check_index_of_folder)
    metrics   recall@1/5/10, MRR@10, nDCG@10 (binary gains), means over queries and per query
"""
import numpy as np

from cli import UserError
from data import SPLITS, PairDataset, load_manifest
from retrieval import folder_content, rebuild_command


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
