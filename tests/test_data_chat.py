"""The chat template against transformers' apply_chat_template, the loss weights, TRL rows, the synthetic set."""

import pytest
from transformers import PreTrainedTokenizerFast

from dsjax.data import chat, conversations, synthetic
from dsjax.data import tokenizer as tk
from dsjax.errors import DataError
from tests.test_data_common import train_byte_level_bpe, train_small_tokenizer

# Verbatim from deepseek-llm-7b-chat's tokenizer_config.json (../shared/PAPER.md, Alignment).
DEEPSEEK_TEMPLATE = r"""{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"""  # noqa: E501

SYSTEM = {"role": "system", "content": "You are terse."}
CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"}],
    "multi": [
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7, for one.\nAnother: 11"},
        {"role": "user", "content": "  And an even one?\n"},
        {"role": "assistant", "content": "2 is the only even prime 😀"},
    ],
    "system": [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
    "system_multi": [
        SYSTEM, {"role": "user", "content": "def f(x):\n    return x"}, {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "中文?"}, {"role": "assistant", "content": "是的。"},
    ],
    "ends_with_user": [SYSTEM, {"role": "user", "content": "One"}, {"role": "assistant", "content": "1"},
                       {"role": "user", "content": "Two"}],
}


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory):
    return train_small_tokenizer(tmp_path_factory.mktemp("chat_spm"))


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """Our HF tokenizer and transformers' PreTrainedTokenizerFast (with the DeepSeek template) on one tokenizer.json."""
    path = train_byte_level_bpe(tmp_path_factory.mktemp("chat_hf"))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token=tk.BOS, eos_token=tk.EOS,
                                 chat_template=DEEPSEEK_TEMPLATE)
    return tk.load_tokenizer(path), hf


def test_our_template_string_is_the_released_one():
    assert chat.JINJA_TEMPLATE == DEEPSEEK_TEMPLATE


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_render_and_ids_equal_apply_chat_template(hf_pair, name, generation_prompt):
    ours, hf = hf_pair
    messages = CONVERSATIONS[name]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert chat.render(messages, generation_prompt) == expected
    expected_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    expected_ids = list(expected_ids["input_ids"] if hasattr(expected_ids, "keys") else expected_ids)
    ids, _ = chat.tokenize(ours, messages, generation_prompt)
    assert ids.tolist() == expected_ids
    if generation_prompt:
        assert chat.prompt_ids(ours, messages) == expected_ids


def test_hand_rendered_strings():
    assert chat.render(CONVERSATIONS["single"]) == f"{tk.BOS}User: What is 12 + 30?\n\nAssistant: 42{tk.EOS}"
    assert chat.render(CONVERSATIONS["system"][:2], True) == f"{tk.BOS}You are terse.\n\nUser: Hi\n\nAssistant:"


@pytest.mark.parametrize("which", ["spm", "hf"])
def test_loss_weights_are_the_assistant_tokens_and_their_eos(spm_tok, hf_pair, which):
    tok = spm_tok if which == "spm" else hf_pair[0]
    messages = CONVERSATIONS["system_multi"]
    ids, weights = chat.tokenize(tok, messages)
    enc = tok.encode
    prompt1 = enc("You are terse.\n\nUser: def f(x):\n    return x\n\nAssistant:")
    answer1 = enc(" ok")
    prompt2 = enc("User: 中文?\n\nAssistant:")
    answer2 = enc(" 是的。")
    expected = [tok.bos_id] + prompt1 + answer1 + [tok.eos_id] + prompt2 + answer2 + [tok.eos_id]
    expected_w = [0] * (1 + len(prompt1)) + [1] * (len(answer1) + 1) + [0] * len(prompt2) + [1] * (len(answer2) + 1)
    assert ids.tolist() == expected and weights.tolist() == expected_w
    # Read back: the weighted tokens are exactly the two replies (with the template's space) and their eos.
    assert [int(i) for i, w in zip(ids, weights) if w and i == tok.eos_id] == [tok.eos_id] * 2
    assert tok.decode(ids[weights == 1]) == " ok 是的。"
    assert tok.decode(ids[weights == 0]) == (
        "You are terse.\n\nUser: def f(x):\n    return x\n\nAssistant:User: 中文?\n\nAssistant:")
    assert weights[0] == 0 and ids[0] == tok.bos_id and weights.dtype.name == "uint8" and ids.dtype.name == "int32"


def test_training_tokens_continue_the_generation_prompt(spm_tok):
    """What the model is trained to emit after "Assistant:" is what generation decodes as the reply."""
    messages = CONVERSATIONS["single"]
    ids, weights = chat.tokenize(spm_tok, messages)
    prompt = chat.prompt_ids(spm_tok, messages[:1])
    assert ids[: len(prompt)].tolist() == prompt and not weights[: len(prompt)].any()
    assert weights[len(prompt):].all() and ids[-1] == spm_tok.eos_id
    assert chat.response_text(spm_tok, ids[len(prompt):]) == "42"
    assert chat.response_text(spm_tok, ids[len(prompt):].tolist() + [5, 6]) == "42"


