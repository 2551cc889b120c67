"""The "Datasets" example of docs/training.md: DIABLOGPTDataset over mock memmaps, one forward/backward.

Runs on CPU with a small model (the seed's config on CUDA with --seed-config). The mock files go
to a temporary folder (or --out).

    python examples/dataset.py
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from diablogpt_pytorch import DIABLOGPT, DIABLOGPTDataset
from diablogpt_pytorch.config import SEED

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default=None, help="folder for the mock memmaps (default: a temp dir)")
parser.add_argument("--seed-config", action="store_true",
                    help="the seed README's full-size model (seq_len 2048; slow without CUDA)")
args = parser.parse_args()

out = Path(args.out or tempfile.mkdtemp(prefix="diablogpt-mock-"))
out.mkdir(parents=True, exist_ok=True)
device = "cuda" if torch.cuda.is_available() else "cpu"

# mock data constants

NUM_CHUNKS = 1000
CHUNK_SIZE = 64
NUM_SEQS = 100
NUM_NEIGHBORS = 2
SEQ_LEN = 2048 if args.seed_config else 256


def save_memmap(path, tensor):
    f = np.memmap(path, dtype=tensor.dtype, mode="w+", shape=tensor.shape)
    f[:] = tensor
    del f


# generate mock chunk data
save_memmap(out / "train.chunks.dat",
            np.int32(np.random.randint(0, 8192, size=(NUM_CHUNKS, CHUNK_SIZE + 1))))

# generate nearest neighbors for each chunk
save_memmap(out / "train.chunks.knn.dat",
            np.int32(np.random.randint(0, 1000, size=(NUM_CHUNKS, NUM_NEIGHBORS))))

# generate seq data
save_memmap(out / "train.seq.dat", np.int32(np.random.randint(0, 128, size=(NUM_SEQS,))))

# instantiate dataset class
# which constructs the sequence and neighbors from memmapped chunk and neighbor information

train_ds = DIABLOGPTDataset(
    num_sequences=NUM_SEQS,
    num_chunks=NUM_CHUNKS,
    num_neighbors=NUM_NEIGHBORS,
    chunk_size=CHUNK_SIZE,
    seq_len=SEQ_LEN,
    chunk_memmap_path=out / "train.chunks.dat",
    chunk_nn_memmap_path=out / "train.chunks.knn.dat",
    seq_memmap_path=out / "train.seq.dat",
)

train_dl = iter(DataLoader(train_ds, batch_size=2))

# one forwards and backwards

if args.seed_config:
    model_config = SEED.model_kwargs()  # the seed README's model
else:
    model_config = dict(max_seq_len=SEQ_LEN, enc_dim=128, enc_depth=2, dec_dim=128, dec_depth=4,
                        dec_cross_attn_layers=(2, 4), heads=4, dim_head=32,
                        dec_attn_dropout=0.25, dec_ff_dropout=0.25)

diablo_gpt = DIABLOGPT(**model_config).to(device)

seq, retrieved = map(lambda t: t.to(device), next(train_dl))

# seq       - (2, SEQ_LEN + 1)              - 1 extra token since split by seq[:, :-1], seq[:, 1:]
# retrieved - (2, SEQ_LEN // 64, 2, 128)    - 128 since chunk + continuation, each 64 tokens

loss = diablo_gpt(seq, retrieved, return_loss=True)
loss.backward()

print(f"seq {tuple(seq.shape)}, retrieved {tuple(retrieved.shape)}, loss {loss.item():.3f}")
print(f"mock memmaps in {out}")
