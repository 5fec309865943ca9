"""`uptrain serve`: an OpenAI-compatible HTTP server over the continuous-batching scheduler.

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`, with the
OpenAI schema (responses, server-sent-event chunks ending in `data: [DONE]`, `usage`, `finish_reason` "stop"
or "length") and its error bodies `{"error": {"message", "type", "param", "code"}}`. The handlers only check
a request, tokenize it, submit its jobs to the `Scheduler` and relay their events; the model lives in the
scheduler's thread. Starlette and uvicorn come with the `serve` extra.

Beyond OpenAI's fields, as vLLM names them: `top_k`, `ignore_eos` (generate exactly max_tokens, for load
tests) and `return_token_ids` (each choice's `token_ids`, and its `prompt_token_ids`).
"""

import asyncio
import hmac
import json
import secrets
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .scheduler import Closed, Delta, Failed, Finished, Job, QueueFull, Scheduler

UNSUPPORTED = {  # request fields with no support here, and the value that means "not used"
    "n": 1,
    "best_of": 1,
    "echo": False,
    "logprobs": None,
    "top_logprobs": None,
    "suffix": None,
    "logit_bias": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
}


class APIError(Exception):
    """A request the server refuses: its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


@dataclass
class Sampling:
    """One request's generation settings, checked."""

    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: list[str]
    stream: bool
    include_usage: bool
    return_token_ids: bool
    ignore_eos: bool


# -- reading a request -----------------------------------------------------------------------------------------


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def optional(body: dict, name: str, check, expected: str, default=None):
    """body[name] if present and not null, checked by `check`; else `default`."""
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise APIError(400, f"'{name}' must be {expected}, not {json.dumps(value)}", param=name)
    return value


def sampling_of(body: dict, max_tokens_names=("max_tokens",)) -> Sampling:
    for name, unused in UNSUPPORTED.items():
        if body.get(name) not in (None, unused):
            raise APIError(400, f"'{name}' is not supported by this server", param=name)
    max_tokens = None
    for name in max_tokens_names:
        max_tokens = optional(body, name, lambda v: _integer(v) and v >= 1, "an integer of at least 1", max_tokens)
    temperature = float(optional(body, "temperature", lambda v: _number(v) and 0 <= v <= 2, "a number in [0, 2]", 1.0))
    top_p = float(optional(body, "top_p", lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]", 1.0))
    top_k = optional(body, "top_k", lambda v: _integer(v) and v >= -1, "an integer, -1 or 0 for all tokens", 0)
    seed = optional(body, "seed", _integer, "an integer", None)
    stop = optional(
        body,
        "stop",
        lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)),
        "a string or a list of strings",
        [],
    )
    stop = [stop] if isinstance(stop, str) else stop
    if any(not s for s in stop):
        raise APIError(400, "'stop' strings must not be empty", param="stop")
    stream = optional(body, "stream", lambda v: isinstance(v, bool), "true or false", False)
    options = optional(body, "stream_options", lambda v: isinstance(v, dict), "an object", {})
    include_usage = optional(options, "include_usage", lambda v: isinstance(v, bool), "true or false", False)
    token_ids = optional(body, "return_token_ids", lambda v: isinstance(v, bool), "true or false", False)
    ignore_eos = optional(body, "ignore_eos", lambda v: isinstance(v, bool), "true or false", False)
    return Sampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=max(top_k, 0),
        seed=secrets.randbits(63) if seed is None else seed,
        stop=stop,
        stream=stream,
        include_usage=include_usage,
        return_token_ids=token_ids,
        ignore_eos=ignore_eos,
    )


