"""The README's "Training wrapper" example, runnable: one gradient step, then sampling.

On CPU it uses a small model and a small slice of the default corpus; with --seed-config and a
CUDA GPU, the seed README's full-size model. Files go to ./runs/training_wrapper.

    python examples/training_wrapper.py
    REPROCESS=1 python examples/training_wrapper.py   # force a rebuild of the database
"""

import argparse
from pathlib import Path

import torch

from diablogpt_pytorch import DIABLOGPT, TrainingWrapper
from diablogpt_pytorch.config import SEED
from diablogpt_pytorch.corpus import write_default_corpus

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--seed-config", action="store_true", help="the seed README's model sizes")
parser.add_argument("--out", default="runs/training_wrapper")
args = parser.parse_args()

out = Path(args.out)
write_default_corpus(out / "text_folder")
device = "cuda" if torch.cuda.is_available() else "cpu"

# instantiate DIABLOGPT, fit it into the TrainingWrapper with correct settings

if args.seed_config:
    sizes = {k: v for k, v in SEED.model_kwargs().items()  # the seed README's model sizes
             if k in ("max_seq_len", "enc_dim", "enc_depth", "dec_dim", "dec_depth",
                      "dec_cross_attn_layers", "heads", "dim_head")}
else:
    sizes = dict(max_seq_len=256, enc_dim=128, enc_depth=2, dec_dim=128, dec_depth=4,
                 dec_cross_attn_layers=(2, 4), heads=4, dim_head=32)

diablo_gpt = DIABLOGPT(
    **sizes,
    dec_attn_dropout=0.25,  # decoder attention dropout
    dec_ff_dropout=0.25,    # decoder feedforward dropout
).to(device)

wrapper = TrainingWrapper(
    diablogpt=diablo_gpt,                                  # the DIABLOGPT instance
    knn=2,                                                 # knn (2 in paper was sufficient)
    chunk_size=64,                                         # chunk size (64 in paper)
    documents_path=out / "text_folder",                    # path to folder of text
    glob="**/*.txt",                                       # text glob
    chunks_memmap_path=out / "train.chunks.dat",           # path to chunks
    seqs_memmap_path=out / "train.seq.dat",                # path to sequence data
    doc_ids_memmap_path=out / "train.doc_ids.dat",         # document ids per chunk
    max_chunks=1_000_000,                                  # maximum cap to chunks
    max_seqs=100_000,                                      # maximum seqs
    knn_extra_neighbors=100,                               # num extra neighbors to fetch
    max_index_memory_usage="100m",
    current_memory_available="1G",
)

# get the dataloader and optimizer (AdamW with all the correct settings)

train_dl = iter(wrapper.get_dataloader(batch_size=2, shuffle=True))
optim = wrapper.get_optimizer(lr=3e-4, wd=0.01)

# one gradient step

seq, retrieved = map(lambda t: t.to(device), next(train_dl))

# seq       - (2, max_seq_len + 1)           - 1 extra token since split by seq[:, :-1], seq[:, 1:]
# retrieved - (2, max_seq_len // 64, 2, 128) - 128 since chunk + continuation, each 64 tokens

loss = diablo_gpt(seq, retrieved, return_loss=True)
loss.backward()
optim.step()
optim.zero_grad()
print(f"seq {tuple(seq.shape)}, retrieved {tuple(retrieved.shape)}, loss {loss.item():.3f}")

# topk sampling with retrieval at chunk boundaries (an untrained model: expect noise)

sampled = wrapper.generate(filter_thres=0.9, temperature=1.0, max_new_tokens=64)
print(f"sampled from scratch: {tuple(sampled.shape)}")

# or with a prompt; knn retrieval for the initial chunks is taken care of

prompt = seq[:1, :128]  # two chunks of real text
sampled = wrapper.generate(prompt, filter_thres=0.9, temperature=1.0, max_new_tokens=64)
print(f"sampled from a {prompt.shape[1]}-token prompt: {tuple(sampled.shape)}")
