"""Reporting scores: thresholds tuned on validation, the notebook's printout at each threshold,
plots, per-pair scores and results.json. Shared by evaluate.py and baseline_cosine.py.

A threshold picked on the split it is scored on flatters that split, so tuned thresholds never
come from the reported split; where they must (the validation split itself), they are labelled
in-sample.

A results folder holds one run's results: check_results_dir, before any work, refuses a folder
holding another run's (another model or input) unless asked to replace them, and any other files;
results_folder also holds it for the run's life, so two runs never write into it at once.
"""
import hashlib
import json
import os
import re
from contextlib import contextmanager

import numpy as np

import metrics
from cli import UserError
from data import FolderLock, check_apart_from_inputs, check_writable, fingerprint

# Every file a results folder holds: report_datasets' scores and plots, write_results' results.json,
# evaluate.py's rejects.tsv, search.py's per_query.csv and speed.json (--speed's results). A folder
# with anything else in it is not a results folder.
RESULT_FILE = re.compile(r"(results|speed)\.json(\.tmp-\d+)?|rejects\.tsv|per_query\.csv|scores_.+\.npz"
                         r"|.+_(pr_curve|roc_curve|confusion_matrix|score_histogram)\.png")  # tmp: a killed write
FINISHED = ("results.json", "speed.json")  # written last, by a run that finished: what names it


def data_id(manifest):
    """16 hex digits naming a data folder's content (its fingerprint) in results.json."""
    return hashlib.sha256(fingerprint(manifest).encode()).hexdigest()[:16]


def check_results_dir(out_dir, this_run, overwrite=False, inputs=()):
    """Before any work: out_dir can take this run's results. It must be writable, no input, in
    none and holding none, hold nothing but results files, and hold no results of another run
    (this_run: the fields of its results.json or speed.json that identify a run, e.g. script, model
    and input; a re-run of the same run replaces its own). Returns the files to delete once this
    run's inputs have been read (results_folder's clear): another run's results where overwrite
    lets them go, the leftovers of a run cut short (no finished results: nothing to lose), so that
    a folder never mixes two runs' files and a bad input never costs the results it would replace."""
    if os.path.isfile(out_dir):
        raise UserError(f"--out_dir {out_dir} is a file", "pass a folder path (new, or one holding this run's "
                        "results)")
    check_writable(out_dir)
    check_apart_from_inputs(out_dir, inputs)
    if not os.path.isdir(out_dir):
        return []
    names = sorted(os.listdir(out_dir))
    foreign = [n for n in names if not RESULT_FILE.fullmatch(n)]
    if foreign:
        raise UserError(f"--out_dir {out_dir} holds files that are not results ({', '.join(foreign[:3])}"
                        f"{', ...' if len(foreign) > 3 else ''})", "pass a new or empty --out_dir")
    finished = [n for n in FINISHED if n in names]
    if not finished:
        return names  # empty, or the files of a run cut short: nothing finished to lose
    for name in finished:
        try:
            with open(os.path.join(out_dir, name)) as f:
                earlier = json.load(f)
        except (OSError, ValueError):
            earlier = {}
        earlier = earlier if isinstance(earlier, dict) else {}
        if {k: earlier.get(k) for k in this_run} != this_run:
            break
    else:
        return []
    if not overwrite:
        model = earlier.get("checkpoint") or earlier.get("encoder") or earlier.get("index") or "unknown"
        split = f" on {earlier['split']}" if earlier.get("split") else ""
        where = f" of {earlier['data_dir']}" if earlier.get("data_dir") else ""
        raise UserError(f"--out_dir {out_dir} holds the results of another run ({earlier.get('script')} of "
                        f"{model}{split}{where})", "pass another --out_dir, or --overwrite to replace them")
    return names


@contextmanager
def results_folder(out_dir, this_run, overwrite=False, inputs=()):
    """out_dir held for this run's life (data.FolderLock: a second run into it is refused, not
    mixed in) and checked as check_results_dir does. Yields clear(): the script calls it once its
    inputs are read, before writing, and another run's results (--overwrite) go then."""
    check_apart_from_inputs(out_dir, inputs)  # before its lock file goes beside it
    with FolderLock(out_dir):
        doomed = check_results_dir(out_dir, this_run, overwrite, inputs)

        def clear():
            for name in doomed:
                if os.path.exists(os.path.join(out_dir, name)):
                    os.remove(os.path.join(out_dir, name))
        yield clear


def tune_thresholds(labels, scores):
    """Thresholds maximizing F1 and accuracy on these labels and scores (the validation split)."""
    return {f"best_{by}": metrics.best_threshold(labels, scores, by=by) for by in ("f1", "accuracy")}


def report_datasets(scores_of, datasets, validation, fixed, out_dir, probabilistic=True):
    """Score and report each dataset at the `fixed` thresholds ({name: value}) and at the ones
    tuned on `validation` (None: no tuning). scores_of(dataset, desc=name) -> (N,) scores.
    Returns (thresholds, results) for results.json."""
    thresholds = {name: {"value": float(t), "chosen_on": "fixed"} for name, t in fixed.items()}
    scores = {}
    if validation is not None and len(validation) > 0:
        scores["validation"] = scores_of(validation, desc="validation")
        save_scores(out_dir, "validation", validation.labels, scores["validation"])
        for name, t in tune_thresholds(validation.labels, scores["validation"]).items():
            thresholds[name] = {"value": t, "chosen_on": "validation", "validation_n": len(validation)}
    results = {}
    for name, ds in datasets.items():
        in_sample = ds is validation  # tuned on this very split
        if not in_sample:
            scores[name] = scores_of(ds, desc=name)
            save_scores(out_dir, name, ds.labels, scores[name])
        results[name] = report(name, ds.labels, scores["validation" if in_sample else name],
                               thresholds, out_dir, probabilistic, in_sample)
    return thresholds, results


