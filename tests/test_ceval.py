"""--mode precision_dataset end to end on a random checkpoint, with small C-Eval datasets in both layouts."""
import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from chatglm2.ceval import EXTRACTION_PROMPT, answer_questions, load_dataset
from chatglm2.engine import Engine
from chatglm2.checkpoint import iter_tensors, read_config, write_checkpoint
from chatglm2.errors import InputError
from chatglm2.tensor_parallel import write_tp_parts
from helpers import run, torchrun_args
from modeling_chatglm_ascend import ChatGLM2ForCausalLM, ChatGLM2Tokenizer

# The protocol's 512 new tokens take seconds per batch even for the tiny model; 16 keep the file quick.
NEW_TOKENS = 16
# (folder of THUDM's layout, subject, questions as (question, options A-D, answer))
SUBJECTS = [
    ("STEM", "computer_network", [
        ("在OSI参考模型中，负责路由选择的是____。", ("物理层", "数据链路层", "网络层", "传输层"), "C"),
        ("TCP协议提供的是____服务。", ("无连接", "面向连接的可靠", "广播", "不可靠"), "B"),
        ("下列哪个是私有IP地址？", ("8.8.8.8", "192.168.1.1", "1.1.1.1", "202.96.0.1"), "B"),
        ("HTTP默认端口号是____。", ("21", "25", "53", "80"), "D"),
        ("以下关于交换机的说法，正确的是____，请仔细阅读\n每一个选项，\"全部\"考虑之后再作答。",
         ("工作在物理层", "工作在数据链路层", "不能隔离冲突域", "只能连接两台计算机"), "B"),
    ]),
    ("Social_Science", "teacher_qualification", [
        ("教师职业道德的核心是____。", ("爱岗敬业", "关爱学生", "教书育人", "为人师表"), "B"),
        ("我国第一部教育学著作是____。", ("《学记》", "《论语》", "《大学》", "《中庸》"), "A"),
        ("今天天气晴朗，适合户外活动，那么学生课外活动的组织形式不包括____。", ("群众性活动", "小组活动", "个人活动", "考试"), "D"),
    ]),
    ("Other", "civil_servant", [
        ("我国的根本大法是____。", ("刑法", "民法典", "宪法", "行政法"), "C"),
        ("请问去火车站怎么走？下列交通工具中速度最快的是____。", ("自行车", "高铁", "公交车", "步行"), "B"),
    ]),
]
CATEGORIES = {"computer_network": "STEM", "teacher_qualification": "Social Science", "civil_servant": "Other"}


def question_text(question: str, options: tuple[str, ...]) -> str:
    return "\n".join([question] + [f"{letter}. {option}" for letter, option in zip("ABCD", options)])


