"""The HF export used the standard transformers ways: AutoProcessor + generate, batches, beam
search, pipeline("image-text-to-text"), the chat template, gradient checkpointing,
device_map="auto", and no warnings under the installed transformers.

One real export (a tiny checkpoint with perturbed weights, the demo's sentencepiece tokenizer,
through `mm1-convert-hf`'s `export` and its parity gate) is made in a fresh process; the tests
load it here with plain transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._helpers.hf_probe import new_tokens
from tests._procs import run_ranks

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
# tiny, with the demo tokenizer's vocabulary; 9 tokens per image; a RoPE base other than
# transformers' default (a release reading another config field would run at the default)
OVERRIDES = ["llm.vocab_size=2048", "llm.num_query_groups=2", "llm.rope_theta=50000"]
MAX_NEW = 8


def case_export(root: str, tokenizer: str) -> dict:
    os.umask(0o022)  # the export honours the umask; fix it for the mode check
    from mm1_megatron.config import ParallelConfig, load_config
    from mm1_megatron.convert.reader import ensure_process_group
    from mm1_megatron.convert.to_hf import export
    from mm1_megatron.runtime import init_distributed
    from tests._helpers.convert import save_single

    ensure_process_group()
    init_distributed(ParallelConfig(world_size=1), seed=1234, environ={})
    overrides = OVERRIDES + [f"data.tokenizer_model={tokenizer}"]
    run = Path(root) / "run"
    save_single(str(run), overrides)
    report = export(run, Path(root) / "hf", load_config("tiny", overrides), progress=False,
                    log=lambda *_: None)
    # the same weights as an SFT run's export: the chat format's template
    sft = overrides + ["data.weight_interleaved=0", "data.weight_caption=0",
                       "data.weight_text=0", "data.weight_sft=1"]
    export(run, Path(root) / "hf_sft", load_config("tiny", sft), progress=False, verify=False,
           log=lambda *_: None)
    # ... and as a tiled (high-resolution) SFT model: 84 px tiles, overview + 2 x 2, through
    # the parity gate (two images of five sub-images each)
    tiled = export(run, Path(root) / "hf_tiled",
                   load_config("tiny", sft + ["vision.tiling=sphinx", "vision.tile_grid=2"]),
                   progress=False, log=lambda *_: None)
    return {"parity": report["parity"], "notes": report["notes"], "tiled": tiled["parity"]}


@pytest.fixture(scope="module")
def exported(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_usage")
    tokenizer = str(demo_data / "tokenizer.model")
    report = run_ranks(__file__, "case_export", nprocs=1, timeout=300,
                       kwargs={"root": str(root), "tokenizer": tokenizer})[0]
    assert report["notes"] == []  # tokenizer.json written, nothing skipped
    return root / "hf", report, tokenizer


@pytest.fixture(scope="module")
def loaded(exported):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    d = exported[0]
    model = AutoModelForImageTextToText.from_pretrained(d, trust_remote_code=True,
                                                        dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(d, trust_remote_code=True)
    return model, processor


@pytest.fixture(scope="module")
def photos():
    from PIL import Image
    from skimage import data

    return [Image.fromarray(f()) for f in (data.astronaut, data.chelsea, data.coffee,
                                           data.rocket)]


def own_ids(tokenizer: str, prompt: str, k: int) -> list[int]:
    """The prompt as training / mm1-eval tokenize it: BOS, text pieces encoded on their own,
    each `<image>` as k placeholder ids (our sentencepiece tokenizer, not transformers')."""
    from mm1_megatron.data.tokenizer import BOS_ID, IMAGE_ID, Tokenizer

    tok, ids = Tokenizer.load(tokenizer), [BOS_ID]
    for i, piece in enumerate(prompt.split("<image>")):
        ids += ([IMAGE_ID] * k if i else []) + (tok.encode(piece) if piece else [])
    return ids


@torch.no_grad()
def own_greedy(model, ids: list[int], pixels, steps: int = MAX_NEW) -> list[int]:
    """Greedy decoding by re-running the whole sequence (no cache, no generate()), images as
    one flat [n, 3, H, W] list; the export's generation config: placeholders never chosen,
    stop after EOS."""
    config = model.generation_config
    seq, out = torch.tensor([ids]), []
    for _ in range(steps):
        logits = model(input_ids=seq, pixel_values=pixels).logits[0, -1]
        logits[config.suppress_tokens] = float("-inf")
        out.append(int(logits.argmax()))
        if out[-1] == config.eos_token_id:
            break
        seq = torch.cat([seq, torch.tensor([[out[-1]]])], dim=1)
    return out


PROMPTS = {0: "Once upon a time", 1: "<image> A photo of",
           3: "<image> A photo of a man.\n<image> A photo of a cat.\n<image> A photo of"}


@pytest.mark.parametrize("n_images", [0, 1, 3])
def test_processor_and_generate_equal_the_models_own_greedy(exported, loaded, photos, n_images):
    _, _, tokenizer = exported
    model, processor = loaded
    prompt, images = PROMPTS[n_images], photos[:n_images] or None
    inputs = processor(images=images, text=prompt, return_tensors="pt")
    k = model.config.num_image_tokens
    assert inputs["input_ids"][0].tolist() == own_ids(tokenizer, prompt, k)
    assert inputs["image_counts"].tolist() == [n_images]
    flat = (processor.image_processor(images, return_tensors="pt").pixel_values
            if images else None)
    out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    assert new_tokens(out, inputs) == own_greedy(model, inputs["input_ids"][0].tolist(), flat)


def test_batch_with_different_image_counts_equals_unbatched_rows(loaded, photos):
    model, processor = loaded
    prompts = [PROMPTS[3], PROMPTS[0], PROMPTS[1]]
    batch = processor(images=photos[:3] + photos[3:4], text=prompts, return_tensors="pt")
    assert batch["image_counts"].tolist() == [3, 0, 1]
    assert tuple(batch["pixel_values"].shape[:2]) == (3, 3)
    width = batch["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(**batch).logits
    out = model.generate(**batch, max_new_tokens=MAX_NEW, do_sample=False)
    firsts = {0: 0, 1: 3, 2: 3}
    for row, prompt in enumerate(prompts):
        n = batch["image_counts"][row].item()
        single = processor(images=photos[firsts[row]:firsts[row] + n] or None, text=prompt,
                           return_tensors="pt")
        length = single["input_ids"].shape[1]
        assert batch["attention_mask"][row].tolist() == [0] * (width - length) + [1] * length
        with torch.no_grad():
            ref = model(**single).logits[0]
        assert float((logits[row, width - length:] - ref).abs().max()) <= 1e-5
        ref_out = model.generate(**single, max_new_tokens=MAX_NEW, do_sample=False)
        assert new_tokens(out, batch, row) == new_tokens(ref_out, single)


def test_beam_search_keeps_each_rows_images(loaded, photos):
    """Two beams (and two returned sequences) of a row with two images, in a batch with
    another row, against the same search fed the row's embeddings (images spliced before
    generate(), so nothing to pair)."""
    from transformers import GenerationMixin

    model, processor = loaded
    prompts = ["<image> A photo of a man.\n<image> A photo of", PROMPTS[1]]
    batch = processor(images=[photos[0], photos[1], photos[2]], text=prompts,
                      return_tensors="pt")
    beams = dict(num_beams=2, num_return_sequences=2, max_new_tokens=MAX_NEW,
                 do_sample=False, early_stopping=True)
    out = model.generate(**batch, **beams)
    for row in range(2):
        single = processor(images=[photos[0], photos[1]] if row == 0 else [photos[2]],
                           text=prompts[row], return_tensors="pt")
        with torch.no_grad():
            embeds = model.embed(single["input_ids"], single["pixel_values"],
                                 single["image_counts"])
        ref = model.generate(inputs_embeds=embeds, attention_mask=single["attention_mask"],
                             **beams)
        for beam in range(2):
            got = out[2 * row + beam, batch["input_ids"].shape[1]:].tolist()
            want = ref[beam].tolist()
            assert got[:len(want)] == want and not any(got[len(want):])
    # what the test guards against: generate()'s own expansion of a flat image list pairs the
    # first row's beams with the wrong images
    flat = processor.image_processor([photos[0], photos[1], photos[2]],
                                     return_tensors="pt").pixel_values
    naive = GenerationMixin.generate(model, input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"], pixel_values=flat,
                                     **beams)
    assert not torch.equal(naive, out)


def test_pipeline_captions_like_generate(exported, loaded, photos):
    from transformers import pipeline

    model, processor = loaded
    pipe = pipeline("image-text-to-text", model=str(exported[0]), trust_remote_code=True)
    inputs = processor(images=photos[1], text=PROMPTS[1], return_tensors="pt")
    want = processor.decode(new_tokens(model.generate(**inputs, max_new_tokens=MAX_NEW,
                                                      do_sample=False), inputs),
                            skip_special_tokens=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": photos[1]}]}]
    got = pipe(text=messages, max_new_tokens=MAX_NEW, return_full_text=False)
    assert got[0]["generated_text"] == want


def test_chat_template_renders_the_evaluation_prompt(exported, loaded, photos):
    from mm1_megatron.data.tokenizer import Tokenizer
    from mm1_megatron.evaluation.prompts import build_prompt, render, segments
    from mm1_megatron.evaluation.tasks import VQA, Example

    model, processor = loaded
    shot = Example("s", ("a.jpg",), question="What animal is  this?", answers=("a  cat",))
    query = Example("q", ("b.jpg",), question="What is on the table?")
    messages = [
        {"role": "user", "content": [{"type": "image", "image": photos[1]},
                                     {"type": "text", "text": shot.question}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a  cat"}]},
        {"role": "user", "content": [{"type": "image", "image": photos[2]},
                                     {"type": "text", "text": query.question}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<s>" + render(segments(VQA, query, [shot]))
    assert processor.tokenizer.apply_chat_template(messages, tokenize=False) == text
    inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True,
                                           add_generation_prompt=True, return_tensors="pt")
    own = build_prompt(Tokenizer.load(exported[2]), VQA, query, [shot],
                       model.config.num_image_tokens, model.config.image_token_id)
    assert inputs["input_ids"][0].tolist() == own.tokens
    assert inputs["pixel_values"].shape[:2] == (1, 2)
    caption = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}],
                                            tokenize=False)
    assert caption == "<s><image> A photo of"
    with pytest.raises(Exception, match="cannot render this system turn"):
        processor.apply_chat_template([{"role": "system", "content": "Be brief."}],
                                      tokenize=False)


def test_processor_saves_and_reloads(tmp_path, loaded, photos):
    from transformers import AutoProcessor

    _, processor = loaded
    processor.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    a = processor(images=photos[:1], text=PROMPTS[1], return_tensors="pt")
    b = again(images=photos[:1], text=PROMPTS[1], return_tensors="pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_recomputes_and_keeps_gradients(loaded, photos):
    from transformers import AutoModelForImageTextToText

    model, processor = loaded
    inputs = processor(images=photos[:1], text=PROMPTS[1] + " a man", return_tensors="pt")
    grads, calls = [], []
    for checkpointing in (False, True):
        m = AutoModelForImageTextToText.from_pretrained(model.name_or_path,
                                                        trust_remote_code=True,
                                                        dtype=torch.float32)
        if checkpointing:
            m.activation_checkpointing_enable()
        m.train()
        count = [0]
        for mlp in (m.language_model.layers[0].mlp, m.vision_tower.encoder.layers[0].mlp):
            # a pre-hook: the recompute stops once the saved tensors are back, before the
            # layer's last module returns
            mlp.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        m(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
        calls.append(count[0])
    assert calls == [2, 4]  # each checkpointed layer runs again in the backward pass
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(m.parameters()))
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


def test_device_map_auto_loads_and_generates(exported, loaded, photos):
    from transformers import AutoModelForImageTextToText

    model, processor = loaded
    mapped = AutoModelForImageTextToText.from_pretrained(exported[0], trust_remote_code=True,
                                                         dtype=torch.float32, device_map="auto")
    inputs = processor(images=photos[:1], text=PROMPTS[1], return_tensors="pt")
    kw = dict(max_new_tokens=MAX_NEW, do_sample=False)
    assert mapped.generate(**inputs, **kw).tolist() == model.generate(**inputs, **kw).tolist()


NO_WARNINGS = r"""
import json, logging, sys, warnings
warnings.simplefilter("error")  # any Python warning (deprecations included) fails the run
import transformers
from transformers import (AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor,
                          AutoTokenizer, pipeline)
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
transformers.logging.set_verbosity_warning()
transformers.logging.get_logger().addHandler(Keep())
import builtins
def no_prompt(*_):
    raise AssertionError("asked whether to run custom code")
builtins.input = no_prompt
from PIL import Image
from skimage import data
d = sys.argv[1]
image = Image.fromarray(data.chelsea())
AutoImageProcessor.from_pretrained(d)
AutoTokenizer.from_pretrained(d, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(d, trust_remote_code=True)
model = AutoModelForImageTextToText.from_pretrained(d, trust_remote_code=True)
inputs = processor(images=[image, image], text=["<image> A photo of", "<image> A cat"],
                   return_tensors="pt")
model.generate(**inputs, max_new_tokens=4)
model.generate(**inputs, max_new_tokens=4, num_beams=2)
model.generate(**inputs, max_new_tokens=4, do_sample=True, num_return_sequences=2)
pipe = pipeline("image-text-to-text", model=d, trust_remote_code=True)
pipe(text=[{"role": "user", "content": [{"type": "image", "image": image}]}], max_new_tokens=4)
print(json.dumps(records))
# Without remote code the tokenizer loads too, never asking (transformers logs that the model
# type is unknown to it: the stock class is used, which is right for the tokenizer).
assert AutoTokenizer.from_pretrained(d, trust_remote_code=False)("<image>").input_ids == [1, 3]
"""


def test_export_loads_and_generates_without_warnings(exported):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "error"}
    done = subprocess.run([sys.executable, "-c", NO_WARNINGS, str(exported[0])], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    assert "asked whether" not in done.stderr


def test_files_readable_and_model_card(exported):
    d, report, _ = exported
    assert {oct(p.stat().st_mode & 0o777) for p in d.rglob("*")} == {"0o644"}
    names = {p.name for p in d.iterdir()}
    assert {"processor_config.json", "processing_mm1.py", "chat_template.jinja",
            "tokenizer.json", "README.md"} <= names
    processor_config = json.loads((d / "processor_config.json").read_text())
    assert processor_config["processor_class"] == "MM1Processor"
    assert processor_config["num_image_tokens"] == json.loads(
        (d / "config.json").read_text())["connector"]["num_tokens"]
    card = (d / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\n")
    assert f"{report['parity']['max_abs_logit_diff']:.2e}" in card
    assert "AutoProcessor.from_pretrained" in card


def test_an_sft_export_renders_the_chat_format_training_used(exported, photos):
    from transformers import AutoProcessor

    from mm1_megatron.data.prompt_format import CHAT_ASSISTANT, Answer, Turn, chat_segments
    from mm1_megatron.data.tokenizer import BOS_ID, EOS_ID, IMAGE_ID, Tokenizer

    d, _, tokenizer = exported
    processor = AutoProcessor.from_pretrained(d.parent / "hf_sft", trust_remote_code=True)
    turns = [Turn("system", ("Answer briefly.",)), Turn("user", (0, "\nWhat is this?")),
             Turn("assistant", ("A cat.",)), Turn("user", ("And this?", 1))]
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "image", "image": photos[1]},
                                             {"type": "text", "text": "\nWhat is this?"}]},
                {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": [{"type": "text", "text": "And this?"},
                                             {"type": "image", "image": photos[3]}]}]
    inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True,
                                           add_generation_prompt=True, return_tensors="pt")
    # training's tokenization of the same turns, then the generation prompt
    segments = chat_segments(turns)
    segments[-1] += CHAT_ASSISTANT
    tok, k = Tokenizer.load(tokenizer), processor.num_image_tokens
    want = [BOS_ID]
    for seg in segments:
        want += [IMAGE_ID] * k if isinstance(seg, int) else tok.encode(seg) + \
            ([EOS_ID] if isinstance(seg, Answer) else [])
    assert inputs["input_ids"][0].tolist() == want
    assert inputs["image_counts"].tolist() == [2]
    assert "fine-tuned on conversations" in (d.parent / "hf_sft" / "README.md").read_text()


