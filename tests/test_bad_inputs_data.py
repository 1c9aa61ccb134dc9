"""preprocess.py on bad output places and bad inputs: it never deletes what it did not write, two
runs never mix in one folder, a reused qid never swaps a question, an unwritable place or an
interruption leaves no temp folder, a --max_len the encoder cannot take is refused up front, and
odd files (UTF-16, repeated column names, pipes) are read or refused in one line.

Every pairs file here is invented (conftest.synthetic_rows)."""
import collections
import csv
import errno
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import data
import preprocess
import retrieval
import text
from cli import UserError
from conftest import ROOT, synthetic_rows, write_csv
from hub import BUNDLED_MODEL, load_tokenizer, resolve_model


def fails(argv, capsys):
    """preprocess.main must exit 2 with one error line; returns the line."""
    with pytest.raises(SystemExit) as e:
        preprocess.main([str(a) for a in argv])
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and ". Fix: " in lines[0], lines
    return lines[0]


def build(src, out, *options):
    preprocess.main([str(src), "--out_dir", str(out), "--max_len", "32", *map(str, options)])
    with open(os.path.join(out, "manifest.json")) as f:
        return json.load(f)


def leftovers(folder):
    """Temp folders, old copies and lock files a run may leave beside its --out_dir."""
    return sorted(n for n in os.listdir(folder) if ".tmp-" in n or ".old-" in n or n.endswith(".lock"))


def snapshot(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


@pytest.fixture
def src(tmp_path):
    return write_csv(tmp_path / "rows.csv", synthetic_rows(60))


@pytest.fixture
def tok():
    return load_tokenizer(BUNDLED_MODEL)


# ----------------------------------------------------------------------------- 1. whose folder

def test_input_inside_the_out_dir_is_refused_and_kept(src, tmp_path, capsys):
    """`cp rows.csv d/mine.csv; preprocess.py d/mine.csv --out_dir d` once deleted mine.csv."""
    d = tmp_path / "d"
    build(src, d)
    shutil.copy(src, d / "mine.csv")
    before = snapshot(d)
    assert "input" in fails([d / "mine.csv", "--out_dir", d, "--seed", 1], capsys)
    assert snapshot(d) == before and leftovers(tmp_path) == []


def test_a_data_folder_holding_other_files_is_refused(src, tmp_path, capsys):
    d = tmp_path / "d"
    build(src, d)
    (d / "notes.txt").write_text("mine")
    line = fails([src, "--out_dir", d, "--seed", 1], capsys)
    assert "notes.txt" in line
    assert (d / "notes.txt").read_text() == "mine"


def test_an_index_folder_is_not_replaced_by_a_data_folder(src, tmp_path, capsys):
    """A folder whose manifest.json is index.py's (or anything's but ours) is not ours."""
    idx = str(tmp_path / "idx")
    retrieval.write_index(idx, np.eye(3, 4), np.ones(3), ["1", "2", "3"], ["a?", "b?", "c?"], {"sources": []})
    before = snapshot(idx)
    line = fails([src, "--out_dir", idx], capsys)
    assert "not a data folder" in line and retrieval.INDEX_FORMAT in line
    assert snapshot(idx) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"name": "my project"}))
    assert "not a data folder" in fails([src, "--out_dir", other], capsys)
    assert os.listdir(other) == ["manifest.json"]


