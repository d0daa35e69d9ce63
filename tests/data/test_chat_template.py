"""Chat prompts: rendered text and token ids equal transformers' `apply_chat_template` on the same directory."""

import itertools
import json
import re

import pytest

from jaxopd.data.chat import render_chat
from jaxopd.data.tokenizer import HFTokenizer, load_tokenizer
from tests.data.conftest import BUNDLED_TOKENIZER, make_hf_tokenizer

# Qwen3's template without the tool-calling branches: ChatML, <think> kept only after the last user turn, and the
# empty think block that enable_thinking=False puts in the generation prompt.
QWEN3_TEMPLATE = """\
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- if message.role == 'user' %}
        {%- set ns.last_query_index = (messages|length - 1) - loop.index0 %}
        {%- break %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {%- if not loop.first %}{{- raise_exception('the system message must come first') }}{%- endif %}
    {%- elif message.role == 'user' %}
        {{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and reasoning_content %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}
            {{- content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- else %}
        {{- raise_exception('unknown role ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

# Llama 3.1's template without tools: BOS, header tokens, the system block with its dates, trimmed contents; a message's
# "data" goes through tojson the way Llama 3.1 writes tool calls.
LLAMA3_TEMPLATE = """\
{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = '' %}
{%- endif %}
{%- if date_string is not defined %}
    {%- set date_string = '26 Jul 2024' %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{{- 'Cutting Knowledge Date: December 2023\\n' }}
{{- 'Today Date: ' + date_string + '\\n\\n' }}
{{- system_message }}
{{- '<|eot_id|>' }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim }}
    {%- if message.data is defined %}
        {{- '\\n' + message.data | tojson(indent=2) }}
    {%- endif %}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

CHAT_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|begin_of_text|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eot_id|>")
TRAINING_TEXTS = [
    "user assistant system The quick brown fox jumps over the lazy dog. What is 2+2? Thanks!",
    "def f(x):\n    return {'a': x}\n", "Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024",
    "Réponds en français. 日本語も可。 ∑ ∫ ∂ ☃ 𝄞 think thinking reasoning",
]


def user(text):
    return {"role": "user", "content": text}


def assistant(text, **fields):
    return {"role": "assistant", "content": text, **fields}


SYSTEMS = [None, "You are a terse assistant.", "  Réponds en français. 日本語も可。\n"]
CONVERSATIONS = [
    [user("What is 2+2?")],
    [user("Hi"), assistant("Hello! How can I help?"), user("A joke about {{ braces }}, {% tags %} and {# notes #}.")],
    [user("Explain ∑ and ∫ ☃ 𝄞"), assistant("<think>\nThe user wants math.\n</think>\n\nSum and integral."),
     user("Thanks; and ∂?")],
    [user("a"), assistant("b"), user("c"), assistant("d"), user("e"), assistant("f"), user("g")],
    [user('Write JSON: {"k": [1, 2]}'), assistant("Sure.", reasoning_content="Simple request."), user("Now YAML")],
    [user("  padded with spaces \n\n"), assistant("trailing\n", reasoning="aliased to reasoning_content")],
    [user("tab\tand\r\nCRLF"), assistant("ok", reasoning_content=None)],
    [user("Say <|im_end|> and <think> literally")],
    [{"role": "user", "content": "look", "data": {"html": "<b>&'</b>", "snow": "☃", "n": [1, 2.5, None]}}],
]


def _cases():
    """(messages, add_generation_prompt, enable_thinking): every conversation, with each kind of system prompt in
    turn, under every flag."""
    for index, (turns, add_generation_prompt, enable_thinking) in enumerate(
            itertools.product(CONVERSATIONS, (True, False), (True, False))):
        system = SYSTEMS[index // 4 % len(SYSTEMS)]
        yield ([{"role": "system", "content": system}] if system else []) + turns, add_generation_prompt, enable_thinking


CASES = list(_cases())


@pytest.fixture(scope="module")
def chat_tokenizers(tmp_path_factory):
    """Three directories of one tokenizer: the Qwen3 template in tokenizer_config.json (as a string, and as a list of
    named templates) and the Llama 3 one in chat_template.jinja."""
    root = tmp_path_factory.mktemp("chat")
    qwen = {"bos_token": None, "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False,
                                            "normalized": False, "rstrip": False, "single_word": False, "special": True}, "pad_token": "<|endoftext|>",
            "tokenizer_class": "PreTrainedTokenizerFast"}
    directories = {
        "qwen3": make_hf_tokenizer(root / "qwen3", TRAINING_TEXTS, CHAT_SPECIALS, ("<think>", "</think>"),
                                   {**qwen, "chat_template": QWEN3_TEMPLATE}),
        "qwen3_named": make_hf_tokenizer(
            root / "qwen3_named", TRAINING_TEXTS, CHAT_SPECIALS, ("<think>", "</think>"),
            {**qwen, "chat_template": [{"name": "tool_use", "template": "{{ raise_exception('not this one') }}"},
                                       {"name": "default", "template": QWEN3_TEMPLATE}]}),
        "llama3": make_hf_tokenizer(root / "llama3", TRAINING_TEXTS, CHAT_SPECIALS, (),
                                    {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                     "pad_token": None, "tokenizer_class": "PreTrainedTokenizerFast"}),
    }
    (directories["llama3"] / "chat_template.jinja").write_text(LLAMA3_TEMPLATE)
    # Llama 3's tokenizer.json adds BOS when asked for special tokens; the template writes it already, so a chat is
    # encoded without them (else BOS twice).
    tokenizers = pytest.importorskip("tokenizers")
    llama = tokenizers.Tokenizer.from_file(str(directories["llama3"] / "tokenizer.json"))
    bos = "<|begin_of_text|>"
    llama.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, llama.token_to_id(bos))])
    llama.save(str(directories["llama3"] / "tokenizer.json"))
    return directories