def test_a_tiled_export_tiles_like_training_and_generates(exported, photos):
    """The tiled SFT export: its processor cuts an overview and 2 x 2 tiles per image like the
    DALI decoder training used (bicubic filters a few levels apart), the prompt is training's
    tokenization with 5 x 9 placeholders per image, and `generate` equals greedy decoding on
    the same sub-images; the export passed its parity gate on tiled images."""
    import io

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mm1_megatron.data.images import ImageDecoder
    from mm1_megatron.data.prompt_format import CHAT_ASSISTANT, Turn, chat_segments
    from mm1_megatron.data.tokenizer import BOS_ID, IMAGE_ID, Tokenizer

    d, report, tokenizer = exported
    assert report["tiled"]["max_abs_logit_diff"] < 1e-3
    tiled = d.parent / "hf_tiled"
    assert json.loads((tiled / "processor_config.json").read_text())["tile_grid"] == 2
    assert "as a 84 px overview and 2 x 2 tiles" in (tiled / "README.md").read_text()
    processor = AutoProcessor.from_pretrained(tiled, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(tiled, trust_remote_code=True,
                                                        dtype=torch.float32).eval()
    images = [photos[1], photos[2]]
    messages = [{"role": "user", "content": [{"type": "image", "image": images[0]},
                                             {"type": "image", "image": images[1]},
                                             {"type": "text", "text": "\nWhat are these?"}]}]
    inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True,
                                           add_generation_prompt=True, return_tensors="pt")
    k = model.config.num_image_tokens * 5
    segments = chat_segments([Turn("user", (0, 1, "\nWhat are these?"))])
    segments[-1] += CHAT_ASSISTANT
    tok, want = Tokenizer.load(tokenizer), [BOS_ID]
    for seg in segments:
        want += [IMAGE_ID] * k if isinstance(seg, int) else tok.encode(seg)
    assert inputs["input_ids"][0].tolist() == want
    assert inputs["image_counts"].tolist() == [10]
    assert inputs["pixel_values"].shape == (1, 10, 3, 84, 84)
    encoded = []
    for image in images:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        encoded.append(buf.getvalue())
    dali, bad = ImageDecoder(84, batch_size=2, device="cpu", tiles=2).decode(encoded)
    diff = (inputs["pixel_values"][0] - dali).abs()
    assert bad == [] and diff.mean() < 0.01 and diff.max() < 0.3, float(diff.mean())
    out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    assert new_tokens(out, inputs) == own_greedy(model, want, inputs["pixel_values"][0])


