"""The real ``openai`` Python client works against the scheduler on 127.0.0.1."""

from __future__ import annotations

import openai
import pytest

from dualpath_engine import tokenizer
from tests.unit.server import fakes
from tests.unit.server.conftest import Factory

pytestmark = pytest.mark.timeout(30)


async def test_openai_client_completion_chat_and_streaming(scheduler_factory: Factory) -> None:
    _, _, base = await scheduler_factory()
    pe = fakes.FakeLeader(base, "pe-0", "prefill", "node-p")
    de = fakes.FakeLeader(base, "de-0", "decode", "node-d")
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=10)
    async with fakes.running(pe, de):
        models = await client.models.list()
        assert [m.id for m in models.data] == ["tiny"]

        completion = await client.completions.create(
            model="tiny", prompt="def f():", max_tokens=6, temperature=0
        )
        expected = fakes.expected_output(tokenizer.encode("def f():"), 6)
        assert completion.choices[0].text == tokenizer.decode(expected)
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage is not None and completion.usage.completion_tokens == 6

        chat = await client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=4,
            temperature=0,
            user="s-1",
        )
        chat_expected = fakes.expected_output(tokenizer.encode_chat([("user", "hello")]), 4)
        assert chat.choices[0].message.content == tokenizer.decode(chat_expected)
        assert chat.choices[0].message.role == "assistant"

        stream = await client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=4,
            temperature=0,
            stream=True,
        )
        pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
        assert "".join(pieces) == tokenizer.decode(chat_expected)

        text_stream = await client.completions.create(
            model="tiny", prompt="def f():", max_tokens=6, stream=True
        )
        text = "".join([chunk.choices[0].text async for chunk in text_stream])
        assert text == tokenizer.decode(expected)

        with pytest.raises(openai.BadRequestError) as bad:
            await client.completions.create(model="tiny", prompt="x", max_tokens=-1)
        assert "max_tokens" in str(bad.value)
    await client.close()
