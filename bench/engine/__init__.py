"""Engine benchmarks on the H200 box and on CPU: calibration of the machine's copy ceilings, the KV-load
microbenchmark (PE-only / DE-only / DualPath / split / unlimited at equal emulated storage-NIC budgets),
layer-wise overlap, and offline/online agentic replay against real engine processes (Basic / DualPath /
Oracle), every figure a ratio measured side by side in one run.

- :mod:`.settings`: the frozen run settings and the ``cpu-quick`` / ``cpu`` / ``gpu`` presets;
- :mod:`.calibration`: host<->device, block-size and GPU-to-GPU copy ceilings (torch);
- :mod:`.kvload`: the KV-load microbenchmark over the engine's NIC token buckets and read queue;
- :mod:`.overlap`: layer-wise overlap efficiency and Full-Block H2D against the ceiling (torch);
- :mod:`.cluster`: scheduler + prefill + decode engine processes on loopback for the replays;
- :mod:`.replay`: offline JCT and online capacity/TPOT/balance over :mod:`.cluster`;
- :mod:`.report`: ratios and the markdown summary.

Entry point: ``python -m bench.engine [--cpu] [--quick] [--only ...] [--out DIR]``
(``bench.engine.__main__``); ``bench/gpu_run.sh`` runs it on the device machine. Results are recorded
in ``docs/benchmarks.md``.
"""