@pytest.fixture(scope="module")
def overlays():
    """The transformers releases CI runs the export under, each in a folder for PYTHONPATH
    (built once per machine, in parallel: ~40 s)."""
    from concurrent.futures import ThreadPoolExecutor

    from mm1_megatron.convert.hf_config import TRANSFORMERS_TESTED
    from tests._helpers.transformers_overlay import overlay

    with ThreadPoolExecutor(len(TRANSFORMERS_TESTED)) as pool:
        return dict(zip(TRANSFORMERS_TESTED, pool.map(overlay, TRANSFORMERS_TESTED)))


def test_the_export_gives_the_same_tokens_under_each_tested_transformers(exported, overlays):
    """4.57.6, 5.0.0, 5.19.0 overlaid on PYTHONPATH: loading, the processor's prompts, greedy
    captions with 0-2 images, a batch of mixed image counts, beam search, the pipeline, the
    SFT chat template and a tiled export give the installed release's tokens, and the export
    says which releases it was tested on."""
    from concurrent.futures import ThreadPoolExecutor

    import transformers

    from tests._helpers import hf_probe

    root = exported[0].parent
    config = json.loads((exported[0] / "config.json").read_text())
    assert config["mm1_megatron"]["transformers"]["tested"] == sorted(
        {*overlays, transformers.__version__}, key=lambda v: tuple(map(int, v.split("."))))
    assert "Runs on transformers >=4.57, <6 (tested: 4.57.6, 5.0.0, 5.19.0" in \
        (exported[0] / "README.md").read_text()

    def probe(folder: Path) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(folder), "HF_HUB_OFFLINE": "1"}
        return subprocess.run([sys.executable, "-m", "tests._helpers.hf_probe", str(root)],
                              env=env, capture_output=True, text=True, timeout=300,
                              cwd=Path(__file__).parents[2])

    with ThreadPoolExecutor(2) as pool:
        runs = dict(zip(overlays, pool.map(probe, overlays.values())))
        want = hf_probe.main(root)  # the installed release, in this process meanwhile
    assert want["greedy_1"] and want["tiled_counts"] == [5]
    for version, done in runs.items():
        assert done.returncode == 0, (version, done.stderr[-3000:])
        got = json.loads(done.stdout.strip().splitlines()[-1])
        assert got.pop("transformers") == version
        assert got.pop("load_warnings") == [], version
        for n in range(3):  # every position's logits (64 of the vocabulary), fp32 noise apart
            logits = torch.tensor(got.pop(f"logits_{n}"))
            assert torch.allclose(logits, torch.tensor(want[f"logits_{n}"]), atol=1e-4), \
                (version, n, float((logits - torch.tensor(want[f"logits_{n}"])).abs().max()))
        assert got == {k: v for k, v in want.items() if k not in (
            "transformers", "load_warnings", "logits_0", "logits_1", "logits_2")}, version


