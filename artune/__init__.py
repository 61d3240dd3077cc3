"""artune: measure every all-reduce backend on this machine, keep the fastest per size, route to it.

``import artune`` needs neither CUDA, NVSHMEM, Triton nor SGLang; those are imported where used.
"""

from __future__ import annotations

from artune.profile import Choice, Profile, ProfileError, load, save, select

__all__ = ["Choice", "Profile", "ProfileError", "load", "save", "select", "__version__"]

__version__ = "0.1.0"
