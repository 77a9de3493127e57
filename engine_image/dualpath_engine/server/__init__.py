"""HTTP front of the scheduler process: the aiohttp app (``app``) and the OpenAI-compatible API
shapes (``openai_api``). Started by ``python -m dualpath_engine.scheduler``; never imports torch.
"""