def test_a_folder_whose_manifest_lists_no_files_can_be_rebuilt(src, tmp_path, capsys):
    """A damaged manifest (no file list) of a folder of ours: its files are not taken for someone
    else's, and the rebuild its loaders name goes ahead."""
    out = tmp_path / "prep"
    preprocess.main([src, "--out_dir", str(out), "--max_len", "32"])
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["files"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    data.check_out_dir(str(out))  # no "files that preprocess.py did not write"
    preprocess.main([src, "--out_dir", str(out), "--max_len", "32", "--force"])
    assert "files" in json.loads((out / "manifest.json").read_text())


def test_a_data_folder_says_what_it_is_and_older_ones_are_still_ours(src, tmp_path, capsys):
    """The manifest carries an explicit marker; a folder written before it (format_version only)
    is still rebuilt."""
    d = tmp_path / "d"
    m = build(src, d)
    assert m["format"] == preprocess.DATA_FORMAT
    del m["format"]
    (d / "manifest.json").write_text(json.dumps(m))
    assert build(src, d, "--seed", 1)["format"] == preprocess.DATA_FORMAT


# ----------------------------------------------------------------------------- 2. one run at a time

def test_a_second_run_into_a_folder_in_use_is_refused(src, tmp_path, capsys):
    out = tmp_path / "prep"
    with data.FolderLock(str(out)):
        line = fails([src, "--out_dir", out], capsys)
    assert f"pid {os.getpid()}" in line and not out.exists()
    build(src, out)  # the lock is gone with its holder
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- 3. reused qids

def test_a_reused_qid_never_swaps_a_question(tmp_path, tok, capsys):
    """Ten rows whose qid2 is an earlier qid of another text are rejected, listed in rejects.tsv
    and conflicts.tsv, and no split pairs a text the row did not hold."""
    rows = synthetic_rows(80)
    qid, qtext = rows[0][1], rows[0][3]
    changed = [i for i in range(20, 80) if rows[i][4] != qtext][:10]
    for i in changed:
        rows[i][2] = qid
    src = write_csv(tmp_path / "rows.csv", rows)
    out = tmp_path / "prep"
    m = build(src, out)
    printed = capsys.readouterr().out
    c = m["counts"]
    assert (c["qid_text_conflicts"], c["rows_rejected"], c["pairs_kept"]) == (10, 10, 70)
    assert "kept as in the file: qid" not in printed and "qid" in printed

    bad_rows = {i + 1 for i in changed}
    with open(out / "rejects.tsv", encoding="utf-8") as f:
        rejects = list(csv.reader(f, delimiter="\t"))[1:]
    assert {int(r[0]) for r in rejects} == bad_rows
    assert all(f"qid2 {qid}" in r[2] and "row 1" in r[2] for r in rejects)
    with open(out / "conflicts.tsv", encoding="utf-8") as f:
        conflicts = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert {int(r[0]) for r in conflicts[1:]} == bad_rows
    assert all(r[2] == rows[int(r[0]) - 1][4] for r in conflicts[1:])  # the row's own text

    # Every pair in the folder is a kept row, with the texts that row held.
    tokens, offsets = np.load(out / "tokens.npy"), np.load(out / "offsets.npy")
    decoded = ["".join(tok.decode(tokens[a:b], skip_special_tokens=True).split())
               for a, b in zip(offsets[:-1], offsets[1:])]
    squash = lambda s: "".join(s.lower().split())  # noqa: E731
    in_folder = collections.Counter((decoded[a], decoded[b], int(y)) for s in data.SPLITS
                                    for a, b, y in np.load(out / f"{s}.npy").tolist())
    kept = [r for n, r in enumerate(rows, 1) if n not in bad_rows]
    assert in_folder == collections.Counter((squash(r[3]), squash(r[4]), int(r[5])) for r in kept)

    # retrieval's contract: the source re-read gives the folder's questions, in its order.
    qs = text.pair_file_questions(src, require_label=True)
    assert len(qs.texts) == c["questions"] and [squash(t) for t in qs.texts] == decoded
    assert len(set(qs.ids)) == len(qs.ids) and {r[0] for r in qs.rejects} == bad_rows


def test_index_questions_never_gives_a_row_another_text():
    pairs = {"qid1": ["1", "2"], "qid2": ["3", "1"], "q1": ["A?", "B?"], "q2": ["C?", "D?"]}
    q1, q2, texts, conflicts = text.index_questions(pairs)
    assert [texts[i] for i in q1] == ["A?", "B?"] and [texts[i] for i in q2] == ["C?", "D?"]
    assert conflicts == 1


# ----------------------------------------------------------------------------- 4. unwritable output

def test_a_seed_numpy_cannot_take_is_one_line_before_any_work(src, tmp_path, capsys):
    for seed in ("-1", str(2 ** 32)):
        assert f"--seed {seed}: out of range" in fails([src, "--out_dir", tmp_path / "out", "--seed", seed], capsys)
    assert not (tmp_path / "out").exists()


def test_out_dir_under_a_file_is_one_line(src, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert "is a file" in fails([src, "--out_dir", tmp_path / "notes.txt" / "prep"], capsys)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_read_only_place_is_refused_before_any_work(src, tmp_path, capsys, monkeypatch):
    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    def no_work(*a, **k):
        raise AssertionError("the input was read before the output place was checked")

    monkeypatch.setattr(data.tempfile, "mkstemp", read_only)
    monkeypatch.setattr(text, "read_pairs", no_work)
    assert "not writable (Read-only file system)" in fails([src, "--out_dir", tmp_path / "prep"], capsys)


def test_disk_full_while_writing_leaves_no_temp_folder(src, tmp_path, capsys, monkeypatch):
    """ENOSPC in the middle of writing: one line, exit 2, the temp folder gone, the earlier folder
    as it was."""
    out = tmp_path / "prep"
    build(src, out)
    before = snapshot(out)
    capsys.readouterr()
    real_save, calls = np.save, []

    def save_then_fill_the_disk(path, arr, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(path, arr, *a, **k)

    monkeypatch.setattr(np, "save", save_then_fill_the_disk)
    line = fails([src, "--out_dir", out, "--max_len", 32, "--seed", 1], capsys)
    assert "No space left on device" in line and len(calls) == 2
    assert leftovers(tmp_path) == [] and snapshot(out) == before


SLOW_WRITE = """
import sys, time
import numpy as np
sys.path.insert(0, {root!r})
import {script}
real_save = np.save
def save_and_wait(path, arr, *a, **k):
    real_save(path, arr, *a, **k)
    open({marker!r}, "w").close()
    time.sleep(120)
np.save = save_and_wait
{script}.main({argv!r})
"""


@pytest.mark.parametrize("script", ["preprocess", "index"])
def test_sigterm_or_ctrl_c_while_writing_leaves_no_temp_folder(src, tmp_path, tiny_bert_dir, script):
    """SIGTERM or SIGINT (exit 143 or 130) while the temp folder is half written (a data folder,
    an index): it is removed, so is the lock, and the error is one line. Both runs go at once (each
    imports transformers)."""
    procs = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        folder = tmp_path / sig.name
        folder.mkdir()
        marker = str(folder / "writing")
        out = str(folder / "prep")
        argv = [src, "--out_dir", out, "--max_len", "32"] if script == "preprocess" else \
            ["--encoder", tiny_bert_dir, src, "--out_dir", out]
        code = SLOW_WRITE.format(root=ROOT, marker=marker, script=script, argv=argv)
        procs[sig] = (folder, marker, subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                                       stderr=subprocess.PIPE, text=True))
    for sig, (folder, marker, p) in procs.items():
        deadline = time.time() + 120
        while not os.path.exists(marker) and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert os.path.exists(marker), p.communicate()[1]
        assert any(".tmp-" in n for n in os.listdir(folder))  # caught in the middle of writing
        p.send_signal(sig)
    for sig, (folder, marker, p) in procs.items():
        out, err = p.communicate(timeout=60)
        assert p.returncode == 128 + sig, err  # main() called from Python (-c): SystemExit, not death by it
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and sig.name in lines[0], err
        assert leftovers(folder) == [] and not (folder / "prep").exists()


WAIT_IN_RUN = """
import os, sys, time
sys.path.insert(0, {root!r})
from cli import run
def body():
    print("ready", os.getpid(), flush=True)
    time.sleep(60)
run(body)
"""


def test_ctrl_c_stops_a_shell_loop_of_scripts_and_a_background_job_keeps_ignoring_it(tmp_path):
    """Ctrl-C reaches the whole foreground group: the script ends by SIGINT after its clean-up, so
    the shell's loop stops too (a script that exits 130 instead would let the loop go on). A job
    started with & ignores Ctrl-C, and cli.run leaves it so."""
    script = tmp_path / "wait.py"
    script.write_text(WAIT_IN_RUN.format(root=ROOT))
    loop = subprocess.Popen(["bash", "-c", f"for i in 1 2 3; do {sys.executable} {script}; echo next $i; done"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert loop.stdout.readline().startswith("ready")
        os.killpg(loop.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        out, err = loop.communicate(timeout=60)
        assert "next" not in out and "stopped by SIGINT" in err, (out, err)
    finally:
        kill_group(loop)
    job = subprocess.Popen(["bash", "-c", f"{sys.executable} {script} & wait"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        pid = int(job.stdout.readline().split()[1])
        os.killpg(job.pid, signal.SIGINT)  # ignored by the job (bash may die of it)
        os.kill(pid, signal.SIGTERM)  # what stops it, then: the one line names SIGTERM, not SIGINT
        _, err = job.communicate(timeout=60)
        assert "stopped by SIGTERM" in err and "SIGINT" not in err, err
    finally:
        kill_group(job)


def test_a_signal_in_a_script_called_in_process_leaves_its_caller_alive(capsys):
    """main() called from Python (a notebook, a test): a signal stops the script with SystemExit(128 +
    the signal) and its caller goes on, with its own signal handlers back."""
    from cli import run
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def body():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises within this
    with pytest.raises(SystemExit) as e:
        run(body)
    assert e.value.code == 128 + signal.SIGTERM and "stopped by SIGTERM" in capsys.readouterr().err
    assert {s: signal.getsignal(s) for s in before} == before


def kill_group(proc):
    """A test's shell and what it started, gone whatever the test found."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate(timeout=60)


# ----------------------------------------------------------------------------- 5. --max_len

def test_max_len_over_what_the_encoder_takes_is_refused_up_front(src, tmp_path, capsys, monkeypatch):
    from transformers import AutoConfig, AutoTokenizer

    def no_work(*a, **k):
        raise AssertionError("the input was read before --max_len was checked")

    monkeypatch.setattr(text, "read_pairs", no_work)
    line = fails([src, "--out_dir", tmp_path / "a", "--max_len", 2000], capsys)
    assert "--max_len 2000" in line and "512" in line
    short = tmp_path / "short_positions"  # an encoder whose positions end before its tokenizer's limit
    AutoTokenizer.from_pretrained(resolve_model(BUNDLED_MODEL)).save_pretrained(short)
    AutoConfig.for_model("bert", max_position_embeddings=64).save_pretrained(short)
    line = fails([src, "--out_dir", tmp_path / "b", "--max_len", 100, "--encoder", short], capsys)
    assert "64" in line and "max_position_embeddings" in line
    monkeypatch.undo()
    build(src, tmp_path / "c", "--encoder", short)  # within both limits: no complaint
    no_config = tmp_path / "tokenizer_only"  # nothing says its positions: only the tokenizer's limit
    AutoTokenizer.from_pretrained(resolve_model(BUNDLED_MODEL)).save_pretrained(no_config)
    preprocess.main([src, "--out_dir", str(tmp_path / "d"), "--max_len", "100", "--encoder", str(no_config)])


# ----------------------------------------------------------------------------- 6. odd files

HEADER = "id,qid1,qid2,question1,question2,is_duplicate\n"
ROWS = "".join(f"{i},{2 * i + 1},{2 * i + 2},How do I learn item {i}?,What is item {i}?,{i % 2}\n"
               for i in range(30))


@pytest.mark.parametrize("kind", ["utf-16", "utf-16-le-no-bom", "utf-16.gz"])
def test_a_utf16_file_asks_for_iconv_from_utf16(tmp_path, kind):
    raw = (HEADER + ROWS).encode("utf-16" if kind != "utf-16-le-no-bom" else "utf-16-le")
    path = tmp_path / f"pairs.{kind}.csv"
    path.write_bytes(gzip.compress(raw) if kind.endswith(".gz") else raw)
    with pytest.raises(UserError) as e:
        text.read_pairs(str(path))
    assert "UTF-16" in str(e.value) and "iconv -f utf-16" in str(e.value) and "latin1" not in str(e.value)


@pytest.mark.parametrize("kind", ["pairs.csv", "pairs.tsv", "questions.csv", "questions.txt"])
def test_carriage_returns_never_merge_or_drop_rows_silently(tmp_path, kind):
    """Classic Mac line breaks (a bare CR) make the whole file one line: one line saying so. A
    stray CR inside one row's unquoted field rejects that row (counted), not the file; a .txt line
    holding one is rejected, not read as one question."""
    sep = "\t" if kind.endswith(".tsv") else ","
    if kind.startswith("pairs"):
        header, rows = HEADER.replace(",", sep), [r.replace(",", sep) for r in ROWS.splitlines(keepends=True)]
        read = text.read_pairs
    elif kind == "questions.csv":
        header, rows, read = "id,question\n", [f"q{i},How do I learn item {i}?\n" for i in range(30)], \
            retrieval.read_questions
    else:
        header, rows, read = "", [f"How do I learn item {i}?\n" for i in range(30)], retrieval.read_questions
    path = tmp_path / kind
    path.write_text((header + "".join(rows)).replace("\n", "\r"), newline="")
    with pytest.raises(UserError) as e:
        read(str(path))
    assert "bare carriage return" in str(e.value) and "tr " in str(e.value)
    rows[4] = rows[4].replace("item 4", "item\r4")  # one stray CR, in row 5
    path.write_text(header + "".join(rows), newline="")
    got = read(str(path))
    if kind.startswith("pairs"):
        pairs, rejects, rows_read = got
        assert rows_read == 30 and len(pairs["q1"]) == 29 and [r[:2] for r in rejects] == [(5, 6)]
        assert "cannot be parsed" in rejects[0][2]
    else:
        assert len(got.texts) == 29 and [r[0] for r in got.rejects] == [5] and got.rows_read == 30
        assert not any("\r" in t for t in got.texts)


def test_a_blank_first_line_is_named_as_such(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("\n" + HEADER + ROWS)
    with pytest.raises(UserError) as e:
        text.read_pairs(str(path))
    assert "line 1 is blank" in str(e.value) and "empty" not in str(e.value)


def test_a_stray_cr_in_the_header_and_a_one_row_mac_file_are_named(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text(HEADER.replace("question2", "ques\rtion2") + ROWS, newline="")
    with pytest.raises(UserError) as e:
        text.read_pairs(str(path))
    assert "line 1, the header, cannot be parsed" in str(e.value)
    path.write_text((HEADER + ROWS.splitlines(keepends=True)[0]).replace("\n", "\r"), newline="")
    with pytest.raises(UserError) as e:
        text.read_pairs(str(path))
    assert "bare carriage return" in str(e.value)


def test_a_nul_byte_in_a_utf8_header_is_not_called_utf16(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_bytes((HEADER.replace("question2", "question\x002") + ROWS).encode())
    with pytest.raises(UserError) as e:
        text.read_pairs(str(path))
    assert "no question2 column" in str(e.value) and "UTF-16" not in str(e.value)


@pytest.mark.parametrize("header", ["id,question1,question2,question1,is_duplicate",
                                    "question1,question2,is_duplicate,Is_Duplicate",
                                    "qid1,qid2,qid1,question1,question2,label"])
def test_a_column_named_twice_is_one_line(tmp_path, header):
    n = header.count(",") + 1
    path = tmp_path / "pairs.csv"
    path.write_text(header + "\n" + ",".join(["1"] * (n - 3) + ["Why?", "How?", "1"]) + "\n")
    twice = collections.Counter(h.lower() for h in header.split(",")).most_common(1)[0][0]
    with pytest.raises(UserError) as e:
        text.read_pairs(str(path))
    assert f"'{twice}'" in str(e.value) and "twice" in str(e.value) and "\n" not in str(e.value)


def pipe_of(content):
    """A /dev/fd path of a pipe holding content (as `<(cat f)` gives): small enough for its buffer."""
    r, w = os.pipe()
    os.write(w, content)
    os.close(w)
    return r, f"/dev/fd/{r}"


@pytest.mark.parametrize("gz", [False, True])
def test_a_pipe_is_read_once(tmp_path, gz):
    content = (HEADER + ROWS).encode()
    path = tmp_path / "pairs.csv"
    path.write_bytes(content)
    r, pipe = pipe_of(gzip.compress(content) if gz else content)
    try:
        assert text.read_pairs(pipe) == text.read_pairs(str(path))
    finally:
        os.close(r)


def test_preprocess_reads_a_pipe_and_never_reuses_its_folder(src, tmp_path, capsys):
    content = open(src, "rb").read()
    out = tmp_path / "prep"
    for _ in range(2):
        r, pipe = pipe_of(content)
        try:
            m = build(pipe, out)
        finally:
            os.close(r)
        assert "up to date" not in capsys.readouterr().out
        assert m["source_sha256"] is None and m["counts"]["rows_read"] == 60
    assert m["counts"] == build(src, tmp_path / "from_file")["counts"]
