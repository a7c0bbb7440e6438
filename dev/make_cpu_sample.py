"""
Cut the small data sample that the CPU preset ships with (dev/cpu_sample/) out of a larger copy of
the same data sets, deterministically. Run once by a maintainer; the result is committed, so users
never need this script or the network.

    python dev/make_cpu_sample.py --src FOLDER [--dst dev/cpu_sample]

FOLDER is laid out like the sample itself, with the full files: arc/<subset>/<split>.jsonl,
mmlu/<split>.jsonl, gsm8k/<split>.jsonl, humaneval/HumanEval.jsonl.gz, chat/*.messages.jsonl,
core_sample/ (core.yaml, eval_meta_data.csv, eval_data/...) and pretrain/shard_0000{0,2}.parquet
(already shuffled; the last one is the validation text). Sources and licences of every file are
in dev/cpu_sample/README.md.

The sample keeps that layout (the tasks read it through NANOCHAT_DATA_DIR, CORE
through NANOCHAT_EVAL_BUNDLE) and takes evenly spaced rows so every slice spans its whole source
(all MMLU subjects, every book of the pretraining text). Sizes are chosen so the whole CPU
pipeline finishes in minutes on 2 cores; see dev/cpu_sample/README.md for sources and licences.
"""

import argparse
import gzip
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq

# (relative path, number of rows to keep; -1 = all)
JSONL_SLICES = [
    ("arc/ARC-Easy/train.jsonl", 400),
    ("arc/ARC-Easy/test.jsonl", 400),
    ("arc/ARC-Challenge/train.jsonl", 300),
    ("arc/ARC-Challenge/test.jsonl", 300),
    ("mmlu/dev.jsonl", -1),
    ("mmlu/validation.jsonl", 300),
    ("mmlu/test.jsonl", 570),  # 10 per subject on average, spread over all 57
    ("gsm8k/train.jsonl", 600),
    ("gsm8k/test.jsonl", 200),
    ("chat/dolly_hhrlhf_small.messages.jsonl", 600),
    ("chat/self_instruct_seed_tasks.messages.jsonl", -1),
    ("chat/self_instruct_user_oriented.messages.jsonl", -1),
    ("core_sample/eval_data/world_knowledge/arc_easy.jsonl", 300),
    ("core_sample/eval_data/commonsense_reasoning/copa.jsonl", -1),
    ("core_sample/eval_data/language_understanding/lambada_openai.jsonl", 300),
    ("core_sample/eval_data/language_understanding/winograd_wsc.jsonl", -1),
    ("core_sample/eval_data/symbolic_problem_solving/bigbench_operators.jsonl", -1),
]
COPIES = ["humaneval/HumanEval.jsonl.gz", "core_sample/core.yaml", "core_sample/eval_meta_data.csv"]

# Pretraining text: (output shard, source shard, number of documents). The last shard is val.
PRETRAIN = [("shard_00000.parquet", "shard_00000.parquet", 2048),
            ("shard_00001.parquet", "shard_00002.parquet", 512)]
ROW_GROUP_SIZE = 64  # small, so up to 8 ranks each get row groups of the 512-row val shard (the full data set: 1024)


def evenly_spaced(rows: list, n: int) -> list:
    """n rows spread evenly over the list, in their original order (all rows if n < 0)."""
    if n < 0 or n >= len(rows):
        return rows
    return [rows[(i * len(rows)) // n] for i in range(n)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--src", required=True, help="a folder laid out like dev/cpu_sample, with the full files")
    parser.add_argument("--dst", default=os.path.join(here, "cpu_sample"))
    args = parser.parse_args()

    for rel, n in JSONL_SLICES:
        with open(os.path.join(args.src, rel), encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        kept = evenly_spaced(lines, n)
        os.makedirs(os.path.dirname(os.path.join(args.dst, rel)), exist_ok=True)
        with open(os.path.join(args.dst, rel), "w", encoding="utf-8") as f:
            f.writelines(kept)
        print(f"{rel}: {len(kept)} of {len(lines)} rows")

    for rel in COPIES:
        os.makedirs(os.path.dirname(os.path.join(args.dst, rel)), exist_ok=True)
        shutil.copyfile(os.path.join(args.src, rel), os.path.join(args.dst, rel))
        print(f"{rel}: copied")

    os.makedirs(os.path.join(args.dst, "pretrain"), exist_ok=True)
    for out_name, src_name, n in PRETRAIN:
        texts = pq.read_table(os.path.join(args.src, "pretrain", src_name), columns=["text"]).column("text").to_pylist()
        kept = texts[:n]  # the source shards are already shuffled
        table = pa.table({"text": pa.array(kept, type=pa.string())})
        # Same encoding as the full data set: zstd level 3, no dictionary, no statistics.
        pq.write_table(table, os.path.join(args.dst, "pretrain", out_name), row_group_size=ROW_GROUP_SIZE,
                       compression="zstd", compression_level=3, use_dictionary=False, write_statistics=False)
        print(f"pretrain/{out_name}: {len(kept)} documents, {sum(map(len, kept)):,} chars (from {src_name})")

    with gzip.open(os.path.join(args.dst, "humaneval", "HumanEval.jsonl.gz"), "rt") as f:
        assert sum(1 for _ in f) == 164


if __name__ == "__main__":
    main()
