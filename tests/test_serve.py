"""`uptrain serve` as users run it: the real server in a subprocess on 127.0.0.1 and an ephemeral port, a tiny
converted model (and a plain source as the baseline), driven by the official `openai` client, raw HTTP and
lm-evaluation-harness's OpenAI-compatible client. Every greedy completion is checked against `generate()` on
its prompt alone, whatever ran beside it (contract 7)."""

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from conftest import load_block_model
from tokenizers import decoders
from transformers import AutoTokenizer

pytestmark = pytest.mark.slow

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
TEXTS = ["a", "The", "cat sat", "Hello, world", "0123456789", "What is a block?", "xy", "one two three four"]
KEY = "test-key-123"


class Server:
    """`uptrain serve FOLDER --port 0 ARGS...` in a subprocess; `url` once it says where it listens."""

    def __init__(self, folder, *args, env=None):
        self.name = str(folder)
        self.log = open(os.path.join(os.path.dirname(folder), f"serve-{os.getpid()}-{id(self)}.log"), "w+")
        command = [sys.executable, "-m", "uptrain", "serve", str(folder), "--port", "0", "--dtype", "float32"]
        self.process = subprocess.Popen(
            [*command, *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},  # tiny models: threads only wait
        )
        line = self.process.stdout.readline()  # the server prints one line once it listens
        if "http://" not in line:
            self.process.kill()
            self.log.seek(0)
            raise RuntimeError(f"the server did not start: {line}{self.log.read()[-3000:]}")
        self.url = line.split("http://")[1].split()[0]
        self.host, self.port = self.url.rsplit(":", 1)

    def client(self, key="none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, int(self.port), timeout=120)

    def post(self, path, body, headers=None) -> tuple[int, dict]:
        """(status, JSON body) of a POST whose body is given as it goes on the wire (bytes) or as JSON."""
        connection = self.connection()
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        connection.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        status, payload = response.status, json.loads(response.read() or b"{}")
        connection.close()
        return status, payload

    def get(self, path, headers=None) -> tuple[int, dict]:
        connection = self.connection()
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        status, payload = response.status, json.loads(response.read())
        connection.close()
        return status, payload

    def load(self) -> dict:
        return self.get("/health")[1]

    def wait_for(self, condition, seconds=30.0):
        deadline = time.monotonic() + seconds
        while not condition(self.load()):
            assert time.monotonic() < deadline, f"server load stayed {self.load()}"
            time.sleep(0.02)

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


def open_stream(server, body, headers=None) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    connection = server.connection()
    connection.request("POST", "/v1/completions", json.dumps({**body, "stream": True}), headers or {})
    response = connection.getresponse()
    assert response.status == 200
    return connection, response


def next_event(response) -> dict | str:
    """The next server-sent event's data: a dict, or "[DONE]"."""
    while True:
        line = response.readline()
        assert line, "the stream ended without [DONE]"
        if line.startswith(b"data: "):
            data = line[6:].strip().decode()
            return data if data == "[DONE]" else json.loads(data)


def served_copy(folder, target):
    """A copy of a model folder whose tokenizer decodes to the characters it was given (the test tokenizer has
    one character a token) and has a chat template."""
    shutil.copytree(folder, target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    tokenizer.backend_tokenizer.decoder = decoders.Fuse()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def block_folder(converted, tmp_path_factory):
    return served_copy(converted("llama"), tmp_path_factory.mktemp("serve") / "block")


@pytest.fixture(scope="module")
def block_model(block_folder):
    return load_block_model(block_folder)


@pytest.fixture(scope="module")
def tokenizer(block_folder):
    return AutoTokenizer.from_pretrained(block_folder)


@pytest.fixture(scope="module")
def block_server(block_folder):
    server = Server(block_folder, "--max-batch", 3, "--max-queue", 16)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def small_server(block_folder):
    """One row, one waiting place, an API key (from the environment)."""
    server = Server(block_folder, "--max-batch", 1, "--max-queue", 1, env={"UPTRAIN_API_KEY": KEY})
    yield server
    server.stop()


def alone(model, prompt_ids, max_new, **settings) -> list[int]:
    """What generate() gives for this prompt alone, cut after EOS as a server ends a completion."""
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new, do_sample=False, **settings)
    tokens = output[0, len(prompt_ids) :].tolist()
    eos = model.generation_config.eos_token_id
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def completion(client, name, prompt, max_tokens, **settings):
    response = client.completions.create(
        model=name, prompt=prompt, max_tokens=max_tokens, extra_body={"return_token_ids": True}, **settings
    )
    return response.choices[0], response.usage


def test_greedy_requests_joining_at_different_times_get_their_tokens_alone(block_server, block_model, tokenizer):
    """Eight prompts of 1 to 18 tokens, 7 to 40 new tokens each, sent at staggered times to a batch of three
    rows (so that requests join a running batch and wait for rows), with bad requests among them."""
    client = block_server.client()
    lengths = (7, 20, 33, 12, 25, 9, 40, 16)

    def good(i):
        time.sleep(0.03 * i)
        return completion(client, block_server.name, TEXTS[i], lengths[i], temperature=0)

    def bad(i):
        time.sleep(0.03 * i)
        with pytest.raises(openai.BadRequestError) as error:
            client.completions.create(model=block_server.name, prompt=TEXTS[i], max_tokens=3000)
        return error.value

    with ThreadPoolExecutor(12) as pool:
        goods = [pool.submit(good, i) for i in range(len(TEXTS))]
        bads = [pool.submit(bad, i) for i in (1, 4, 6)]
        results = [future.result() for future in goods]
        errors = [future.result() for future in bads]
    for i, (choice, usage) in enumerate(results):
        prompt_ids = choice.model_extra["prompt_token_ids"]
        expected = alone(block_model, prompt_ids, lengths[i])
        assert choice.model_extra["token_ids"] == expected, TEXTS[i]
        assert choice.finish_reason == ("length" if len(expected) == lengths[i] else "stop")
        assert usage.prompt_tokens == len(prompt_ids) and usage.completion_tokens == len(expected)
        assert prompt_ids == tokenizer(TEXTS[i]).input_ids
        assert choice.text == tokenizer.decode(expected, skip_special_tokens=True)
    for error in errors:
        assert error.status_code == 400 and error.body["param"] == "max_tokens"
        assert error.body["code"] == "context_length_exceeded" and "2048" in error.body["message"]


def test_streaming_chat_and_stop_strings(block_server, block_model, tokenizer):
    client, name = block_server.client(), block_server.name
    whole, usage = completion(client, name, "Hello, world", 24, temperature=0)
    chunks = list(
        client.completions.create(
            model=name,
            prompt="Hello, world",
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason
    assert chunks[-1].usage.completion_tokens == usage.completion_tokens and not chunks[-1].choices
    assert len(chunks) > 3  # text arrives block by block

    stop = whole.text[5:7]
    cut, _ = completion(client, name, "Hello, world", 24, temperature=0, stop=["zzz", stop])
    assert cut.text == whole.text[: whole.text.index(stop)] and cut.finish_reason == "stop"

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = alone(block_model, tokenizer(templated, add_special_tokens=False).input_ids, 20)
    chat = client.chat.completions.create(model=name, messages=messages, max_tokens=20, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert chat.usage.completion_tokens == len(expected) and chat.object == "chat.completion"
    streamed = list(
        client.chat.completions.create(model=name, messages=messages, max_tokens=20, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content
    assert streamed[0].choices[0].delta.role == "assistant" and streamed[-1].choices[0].finish_reason
    assert {c.object for c in streamed} == {"chat.completion.chunk"}


def test_seeded_sampling_is_reproducible_whatever_runs_beside_it(block_server, block_model, tokenizer):
    client, name = block_server.client(), block_server.name
    settings = {"temperature": 0.9, "top_p": 0.95, "seed": 1234, "extra_body": {"top_k": 40, "return_token_ids": True}}

    def sampled(prompt, **changes):
        response = client.completions.create(model=name, prompt=prompt, max_tokens=30, **{**settings, **changes})
        return response.choices[0].model_extra["token_ids"]

    first = sampled("The")
    with ThreadPoolExecutor(4) as pool:  # the same request beside other sampled and greedy ones
        others = [pool.submit(sampled, text, seed=i) for i, text in enumerate(TEXTS[3:6])]
        again = pool.submit(sampled, "The")
        greedy = pool.submit(completion, client, name, "cat sat", 12, temperature=0)
        assert again.result() == first
        assert len({tuple(other.result()) for other in others} | {tuple(first)}) == 4
        assert greedy.result()[0].model_extra["token_ids"] == alone(block_model, tokenizer("cat sat").input_ids, 12)
    assert sampled("The", seed=99) != first
    top1 = sampled("The", extra_body={"top_k": 1, "return_token_ids": True})
    assert top1 == alone(block_model, tokenizer("The").input_ids, 30)


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b'{"model": "M", "prompt": "hi"', 400, None),  # malformed JSON
        (b"[1, 2]", 400, None),  # not an object
        ({"prompt": "hi"}, 400, "model"),
        ({"model": "M"}, 400, "prompt"),
        ({"model": "other", "prompt": "hi"}, 404, "model"),
        ({"model": "M", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "M", "prompt": "hi", "max_tokens": "five"}, 400, "max_tokens"),
        ({"model": "M", "prompt": "hi", "max_tokens": 2047}, 400, "max_tokens"),  # past the context
        ({"model": "M", "prompt": "x" * 2048, "max_tokens": 1}, 400, "prompt"),  # the prompt alone fills it
        ({"model": "M", "prompt": "", "max_tokens": 1}, 400, "prompt"),
        ({"model": "M", "prompt": 5}, 400, "prompt"),
        ({"model": "M", "prompt": [5, 999]}, 400, "prompt"),  # a token id past the vocabulary
        ({"model": "M", "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
        ({"model": "M", "prompt": "hi", "top_p": 0}, 400, "top_p"),
        ({"model": "M", "prompt": "hi", "stop": [3]}, 400, "stop"),
        ({"model": "M", "prompt": "hi", "stream": "yes"}, 400, "stream"),
        ({"model": "M", "prompt": "hi", "n": 2}, 400, "n"),
        ({"model": "M", "messages": "hi"}, 400, "messages"),
    ],
)
def test_bad_requests_get_openai_errors(block_server, body, status, param):
    if isinstance(body, dict):
        body = {key: block_server.name if value == "M" else value for key, value in body.items()}
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    got, payload = block_server.post(path, body)
    assert got == status, payload
    assert set(payload["error"]) == {"message", "type", "param", "code"} and payload["error"]["message"]
    assert payload["error"]["param"] == param
    assert block_server.load() == {"status": "ok", "running": 0, "waiting": 0}


def test_models_health_and_unknown_routes(block_server, block_model):
    status, models = block_server.get("/v1/models")
    assert status == 200 and [entry["id"] for entry in models["data"]] == [block_server.name]
    assert models["data"][0]["max_model_len"] == block_model.config.block_decoder.max_position_embeddings
    assert [m.id for m in block_server.client().models.list()] == [block_server.name]
    status, payload = block_server.get("/v1/nothing")
    assert status == 404 and payload["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        block_server.client().completions.create(model="gpt-4", prompt="hi", max_tokens=2)


def test_the_plain_source_is_served_like_transformers_generate(tiny_source, tmp_path):
    folder, model = tiny_source("qwen2")
    server = Server(served_copy(folder, tmp_path / "source"), "--max-batch", 2, "--max-context", 256)
    try:
        client = server.client()
        lengths = (9, 30, 4, 17, 22)

        def good(i):
            time.sleep(0.02 * i)
            return completion(client, server.name, TEXTS[i], lengths[i], temperature=0)

        with ThreadPoolExecutor(5) as pool:
            results = list(pool.map(good, range(5)))
        for i, (choice, _) in enumerate(results):
            prompt_ids = choice.model_extra["prompt_token_ids"]
            assert choice.model_extra["token_ids"] == alone(model, prompt_ids, lengths[i], pad_token_id=3)
        settings = {"temperature": 1.0, "seed": 5, "extra_body": {"return_token_ids": True}}
        runs = [client.completions.create(model=server.name, prompt="abc", max_tokens=20, **settings) for _ in "12"]
        assert runs[0].choices[0].model_extra["token_ids"] == runs[1].choices[0].model_extra["token_ids"]
        status, payload = server.post("/v1/completions", {"model": server.name, "prompt": "hi", "max_tokens": 300})
        assert status == 400 and "256" in payload["error"]["message"]
    finally:
        server.stop()
    assert server.process.returncode == 0


def test_api_key(small_server):
    name = small_server.name
    body = {"model": name, "prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        status, payload = small_server.post("/v1/completions", body, headers)
        assert status == 401 and payload["error"]["code"] == "invalid_api_key", headers
    with pytest.raises(openai.AuthenticationError):
        small_server.client("wrong").models.list()
    assert small_server.client(KEY).completions.create(model=name, prompt="hi", max_tokens=2).choices[0].text
    assert small_server.get("/health")[0] == 200  # no key needed


def test_a_full_queue_answers_429_and_clients_that_leave_free_their_places(small_server):
    auth = {"Authorization": f"Bearer {KEY}"}
    long = {"model": small_server.name, "prompt": "hi", "max_tokens": 2000, "temperature": 0, "ignore_eos": True}
    running = open_stream(small_server, long, auth)
    next_event(running[1])
    waiting = open_stream(small_server, long, auth)
    small_server.wait_for(lambda load: load["running"] == 1 and load["waiting"] == 1)
    with pytest.raises(openai.RateLimitError) as error:
        small_server.client(KEY).completions.create(model=small_server.name, prompt="hi", max_tokens=2)
    assert error.value.status_code == 429 and "capacity" in error.value.body["message"]
    waiting[0].close()  # a waiting client leaves: its place is freed
    small_server.wait_for(lambda load: load["waiting"] == 0)
    assert small_server.load()["running"] == 1

    # A streaming client that disconnects frees its row at once, long before its 2,000 tokens would end.
    started = time.monotonic()
    running[0].close()
    small_server.wait_for(lambda load: load["running"] == 0)
    freed = time.monotonic() - started
    started = time.monotonic()
    short = small_server.client(KEY).completions.create(
        model=small_server.name, prompt="hi", max_tokens=200, extra_body={"ignore_eos": True}
    )
    per_200 = time.monotonic() - started
    assert short.usage.completion_tokens == 200
    assert freed < 5 * per_200, (freed, per_200)  # the 2,000 tokens would take about 10 x per_200


def test_sigterm_stops_accepting_and_finishes_the_requests_in_flight(block_folder):
    server = Server(block_folder, "--max-batch", 1, "--max-queue", 2)
    long = {"model": server.name, "prompt": "abc", "max_tokens": 1500, "temperature": 0, "return_token_ids": True}
    long["ignore_eos"] = True
    connection, response = open_stream(server, long)
    tokens = next_event(response)["choices"][0]["token_ids"]
    queued = {}
    thread = threading.Thread(
        target=lambda: queued.update(
            result=server.post("/v1/completions", {"model": server.name, "prompt": "xyz", "max_tokens": 40})
        )
    )
    thread.start()
    server.wait_for(lambda load: load["waiting"] == 1)
    server.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while True:  # new connections are refused soon
        try:
            server.get("/health")
        except ConnectionRefusedError:
            break
        assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
        time.sleep(0.05)
    events = []
    while (event := next_event(response)) != "[DONE]":
        events.append(event)
        tokens += event["choices"][0].get("token_ids", [])
    connection.close()
    assert len(events) > 2  # SIGTERM came mid-stream
    assert events[-1]["choices"][0]["finish_reason"] == "length" and len(tokens) == 1500
    thread.join(60)
    status, payload = queued["result"]
    assert status == 200 and payload["usage"]["completion_tokens"] <= 40
    assert server.process.wait(60) == 0
    server.stop()


def test_lm_eval_local_completions_runs_a_generation_task(block_server, block_model, tokenizer, tmp_path):
    """lm-evaluation-harness's OpenAI-compatible client on a local generate_until task whose targets are the
    model's own greedy continuations (cut at a newline): exact match 1."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    items = []
    for text in TEXTS[:4]:
        ids = tokenizer(text).input_ids
        target = tokenizer.decode(alone(block_model, ids, 8), skip_special_tokens=True).split("\n")[0]
        items.append({"prompt": text, "target": target})
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    (tmp_path / "serve_items.yaml").write_text(
        "task: serve_items\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_target: "{{target}}"\n'
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 8\n  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "model": block_server.name,
            "base_url": f"http://{block_server.url}/v1/completions",
            "tokenizer_backend": "huggingface",
            "tokenizer": block_server.name,
            "num_concurrent": 2,
            "max_retries": 1,
        },
        tasks=["serve_items"],
        task_manager=TaskManager(include_path=str(tmp_path)),
    )
    scores = results["results"]["serve_items"]
    assert scores["exact_match,none"] == 1.0, (items, results["samples"] if "samples" in results else None)
