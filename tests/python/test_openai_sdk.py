"""The official OpenAI Python SDK, unchanged, against sluice over HTTPS."""

import json
import ssl
import threading

import httpx
import openai
import pytest

from conftest import KEY, LIMITED_KEY, POLICY_KEY

MODEL = "deepseek-v4-flash"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}


def client(sluice, key=KEY, http2=False):
    base_url, ca = sluice
    return openai.OpenAI(
        base_url=base_url,
        api_key=key,
        max_retries=0,
        http_client=httpx.Client(verify=ssl.create_default_context(cafile=ca), http2=http2, timeout=30, trust_env=False),
    )


def test_chat_non_stream(sluice):
    r = client(sluice).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello"}], max_tokens=8
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.content
    assert r.usage.completion_tokens == 8
    assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("http2", [False, True])
def test_chat_stream_with_usage(sluice, http2):
    stream = client(sluice, http2=http2).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a story"}],
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert text.strip()
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 20


def test_stream_tool_call_fragments_assemble(sluice):
    stream = client(sluice).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER_TOOL],
        stream=True,
    )
    name, args, finish, fragments = None, "", None, 0
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            if tc.function.name:
                name = tc.function.name
            if tc.function.arguments:
                args += tc.function.arguments
                fragments += 1
        finish = chunk.choices[0].finish_reason or finish
    assert name == "get_weather"
    assert fragments > 1, "arguments arrive in several fragments"
    parsed = json.loads(args)
    assert set(parsed) == {"city", "unit"}
    assert parsed["unit"] in ("celsius", "fahrenheit")
    assert finish == "tool_calls"


def test_thinking_returns_reasoning_content(sluice):
    r = client(sluice).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Think first"}],
        extra_body={"chat_template_kwargs": {"thinking": True}},
    )
    msg = r.choices[0].message
    assert msg.model_extra.get("reasoning_content")
    assert msg.content


def test_models_list(sluice):
    ids = [m.id for m in client(sluice).models.list()]
    assert ids == [MODEL]


def test_bad_key_is_authentication_error(sluice):
    with pytest.raises(openai.AuthenticationError) as e:
        client(sluice, key="sk-wrong").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
    assert e.value.status_code == 401
    assert e.value.body["layer"] == "customer"
    assert len(e.value.body["trace_id"]) == 32


def test_unknown_model_is_not_found_error(sluice):
    with pytest.raises(openai.NotFoundError) as e:
        client(sluice).chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    assert e.value.body["param"] == "model"


def test_concurrency_cap_is_rate_limit_error(sluice):
    holder = client(sluice, key=LIMITED_KEY)
    stream = holder.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "long"}],
        stream=True,
        extra_body={"sim": {"output_tokens": 400, "tpot_ms": 20}},
    )
    first = next(iter(stream))  # the slot is taken while this stream runs
    assert first.id
    try:
        with pytest.raises(openai.RateLimitError) as e:
            client(sluice, key=LIMITED_KEY).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}]
            )
        assert e.value.response.headers["retry-after"] == "1"
        assert e.value.body["layer"] == "customer"
    finally:
        stream.close()


def test_engine_failure_is_internal_server_error_with_provider_layer(sluice):
    with pytest.raises(openai.InternalServerError) as e:
        client(sluice).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], extra_body={"sim": {"fault": "error"}}
        )
    assert e.value.status_code == 502
    assert e.value.body["layer"] == "provider"


def test_broken_stream_raises_api_error(sluice):
    stream = client(sluice).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_body={"sim": {"fault": "drop", "output_tokens": 50}},
    )
    with pytest.raises(openai.APIError) as e:
        for _ in stream:
            pass
    assert "broke the stream" in str(e.value)


def test_concurrent_streams(sluice):
    errors = []

    def one():
        try:
            s = client(sluice).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=10, stream=True
            )
            n = sum(1 for c in s if c.choices and c.choices[0].delta.content)
            assert n == 10, n
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# --- the tenant's WebAssembly policy plugins, seen through the SDK ----------
# One test walks the whole policy tenant, in order, because its rate-limit
# bucket (burst 6) is shared by every request it makes.


def test_policy_plugins_through_the_sdk(sluice):
    c = client(sluice, key=POLICY_KEY)

    # 1. thinking-policy: the "agent" task forces thinking on; the stream
    #    carries reasoning_content deltas.
    stream = c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Plan a trip"}],
        max_tokens=30,
        stream=True,
        extra_headers={"x-sluice-task": "agent"},
    )
    reasoning = "".join((ch.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for ch in stream if ch.choices)
    assert reasoning.strip()

    # 2. context-cap: a prompt over 1000 tokens is a BadRequestError.
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 3000}])
    assert e.value.body["code"] == "context_length_exceeded"
    assert e.value.body["layer"] == "customer"

    # 3. output-validator: invalid JSON output, retried once, then a 422.
    with pytest.raises(openai.UnprocessableEntityError) as e:
        c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "JSON please"}],
            response_format={"type": "json_object"},
            extra_body={"sim": {"fault": "invalid_json"}},
        )
    assert e.value.body["code"] == "output_validation_failed"

    # 4. rate-limit: the burst of 6 is spent; the next one is a RateLimitError.
    limited = None
    for _ in range(10):
        try:
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        except openai.RateLimitError as err:
            limited = err
            break
    assert limited is not None, "the burst never ran out"
    assert limited.body["code"] == "rate_limit_exceeded"
    assert int(limited.response.headers["retry-after"]) >= 1
