"""Every prompt is checked before step 1: files, JSON, the prompt field, tokenized length against max_prompt_len;
a bad row is named by file and line, over-long prompts are an error or left out (counted), never cut."""

import json
import pathlib

import pytest

from jaxopd import train
from jaxopd.bundled import resolve_path
from jaxopd.data.tokenizer import load_tokenizer
from jaxopd.distill.prompts import PromptStream, load_prompts, read_prompts
from jaxopd.training.config import load_config_file

TOKENIZER = load_tokenizer(resolve_path("data/tasks/arithmetic/tokenizer.json"))  # one token per character
CHECKS = dict(tokenizer=TOKENIZER, max_prompt_len=8)


def texts(prompts):
    return [prompt.text for prompt in prompts]


def write_prompts(path: pathlib.Path, prompts, field="prompt") -> pathlib.Path:
    path.write_text("".join(json.dumps({field: prompt}) + "\n" for prompt in prompts))
    return path


def test_prompts_load_in_file_order_as_the_jsonl_reader_gives_them(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "1+2="}\n\n{"prompt": "30+4=", "answer": "34"}\n')  # a blank line is no prompt
    prompts = load_prompts(str(path), key="distill.prompts", **CHECKS)
    assert texts(prompts) == ["1+2=", "30+4="] and prompts[1].row == {"prompt": "30+4=", "answer": "34"}
    assert prompts[0].ids == (TOKENIZER.bos_id, *TOKENIZER.encode("1+2=")) and prompts[1].where == f"{path}:3"


def test_one_over_long_prompt_among_200_is_named_by_file_and_line(tmp_path):
    prompts = [f"{i % 100}+{i % 10}=" for i in range(200)]  # at most "<bos>99+9=", 6 tokens
    prompts[136] = "1234+5678="
    path = write_prompts(tmp_path / "p.jsonl", prompts)
    with pytest.raises(ValueError, match=rf"^1 of the 200 prompts of distill.prompts are longer than "
                                         rf"distill.max_prompt_len=8 tokens \(BOS and chat template included\), the first at "
                                         rf"{path}:137 \(11 tokens\).*distill.long_prompts='skip'"):
        load_prompts(str(path), key="distill.prompts", **CHECKS)


def test_skipped_prompts_are_counted_and_left_out_of_the_stream(tmp_path, capsys):
    prompts = ["1+1=", "1234+5678=", "2+2=", "99999+1=", "3+3="]
    path = write_prompts(tmp_path / "p.jsonl", prompts)
    kept = load_prompts(str(path), key="distill.prompts", long_prompts="skip", **CHECKS)
    assert texts(kept) == ["1+1=", "2+2=", "3+3="]
    assert "2 of the 5 prompts of distill.prompts are longer" in capsys.readouterr().out
    # The stream draws only kept prompts, the same ones for the same seed (so a resume draws what a run would).
    drawn = texts(PromptStream(kept, seed=0).next(30))
    assert set(drawn) == set(texts(kept)) and drawn == texts(PromptStream(kept, seed=0).next(30))


@pytest.mark.parametrize("content, message", [
    ("", r"holds no prompt"),
    ('{"prompt": "1+1="}\n{"prompt": "2+2=",\n', r"p.jsonl:2: malformed JSON"),
    ('{"prompt": "1+1="}\n{"question": "2+2="}\n', r"p.jsonl:2: no field 'prompt' or 'messages' \(fields "
                                                   r"\['question'\]\); set distill.prompt_field"),
    ('{"prompt": ""}\n', r"p.jsonl:1: field 'prompt' is empty"),
    (b'{"prompt": "1+1\xff="}\n', r"p.jsonl:1: not UTF-8 text"),
    ('{"messages": "hi"}\n', r"p.jsonl:1: field 'messages' must be a non-empty list of chat turns"),
    ('{"messages": [{"role": "user"}]}\n', r"p.jsonl:1: every turn of 'messages' needs string 'role' and 'content'"),
    ('{"prompt": 12}\n', r"p.jsonl:1: field 'prompt' is a JSON int, not a string"),
    ('["1+1="]\n', r"p.jsonl:1: no field 'prompt' or 'messages' \(a JSON list\)"),
])
def test_bad_prompt_files_are_errors_naming_the_row(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message):
        load_prompts(str(path), key="distill.prompts", **CHECKS)


def test_missing_files_name_the_config_key(tmp_path):
    with pytest.raises(ValueError, match=r"distill.eval_prompts='nowhere/\*.jsonl'.*matches no file; set "
                                         r"distill.eval_prompts"):
        load_prompts("nowhere/*.jsonl", key="distill.eval_prompts", **CHECKS)


def test_eval_count_over_the_file_names_eval_prompts_count(tmp_path):
    path = write_prompts(tmp_path / "eval.jsonl", ["1+1=", "2+2="])
    with pytest.raises(ValueError, match="3 prompts requested \\(distill.eval_prompts_count\\) but "
                                         "distill.eval_prompts=.* has 2; lower distill.eval_prompts_count"):
        read_prompts(str(path), 3, **CHECKS)


@pytest.mark.parametrize("where", ["prompts", "eval_prompts"])
def test_a_run_with_a_bad_prompt_file_stops_before_step_1(tmp_path, where):
    bad = write_prompts(tmp_path / "bad.jsonl", ["1+1=", "123456+654321="])
    config = load_config_file("tiny_distill", {"workdir": str(tmp_path / "run"), f"distill.{where}": str(bad),
                                               "batch_size": 16, "microbatch_size": 16,
                                               "distill.eval_prompts_count": 8, "progress_bar": False})
    with pytest.raises(ValueError, match=rf"prompts of distill.{where} are longer than distill.max_prompt_len=8"):
        train.train(config)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing ran, nothing was written
