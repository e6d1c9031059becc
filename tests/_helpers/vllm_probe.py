"""Run under vllm_overlay.pythonpath(): `vllm.LLM` on MM1 exports, one after the other,
greedy, for the prompts of `tests/convert/test_vllm_serving.py` (0, 1 and 2 images), each
request alone and all in one batch; prints `RESULT {json}`: per export, each request's prompt
ids and generated ids.

    python tests/_helpers/vllm_probe.py MAX_NEW_TOKENS PROMPTS.json EXPORT_DIR [EXPORT_DIR ...]
PROMPTS.json: [[prompt, [image paths]], ...].
"""

import json
import sys


def main() -> None:
    from PIL import Image
    from vllm import LLM, SamplingParams

    import gc

    max_new, prompts, exports = int(sys.argv[1]), json.load(open(sys.argv[2])), sys.argv[3:]
    greedy = SamplingParams(temperature=0.0, max_tokens=max_new)
    requests = []
    for text, paths in prompts:
        request = {"prompt": text}
        if paths:
            request["multi_modal_data"] = {"image": [Image.open(p).convert("RGB")
                                                     for p in paths]}
        requests.append(request)

    def ids(outputs):
        return [[list(o.prompt_token_ids), list(o.outputs[0].token_ids)] for o in outputs]

    results = {}
    for export in exports:
        llm = LLM(model=export, trust_remote_code=True, dtype="float32", enforce_eager=True,
                  max_model_len=128, limit_mm_per_prompt={"image": 2}, seed=0)
        alone = [ids(llm.generate([r], greedy, use_tqdm=False))[0] for r in requests]
        batched = ids(llm.generate(requests, greedy, use_tqdm=False))
        results[export] = {"alone": alone, "batched": batched}
        llm.llm_engine.engine_core.shutdown()  # its engine-core process, before the next
        del llm
        gc.collect()
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":  # vLLM's engine core is spawned: it re-imports this file
    main()
