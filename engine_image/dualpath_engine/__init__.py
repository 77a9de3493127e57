"""dualpath_engine: prefill/decode engines, traffic manager and central scheduler for DualPath.

torch is imported only by ``model`` and device transfer backends; everything else is torch-free so
the scheduler, KV index and simulator run without it.
"""

__version__ = "0.1.0"