def report(name, labels, scores, thresholds, out_dir, probabilistic, in_sample):
    """Print the notebook's report at each threshold, save the plots; the entry for results.json."""
    metrics_at = {}
    for how, t in thresholds.items():
        m = metrics.compute_metrics(labels, scores, t["value"], probabilistic=probabilistic)
        where = "fixed" if t["chosen_on"] == "fixed" else "chosen on validation"
        if in_sample and t["chosen_on"] == "validation":
            where += ", IN-SAMPLE: tuned on this split, optimistic"
        print(metrics.format_report(m, f"== {name} ({len(labels):,} pairs), threshold "
                                       f"{t['value']:.6g} [{how}, {where}]") + "\n")
        metrics_at[how] = m
    save_plots(out_dir, name, labels, scores, metrics_at)
    return {"n": int(len(labels)), "tuned_thresholds_in_sample": in_sample, "metrics": metrics_at}


def save_scores(out_dir, name, labels, scores):
    np.savez(os.path.join(out_dir, f"scores_{name}.npz"), scores=scores, labels=np.asarray(labels))


def save_plots(out_dir, name, labels, scores, metrics_at):
    """<name>_{pr_curve,roc_curve,confusion_matrix,score_histogram}.png, marking each threshold."""
    import matplotlib
    matplotlib.use("Agg")  # files only; no display needed (imported here: predict.py never pays)
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve
    labels = np.asarray(labels)

    def path(kind):
        return os.path.join(out_dir, f"{name}_{kind}.png")

    both = len(np.unique(labels)) == 2  # curves need both classes

    if both:
        precision, recall, _ = precision_recall_curve(labels, scores)
        fig, ax = plt.subplots(figsize=(5.5, 5))
        ax.plot(recall, precision, lw=1.5,
                label=f"AP {next(iter(metrics_at.values()))['average_precision']:.3f}")
        ax.axhline(labels.mean(), ls=":", c="gray", label=f"chance ({labels.mean():.3f})")
        for how, m in metrics_at.items():
            ax.plot(m["recall"], m["precision"], "o", label=f"{how} @ {m['threshold']:.3f}")
        ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
               title=f"{name}: precision-recall ({len(labels):,} pairs)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left")
        fig.savefig(path("pr_curve"), dpi=120, bbox_inches="tight")
        plt.close(fig)

        fpr, tpr, _ = roc_curve(labels, scores)
        fig, ax = plt.subplots(figsize=(5.5, 5))
        ax.plot(fpr, tpr, lw=1.5, label=f"AUC {next(iter(metrics_at.values()))['roc_auc']:.3f}")
        ax.plot([0, 1], [0, 1], ls=":", c="gray", label="chance")
        for how, m in metrics_at.items():
            (tn, fp), _ = m["confusion_matrix"]
            ax.plot(fp / max(tn + fp, 1), m["recall"], "o", label=f"{how} @ {m['threshold']:.3f}")
        ax.set(xlabel="false positive rate", ylabel="true positive rate (recall)", xlim=(0, 1),
               ylim=(0, 1.02), title=f"{name}: ROC ({len(labels):,} pairs)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.savefig(path("roc_curve"), dpi=120, bbox_inches="tight")
        plt.close(fig)
    else:
        print(f"note: {name} holds one class only: no precision-recall or ROC curve")

    fig, axes = plt.subplots(1, len(metrics_at), figsize=(3.6 * len(metrics_at), 3.8), squeeze=False,
                             layout="constrained")
    for ax, (how, m) in zip(axes[0], metrics_at.items()):
        cm = np.array(m["confusion_matrix"])  # rows: true 0/1, columns: predicted 0/1
        ax.imshow(cm, cmap="Blues")
        for (i, j), count in np.ndenumerate(cm):
            ax.text(j, i, f"{count:,}", ha="center", va="center",
                    color="white" if count > cm.max() / 2 else "black")
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["not dup", "dup"],
               yticklabels=["not dup", "dup"], xlabel="predicted",
               title=f"{how} @ {m['threshold']:.3f}\nacc {m['accuracy']:.3f}  F1 {m['f1']:.3f}")
    axes[0][0].set_ylabel("true")
    fig.suptitle(f"{name}: confusion matrices ({len(labels):,} pairs)")
    fig.savefig(path("confusion_matrix"), dpi=120, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    bins = np.linspace(float(scores.min()), float(scores.max()) + 1e-6, 51)
    for cls, label in ((0, "not duplicate"), (1, "duplicate")):
        if (labels == cls).any():  # density: the classes differ in size (QQP: 37% duplicates)
            ax.hist(scores[labels == cls], bins=bins, density=True, histtype="step", lw=1.5,
                    label=f"{label} ({int((labels == cls).sum()):,})")
    for k, (how, m) in enumerate(metrics_at.items()):
        ax.axvline(m["threshold"], ls="--", c=f"C{k + 2}", label=f"{how} @ {m['threshold']:.3f}")
    ax.set(xlabel="score", ylabel="density", title=f"{name}: scores per true class")
    ax.legend(fontsize="small")
    fig.savefig(path("score_histogram"), dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_results(out_dir, results, name="results.json", say=True):
    """results.json (strict JSON: an undefined metric, e.g. ROC-AUC of one class, is null), renamed
    into place whole: it is what marks the folder as holding a finished run."""
    path = os.path.join(out_dir, name)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(metrics.json_safe(results), f, indent=1, allow_nan=False)
        os.replace(tmp, path)
    except BaseException:  # a full disk, a signal: no temp file left in the results folder
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if say:
        print(f"wrote {path}, per-pair scores and plots in {out_dir}")
    return path
