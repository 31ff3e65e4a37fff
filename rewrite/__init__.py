"""dlrm-rewrite: rewrite a trained DLRM's embedding tables, compile, and choose a path.

    model = rewrite.load("model.pt")
    gm, sites = rewrite.capture(model)
    prof = rewrite.profile(model, rewrite.data.open("day_0.npz"))
    rw, report = rewrite.apply(model, [passes.onehot()], profile=prof)
"""

from rewrite import data
from rewrite.batch import Batch
from rewrite.errors import RewriteError, VerificationError
from rewrite.formats import load
from rewrite.formats.native import save
from rewrite.model import ModelSpec, RecModel
from rewrite.pipeline import apply
from rewrite.profiling import AccessProfile, profile
from rewrite.tracing import EmbeddingSite, capture

__version__ = "0.1.0"

__all__ = ["AccessProfile", "Batch", "EmbeddingSite", "ModelSpec", "RecModel", "RewriteError",
           "VerificationError", "apply", "capture", "data", "load", "profile", "save"]