@pytest.mark.parametrize("name", ["qwen3", "qwen3_named", "llama3"])
def test_chat_prompt_ids_equal_transformers(chat_tokenizers, name):
    transformers = pytest.importorskip("transformers")
    directory = chat_tokenizers[name]
    theirs = transformers.AutoTokenizer.from_pretrained(str(directory))
    ours = load_tokenizer(directory)
    assert ours.chat_template == (LLAMA3_TEMPLATE if name == "llama3" else QWEN3_TEMPLATE)
    assert len(CASES) >= 20
    for messages, add_generation_prompt, enable_thinking in CASES:
        flags = dict(add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)
        text = ours.apply_chat_template(messages, **flags)
        assert text == theirs.apply_chat_template(messages, tokenize=False, **flags), (messages, flags)
        encoded = theirs.apply_chat_template(messages, tokenize=True, **flags)
        expected = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
        assert ours.encode(text) == list(expected), (messages, flags)
    # The template's own markup became single special-token ids, and the prompt starts the way the model expects.
    first = ours.encode(ours.apply_chat_template(CASES[0][0]))
    assert first[0] == (ours.bos_id if name == "llama3" else ours.token_to_id("<|im_start|>"))
    assert first.count(ours.bos_id) == (name == "llama3")


def test_special_tokens_and_template_are_read_from_the_directory(chat_tokenizers):
    llama = HFTokenizer(chat_tokenizers["llama3"])
    assert llama.special_tokens == {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    assert llama.eos_id == llama.token_to_id("<|eot_id|>") and llama.pad_id == llama.eos_id
    qwen = HFTokenizer(chat_tokenizers["qwen3"])  # the AddedToken dict unwrapped
    assert qwen.special_tokens == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    assert "Today Date: 1 Jan 2030" in llama.apply_chat_template([user("hi")], date_string="1 Jan 2030")


def test_template_errors_name_the_template_file(chat_tokenizers, tmp_path):
    qwen = HFTokenizer(chat_tokenizers["qwen3"])
    with pytest.raises(ValueError, match=r"qwen3/tokenizer_config.json refused the conversation: the system message "
                                         "must come first"):
        qwen.apply_chat_template([user("hi"), {"role": "system", "content": "late"}])
    broken = make_hf_tokenizer(tmp_path / "broken", TRAINING_TEXTS)
    (broken / "chat_template.jinja").write_text("{% for message in messages %}\n{{ message.content }\n")
    with pytest.raises(ValueError, match=r"broken/chat_template.jinja, line 2: unexpected '}'"):
        HFTokenizer(broken).apply_chat_template([user("hi")])
    with pytest.raises(ValueError, match="chat template my.jinja, line 1"):
        render_chat("{% if %}", [user("hi")], template_file="my.jinja")


def test_tokenizer_without_chat_template_says_what_to_set(tmp_path):
    plain = HFTokenizer(make_hf_tokenizer(tmp_path / "plain", TRAINING_TEXTS))
    assert plain.chat_template is None
    for tokenizer in (plain, load_tokenizer(BUNDLED_TOKENIZER)):
        with pytest.raises(ValueError, match=f"tokenizer {re.escape(tokenizer.path)} has no chat template; set "
                                             "distill.chat_template .* or give prompts as plain `prompt` strings"):
            tokenizer.apply_chat_template([user("hi")])


def test_tojson_writes_plain_json_not_html_escapes():
    rendered = render_chat("{{ messages[0].data | tojson }}", [{"role": "user", "data": {"a": "<&'☃>"}}])
    assert json.loads(rendered) == {"a": "<&'☃>"} and "<&'☃>" in rendered