def write_jsonl_dataset(root: Path) -> Path:
    for folder, subject, questions in SUBJECTS:
        lines = [json.dumps({"inputs_pretokenized": question_text(q, options), "choices_pretokenized": list(options),
                             "label": "ABCD".index(answer)}, ensure_ascii=False) for q, options, answer in questions]
        (root / "val" / folder).mkdir(parents=True, exist_ok=True)
        (root / "val" / folder / f"{subject}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def write_csv_dataset(root: Path) -> Path:
    (root / "val").mkdir(parents=True, exist_ok=True)
    for _, subject, questions in SUBJECTS:
        with open(root / "val" / f"{subject}_val.csv", "w", encoding="utf-8", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["id", "question", "A", "B", "C", "D", "answer"])
            writer.writerows([i, q, *options, answer] for i, (q, options, answer) in enumerate(questions))
    return root


def run_ceval(ckpt: Path, dataset: Path, output: Path, batch: int = 8, *extra: str,
              launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return run(*launcher, "main.py", "--mode", "precision_dataset", "--model_path", str(ckpt), "--ceval_dataset",
               str(dataset), "--batch", str(batch), "--precision_output_file", str(output), "--backend", "cpu",
               "--dtype", "fp32", *extra, CEVAL_MAX_NEW_TOKENS=str(NEW_TOKENS))


def predictions(record: dict) -> dict[str, str]:
    return {name: result["predictions"] for name, result in record["subjects"].items()}


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt, tmp_path_factory) -> Path:
    """The tiny checkpoint with 20x larger layer weights. At the conftest's scale the embedding of the prompt's last
    token swamps the layers and every question gets the same letter, which would make the comparisons vacuous."""
    tensors = {name: tensor * 20 if "dense" in name or "query_key_value.weight" in name else tensor
               for name, tensor in iter_tensors(tiny_ckpt)}
    path = tmp_path_factory.mktemp("ckpt") / "strong"
    write_checkpoint(path, read_config(tiny_ckpt), [tensors], 1, tiny_ckpt)
    return path


@pytest.fixture(scope="module")
def jsonl_dataset(tmp_path_factory) -> Path:
    return write_jsonl_dataset(tmp_path_factory.mktemp("ceval") / "CEval")


@pytest.fixture(scope="module")
def jsonl_run(ckpt, jsonl_dataset, tmp_path_factory) -> Path:
    """The output file of one --batch 8 run on the jsonl layout."""
    output = tmp_path_factory.mktemp("out") / "precison_result.json"
    result = run_ceval(ckpt, jsonl_dataset, output)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "C-Eval val accuracy" in result.stdout
    return output


def direct_predictions(ckpt: Path) -> dict[str, str]:
    """THUDM's two stages written out for one question at a time, straight on the model."""
    tokenizer = ChatGLM2Tokenizer.from_pretrained(ckpt)
    model = ChatGLM2ForCausalLM.from_pretrained(ckpt, device="cpu", dtype=torch.float32)
    choice_ids = [tokenizer.encode(letter, add_special_tokens=False)[0] for letter in "ABCD"]
    answers = {}
    for _, subject, questions in SUBJECTS:
        answers[subject] = ""
        for q, options, _ in questions:
            text = question_text(q, options)
            response = tokenizer.decode(model.generate(**tokenizer(tokenizer.build_prompt(text)),
                                                       max_new_tokens=NEW_TOKENS)[0])
            logits = model(**tokenizer(tokenizer.build_prompt(text + response + "\n综上所述，ABCD中正确的选项是：")))
            answers[subject] += "ABCD"[int(logits[0, -1, choice_ids].argmax())]
    return answers


@pytest.mark.slow
def test_report_structure_and_predictions_equal_the_protocol(ckpt, jsonl_run):
    records = json.loads(jsonl_run.read_text(encoding="utf-8"))
    assert len(records) == 1 and records[0]["complete"]
    record = records[0]
    assert record["setup"]["layout"] == "jsonl" and record["setup"]["max_new_tokens"] == NEW_TOKENS
    assert list(record["subjects"]) == ["civil_servant", "computer_network", "teacher_qualification"]  # by path
    for _, subject, questions in SUBJECTS:
        result = record["subjects"][subject]
        labels = [answer for _, _, answer in questions]
        assert result["category"] == CATEGORIES[subject] and result["total"] == len(questions)
        assert result["correct"] == sum(p == a for p, a in zip(result["predictions"], labels))
        assert result["accuracy"] == pytest.approx(result["correct"] / result["total"])
    assert set(record["categories"]) == set(CATEGORIES.values())
    total = sum(len(questions) for _, _, questions in SUBJECTS)
    correct = sum(r["correct"] for r in record["subjects"].values())
    assert record["overall"] == {"correct": correct, "total": total, "accuracy": pytest.approx(correct / total)}

    answers = direct_predictions(ckpt)
    assert predictions(record) == answers
    assert len(set("".join(answers.values()))) > 1  # the random model does not always say one letter

    rows = list(csv.DictReader(jsonl_run.with_suffix(".csv").read_text(encoding="utf-8").splitlines()))
    assert [r["level"] for r in rows] == ["subject"] * 3 + ["category"] * 3 + ["overall"]
    assert rows[-1]["correct"] == str(correct) and rows[-1]["total"] == str(total)


@pytest.mark.slow
def test_csv_layout_at_batch_1_gives_the_same_predictions_and_is_appended(ckpt, jsonl_dataset, jsonl_run, tmp_path):
    """The CSV release yields the jsonl prompts and labels, so its --batch 1 answers must equal the --batch 8 ones."""
    dataset = write_csv_dataset(tmp_path / "ceval-exam")
    assert [(s.name, s.questions, s.labels) for s in load_dataset(dataset)[1]] == \
        [(s.name, s.questions, s.labels) for s in load_dataset(jsonl_dataset)[1]]
    output = tmp_path / "results.json"
    shutil.copy(jsonl_run, output)
    result = run_ceval(ckpt, dataset, output, batch=1)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = json.loads(output.read_text(encoding="utf-8"))
    assert first == json.loads(jsonl_run.read_text(encoding="utf-8"))[0]
    assert second["setup"]["layout"] == "csv" and second["complete"] and second["batch"] == 1
    assert {name: r["category"] for name, r in second["subjects"].items()} == CATEGORIES
    assert predictions(second) == predictions(first)


@pytest.mark.slow
def test_resumes_an_unfinished_run(ckpt, jsonl_dataset, jsonl_run, tmp_path):
    finished = json.loads(jsonl_run.read_text(encoding="utf-8"))[0]
    unfinished = json.loads(json.dumps(finished))
    unfinished["complete"] = False
    del unfinished["subjects"]["civil_servant"]
    # A marker that only survives if the subject is taken from the file rather than computed again.
    unfinished["subjects"]["computer_network"].update(correct=5, accuracy=1.0, predictions="BBCDB")
    output = tmp_path / "resume.json"
    output.write_text(json.dumps([unfinished]), encoding="utf-8")
    result = run_ceval(ckpt, jsonl_dataset, output)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 subject(s) already done" in result.stdout
    (record,) = json.loads(output.read_text(encoding="utf-8"))
    assert record["complete"] and list(record["subjects"]) == list(finished["subjects"])
    assert record["subjects"]["computer_network"]["predictions"] == "BBCDB"
    assert record["subjects"]["civil_servant"] == finished["subjects"]["civil_servant"]


def test_generation_is_capped_to_fit_max_seq_len(ckpt):
    tokenizer = ChatGLM2Tokenizer.from_pretrained(ckpt)
    questions = [question_text(q, options) for q, options, _ in SUBJECTS[0][2][:2]]
    longest = max(len(tokenizer.encode(tokenizer.build_prompt(q))) for q in questions)
    suffix = len(tokenizer.encode("\n" + EXTRACTION_PROMPT, add_special_tokens=False))
    model = ChatGLM2ForCausalLM.from_pretrained(ckpt, device="cpu", dtype=torch.float32,
                                                max_seq_len=longest + suffix + 5)
    answers, budget = answer_questions(Engine(model, 2), tokenizer, questions, max_new_tokens=512, batch=2)
    assert budget == 5 and len(answers) == 2
    model.max_seq_len = longest + suffix
    with pytest.raises(InputError, match="no room to answer"):
        answer_questions(Engine(model, 2), tokenizer, questions, max_new_tokens=512, batch=2)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


GOOD_LINE = json.dumps({"inputs_pretokenized": "1+1=?\nA. 1\nB. 2\nC. 3\nD. 4", "label": 1})
CSV_HEADER = "id,question,A,B,C,D,answer\n"


@pytest.mark.parametrize("name, text, where", [
    ("val/STEM/logic.jsonl", GOOD_LINE + "\n{not json\n", "line 2"),
    ("val/STEM/logic.jsonl", GOOD_LINE + "\n" + json.dumps({"inputs_pretokenized": "q", "label": 4}) + "\n", "line 2"),
    ("val/STEM/logic.jsonl", GOOD_LINE + "\n\n" + json.dumps({"label": 0}) + "\n", "line 3"),
    ("val/logic_val.csv", CSV_HEADER + "0,q,a,b,c,d,A\n1,q,a,b,c,d,E\n", "line 3"),
    ("val/logic_val.csv", CSV_HEADER + '0,"two\nlines",a,b,c,d,B\n1,q,a,b,c\n', "line 4"),
    ("val/logic_val.csv", "id,question,A,B,C,answer\n0,q,a,b,c,A\n", "line 1"),
])
def test_bad_lines_name_file_and_line(tmp_path, name, text, where):
    file = write(tmp_path / name, text)
    with pytest.raises(InputError, match=f"{file}.* {where}"):
        load_dataset(tmp_path)
    if "line 1" in where and file.suffix == ".csv":
        return  # a header without the columns is never skippable
    layout, subjects = load_dataset(tmp_path, skip_bad_lines=True)
    assert layout == file.suffix[1:] and len(subjects[0].questions) == 1 and subjects[0].skipped_lines == 1


def test_missing_or_empty_dataset(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "val").mkdir()
    write(tmp_path / "val" / "notes.txt", "no questions here")
    with pytest.raises(InputError, match="holds no"):
        load_dataset(tmp_path)


@pytest.mark.slow
def test_bad_line_stops_the_run_before_writing(ckpt, tmp_path):
    dataset = write_jsonl_dataset(tmp_path / "CEval")
    write(dataset / "val" / "Other" / "civil_servant.jsonl", GOOD_LINE + "\n" + GOOD_LINE.replace("1}", "7}") + "\n")
    output = tmp_path / "out.json"
    result = run_ceval(ckpt, dataset, output)
    assert result.returncode == 2 and "civil_servant.jsonl line 2: label 7" in result.stderr
    assert not output.exists() and not output.with_suffix(".csv").exists()


@pytest.mark.slow
def test_tensor_parallel_gives_the_same_predictions(ckpt, jsonl_dataset, jsonl_run, tmp_path):
    split = tmp_path / "ckpt"  # a copy: the parts go inside the checkpoint, as process_weights.py puts them
    shutil.copytree(ckpt, split)
    write_tp_parts(split, 2, show_progress=False)
    launcher = tuple(torchrun_args(2))
    output = tmp_path / "tp.json"
    result = run_ceval(split, jsonl_dataset, output, 8, "--tp_size", "2", launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("C-Eval val accuracy") == 1  # rank 0 alone reports
    (record,) = json.loads(output.read_text(encoding="utf-8"))
    assert record["complete"] and record["tp_size"] == 2
    assert predictions(record) == predictions(json.loads(jsonl_run.read_text(encoding="utf-8"))[-1])
