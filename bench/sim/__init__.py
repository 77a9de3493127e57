"""Discrete-event simulator of a DualPath cluster (up to 144 nodes x 8 GPUs) running the real policy.

``config`` holds the frozen configuration (hardware, cost model, mode), ``workload`` the agentic
turns (Table 2 shape), ``links`` the storage-NIC FIFO servers with byte accounting, ``entities``
the requests, engines, nodes and run result, ``cluster`` the event loop with prefill and decode
engines and the scheduler that calls ``dualpath_engine.scheduler.policy`` and ``batching``;
``rebalance`` runs the operator's weights and ratio planners against the simulated telemetry;
``scenarios`` are the paper's comparisons run side by side. Called by ``python -m bench`` and by
``tests/unit/sim``. No torch, no I/O.
"""
