"""The data of ``reproduce_instruct.py``: the Alpaca training slice and development slice, the de-en test
sentences of the LLM study, the AESLC subject-line subset in instruction form, the prior-axis samples and the
``--extra-test`` files, written under ``WORK/data`` (:func:`prepare_data`)."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
from typing import Any

import _runner
from _llm_common import TEST_SET, TRAIN_SETS, SetupError
from _llm_data import _keep as keep_pair
from _llm_data import _read_pair as read_pair
from _llm_data import _subset as subset

#: the instruction that turns an email into a subject-line request (AESLC, zero-shot)
SUBJECT_INSTRUCTION = "Write a short subject line for the following email."
#: the data kinds of --extra-test
EXTRA_KINDS = ("instruction", "translation", "summarization")
#: files each data folder of DATA_ROOT must hold
REQUIRED = {
    "alpaca": ("train.jsonl",),
    "newstest-de-en": tuple(f"{n}.{lang}" for n in (*TRAIN_SETS, TEST_SET) for lang in ("de", "en")),
    "aeslc": ("train.jsonl", "dev.jsonl"),
}


def check_data_root(root: str) -> None:
    """``SetupError`` naming the missing folder or file of ``DATA_ROOT``."""
    if not os.path.isdir(root):
        raise SetupError(f"data directory {root!r} does not exist")
    missing = [
        os.path.join(d, f)
        for d, files in REQUIRED.items()
        for f in files
        if not os.path.isfile(os.path.join(root, d, f))
    ]
    if missing:
        raise SetupError(
            f"data directory {root!r} lacks {', '.join(missing)} (expected the folders alpaca/, "
            "newstest-de-en/ and aeslc/ of ../shared/data)"
        )


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, one a line (blank lines skipped); ``SetupError`` names a bad line."""
    from properlm.evaluation.comparison import ComparisonError
    from properlm.evaluation.run_records import read_metrics_log

    try:
        return read_metrics_log(path)
    except ComparisonError as exc:
        raise SetupError(str(exc)) from None


def _write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _usable_instruction(r: dict[str, Any]) -> bool:
    return all(isinstance(r.get(k), str) and r[k].strip() for k in ("instruction", "output"))


def subject_record(r: dict[str, Any]) -> dict[str, Any]:
    """An AESLC record (``document``, ``summary``, optional ``annotations``) as an instruction record:
    :data:`SUBJECT_INSTRUCTION`, the email as its input, the subject line as its output and the annotators'
    subject lines as further references."""
    out = {"instruction": SUBJECT_INSTRUCTION, "input": r["document"], "output": r["summary"]}
    if r.get("annotations"):
        out["annotations"] = list(r["annotations"])
    return out


