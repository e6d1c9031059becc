"""Few-shot evaluation (MM1's 0/4/8-shot captioning and VQA).

tasks.py      JSONL task format, seeded support draws
prompts.py    k-shot prompts, in-context examples interleaved in one sequence
generate.py   batched greedy decoding, Megatron-Core static KV cache (or none)
metrics.py    CIDEr-D, VQA accuracy
evaluator.py  tasks -> predictions -> scores; the results table
model_io.py   one-process model from a checkpoint of any layout
cli.py        `mm1-eval`
callback.py   in-training evaluation (TensorBoard eval/<task>/<k>shot)
"""
