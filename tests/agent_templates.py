"""Two real chat-template shapes for the multi-turn tests: SmolLM2-135M-Instruct's (ChatML, no
tool support: tools are described in the system prompt, calls written in the Hermes format)
and a Llama-3.1-style one (tools rendered by the template, calls as JSON with "parameters",
tool results under the `ipython` role), each on a tiny local tokenizer with the template's
special tokens."""

from __future__ import annotations

SMOLLM2_TEMPLATE = (  # as shipped in SmolLM2-135M-Instruct's tokenizer_config.json
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA31_STYLE_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}"
    "{%- if tools %}{{- 'Environment: ipython\n' }}{%- endif %}"
    "{{- system }}"
    "{%- if tools %}{{- '\nYou may call these functions. Reply with a JSON object '"
    "'{\"name\": function name, \"parameters\": {argument name: value}}.\n\n' }}"
    "{%- for t in tools %}{{- t | tojson }}{{- '\n\n' }}{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{%- for call in message['tool_calls'] %}"
    "{{- '{\"name\": \"' + call['function']['name'] + '\", \"parameters\": ' }}"
    "{{- call['function']['arguments'] | tojson }}{{- '}' }}{%- endfor %}{{- '<|eot_id|>' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
LLAMA_SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>"]


def smollm2_tokenizer():
    """The tiny BPE tokenizer with SmolLM2's chat template (its specials are ChatML's)."""
    from alignkit.testing import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = SMOLLM2_TEMPLATE
    return tokenizer


def llama_tokenizer():
    """The tiny BPE tokenizer with Llama 3.1's header/turn specials and a template of its shape;
    <|eot_id|> ends a turn (its EOS)."""
    from alignkit.testing import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": LLAMA_SPECIALS})
    tokenizer.eos_token = "<|eot_id|>"
    tokenizer.chat_template = LLAMA31_STYLE_TEMPLATE
    return tokenizer
