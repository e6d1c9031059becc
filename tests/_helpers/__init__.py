"""What the tests share, one module a topic: small real data inputs (`data`), test images and
their PIL reference (`images`), TensorBoard scalars of a run (`tensorboard`), the tiny MoE
model's parity overrides and synthetic batches (`parity`), the evaluation tests' overrides and
prompts (`evaluation`), a tiny Megatron-Core GPT in a gloo world (`tiny_gpt`) and a saved tiny
MM1 checkpoint (`convert`). Test modules and worker scripts import shared pieces from here,
never from one another.
"""
