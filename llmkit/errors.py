"""LlmkitError: the one exception type whose message is shown to users as a single line.

Library code raises it for bad input (missing file, corrupt checkpoint, bad parameter) with a message
that says what went wrong, where, and what to do. The CLI prints `llmkit: error: <message>` and exits 1;
the server turns it into an OpenAI-shaped 4xx. Tracebacks appear only with `--debug`.
"""


class LlmkitError(Exception):
    """A user-facing error: one line, no traceback."""

    def __init__(self, message: str, *, status: int = 400, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status  # HTTP status when raised inside a server route
        self.code = code  # OpenAI error `code` (e.g. "model_not_found")
        self.param = param  # OpenAI error `param`: the request field at fault, when there is one