class Service:
    """What the handlers share: the scheduler, the tokenizer, the served name, the key, the limits."""

    def __init__(self, scheduler: Scheduler, tokenizer, name: str, api_key: str | None, vocab_size: int):
        self.scheduler, self.tokenizer, self.name = scheduler, tokenizer, name
        self.api_key = api_key
        self.vocab_size = vocab_size
        self.context = scheduler.context
        self.created = int(time.time())

    def authorize(self, request: Request):
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise APIError(401, "missing API key: send it as 'Authorization: Bearer KEY'", code="invalid_api_key")
        if not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    async def body(self, request: Request) -> dict:
        self.authorize(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise APIError(400, f"the request body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is None:
            raise APIError(400, "'model' is required", param="model")
        if model != self.name:
            raise APIError(
                404,
                f"the model '{model}' does not exist; this server serves '{self.name}'",
                param="model",
                code="model_not_found",
            )
        return body

    def prompts_of(self, prompt) -> list[list[int]]:
        """A completion request's `prompt`: text, a list of texts, token ids, or a list of token-id lists."""
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(_integer(t) for t in prompt):
            prompts = [prompt]
        elif (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(p, str) or (isinstance(p, list) and all(_integer(t) for t in p)) for p in prompt)
        ):
            prompts = prompt
        else:
            raise APIError(
                400,
                "'prompt' must be a string, a list of strings, a list of token ids or a list of lists of token ids",
                param="prompt",
            )
        ids = [self.tokenizer(p).input_ids if isinstance(p, str) else p for p in prompts]
        for one in ids:
            if any(not 0 <= t < self.vocab_size for t in one):
                raise APIError(400, f"token ids must be in [0, {self.vocab_size})", param="prompt")
        return ids

    def chat_prompt(self, messages) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
        turns = []
        for message in messages:
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)):
                raise APIError(400, "each message needs a 'role' string", param="messages")
            content = message.get("content")
            if isinstance(content, list):  # content parts: only text ones
                if not all(
                    isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
                ):
                    raise APIError(400, "only text content parts are supported", param="messages")
                content = "".join(part["text"] for part in content)
            if not isinstance(content, str):
                raise APIError(400, "each message needs a 'content' string", param="messages")
            turns.append({"role": message["role"], "content": content})
        if not self.tokenizer.chat_template:
            raise APIError(400, f"the tokenizer of '{self.name}' has no chat template: use /v1/completions")
        try:
            text = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        except Exception as error:  # noqa: BLE001 - a template may raise anything on messages it rejects
            raise APIError(400, f"the chat template rejected the messages: {error}", param="messages") from None
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def fit(self, prompt: list[int], max_tokens: int | None, param: str) -> int:
        """max_tokens for this prompt (None: the rest of the context), checked against the context."""
        if not prompt:
            raise APIError(400, "the prompt is empty", param=param)
        if len(prompt) >= self.context:
            raise APIError(
                400,
                f"the prompt has {len(prompt)} tokens; this server's context is {self.context} "
                "tokens, and at least one must be left to generate",
                param=param,
                code="context_length_exceeded",
            )
        if max_tokens is None:
            return self.context - len(prompt)
        if len(prompt) + max_tokens > self.context:
            raise APIError(
                400,
                f"this server's context is {self.context} tokens; the request asks for "
                f"{len(prompt) + max_tokens} ({len(prompt)} in the prompt, {max_tokens} to generate)",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return max_tokens

    def submit(self, prompts: list[list[int]], sampling: Sampling, max_tokens: list[int]):
        """Jobs for the prompts, submitted; -> (jobs, the asyncio queue of their (index, event))."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        jobs = []
        for index, (prompt, limit) in enumerate(zip(prompts, max_tokens)):

            def deliver(event, index=index):
                try:
                    loop.call_soon_threadsafe(events.put_nowait, (index, event))
                except RuntimeError:  # the event loop has closed: nobody is waiting
                    pass

            jobs.append(
                Job(
                    prompt,
                    limit,
                    deliver,
                    sampling.temperature,
                    sampling.top_k,
                    sampling.top_p,
                    sampling.seed + index,
                    sampling.stop,
                    sampling.ignore_eos,
                )
            )
        try:
            for job in jobs:
                self.scheduler.submit(job)
        except QueueFull as error:
            self.cancel(jobs)
            raise APIError(429, str(error), code="rate_limit_exceeded", kind="rate_limit_error") from None
        except Closed as error:
            self.cancel(jobs)
            raise APIError(503, str(error), kind="server_error") from None
        return jobs, events

    def cancel(self, jobs):
        for job in jobs:
            self.scheduler.cancel(job)


# -- relaying a request's events -----------------------------------------------------------------------------


async def events_of(jobs, events: asyncio.Queue, request: Request):
    """(index, event) of every job until each has ended; cancels the jobs whose client has gone."""
    open_jobs = set(range(len(jobs)))
    try:
        while open_jobs:
            try:
                index, event = await asyncio.wait_for(events.get(), timeout=1.0)
            except asyncio.TimeoutError:  # TimeoutError since Python 3.11
                if await request.is_disconnected():
                    return
                continue
            if isinstance(event, (Finished, Failed)):
                open_jobs.discard(index)
            yield index, event
    finally:  # also when the response is cancelled: a streaming client that disconnects
        request.app.state.service.cancel([jobs[index] for index in open_jobs])


def usage_of(finished: dict) -> dict:
    prompt = sum(f.prompt_tokens for f in finished.values())
    completion = sum(f.completion_tokens for f in finished.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def respond(request: Request, prompts: list[list[int]], sampling: Sampling, max_tokens: list[int], chat: bool):
    service: Service = request.app.state.service
    jobs, events = service.submit(prompts, sampling, max_tokens)
    prefix, kind = ("chatcmpl", "chat.completion") if chat else ("cmpl", "text_completion")
    head = {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": service.name}

    def choice(index, text, reason, token_ids=None):
        if chat:
            content = {"message" if not sampling.stream else "delta": text}
            entry = {"index": index, **content, "logprobs": None, "finish_reason": reason}
        else:
            entry = {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
        if sampling.return_token_ids and token_ids is not None:
            entry["token_ids"] = token_ids
        return entry

    if sampling.stream:
        chunk = {**head, "object": f"{kind}.chunk"} if chat else head

        async def stream():
            finished = {}
            if chat:
                for index in range(len(jobs)):
                    yield sse({**chunk, "choices": [choice(index, {"role": "assistant", "content": ""}, None)]})
            async for index, event in events_of(jobs, events, request):
                if isinstance(event, Delta):
                    text = {"content": event.text} if chat else event.text
                    yield sse({**chunk, "choices": [choice(index, text, None, event.token_ids)]})
                elif isinstance(event, Finished):
                    finished[index] = event
                    yield sse({**chunk, "choices": [choice(index, {} if chat else "", event.reason)]})
                else:
                    yield sse(APIError(500, event.message, kind="server_error").body())
            if sampling.include_usage and len(finished) == len(jobs):
                yield sse({**chunk, "choices": [], "usage": usage_of(finished)})
            yield "data: [DONE]\n\n"

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    texts, token_ids, finished = [[] for _ in jobs], [[] for _ in jobs], {}
    async for index, event in events_of(jobs, events, request):
        if isinstance(event, Delta):
            texts[index].append(event.text)
            token_ids[index] += event.token_ids
        elif isinstance(event, Finished):
            finished[index] = event
        else:
            raise APIError(500, event.message, kind="server_error")
    if len(finished) < len(jobs):  # the client has gone
        return JSONResponse({}, status_code=499)
    choices = []
    for index, pieces in enumerate(texts):
        text = "".join(pieces)
        choices.append(
            choice(
                index,
                {"role": "assistant", "content": text} if chat else text,
                finished[index].reason,
                token_ids[index],
            )
        )
    if sampling.return_token_ids:
        for entry, prompt in zip(choices, prompts):
            entry["prompt_token_ids"] = prompt
    return JSONResponse({**head, "choices": choices, "usage": usage_of(finished)})


# -- the endpoints ---------------------------------------------------------------------------------------------


async def completions(request: Request):
    service: Service = request.app.state.service
    body = await service.body(request)
    if "prompt" not in body:
        raise APIError(400, "'prompt' is required", param="prompt")
    sampling = sampling_of(body)
    prompts = service.prompts_of(body["prompt"])
    limit = 16 if sampling.max_tokens is None else sampling.max_tokens  # OpenAI's default for completions
    max_tokens = [service.fit(prompt, limit, "prompt") for prompt in prompts]
    return await respond(request, prompts, sampling, max_tokens, chat=False)


async def chat_completions(request: Request):
    service: Service = request.app.state.service
    body = await service.body(request)
    if "messages" not in body:
        raise APIError(400, "'messages' is required", param="messages")
    sampling = sampling_of(body, ("max_tokens", "max_completion_tokens"))
    prompt = service.chat_prompt(body["messages"])
    max_tokens = service.fit(prompt, sampling.max_tokens, "messages")
    return await respond(request, [prompt], sampling, [max_tokens], chat=True)


async def models(request: Request):
    service: Service = request.app.state.service
    service.authorize(request)
    entry = {
        "id": service.name,
        "object": "model",
        "created": service.created,
        "owned_by": "block-uptrain",
        "max_model_len": service.context,
    }
    return JSONResponse({"object": "list", "data": [entry]})


async def health(request: Request):
    return JSONResponse({"status": "ok", **request.app.state.service.scheduler.load()})


async def api_error(request: Request, error: APIError):
    return error.response()


async def http_error(request: Request, error: HTTPException):
    kind = "invalid_request_error" if error.status_code < 500 else "server_error"
    return APIError(error.status_code, str(error.detail), kind=kind).response()


async def server_error(request: Request, error: Exception):
    return APIError(500, f"internal error: {type(error).__name__}", kind="server_error").response()


def build_app(service: Service) -> Starlette:
    routes = [
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
    handlers = {APIError: api_error, HTTPException: http_error, Exception: server_error}
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.service = service
    return app


# -- running it -------------------------------------------------------------------------------------------------


def bound_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (0: any free port), not yet listening: the port is taken at once, and
    connections are refused until the model is ready and `listen()` is called."""
    family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, protocol)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def serve(
    spec: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 8,
    max_queue: int = 64,
    max_context: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    api_key: str | None = None,
    name: str | None = None,
    gguf_file: str | None = None,
) -> None:
    """Load the model, start its scheduler, listen, and serve until SIGTERM or SIGINT."""
    import torch

    from .architectures import is_block_model
    from .errors import UserError, first_line
    from .generation_block_transformer import Unsupported
    from .inference import load_for_inference
    from .scheduler import context_limit

    if max_batch < 1 or max_queue < 0:
        raise UserError("--max-batch must be at least 1 and --max-queue at least 0")
    if max_context is not None and max_context < 2:
        raise UserError("--max-context must be at least 2")
    if not 0 <= port < 65536:
        raise UserError(f"--port must be in 0..65535, not {port}")
    try:
        sock = bound_socket(host, port)
    except OSError as error:
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror or first_line(error)}") from None
    try:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer = load_for_inference(spec, device, dtype, gguf_file)
        limit = context_limit(model)
        if limit is None and max_context is None:
            raise UserError(f"cannot tell the context length of {spec}: give --max-context")
        context = min(n for n in (limit, max_context) if n is not None)
        scheduler = Scheduler(model, tokenizer, max_batch, context, max_queue)
        try:
            scheduler.start()
        except Unsupported as error:
            raise UserError(f"the fast engine cannot serve {spec}: {first_line(error)}") from None
    except BaseException:
        sock.close()
        raise
    sock.listen(2048)
    service = Service(scheduler, tokenizer, name or spec, api_key, model.config.vocab_size)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    engine = "block" if is_block_model(model) else "vanilla"
    print(
        f"serving {service.name} on http://{shown}:{bound_port} ({engine} engine on {device}, {max_batch} rows of "
        f"{context} tokens, queue {max_queue})",
        flush=True,
    )
    try:
        run(service, sock)
    finally:
        scheduler.close()


def run(service: Service, sock: socket.socket) -> None:
    """Serve until SIGTERM or SIGINT: then stop accepting, let the requests in flight finish, return."""
    import uvicorn

    config = uvicorn.Config(
        build_app(service), log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=None
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down; a handler that returns lets the
    # command finish normally (exit 0) after a clean shutdown.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("stopped", file=sys.stderr, flush=True)
