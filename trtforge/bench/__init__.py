"""`trtforge bench`: the harness that measures the runtime, kept apart from the serving code.

    harness.py     the bench itself: contenders measured, parity against DDP, reports and plots
    baselines.py   the PyTorch contenders: DDP, length-sorted DDP, DataParallel, torch.compile
    workloads.py   real English text (sentences, paragraphs) and its tokenization
    callers.py     several caller processes, each its own Runtime, measured together

It uses the runtime as a service would (trtforge.runtime.Runtime and the batching helpers it
exports); nothing in trtforge/runtime/ imports it.
"""
