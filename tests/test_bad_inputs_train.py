"""train.py on bad inputs and interruptions: one run per --out_dir, an output place it cannot write,
data longer than the encoder's positions, every numeric flag's range, signals, single-class data.
Each case is a one-line `error: ... Fix: ...` with exit code 2 before any work (or the exit code
of the signal after saving), never a traceback."""
import errno
import json
import math
import os
import signal
from dataclasses import fields

import pytest

import data
import engine
import preprocess
import train
from conftest import TINY_BERT, save_tiny_encoder, synthetic_rows, write_csv
from model import load_checkpoint
from test_train import train_here

FAST = ["--epochs", "1", "--bs", "16", "--num_workers", "0", "--log_every_steps", "1", "--lr", "1e-3"]


def one_line_error(code, err):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and ". Fix: " in lines[0], (code, err)
    return lines[0]


def strict_json(text):
    """json.loads that refuses NaN and Infinity, as JSON readers outside Python do."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


# ----------------------------------------------------------------------------- one run per out_dir

def test_a_held_out_dir_is_refused_before_anything_in_it_is_touched(tmp_path, tiny_data, tiny_bert_dir, capsys):
    """Another run holds --out_dir (its lock is an flock, which conflicts between two open files
    even in one process): a new run, an --overwrite_output_dir and a --resume each stop with the
    holder's pid, and the folder is as it was (nothing deleted, last.pt never read)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "last.pt").write_bytes(b"not a checkpoint")  # read by --resume, deleted by --overwrite_output_dir
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    common = ["--data_dir", tiny_data, "--encoder", tiny_bert_dir, *FAST, "--out_dir", str(out)]
    with data.FolderLock(str(out)):
        for extra in ([], ["--overwrite_output_dir"], ["--resume"]):
            line = one_line_error(*train_here([*common, *extra], capsys)[::2])
            assert f"is in use by another run (pid {os.getpid()}" in line, line
    assert (out / "last.pt").read_bytes() == b"not a checkpoint"
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'
    # A run that fails after taking the lock gives it back (else this would be refused).
    assert "not a checkpoint this code can read" in one_line_error(*train_here([*common, "--resume"], capsys)[::2])
    with data.FolderLock(str(out)):
        pass


def test_overwrite_output_dir_deletes_the_earlier_run_only_once_the_inputs_are_good(tmp_path, tiny_data,
                                                                                    tiny_bert_dir, capsys):
    """A typo in --data_dir or --encoder with --overwrite_output_dir is one line, and the earlier run
    is still there; with good inputs it goes."""
    out = tmp_path / "out"
    common = ["--data_dir", tiny_data, "--encoder", tiny_bert_dir, *FAST, "--out_dir", str(out), "--max_steps", "1"]
    assert train_here(common, capsys)[0] == 0
    before = (out / "ckpt.pt").read_bytes()
    for typo in (["--data_dir", str(tmp_path / "nope")], ["--encoder", str(tmp_path / "no_encoder")]):
        line = one_line_error(*train_here([*common, *typo, "--overwrite_output_dir"], capsys)[::2])
        assert "nope" in line or "no_encoder" in line, line
        assert (out / "ckpt.pt").read_bytes() == before and (out / "last.pt").exists()
    code, printed, _ = train_here([*common, "--overwrite_output_dir", "--seed", "1"], capsys)
    assert code == 0 and "deleting the earlier run" in printed


def test_resume_from_a_ckpt_copied_over_last_pt_is_one_line(tmp_path, tiny_data, tiny_bert_dir, capsys):
    out = tmp_path / "out"
    common = ["--data_dir", tiny_data, "--encoder", tiny_bert_dir, *FAST, "--out_dir", str(out), "--max_steps", "1"]
    assert train_here(common, capsys)[0] == 0
    (out / "last.pt").write_bytes((out / "ckpt.pt").read_bytes())
    line = one_line_error(*train_here([*common, "--resume"], capsys)[::2])
    assert "holds no optimizer, scheduler, scaler, rng (a ckpt.pt copied over it" in line


