"""Agentic workload: a trajectory generator shaped like the DualPath paper's Table 2 (``trace``) and
an offline/online replayer against the OpenAI API reporting TTFT, TPOT and JCT (``replay``).
CLI: ``python -m dualpath_engine.workload``.
"""
