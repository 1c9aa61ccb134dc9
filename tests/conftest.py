"""Shared fixtures: pair files the tests write themselves (never QQP rows), tiny random encoders."""
import csv
import os
import random
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

REAL_8K = os.path.join(ROOT, "..", "shared", "data", "qqp", "qqp_first8k.csv.gz")
needs_real_data = pytest.mark.skipif(not os.path.exists(REAL_8K),
                                     reason="../shared/data/qqp/qqp_first8k.csv.gz is absent")

# Tiny random encoders (seconds to build and train); the vocabulary is the bundled MiniLM's, so
# the data can be tokenized with the real offline tokenizer.
TINY_BERT = dict(model_type="bert", vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=2, intermediate_size=64, max_position_embeddings=512)
TINY_DISTILBERT = dict(model_type="distilbert", vocab_size=30522, dim=32, n_layers=2, n_heads=2,
                       hidden_dim=64, max_position_embeddings=512)

SUBJECTS = ["python", "the moon", "a startup", "machine learning", "india", "coffee", "chess",
            "a bicycle", "quantum physics", "the stock market", "guitar", "photosynthesis"]
FRAMES = ["How do I learn {}?", "What is the best way to learn {}?", "Why is {} so popular?",
          "What are the benefits of {}?", "How can I get better at {} quickly?",
          "Is {} worth it in 2024?", "What should I know before starting {}?"]


def synthetic_rows(n, seed=0):
    """Kaggle-shaped rows with learnable labels: a pair is a duplicate when both questions use the
    same frame family and subject. Questions reuse qids the way QQP does."""
    rng = random.Random(seed)
    rows, qid_of = [], {}

    def qid(text):
        if text not in qid_of:
            qid_of[text] = len(qid_of) + 1
        return qid_of[text]

    for i in range(n):
        s1 = rng.choice(SUBJECTS)
        dup = rng.random() < 0.4
        s2 = s1 if dup else rng.choice([s for s in SUBJECTS if s != s1])
        f1 = rng.randrange(len(FRAMES))
        f2 = f1 if dup else rng.randrange(len(FRAMES))
        tail1 = "" if rng.random() < 0.5 else f" (asked {rng.randrange(50)})"
        tail2 = "" if rng.random() < 0.5 else f" (asked {rng.randrange(50)})"
        q1, q2 = FRAMES[f1].format(s1) + tail1, FRAMES[f2].format(s2) + tail2
        if q1 == q2:
            q2 = q2 + " really"
        rows.append([i, qid(q1), qid(q2), q1, q2, int(dup)])
    return rows


def write_csv(path, rows, header=("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
              delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return str(path)


@pytest.fixture
def pairs_csv(tmp_path):
    return write_csv(tmp_path / "pairs.csv", synthetic_rows(400))


@pytest.fixture
def tiny_data(tmp_path, pairs_csv):
    """A preprocessed folder of 400 synthetic pairs (bundled MiniLM tokenizer, default split)."""
    import preprocess
    out = str(tmp_path / "prep")
    preprocess.main([pairs_csv, "--out_dir", out, "--max_len", "32"])
    return out


def save_tiny_encoder(path, hf_config):
    """A tiny random encoder saved like a real HF model folder, with the bundled tokenizer."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    import torch
    from hub import BUNDLED_MODEL, resolve_model
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.for_model(**hf_config)).save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_model(BUNDLED_MODEL)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny_bert"), TINY_BERT)


@pytest.fixture(scope="session")
def tiny_distilbert_dir(tmp_path_factory):
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny_distilbert"), TINY_DISTILBERT)
