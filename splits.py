"""Splitting pairs into train / validation / test, and auditing the split for leaks.

- split_questions (the default policy): questions linked by a pair or by identical normalized text
  form groups; groups go whole into one split, so no question is in two splits.
- split_random: the notebook's policy, pairs shuffled and cut by share (leaky: kept for comparison).
- transitive_positives: the notebook's augmentation (every pair inside a duplicate cluster).
- leak_audit: questions and normalized texts shared between splits, and labels of one split
  implied by another's.
"""
import numpy as np


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


def pair_duplicates(q1, q2, labels, rows, ids=None):
    """What a pairs file repeats: pair ids used more than once, the same unordered question pair
    given more than once, and pairs given with both labels. Returns (counts, conflict_rows): the
    file rows of every pair with conflicting labels, as (row, q1 index, q2 index, label)."""
    a, b = np.minimum(q1, q2), np.maximum(q1, q2)
    key = a * (int(max(q1.max(), q2.max())) + 1) + b  # one integer per unordered pair
    uniq, inverse, count = np.unique(key, return_inverse=True, return_counts=True)
    has_pos = np.bincount(inverse, weights=labels == 1, minlength=len(uniq)) > 0
    has_neg = np.bincount(inverse, weights=labels == 0, minlength=len(uniq)) > 0
    conflicting = has_pos & has_neg
    rows_in = np.flatnonzero(conflicting[inverse])
    counts = {"duplicate_ids": 0 if ids is None else len(ids) - len(set(ids)),
              "duplicate_pairs": int((count - 1).sum()),
              "pairs_with_conflicting_labels": int(conflicting.sum())}
    conflict_rows = [(int(rows[i]), int(q1[i]), int(q2[i]), int(labels[i])) for i in rows_in]
    return counts, conflict_rows