def spread(items: list[Any], k: int) -> list[Any]:
    """``k`` items evenly spread over ``items`` (the first, then every len/k-th), in order."""
    return [items[(i * len(items)) // k] for i in range(min(k, len(items)))]


def data_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "data_root": os.path.abspath(args.data_root),
        "dev_examples": args.dev_examples,
        "decode_examples": args.decode_examples,
        "val_examples": args.val_examples,
        "test_examples": args.test_examples,
        "summ_examples": args.summ_examples,
        "prior_examples": args.prior_examples,
        "train_fraction": args.train_fraction,
    }


def _reference_tokens(rows: list[dict[str, Any]], quantile: float) -> int:
    """The ``quantile`` of the references' token counts under the SmolLM2 tokenizer (+1 for the end of turn);
    words x 1.6 when the tokenizer is not at hand (the estimate on a machine without the model)."""
    counts = sorted(len(r["output"].split()) for r in rows)
    return math.ceil(counts[min(len(counts) - 1, int(quantile * len(counts)))] * 1.6) + 1


def make_data(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The data sets in memory (``{name: rows or (sources, references)}``) and their manifest."""
    root = args.data_root
    alpaca_path = os.path.join(root, "alpaca", "train.jsonl")
    raw = read_jsonl(alpaca_path)
    usable = [r for r in raw if _usable_instruction(r)]
    order = list(range(len(usable)))
    random.Random(0).shuffle(order)
    if args.dev_examples >= len(usable):
        raise SetupError(f"--dev-examples {args.dev_examples}: Alpaca has only {len(usable)} usable records")
    dev = [usable[i] for i in sorted(order[: args.dev_examples])]
    train_all = [usable[i] for i in sorted(order[args.dev_examples :])]
    n_train = max(1, round(args.train_fraction * len(train_all)))
    train = [train_all[i] for i in sorted(random.Random(1).sample(range(len(train_all)), n_train))]
    # the LLM study's 1,000 newstest2014 sentences and its 2,000 training pairs (reproduce_llm.py's defaults:
    # the 20-word filter, random.Random(2) for the test subset, random.Random(0) for the training pairs)
    deen = os.path.join(root, "newstest-de-en")
    pool = [p for name in TRAIN_SETS if os.path.isfile(os.path.join(deen, f"{name}.de")) for p in read_pair(deen, name)]
    kept = [p for p in pool if keep_pair(p, 20)]
    deen_train = random.Random(0).sample(kept, min(2000, len(kept)))
    deen_test = subset(read_pair(deen, TEST_SET), args.test_examples, 2, 20)
    if len(deen_test) < args.test_examples:
        raise SetupError(
            f"--test-examples {args.test_examples}: only {len(deen_test)} newstest2014 sentences pass "
            "the LLM study's 20-word filter"
        )
    aeslc_dev = read_jsonl(os.path.join(root, "aeslc", "dev.jsonl"))
    aeslc_train = read_jsonl(os.path.join(root, "aeslc", "train.jsonl"))
    summ = [
        aeslc_dev[i]
        for i in sorted(random.Random(3).sample(range(len(aeslc_dev)), min(args.summ_examples, len(aeslc_dev))))
    ]
    prior_aeslc = [
        aeslc_train[i]
        for i in sorted(random.Random(4).sample(range(len(aeslc_train)), min(args.prior_examples, len(aeslc_train))))
    ]
    data: dict[str, Any] = {
        "alpaca_train": train,
        "alpaca_dev": dev,
        "alpaca_val": spread(dev, args.val_examples),
        "alpaca_decode": dev[: args.decode_examples],
        "deen_test": deen_test,
        "aeslc_dev": [subject_record(r) for r in summ],
        "prior_alpaca": spread(train, args.prior_examples),
        "prior_deen": spread(deen_train, args.prior_examples),
        "prior_aeslc": [subject_record(r) for r in prior_aeslc],
    }
    manifest = {
        "settings": data_settings(args),
        "alpaca_records": len(raw),
        "alpaca_dropped_empty": len(raw) - len(usable),
        "alpaca_train_pool": len(train_all),
        "counts": {k: len(v) for k, v in data.items()},
        "alpaca_response_cap": _reference_tokens(dev, 0.975),
    }
    return data, manifest


def write_data(data: dict[str, Any], d: str) -> None:
    """Write :func:`make_data`'s sets into the folder ``d``: JSONL records, or ``NAME.de`` / ``NAME.en`` line files for
    the de-en pairs."""
    os.makedirs(d, exist_ok=True)
    for name, rows in data.items():
        if name.endswith("deen") or name == "deen_test":
            for lang, col in (("de", 0), ("en", 1)):
                with open(os.path.join(d, f"{name}.{lang}"), "w", encoding="utf-8") as f:
                    f.writelines(p[col] + "\n" for p in rows)
        else:
            _write_jsonl(os.path.join(d, f"{name}.jsonl"), rows)


def prepare_data(args: argparse.Namespace, work: str) -> dict[str, Any]:
    """Write ``WORK/data/*`` and ``WORK/data/manifest.json`` (reused when the settings match). The Alpaca
    response cap is measured with the model's tokenizer when ``args.tokenizer_dir`` is set."""
    d = os.path.join(work, "data")
    path = os.path.join(d, "manifest.json")
    manifest = _runner.read_json_if(path)
    if manifest is not None:
        if manifest["settings"] == data_settings(args):
            return manifest
        raise SetupError(
            f"{work} holds data made with other settings ({manifest['settings']}); use the same "
            "options or a new --work-dir"
        )
    data, manifest = make_data(args)
    write_data(data, d)
    if getattr(args, "tokenizer_dir", None):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer_dir)
        counts = sorted(len(tok(r["output"], add_special_tokens=False)["input_ids"]) + 1 for r in data["alpaca_dev"])
        manifest["alpaca_response_cap"] = counts[min(len(counts) - 1, int(0.975 * len(counts)))]
        manifest["alpaca_response_cap_from"] = "97.5th percentile of the dev references' tokens (+1 end of turn)"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def parse_extra(spec: str, taken: dict[str, Any], reserved: tuple[str, ...] = ()) -> tuple[str, dict[str, Any]]:
    """``KIND:NAME=PATH[,PATH]`` -> ``(NAME, {"kind", "files"})``; ``SetupError`` names the problem."""
    where = f"--extra-test {spec!r}"
    head, eq, files = spec.partition("=")
    kind, colon, name = head.partition(":")
    kind, name = kind.strip(), name.strip()
    if not eq or not colon:
        raise SetupError(f"{where}: expected KIND:NAME=PATH[,PATH] with KIND one of {', '.join(EXTRA_KINDS)}")
    if kind not in EXTRA_KINDS:
        raise SetupError(f"{where}: unknown kind {kind!r}; allowed: {', '.join(EXTRA_KINDS)}")
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise SetupError(f"{where}: NAME must be letters, digits, - and _ (got {name!r})")
    if name in taken or name in reserved:
        raise SetupError(f"{where}: the name {name!r} is " + ("given twice" if name in taken else "reserved"))
    paths = [p.strip() for p in files.split(",") if p.strip()]
    want = 2 if kind == "translation" else 1
    if len(paths) != want:
        raise SetupError(f"{where}: {kind} takes {'SOURCE_FILE,REFERENCE_FILE' if want == 2 else 'one JSONL file'}")
    for p in paths:
        if not os.path.isfile(p):
            raise SetupError(f"{where}: file {p!r} does not exist")
    if kind == "translation":
        n_src, n_ref = len(_runner.read_lines(paths[0])), len(_runner.read_lines(paths[1]))
        if n_src != n_ref or n_src == 0:
            raise SetupError(f"{where}: {paths[0]} has {n_src} lines and {paths[1]} {n_ref} (need the same, > 0)")
    else:
        rows = read_jsonl(paths[0])
        need = ("instruction", "output") if kind == "instruction" else ("document", "summary")
        for i, r in enumerate(rows, 1):
            for k in need:
                if not isinstance(r.get(k), str) or not r[k].strip():
                    raise SetupError(f"{where}: {paths[0]} record {i}: field {k!r} is missing or empty")
        if not rows:
            raise SetupError(f"{where}: {paths[0]} holds no records")
    return name, {"kind": kind, "files": [os.path.abspath(p) for p in paths]}


def extra_options(work: str, name: str, spec: dict[str, Any]) -> list[str]:
    """The ``properlm evaluate`` data options of an extra test set (a summarization file: the file
    :func:`prepare_extra` writes)."""
    if spec["kind"] == "translation":
        return [
            "--source-file",
            spec["files"][0],
            "--target-file",
            spec["files"][1],
            "--source-lang",
            "German",
            "--target-lang",
            "English",
        ]
    if spec["kind"] == "instruction":
        return ["--data-file", spec["files"][0], "--task", "instruction"]
    return ["--data-file", os.path.join(work, "data", f"extra_{name}.jsonl"), "--task", "instruction"]


def prepare_extra(work: str, name: str, spec: dict[str, Any]) -> None:
    """Write a summarization extra test set once as ``WORK/data/extra_NAME.jsonl`` in the subject-line instruction
    form (the other kinds are read as they are)."""
    out = os.path.join(work, "data", f"extra_{name}.jsonl")
    if spec["kind"] != "summarization" or os.path.isfile(out):
        return
    os.makedirs(os.path.dirname(out), exist_ok=True)
    _write_jsonl(out + ".tmp", [subject_record(r) for r in read_jsonl(spec["files"][0])])
    os.replace(out + ".tmp", out)
