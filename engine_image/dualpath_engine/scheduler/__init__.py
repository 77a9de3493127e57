"""The central scheduler (DualPath paper section 6) and its engine-facing pull protocol.

``policy`` and ``batching`` are pure decision functions (also run by the simulator); ``protocol``
holds the HTTP/JSON messages between group leaders and the scheduler; ``records``, ``state`` and
``service`` are the running scheduler; ``metrics`` its Prometheus metrics; ``benchmark`` times the
policy at scale. ``python -m dualpath_engine.scheduler --config F`` starts the process, whose HTTP
app lives in ``dualpath_engine.server``. Nothing here imports torch.
"""
