"""Training qkv's own small models, which ship with the package to show attention at work.

    qkv train recall      # associative recall: a three-layer GPT-2 looks a key up (recall.py)
    qkv train translate   # an encoder-decoder reorders words through cross-attention (translate.py)
    qkv train digits      # a small vision transformer reads 8x8 handwritten digits (digits.py)

All are deterministic for a seed, print a progress bar, resume from their last checkpoint and
write Hugging Face-style folders that `qkv.load` reads (models -> nn -> core; train -> models).
They write only into a new or empty folder, or one marked as their own (`.qkv-train`).
"""

from ._loop import TrainingError, check_folder, interrupted_note

__all__ = ["TrainingError", "check_folder", "interrupted_note"]
