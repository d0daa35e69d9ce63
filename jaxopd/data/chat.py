"""Chat templates rendered the way transformers' `apply_chat_template` renders them, without importing transformers.

A Hugging Face checkpoint's chat template is a Jinja program (tokenizer_config.json's "chat_template" or the
chat_template.jinja file). transformers compiles it in an immutable sandbox with trim_blocks and lstrip_blocks, the
loopcontrols extension, its own `tojson` filter and the `raise_exception` and `strftime_now` globals, and renders it with
`messages`, `tools`, `documents`, `add_generation_prompt`, the named special tokens (`bos_token`, `eos_token`, ...)
and any extra variables (Qwen3's `enable_thinking`). This module does the same (transformers/utils/
chat_template_utils.py, `_cached_compile_jinja_template` and `render_jinja_template`), so the prompt the student
samples after is the prompt the model was tuned on. Token ids of a rendered chat are `tokenizer.encode(rendered)`:
transformers too encodes it with add_special_tokens=False, the template writes BOS itself.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

# Names a message's reasoning is passed under; templates read the first (transformers' _REASONING_FIELDS).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
                special_tokens: dict[str, str] | None = None, template_file: str = "<chat template>",
                **template_vars: Any) -> str:
    """The text `template` makes of `messages` (dicts with "role" and "content"), as transformers renders it.

    special_tokens: {"bos_token": "<s>", ...}, as `HFTokenizer.special_tokens` gives them; template_vars (e.g.
    enable_thinking=False) override them. template_file names the template in errors: a syntax error or the
    template's own `raise_exception` becomes a ValueError naming it.
    """
    try:
        import jinja2
    except ImportError as error:
        raise ImportError("chat templates are rendered with `jinja2`: pip install 'jaxopd[hf]'") from error
    try:
        compiled = _compile(template)
        return compiled.render(messages=_template_messages(messages), tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt,
                               **{**(special_tokens or {}), **template_vars})
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(f"chat template {template_file}, line {error.lineno}: {error.message}") from error
    except jinja2.TemplateError as error:
        raise ValueError(f"chat template {template_file} refused the conversation: {error}") from error


def _template_messages(messages: list[dict]) -> list[dict]:
    """What transformers hands the template: keys whose value is None dropped (templates test for a missing key, and
    would print "None"), and the reasoning copied under "reasoning_content" and "thinking" from whichever name holds
    it."""
    result = []
    for message in messages:
        if not isinstance(message, dict):
            raise ValueError(f"chat messages are dicts with 'role' and 'content', got {message!r}")
        message = {key: value for key, value in message.items() if value is not None}
        reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        result.append(message)
    return result


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` renders its body; transformers uses the tag to mark the assistant
        tokens for a loss mask, which the rendered text does not depend on."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want the plain JSON.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[Generation, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return environment.from_string(template)
