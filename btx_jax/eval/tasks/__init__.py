"""Offline lm-evaluation-harness tasks: the harness's own task definitions (prompts, metrics, filters) for
JCommonsenseQA, JSQuAD and GSM8K, pointed at small samples bundled here instead of the Hugging Face hub.

    btx_jcommonsenseqa   = ja_leaderboard_jcommonsenseqa  (multiple choice, acc; 3-shot)
    btx_jsquad           = ja_leaderboard_jsquad          (generate_until, exact_match; 2-shot)
    btx_gsm8k            = gsm8k                          (generate_until, exact_match; 5-shot)
    btx_ja               = group of the two Japanese tasks

Each YAML loads its data with `data.py` (`custom_dataset`); `dataset_kwargs: {data_files: {split: path}}` in an
including YAML points a task at other files (e.g. the full JGLUE validation set). SOURCE.md lists the samples.
"""
