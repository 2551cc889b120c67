"""diablogpt_pytorch: RETRO, the retrieval-enhanced transformer (Borgeaud et al. 2022), in PyTorch.

Only re-exports. Importing the package does not import faiss, autofaiss or transformers:
the stage modules of ``diablogpt_pytorch.database`` import them when used.
"""

from diablogpt_pytorch.model import DIABLOGPT
from diablogpt_pytorch.data import DIABLOGPTDataset
from diablogpt_pytorch.training import TrainingWrapper
from diablogpt_pytorch.retrofit import RetroFitted
from diablogpt_pytorch.database.update import add_documents, remove_documents

__all__ = ["DIABLOGPT", "DIABLOGPTDataset", "TrainingWrapper", "RetroFitted", "add_documents",
           "remove_documents"]
__version__ = "0.1.0"