def test_an_out_dir_in_or_of_an_input_or_a_data_folder_is_refused(tmp_path, tiny_data, tiny_bert_dir, capsys):
    common = ["--data_dir", tiny_data, "--encoder", tiny_bert_dir, *FAST]
    listed = sorted(os.listdir(tiny_data)), sorted(os.listdir(tiny_bert_dir))
    for out in (tiny_data, os.path.join(tiny_data, "run"), tiny_bert_dir):
        line = one_line_error(*train_here([*common, "--out_dir", out], capsys)[::2])
        assert "is, holds or lies in an input" in line, line
    copy = tmp_path / "copy"  # a data folder, not this run's input: still no place for a run
    copy.mkdir()
    (copy / "manifest.json").write_text("{}")
    line = one_line_error(*train_here([*common, "--out_dir", str(copy)], capsys)[::2])
    assert "holds a manifest.json: a data or index folder" in line
    assert (sorted(os.listdir(tiny_data)), sorted(os.listdir(tiny_bert_dir))) == listed  # nothing written


# ----------------------------------------------------------------------------- where it writes

def test_an_out_dir_under_a_file_is_refused_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    # The data folder does not exist either: the out_dir check must come first.
    line = one_line_error(*train_here(["--data_dir", str(tmp_path / "none"), "--out_dir", str(a_file / "run")],
                                      capsys)[::2])
    assert "is a file, so nothing can be written under it" in line
    assert a_file.read_text() == "mine"


def test_a_read_only_out_dir_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """A read-only filesystem (simulated: this may run as root, which chmod does not stop)."""
    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(data.tempfile, "mkstemp", read_only)
    line = one_line_error(*train_here(["--data_dir", str(tmp_path / "none"), "--out_dir", str(tmp_path / "run")],
                                      capsys)[::2])
    assert "is not writable (Read-only file system)" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_folder_without_write_permission_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    line = one_line_error(*train_here(["--data_dir", str(tmp_path / "none"), "--out_dir", str(locked / "run")],
                                      capsys)[::2])
    assert "is not writable" in line


# ----------------------------------------------------------------------------- lengths the encoder takes

@pytest.fixture(scope="module")
def long_data(tmp_path_factory):
    """Synthetic pairs preprocessed with --max_len 300 (the bundled tokenizer takes 512)."""
    tmp = tmp_path_factory.mktemp("long")
    out = str(tmp / "prep")
    preprocess.main([write_csv(tmp / "pairs.csv", synthetic_rows(200)), "--out_dir", out, "--max_len", "300"])
    return out


@pytest.fixture(scope="module")
def short_encoders(tmp_path_factory):
    """Tiny BERTs with the bundled tokenizer (512 tokens) but fewer positions: 256 and 48."""
    return {n: save_tiny_encoder(tmp_path_factory.mktemp(f"enc{n}"), {**TINY_BERT, "max_position_embeddings": n})
            for n in (256, 48)}


@pytest.mark.parametrize("data_name,positions,arch,message", [
    ("long", 256, "siamese", "--max_len 300, longer than the 256 positions"),
    ("long", 512, "cross", None),  # joined pairs are cut at 512 tokens (data.Collator)
    ("tiny", 48, "siamese", None),  # max_len 32
    ("tiny", 48, "cross", "--max_len 32: joined pairs of up to 63 tokens, longer than the 48 positions"),
])
def test_data_longer_than_the_encoders_positions_is_refused_before_training(
        tmp_path, tiny_data, long_data, tiny_bert_dir, short_encoders, data_name, positions, arch, message, capsys):
    data_dir = {"long": long_data, "tiny": tiny_data}[data_name]
    encoder = {512: tiny_bert_dir, **short_encoders}[positions]
    code, out, err = train_here(["--data_dir", data_dir, "--encoder", encoder, "--arch", arch, *FAST,
                                 "--max_steps", "1", "--out_dir", str(tmp_path / "run")], capsys)
    if message is None:
        assert code == 0, err[-2000:]
        return
    line = one_line_error(code, err)
    assert message in line and "re-run preprocess.py with --max_len" in line, line
    assert "step" not in out and not os.path.exists(tmp_path / "run" / "last.pt")


# ----------------------------------------------------------------------------- every numeric flag's range

