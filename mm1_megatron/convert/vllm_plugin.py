"""vLLM plugin (entry point `vllm.general_plugins: mm1`): registers MM1's export architecture
with vLLM's model registry in every vLLM process (the engine core and its workers are
spawned, so registering in a script would not reach them). Cheap to import: vLLM imports the
model module (`convert/vllm_model.py`) itself, lazily, by name."""

ARCHITECTURE = "MM1ForConditionalGeneration"  # the export's config.json `architectures`


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE,
                                     "mm1_megatron.convert.vllm_model:" + ARCHITECTURE)
