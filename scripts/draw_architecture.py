"""Draw RETRO.png: the architecture of diablogpt_pytorch.

    python scripts/draw_architecture.py            # writes ./RETRO.png at the repo root
    python scripts/draw_architecture.py -o out.png

Panels: (1) the retrieval database built from a text folder, (2) the data that feeds the model,
(3) the model: decoder stack with chunked cross-attention (CCA) and the neighbour encoder, and
(4) the CCA alignment: which decoder positions see which chunk's neighbours.

Needs only matplotlib (the `plot` or `test` extra). Drawn with the Agg backend, no display.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

# palette: one colour per part of the library
DB = "#dbe9f6"  # retrieval database
DB_EDGE = "#2f6690"
DATA = "#e3f1de"  # dataset / retriever
DATA_EDGE = "#3a7d44"
DEC = "#fde9d4"  # decoder
DEC_EDGE = "#b3541e"
CCA = "#f9d0c4"  # chunked cross-attention
ENC = "#ece2f4"  # neighbour encoder
ENC_EDGE = "#6a4c93"
ARROW = "#333333"
NOTE = "#555555"


def box(ax, x, y, w, h, title, body="", face="white", edge="black", dashed=False, title_size=10.5):
    """A rounded box with a bold first line and an optional smaller body; (x, y) is lower left."""
    ax.add_patch(
        FancyBboxPatch(
            (x, y), w, h,
            boxstyle="round,pad=0.0,rounding_size=1.2",
            facecolor=face, edgecolor=edge, linewidth=1.4,
            linestyle=(0, (4, 2)) if dashed else "-",
            zorder=2,
        )
    )
    if body:
        ax.text(x + w / 2, y + h - 1.2, title, ha="center", va="top", fontsize=title_size,
                fontweight="bold", zorder=3)
        ax.text(x + w / 2, y + h - 1.2 - 2.6, body, ha="center", va="top", fontsize=8.8,
                color="#222222", linespacing=1.25, zorder=3)
    else:
        ax.text(x + w / 2, y + h / 2, title, ha="center", va="center", fontsize=title_size,
                fontweight="bold", zorder=3)


def panel(ax, x, y, w, h, label, face, edge):
    """A large pale background panel with its label in the top left corner."""
    ax.add_patch(
        FancyBboxPatch(
            (x, y), w, h, boxstyle="round,pad=0.0,rounding_size=2",
            facecolor=face, edgecolor=edge, linewidth=1.0, alpha=0.35, zorder=0,
        )
    )
    ax.text(x + 1.5, y + h - 1.2, label, ha="left", va="top", fontsize=12.5, fontweight="bold",
            color=edge, zorder=1)


def arrow(ax, start, end, label="", color=ARROW, rad=0.0, label_at=0.5, label_offset=(0, 0),
          ha="center", style="-|>", lw=1.5, label_color=None, dashed=False):
    """An arrow from start to end (data coordinates) with an optional label near label_at."""
    ax.add_patch(
        FancyArrowPatch(
            start, end, arrowstyle=style, mutation_scale=14, color=color, linewidth=lw,
            connectionstyle=f"arc3,rad={rad}", shrinkA=0, shrinkB=0, zorder=4,
            linestyle=(0, (4, 2)) if dashed else "-",
        )
    )
    if label:
        lx = start[0] + (end[0] - start[0]) * label_at + label_offset[0]
        ly = start[1] + (end[1] - start[1]) * label_at + label_offset[1]
        ax.text(lx, ly, label, ha=ha, va="center", fontsize=8.6, color=label_color or color,
                zorder=5, bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none",
                                    alpha=0.9))


def polyline_arrow(ax, points, color=ARROW, lw=1.5, dashed=False):
    """An arrow along straight segments through `points`, with the head on the last segment."""
    xs, ys = zip(*points)
    ax.plot(xs[:-1], ys[:-1], color=color, linewidth=lw, zorder=4,
            linestyle=(0, (4, 2)) if dashed else "-", solid_capstyle="butt")
    arrow(ax, points[-2], points[-1], color=color, lw=lw, dashed=dashed)


def draw_database(ax):
    panel(ax, 1, 35, 50, 76, "1  Retrieval database  (retrieval.py, embedder.py)", DB, DB_EDGE)
    x, w, h = 4, 44, 8.6
    steps = [
        (96, "text folder", "glob '**/*.txt', one document per file"),
        (83, "tokenize", "BERT tokenizer = the LM's vocabulary; ids + [SEP] per document,\n"
                         "right-padded to a multiple of C (chunks never cross documents)"),
        (70, "chunks / doc_ids / seqs memmaps",
         "chunks int32 (num_chunks, C+1)   doc_ids int32 (num_chunks,)\n"
         "seqs int32 (num_seqs,): first chunk of each packed sequence"),
        (57, "frozen BERT embedder",
         "all-MiniLM-L6-v2 (offline default), mean-pooled;\n"
         "one chunk formatting at index time and at query time"),
    ]
    for y, title, body in steps:
        box(ax, x, y, w, h, title, body, face="white", edge=DB_EDGE)
    for (y0, *_), (y1, *_) in zip(steps, steps[1:]):
        arrow(ax, (x + w / 2, y0), (x + w / 2, y1 + h), color=DB_EDGE)
    # bottom row: the faiss index and the precomputed neighbours, side by side
    bw, by = 19, 42.5
    box(ax, x, by, bw, h, "faiss index", "autofaiss, under a\nmemory budget", face="white",
        edge=DB_EDGE)
    box(ax, x + w - bw, by, bw, h, "knn memmap", "int32 (num_chunks, K)\nnot own doc; -1 = none",
        face="white", edge=DB_EDGE)
    arrow(ax, (x + bw / 2, 57), (x + bw / 2, by + h), color=DB_EDGE)
    arrow(ax, (x + bw, by + h / 2), (x + w - bw, by + h / 2), color=DB_EDGE)
    ax.text(x + w / 2, by + h / 2 + 1.0, "search", ha="center", va="bottom", fontsize=8.2,
            color=DB_EDGE)
    return {
        "chunks_right": (x + w, 74.3),
        "knn_right": (x + w, by + h / 2),
        "index_bottom": (x + bw / 2, by),
    }


def draw_data(ax, db):
    panel(ax, 54, 35, 40, 76, "2  Data  (data.py, neighbours.py)", DATA, DATA_EDGE)
    x, w = 56.5, 35
    box(ax, x, 85, w, 15, "DIABLOGPTDataset",
        "sequence i = chunks i*n/C ... (i+1)*n/C\n"
        "(documents packed back to back)\n"
        "seq  int64 (b, n+1)\n"
        "retrieved  int64 (b, n/C, K, 2C)",
        face="white", edge=DATA_EDGE)
    box(ax, x, 62, w, 15, "neighbour_tokens",
        "knn ids -> K neighbours of 2C tokens:\n"
        "the neighbour chunk + its continuation\n"
        "(next chunk of the SAME document,\n"
        "else padding)",
        face="white", edge=DATA_EDGE)
    box(ax, x, 38.5, w, 14, "generate()  (generation.py)",
        "when a chunk of C tokens completes:\n"
        "embed it, search the faiss index,\n"
        "its K neighbours feed the next\n"
        "CCA window; cached keys/values",
        face="white", edge=DATA_EDGE)
    # database -> data
    arrow(ax, db["chunks_right"], (x, 92), "chunks, seqs,\ndoc_ids", color=DB_EDGE, label_at=0.45)
    arrow(ax, db["knn_right"], (x, 66), "knn ids", color=DB_EDGE, label_at=0.5)
    polyline_arrow(ax, [db["index_bottom"], (db["index_bottom"][0], 37.3), (x + 4, 37.3),
                        (x + 4, 38.5)], color=DB_EDGE)
    ax.text(36, 37.3, "query / neighbours", ha="center", va="center", fontsize=8.2,
            color=DB_EDGE, bbox=dict(boxstyle="round,pad=0.15", facecolor="white",
                                     edgecolor="none", alpha=0.95), zorder=5)
    arrow(ax, (x + w / 2, 77), (x + w / 2, 85), "retrieved", color=DATA_EDGE, label_at=0.5)
    arrow(ax, (x + w / 2, 62), (x + w / 2, 52.5), "same format", color=DATA_EDGE, label_at=0.5)
    return {"seq_out": (x + w, 95), "retrieved_out": (x + w, 88)}


def draw_model(ax, data):
    panel(ax, 97, 35, 82, 76, "3  Model  DIABLOGPT  (model/)", DEC, DEC_EDGE)

    # ---- decoder column
    dx, dw = 99.5, 34.5
    box(ax, dx, 38, dw, 6.5, "token embedding  (b, n, dec_dim)", face="white", edge=DEC_EDGE,
        title_size=9.5)
    # the repeated decoder layer
    ax.add_patch(FancyBboxPatch((dx, 49), dw, 37, boxstyle="round,pad=0.0,rounding_size=1.5",
                                facecolor="#fff7ef", edgecolor=DEC_EDGE, linewidth=1.6, zorder=1))
    ax.text(dx + dw / 2, 84.6, "decoder layer  x dec_depth", ha="center", va="top",
            fontsize=10.5, fontweight="bold", color=DEC_EDGE, zorder=3)
    ax.text(dx + dw / 2, 81.6, "pre-RMSNorm + residual around each block\n(DeepNet post-norm optional)",
            ha="center", va="top", fontsize=8.2, color=NOTE, zorder=3)
    box(ax, dx + 2, 51, dw - 4, 7.5, "causal self-attention",
        "rotary positions, SDPA", face=DEC, edge=DEC_EDGE, title_size=9.5)
    box(ax, dx + 2, 61, dw - 4, 9.5, "chunked cross-attention (CCA)",
        "only at layers in dec_cross_attn_layers\n(default 1, 3, 6, 9); K, V = neighbours",
        face=CCA, edge=DEC_EDGE, dashed=True, title_size=9.5)
    box(ax, dx + 2, 73, dw - 4, 4.8, "feed-forward", face=DEC, edge=DEC_EDGE, title_size=9.5)
    arrow(ax, (dx + dw / 2, 44.5), (dx + dw / 2, 51), color=DEC_EDGE)
    arrow(ax, (dx + dw / 2, 58.5), (dx + dw / 2, 61), color=DEC_EDGE)
    arrow(ax, (dx + dw / 2, 70.5), (dx + dw / 2, 73), color=DEC_EDGE)
    box(ax, dx, 90, dw, 7.5, "final RMSNorm -> output head",
        "logits (b, n, num_tokens)", face="white", edge=DEC_EDGE, title_size=9.5)
    arrow(ax, (dx + dw / 2, 86), (dx + dw / 2, 90), color=DEC_EDGE)
    box(ax, dx, 100.5, dw, 6.5, "loss: cross-entropy vs seq[:, 1:]",
        "labels equal to pad_id are ignored", face="white", edge=DEC_EDGE, title_size=9.2)
    arrow(ax, (dx + dw / 2, 97.5), (dx + dw / 2, 100.5), color=DEC_EDGE)

    # ---- encoder column
    ex, ew = 143.5, 33.5
    box(ax, ex, 38, ew, 6.5, "neighbour embedding  (enc_dim)", face="white", edge=ENC_EDGE,
        title_size=9.5)
    ax.add_patch(FancyBboxPatch((ex, 49), ew, 37, boxstyle="round,pad=0.0,rounding_size=1.5",
                                facecolor="#f7f2fb", edgecolor=ENC_EDGE, linewidth=1.6, zorder=1))
    ax.text(ex + ew / 2, 84.6, "neighbour encoder  x enc_depth", ha="center", va="top",
            fontsize=10.5, fontweight="bold", color=ENC_EDGE, zorder=3)
    ax.text(ex + ew / 2, 81.6, "run once, at the FIRST CCA layer\n(paper Algorithm 1)",
            ha="center", va="top", fontsize=8.2, color=NOTE, zorder=3)
    box(ax, ex + 2, 51, ew - 4, 7.5, "bidirectional self-attention",
        "over each neighbour's 2C tokens, rotary", face=ENC, edge=ENC_EDGE, title_size=9.5)
    box(ax, ex + 2, 61, ew - 4, 9.5, "cross-attention",
        "to the decoder hidden states of the\nretrieving chunk u (enc_cross_attn_layers)", face=ENC, edge=ENC_EDGE,
        title_size=9.5)
    box(ax, ex + 2, 73, ew - 4, 4.8, "feed-forward", face=ENC, edge=ENC_EDGE, title_size=9.5)
    arrow(ax, (ex + ew / 2, 44.5), (ex + ew / 2, 51), color=ENC_EDGE)
    arrow(ax, (ex + ew / 2, 58.5), (ex + ew / 2, 61), color=ENC_EDGE)
    arrow(ax, (ex + ew / 2, 70.5), (ex + ew / 2, 73), color=ENC_EDGE)
    box(ax, ex, 90, ew, 10, "encoded neighbours",
        "(b, n/C, K, 2C, enc_dim)\nprojected to keys/values\nof every CCA layer", face="white",
        edge=ENC_EDGE, title_size=9.5)
    arrow(ax, (ex + ew / 2, 86), (ex + ew / 2, 90), color=ENC_EDGE)

    # decoder hidden states -> encoder cross-attention (at the first CCA layer)
    arrow(ax, (dx + dw - 2, 63.5), (ex + 2, 63.5), color=ENC_EDGE)
    ax.text((dx + dw + ex) / 2, 62.6, "hidden\nstates\nof chunk u", ha="center", va="top",
            fontsize=7.8, color=ENC_EDGE, zorder=5, linespacing=1.1)
    # encoded neighbours -> keys/values of every CCA layer
    kv_x = (dx + dw + ex) / 2
    polyline_arrow(ax, [(ex, 95), (kv_x, 95), (kv_x, 67.5), (dx + dw - 2, 67.5)],
                   color=ENC_EDGE)
    ax.text(kv_x, 78, "K, V", ha="center", va="center", fontsize=8.2, color=ENC_EDGE,
            fontweight="bold", bbox=dict(boxstyle="round,pad=0.15", facecolor="white",
                                         edgecolor="none", alpha=0.95), zorder=5)

    # data -> model inputs: seq along the top, retrieved to the encoder
    polyline_arrow(ax, [data["seq_out"], (95.5, 95), (95.5, 41.2), (dx, 41.2)], color=DATA_EDGE)
    ax.text(95.9, 74, "seq[:, :-1]", rotation=90, ha="left", va="center", fontsize=8.6,
            color=DATA_EDGE, bbox=dict(boxstyle="round,pad=0.15", facecolor="white",
                                       edgecolor="none", alpha=0.9), zorder=5)
    polyline_arrow(ax, [data["retrieved_out"], (93.2, 88), (93.2, 36.2), (ex + ew / 2, 36.2),
                        (ex + ew / 2, 38)], color=DATA_EDGE)
    ax.text(120, 36.2, "retrieved (b, n/C, K, 2C)", ha="center", va="center", fontsize=8.6,
            color=DATA_EDGE, bbox=dict(boxstyle="round,pad=0.15", facecolor="white",
                                       edgecolor="none", alpha=0.95), zorder=5)


def draw_cca_alignment(ax):
    panel(ax, 1, 1, 178, 31, "4  Chunked cross-attention alignment  (C = 4, K = 2 shown)",
          "#f4f4f4", "#444444")
    size, gap, chunk_gap = 3.0, 0.9, 1.4
    C, n_chunks = 4, 3
    x0, y_seq = 10, 12.5
    colours = ["#9ecae1", "#fdae6b", "#a1d99b"]

    def tok_x(pos):
        return x0 + pos * (size + gap) + (pos // C) * chunk_gap

    for pos in range(n_chunks * C):
        ax.add_patch(Rectangle((tok_x(pos), y_seq), size, size, facecolor=colours[pos // C],
                               edgecolor="#333", linewidth=0.8, zorder=3))
        ax.text(tok_x(pos) + size / 2, y_seq + size / 2, str(pos), ha="center", va="center",
                fontsize=7.5, zorder=4)
    for u in range(n_chunks):
        left, right = tok_x(u * C), tok_x(u * C + C - 1) + size
        ax.text((left + right) / 2, y_seq + size + 0.6, f"chunk {u}", ha="center", va="bottom",
                fontsize=8.5)
    ax.text(x0 - 1.2, y_seq + size / 2, "decoder\nsequence", ha="right", va="center",
            fontsize=8.5)

    # windows: the last token of chunk u + the first C-1 tokens of chunk u+1
    for u, style in ((0, "-"), (1, (0, (3, 1.5)))):
        start, end = (u + 1) * C - 1, (u + 2) * C - 2
        wx0, wx1 = tok_x(start) - 0.2, tok_x(end) + size + 0.2
        ax.add_patch(Rectangle((wx0, y_seq - 0.5), wx1 - wx0, size + 1.0, fill=False,
                               edgecolor=DEC_EDGE, linewidth=2.0, linestyle=style, zorder=5))
        ax.text((wx0 + wx1) / 2, y_seq - 1.3, f"window {u}\n(positions {start}-{end})",
                ha="center", va="top", fontsize=8, color=DEC_EDGE, linespacing=1.15)
    left, right = tok_x(0), tok_x(C - 2) + size
    ax.plot([left, left, right, right], [y_seq - 1.0, y_seq - 1.6, y_seq - 1.6, y_seq - 1.0],
            color=NOTE, linewidth=1.0)
    ax.text((left + right) / 2, y_seq - 2.2, "no retrieval", ha="center", va="top", fontsize=8,
            color=NOTE)

    # neighbours of chunk 0: K rows of chunk + continuation
    nx0, ny = 68, 14.5
    for k in range(2):
        y = ny + (1 - k) * (size + 0.8)
        for t in range(2 * C):
            x = nx0 + t * (size + gap) + (chunk_gap if t >= C else 0)
            ax.add_patch(Rectangle((x, y), size, size,
                                   facecolor="#c6dbef" if t < C else "#e5eef7",
                                   edgecolor=DB_EDGE, linewidth=0.8, zorder=3,
                                   hatch="" if t < C else "//"))
        ax.text(nx0 - 1, y + size / 2, f"k={k}", ha="right", va="center", fontsize=8)
    n_right = nx0 + 8 * (size + gap) + chunk_gap
    ax.text((nx0 + n_right) / 2, ny + 2 * (size + 0.8) + 0.4,
            "neighbours of chunk 0  (K x 2C tokens)", ha="center", va="bottom", fontsize=8.5,
            color=DB_EDGE)
    ax.text(nx0 + 2 * (size + gap), ny - 0.6, "neighbour chunk", ha="center", va="top",
            fontsize=7.8, color=DB_EDGE)
    ax.text(nx0 + 6 * (size + gap) + chunk_gap, ny - 0.6, "continuation", ha="center",
            va="top", fontsize=7.8, color=DB_EDGE)
    # neighbours of chunk 0 -> window 0 (its keys/values)
    target = (tok_x(C - 1) + size + gap / 2, y_seq + size + 0.5)
    arrow(ax, (nx0 - 5, ny + size + 0.4), target, color=DB_EDGE, rad=0.35, lw=1.5)
    ax.text(47, 26.2, "keys / values of window 0", ha="center", va="bottom", fontsize=8,
            color=DB_EDGE)

    notes = (
        "- Window u = the last token of chunk u + the first C-1 tokens of chunk u+1;\n"
        "  it attends to all K x 2C neighbour tokens of chunk u in ONE softmax,\n"
        "  plus a learned null key/value (all-padding neighbours stay finite).\n"
        "- So chunk u's neighbours influence only positions >= (u+1)C - 1, and\n"
        "  positions 0..C-2 never see retrieval: training stays causal.\n"
        "- Relative (rotary) positions inside a window are computed once.\n"
        "- Neighbours never come from the querying chunk's own document."
    )
    ax.text(112, 27, notes, ha="left", va="top", fontsize=9, linespacing=1.45, color="#222")


def draw(out_path: Path) -> None:
    fig = plt.figure(figsize=(18, 12), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 180)
    ax.set_ylim(0, 120)
    ax.axis("off")

    ax.text(90, 118.2, "diablogpt_pytorch: RETRO, a decoder with chunked cross-attention over "
            "retrieved neighbours", ha="center", va="top", fontsize=16, fontweight="bold")
    ax.text(90, 114.6, "Borgeaud et al. 2022, arXiv:2112.04426.   C = chunk_size (64),  "
            "K = neighbours per chunk,  n = sequence length,  b = batch",
            ha="center", va="top", fontsize=10.5, color=NOTE)

    db = draw_database(ax)
    data = draw_data(ax, db)
    draw_model(ax, data)
    draw_cca_alignment(ax)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=100, facecolor="white")
        os.replace(tmp, out_path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=REPO_ROOT / "RETRO.png",
                        help="where to write the PNG (default: RETRO.png at the repo root)")
    args = parser.parse_args(argv)
    draw(args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