def test_prompt_completion_trains_only_the_completion(spm_tok):
    record = {"prompt": CONVERSATIONS["multi"][:3], "completion": [CONVERSATIONS["multi"][3]]}
    messages, train_from = conversations.chat_row(record)
    assert messages == CONVERSATIONS["multi"] and train_from == 3
    ids, weights = chat.tokenize(spm_tok, messages, train_from=train_from)
    full_ids, full_w = chat.tokenize(spm_tok, messages)
    assert ids.tolist() == full_ids.tolist()
    assert spm_tok.decode(ids[weights == 1]) == " 2 is the only even prime 😀"
    assert spm_tok.decode(full_ids[full_w == 1]) == " 7, for one.\nAnother: 11 2 is the only even prime 😀"
    # Strings: a user prompt and an assistant completion.
    assert conversations.chat_row({"prompt": "Hi", "completion": "Hello."}) == (
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], 1)


@pytest.mark.parametrize("record, reason", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}, "unknown_role"),
    ({"messages": [{"role": "user", "content": "a"}]}, "no_assistant"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " \n"}]}, "empty_content"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}, "invalid_message"),
    ({"messages": []}, "invalid_message"),
    ({"messages": "hi"}, "missing_field"),
    ({"prompt": "a"}, "missing_field"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "completion": [{"role": "user", "content": "c"}]}, "no_assistant"),
    ({"text": "plain"}, "missing_field"),
    ([1, 2], "missing_field"),
    ({"messages": [{"role": "user", "content": "\ud800"}, {"role": "assistant", "content": "b"}]}, "invalid_utf8"),
])
def test_bad_rows_name_their_reason(record, reason):
    with pytest.raises(conversations.BadRow) as e:
        conversations.chat_row(record)
    assert e.value.reason == reason and e.value.reason in conversations.CHAT_REASONS


def test_tokenize_refuses_a_bad_conversation_in_one_sentence(spm_tok):
    with pytest.raises(DataError, match=r"^cannot tokenize this conversation: message 1 has role 'tool'.*\.$"):
        chat.tokenize(spm_tok, [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])


@pytest.mark.parametrize("tasks", [synthetic.TASKS, ("add", "reverse", "sort")])
def test_synthetic_set_is_deterministic_correct_and_disjoint(tasks):
    train = synthetic.examples("train", 3000, seed=1, tasks=tasks)
    val = synthetic.examples("val", 300, seed=1, tasks=tasks)
    assert train == synthetic.examples("train", 3000, seed=1, tasks=tasks)
    assert train != synthetic.examples("train", 3000, seed=2, tasks=tasks)
    assert {e.task for e in val} == set(tasks)
    for e in train + val:  # every answer recomputed from the prompt text
        numbers = [int(x) for x in e.prompt.replace("?", " ").replace(".", " ").split() if x.isdigit()]
        letters = [x for x in e.prompt.rstrip("?.").split() if len(x) == 1 and x in synthetic.LETTERS]
        if e.task == "add":
            assert e.answer == str(sum(numbers)) and len(numbers) == 2
        elif e.task == "reverse":
            assert e.answer == " ".join(reversed(letters)) and len(set(letters)) == len(letters)
        elif e.task == "max":
            assert e.answer == str(max(numbers)) and 3 <= len(numbers) <= 5
        elif e.task == "min":
            assert e.answer == str(min(numbers)) and 3 <= len(numbers) <= 5
        else:
            assert e.answer == " ".join(str(n) for n in sorted(numbers))
    # No held-out problem (an unordered pair, a list, or a multiset of digits, which sort, max and min share)
    # appears in training, under any seed.
    def identity(e):
        numbers = tuple(sorted(int(x) for x in e.prompt.replace("?", " ").replace(".", " ").split() if x.isdigit()))
        if e.task == "reverse":
            return e.task, tuple(e.answer.split())
        return ("add" if e.task == "add" else "digits"), numbers
    other_train = synthetic.examples("train", 3000, seed=7, tasks=tasks)
    assert not {identity(e) for e in val} & {identity(e) for e in train + other_train}
    assert len({(e.task, identity(e)) for e in val}) == len(val)  # distinct held-out problems
    pairs = synthetic.held_out(300, seed=1, tasks=tasks)
    assert pairs == [([{"role": "user", "content": e.prompt}], e.answer) for e in val]


def test_synthetic_fingerprint_names_the_task_set():
    # The SFT and DPO demo caches are keyed by it: another task set must never reuse a prepared cache.
    assert synthetic.fingerprint() == synthetic.fingerprint(synthetic.TASKS)
    assert synthetic.fingerprint(("add", "reverse", "sort")) != synthetic.fingerprint()
