"""The acceptance run on the real 8k rows: fine-tuned MiniLM must clearly beat the cosine baseline.

Opt-in (about 5 minutes on 2 CPU cores):  python -m pytest -q -m slow
"""
import json
import os

import pytest

from conftest import REAL_8K, needs_real_data


@pytest.mark.slow
@needs_real_data
def test_fine_tuned_beats_cosine_baseline_on_real_pairs(tmp_path):
    import baseline_cosine
    import preprocess
    import train
    data = str(tmp_path / "data")
    preprocess.main([REAL_8K, "--out_dir", data])
    baseline_cosine.main(["--data_dir", data, "--out_dir", str(tmp_path / "cosine")])
    with open(tmp_path / "cosine" / "results.json") as f:
        cosine = json.load(f)["results"]["test"]["metrics"]
    best_cosine = max(m["accuracy"] for m in cosine.values())

    out = str(tmp_path / "run")
    train.main(["--data_dir", data, "--epochs", "2", "--bs", "64", "--out_dir", out])
    with open(os.path.join(out, "test_results.json")) as f:
        fine_tuned = json.load(f)
    assert fine_tuned["accuracy"] >= 0.80
    assert fine_tuned["accuracy"] > best_cosine