NUMERIC = {f.name for f in fields(train.TrainConfig) if f.type in (int, float)}
BAD_VALUES = [  # (flag, a value out of its range, what the error says)
    ("wise_alpha", "1.5", "--wise_alpha 1.5: out of range, must be in [0, 1]"),
    ("wise_alpha", "-0.1", "must be in [0, 1]"),
    ("encoder_lr", "-0.00002", "--encoder_lr -2e-05: out of range, must be 0 or more"),
    ("freeze_layers", "-1", "--freeze_layers -1: out of range, must be 0 or more"),
    ("hidden", "-5", "--hidden -5: out of range, must be at least 1"),
    ("hidden", "0", "--hidden 0: out of range, must be at least 1"),
    ("dropout", "1", "--dropout 1.0: out of range, must be in [0, 1)"),
    ("dropout", "-0.1", "must be in [0, 1)"),
    ("cosine_prior", "-1", "--cosine_prior -1.0: out of range, must be 0 or more"),
    ("cosine_shift", "2", "--cosine_shift 2.0: out of range, must be in [-1, 1]"),
    ("aux_weight", "0", "--aux_weight 0.0: out of range, must be more than 0"),
    ("mnrl_scale", "-3", "must be more than 0"),
    ("contrastive_margin", "0", "must be in (0, 2]"),
    ("contrastive_margin", "2.5", "must be in (0, 2]"),
    ("epochs", "0", "--epochs 0: out of range, must be at least 1"),
    ("batch_size", "0", "--batch_size 0: out of range, must be at least 1"),
    ("grad_accum_steps", "-1", "must be at least 1"),
    ("max_steps", "-1", "--max_steps -1: out of range, must be 0 or more"),
    ("lr", "0", "--lr 0.0: out of range, must be more than 0"),
    ("lr", "nan", "--lr nan: out of range, must be more than 0"),
    ("weight_decay", "-1", "--weight_decay -1.0: out of range, must be 0 or more"),
    ("weight_decay", "inf", "--weight_decay inf: out of range"),
    ("warmup_ratio", "1.5", "must be in [0, 1]"),
    ("clip", "0", "must be more than 0"),
    ("seed", "-1", "--seed -1: out of range, must be in [0, 4294967295]"),
    ("seed", str(2 ** 32), "must be in [0, 4294967295]"),
    ("eval_every_steps", "-2", "must be 0 or more"),
    ("early_stopping_patience", "-1", "must be 0 or more"),
    ("save_every_steps", "-1", "must be 0 or more"),
    ("log_every_steps", "0", "must be at least 1"),
    ("num_workers", "-1", "must be in [0, 64]"),
    ("num_workers", "100000", "must be in [0, 64]"),
]


def test_every_numeric_flag_has_a_range_in_the_table():
    assert {name for name, _, _ in BAD_VALUES} == NUMERIC


@pytest.mark.parametrize("name,value,message", BAD_VALUES, ids=[f"{n}={v}" for n, v, _ in BAD_VALUES])
def test_a_numeric_flag_out_of_range_is_one_line(tmp_path, name, value, message, capsys):
    # The data folder does not exist: the flag must be refused before anything is read.
    line = one_line_error(*train_here(["--data_dir", str(tmp_path / "none"), "--out_dir", str(tmp_path / "o"),
                                       f"--{name}", value], capsys)[::2])
    assert message in line and f"e.g. --{name} " in line, line
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("flags", [
    {"hidden": 1, "dropout": 0.0, "cosine_prior": 0.0, "cosine_shift": -1.0, "weight_decay": 0.0, "max_steps": 0,
     "warmup_ratio": 0.0, "seed": 0, "contrastive_margin": 2.0, "num_workers": 0, "eval_every_steps": 0},
    {"cosine_shift": 1.0, "warmup_ratio": 1.0, "seed": 2 ** 32 - 1, "lr": 1e-9, "clip": 1e-6, "aux_weight": 1e-3},
])
def test_the_ends_of_each_range_are_accepted(flags):
    train.check_config(train.TrainConfig(**flags))


# ----------------------------------------------------------------------------- signals

