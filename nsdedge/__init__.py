"""nsdedge: fMRI-to-image reconstruction (decoder -> IP-Adapter-Plus tokens -> SD 1.5) on edge GPUs and CPUs."""

__version__ = "0.1.0"