@pytest.fixture(scope="module")
def lmms_eval_env(tmp_path_factory):
    """lmms-eval 0.7.3 (tests/_helpers/lmms_overlay.py), the two 4-row stock-layout datasets
    saved as `mm1-lmms-tasks save` saves them, and the task pack `mm1-lmms-tasks pack` writes
    for them."""
    from tests._helpers.lmms_overlay import overlay

    root = tmp_path_factory.mktemp("lmms")
    env = {**os.environ, "PYTHONPATH": str(overlay()), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(root / "hf_home")}
    repo = Path(__file__).parents[2]
    # one process (importing lmms-eval's task registry costs ~10 s): the data, the pack,
    # and what `save` would download for the whole suite, resolved offline
    script = (f"from tests._helpers.lmms_data import save; save(__import__('pathlib')"
              f".Path({str(root / 'data')!r}))\n"
              "from mm1_megatron.evaluation.lmms_tasks import main\n"
              f"assert main(['pack', '--data', {str(root / 'data')!r}, '--out', "
              f"{str(root / 'pack')!r}]) == 0\n"
              f"assert main(['save', '--tasks', 'sft-suite', '--out', "
              f"{str(root / 'unused')!r}, '--dry-run']) == 0\n")
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=repo,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    packed, plan = [json.loads(line) for line in done.stdout.splitlines()
                    if line.startswith("{")]
    assert packed["tasks"] == ["pope_local", "seedbench_ppl_local"]
    assert {"mme", "pope", "mmvet", "mathvista_testmini_format"} <= set(plan)  # group expanded
    assert all(p["dataset_path"] and p["splits"] for p in plan.values())
    assert plan["pope"]["splits"] == ["test"] and not (root / "unused").exists()
    return root, env, repo


