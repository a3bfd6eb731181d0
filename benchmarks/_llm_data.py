"""The data subsets of ``reproduce_llm.py``: the length filter, the fixed random subsets of
training, dev, validation and test sentences (:func:`make_subsets`) and their files under
``WORK/data`` (:func:`prepare_data`)."""

from __future__ import annotations

import argparse
import json
import os
import random
from typing import Any

import _runner
from _llm_common import DEV_SET, TEST_SET, TRAIN_SETS, SetupError


def check_data_dir(data_dir: str) -> None:
    if not os.path.isdir(data_dir):
        raise SetupError(f"data directory {data_dir!r} does not exist")
    missing = [
        f"{name}.{lang}"
        for name in (*TRAIN_SETS, DEV_SET, TEST_SET)
        for lang in ("de", "en")
        if not os.path.isfile(os.path.join(data_dir, f"{name}.{lang}"))
    ]
    if missing:
        raise SetupError(
            f"data directory {data_dir!r} lacks {', '.join(missing)} (expected the WMT newstest "
            f"files {', '.join(TRAIN_SETS)}, {DEV_SET}, {TEST_SET} as NAME.de / NAME.en)"
        )


def _read_pair(data_dir: str, name: str) -> list[tuple[str, str]]:
    src = _runner.read_lines(os.path.join(data_dir, f"{name}.de"))
    tgt = _runner.read_lines(os.path.join(data_dir, f"{name}.en"))
    if len(src) != len(tgt):
        raise SetupError(f"{data_dir}/{name}.de has {len(src)} lines but {name}.en has {len(tgt)}")
    return [(s.strip(), t.strip()) for s, t in zip(src, tgt)]


def _keep(pair: tuple[str, str], max_source_words: int) -> bool:
    """The length filter: both sides non-empty, at most ``max_source_words`` source words and
    ``1.5 * max_source_words`` target words."""
    s, t = pair
    return bool(s and t) and len(s.split()) <= max_source_words and len(t.split()) <= int(1.5 * max_source_words)


def _subset(pairs: list[tuple[str, str]], k: int, seed: int, max_source_words: int) -> list[tuple[str, str]]:
    """A fixed random subset of ``k`` pairs that pass the length filter, in corpus order."""
    idx = [i for i, p in enumerate(pairs) if _keep(p, max_source_words)]
    chosen = sorted(random.Random(seed).sample(idx, min(k, len(idx))))
    return [pairs[i] for i in chosen]


def _spread(items: list[Any], k: int) -> list[Any]:
    """``k`` items evenly spread over ``items`` (the first, then every len/k-th), in order."""
    return [items[(i * len(items)) // k] for i in range(min(k, len(items)))]


def _write(directory: str, name: str, pairs: list[tuple[str, str]]) -> None:
    for lang, col in (("de", 0), ("en", 1)):
        with open(os.path.join(directory, f"{name}.{lang}"), "w", encoding="utf-8") as f:
            f.writelines(p[col] + "\n" for p in pairs)


def _data_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "data_dir": os.path.abspath(args.data_dir),
        "train_examples": args.train_examples,
        "max_source_words": args.max_source_words,
        "dev_examples": args.dev_examples,
        "val_examples": args.val_examples,
        "test_examples": args.test_examples,
    }


def make_subsets(args: argparse.Namespace) -> tuple[dict[str, list[tuple[str, str]]], dict[str, Any]]:
    """The data subsets ``{"train", "dev", "val", "test"}`` (see the module docstring) and their
    manifest, in memory."""
    pool: list[tuple[str, str]] = []
    for name in TRAIN_SETS:
        pool.extend(_read_pair(args.data_dir, name))
    kept = [p for p in pool if _keep(p, args.max_source_words)]
    if len(kept) < args.train_examples:
        raise SetupError(
            f"only {len(kept)} training pairs have at most {args.max_source_words} source words; "
            f"lower --train-examples ({args.train_examples}) or raise --max-source-words"
        )
    dev_all, test_all = _read_pair(args.data_dir, DEV_SET), _read_pair(args.data_dir, TEST_SET)
    splits = {
        "train": random.Random(0).sample(kept, args.train_examples),
        "dev": _subset(dev_all, args.dev_examples, 1, args.max_source_words),
        "test": _subset(test_all, args.test_examples, 2, args.max_source_words),
    }
    for split, n in (("dev", args.dev_examples), ("test", args.test_examples)):
        if len(splits[split]) < n:
            raise SetupError(
                f"--{split}-examples {n}: only {len(splits[split])} sentences of "
                f"{DEV_SET if split == 'dev' else TEST_SET} pass the {args.max_source_words}-word filter"
            )
    splits["val"] = _spread(splits["dev"], args.val_examples)

    def words(pairs: list[tuple[str, str]], col: int) -> float:
        return sum(len(p[col].split()) for p in pairs) / max(len(pairs), 1)

    manifest = {
        "settings": _data_settings(args),
        "train_pool": len(pool),
        "train_pool_after_filter": len(kept),
        "counts": {k: len(v) for k, v in splits.items()},
        "distinct_train_pairs": len(set(splits["train"])),
        "mean_words": {k: [round(words(v, 0), 2), round(words(v, 1), 2)] for k, v in splits.items()},
    }
    return splits, manifest


def prepare_data(args: argparse.Namespace, work: str) -> dict[str, Any]:
    """Write ``WORK/data/{train,dev,val,test}.{de,en}`` and ``WORK/data/manifest.json``; an
    existing manifest with the same settings is reused."""
    d = os.path.join(work, "data")
    manifest_path = os.path.join(d, "manifest.json")
    manifest = _runner.read_json_if(manifest_path)
    if manifest is not None:
        if manifest["settings"] == _data_settings(args):
            return manifest
        raise SetupError(
            f"{work} holds data subsets made with other settings ({manifest['settings']}); use a new "
            "--work-dir or the same options"
        )
    splits, manifest = make_subsets(args)
    os.makedirs(d, exist_ok=True)
    for name, pairs in splits.items():
        _write(d, name, pairs)
    with open(manifest_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    return manifest
