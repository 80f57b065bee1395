"""`trtforge run`: a model over a user's data on every GPU (see run.py for the pipeline).

    inputs.py      the user's files, read in order and in bounded blocks, checked before any work
    tokenizing.py  tokenizing processes beside the engines
    output.py      the output directory: shards, _run.json, resume, publication
    run.py         the pipeline: read -> tokenize -> infer -> write, overlapped, bounded; progress
"""