LMMS_NEW_TOKENS = 12  # over POPE's 128: a random model rarely stops early


def _lmms_eval(env_root, export: Path, out: Path, tasks: str, *extra: str) -> dict:
    root, env, repo = env_root
    done = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "mm1", "--model_args",
         f"pretrained={export},dtype=float32", "--tasks", tasks, "--include_path",
         str(root / "pack"), "--output_path", str(out), "--batch_size", "2", "--device", "cpu",
         "--gen_kwargs", f"max_new_tokens={LMMS_NEW_TOKENS}", "--log_samples", *extra], env=env, cwd=repo, capture_output=True, text=True,
        timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(next(out.rglob("*_results.json")).read_text())["results"]
    samples = {path.stem.split("_samples_")[1]: [json.loads(line) for line in
                                                 path.read_text().splitlines()]
               for path in out.rglob("*_samples_*.jsonl")}
    return {"results": results, "samples": samples}


def _user_turn(processor, text: str, n_images: int) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}],
                                         tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def test_lmms_eval_scores_a_pretraining_export_offline_with_the_mm1_plugin(
        exported, loaded, lmms_eval_env, tmp_path):
    """`lmms-eval --model mm1` (the entry point, no fork, no --include_path model code) on
    the export with stock POPE (generation) and SEED-Bench multiple choice read offline from
    the task pack: every answer is the export's greedy text for the paper's VQA prompt, cut at
    the newline; every choice's score is the continuation's summed log-probability; the
    accuracies lmms-eval writes are those answers' and scores'."""
    from tests._helpers.lmms_data import rows

    model, processor = loaded
    run = _lmms_eval(lmms_eval_env, exported[0], tmp_path / "out",
                     "pope_local,seedbench_ppl_local")
    data = rows()

    pope = sorted(run["samples"]["pope_local"], key=lambda s: s["doc_id"])
    assert len(pope) == 4
    right = 0
    for doc, sample in enumerate(pope):
        question = data["pope"]["question"][doc] + \
            "\nAnswer the question using a single word or phrase."  # POPE's post_prompt
        prompt = _user_turn(processor, question, 1)
        assert prompt.startswith("<s><image> Question: " + data["pope"]["question"][doc]) \
            and prompt.endswith(" Short answer:")  # the template folds whitespace
        inputs = processor(images=[data["pope"]["image"][doc].convert("RGB")], text=prompt,
                           return_tensors="pt", add_special_tokens=False)
        out = model.generate(**inputs, max_new_tokens=LMMS_NEW_TOKENS, do_sample=False)
        want = processor.decode(new_tokens(out, inputs), skip_special_tokens=True)
        want = want.split("\n\n")[0].split("\n")[0].strip()
        assert sample["filtered_resps"] == want, doc
        right += want.lower() == data["pope"]["answer"][doc]
    assert run["results"]["pope_local"]["pope_accuracy,none"] == right / 4

    seed = sorted(run["samples"]["seedbench_ppl_local"], key=lambda s: s["doc_id"])
    letters = "ABCD"
    correct = 0
    for doc, sample in enumerate(seed):
        prompt = _user_turn(processor, f"{data['seedbench_ppl']['question'][doc]} Answer :", 1)
        inputs = processor(images=[data["seedbench_ppl"]["image"][doc][0].convert("RGB")],
                           text=prompt, return_tensors="pt", add_special_tokens=False)
        scores = []
        for letter in letters:
            choice = " " + data["seedbench_ppl"][f"choice_{letter.lower()}"][doc]
            cont = processor.tokenizer(choice, add_special_tokens=False,
                                       return_tensors="pt").input_ids
            ids = torch.cat([inputs["input_ids"], cont], dim=1)
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"],
                           image_counts=inputs["image_counts"]).logits[0]
            logp = torch.log_softmax(logits[-cont.shape[1] - 1:-1], -1)
            scores.append(float(logp.gather(1, cont[0, :, None]).sum()))
        got = [float(pair[0]) for pair in sample["filtered_resps"]]
        assert got == pytest.approx(scores, abs=1e-3), doc
        correct += letters[int(torch.tensor(scores).argmax())] == \
            data["seedbench_ppl"]["answer"][doc]
    assert run["results"]["seedbench_ppl_local"]["acc,none"] == correct / 4


def test_lmms_eval_prompts_an_sft_export_in_its_chat_format(exported, lmms_eval_env, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tests._helpers.lmms_data import rows

    sft = exported[0].parent / "hf_sft"
    run = _lmms_eval(lmms_eval_env, sft, tmp_path / "out", "pope_local", "--limit", "2")
    processor = AutoProcessor.from_pretrained(sft, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(sft, trust_remote_code=True,
                                                        dtype=torch.float32).eval()
    data = rows()["pope"]
    for sample in sorted(run["samples"]["pope_local"], key=lambda s: s["doc_id"]):
        doc = sample["doc_id"]
        question = data["question"][doc] + "\nAnswer the question using a single word or phrase."
        prompt = _user_turn(processor, question, 1)
        assert prompt.startswith("<s>User: <image>") and prompt.endswith("\nAssistant:")
        inputs = processor(images=[data["image"][doc].convert("RGB")], text=prompt,
                           return_tensors="pt", add_special_tokens=False)
        out = model.generate(**inputs, max_new_tokens=LMMS_NEW_TOKENS, do_sample=False)
        want = processor.decode(new_tokens(out, inputs), skip_special_tokens=True)
        assert sample["filtered_resps"] == want.split("\n\n")[0]  # lmms-eval's default stop