@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_then_exits_with_its_code(tmp_path, tiny_data, tiny_bert_dir, monkeypatch, sig, code, capsys):
    """`train && evaluate` must not go on after an interrupted run: last.pt is saved, the test pass
    skipped, and the exit code is the shell's for that signal (128 + its number)."""
    real_step = engine.train_step
    calls = []

    def step_then_signal(*a, **k):
        loss = real_step(*a, **k)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), sig)  # the run's handler records it; the loop stops after this step
        return loss
    monkeypatch.setattr(engine, "train_step", step_then_signal)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out = tmp_path / "run"
    got, stdout, err = train_here(["--data_dir", tiny_data, "--encoder", tiny_bert_dir, *FAST, "--out_dir", str(out)],
                                  capsys)
    assert got == code, err[-2000:]
    assert f"stopped by signal {int(sig)}: saved {out}/last.pt; continue with --resume" in stdout
    assert "Traceback" not in err
    assert load_checkpoint(str(out / "last.pt"))["step"] == 2 and len(calls) == 2
    assert not (out / "test_results.json").exists()
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the handlers given back
    with data.FolderLock(str(out)):  # and the lock
        pass


def test_a_run_that_fails_mid_loop_gives_back_the_signal_handlers_and_the_lock(tmp_path, tiny_data, tiny_bert_dir,
                                                                               monkeypatch, capsys):
    """Else Ctrl-C would stay swallowed in the process that called train.main."""
    import objectives
    monkeypatch.setattr(objectives, "pair_loss", lambda logits, labels: logits.sum() * float("nan"))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out = tmp_path / "run"
    line = one_line_error(*train_here(["--data_dir", tiny_data, "--encoder", tiny_bert_dir, *FAST,
                                       "--out_dir", str(out)], capsys)[::2])
    assert line.startswith("error: non-finite loss")
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    with data.FolderLock(str(out)):
        pass


# ----------------------------------------------------------------------------- single-class data

@pytest.fixture(scope="module")
def one_class_data(tmp_path_factory):
    """Synthetic pairs, every one labelled not-duplicate."""
    tmp = tmp_path_factory.mktemp("oneclass")
    rows = [[*row[:5], 0] for row in synthetic_rows(200)]
    out = str(tmp / "prep")
    preprocess.main([write_csv(tmp / "pairs.csv", rows), "--out_dir", out, "--max_len", "32"])
    return out


def test_single_class_validation_warns_once_and_writes_null_not_nan(tmp_path, one_class_data, tiny_bert_dir,
                                                                    capsys):
    out = tmp_path / "run"
    code, stdout, err = train_here(["--data_dir", one_class_data, "--encoder", tiny_bert_dir, *FAST, "--max_steps",
                                    "4", "--eval_every_steps", "2", "--out_dir", str(out)], capsys)
    assert code == 0, err[-2000:]
    warnings = [line for line in stdout.splitlines() if "one class" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "ROC-AUC" in warnings[0], warnings
    records = [strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert all(r["roc_auc"] is None and r["average_precision"] is None for r in records)
    assert all(isinstance(r["accuracy"], float) and math.isfinite(r["val_loss"]) for r in records)
    test_results = strict_json((out / "test_results.json").read_text())
    assert test_results["roc_auc"] is None and test_results["average_precision"] is None


def test_single_class_validation_cannot_pick_checkpoints_by_an_undefined_metric(tmp_path, one_class_data,
                                                                                 tiny_bert_dir, capsys):
    for metric in ("roc_auc", "average_precision"):
        line = one_line_error(*train_here(["--data_dir", one_class_data, "--encoder", tiny_bert_dir, *FAST,
                                           "--metric_for_best", metric, "--out_dir", str(tmp_path / metric)],
                                          capsys)[::2])
        assert f"--metric_for_best {metric}" in line and "one class" in line, line


def test_json_safe_turns_non_finite_numbers_into_null():
    from metrics import compute_metrics, json_safe
    m = compute_metrics([0, 0, 0], [0.1, 0.2, 0.7])  # one class: ROC-AUC and AP are undefined (NaN)
    assert math.isnan(m["roc_auc"]) and math.isnan(m["average_precision"])
    safe = json_safe(m)
    assert safe["roc_auc"] is None and safe["average_precision"] is None
    assert safe["accuracy"] == m["accuracy"] and safe["confusion_matrix"] == m["confusion_matrix"]
    assert strict_json(json.dumps(safe)) == safe
    assert json_safe({"a": [float("inf"), 1.5, {"b": float("-inf")}]}) == {"a": [None, 1.5, {"b": None}]}
