"""C-Eval accuracy on the val split (--mode precision_dataset), with the protocol of THUDM's evaluate_ceval.py.

For each question, as THUDM's ChatGLM2-6B evaluation/evaluate_ceval.py (which the Ascend example copies) does:
  1. greedy generation of up to 512 new tokens on the chat prompt build_prompt(question);
  2. one forward pass on build_prompt(question + response + "\\n综上所述，ABCD中正确的选项是："); the prediction is the
     argmax of the last position's logits over the first token ids of "A", "B", "C" and "D".
ChatGLM3 and GLM-4 get the same two stages in their own chat format (question_ids).
Stage 1 streams a subject's questions through --batch engine rows (a finished answer's row takes the
next question); stage 2 scores them in batches of --batch, left padded. The dataset is either THUDM's processed jsonl release
(val/<Category>/<subject>.jsonl) or the official ceval-exam CSV release (val/<subject>_val.csv).

Results go to a JSON list of run records (--precision_output_file) and a CSV of the latest run beside it, rewritten
after every subject; a run whose last record is unfinished and has the same setup resumes from it.
"""
import csv
import fcntl
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from chatglm2 import collectives
from chatglm2.engine import Engine, SamplingParams
from chatglm2.atomic import write_text_atomic
from chatglm2.errors import InputError
from chatglm2.batch_encode import pad_left

CHOICES = "ABCD"
EXTRACTION_PROMPT = "综上所述，ABCD中正确的选项是："
MAX_NEW_TOKENS = 512
CSV_COLUMNS = ("id", "question", "A", "B", "C", "D", "answer")
TABLE_HEADER = "level,name,category,correct,total,accuracy"
LAYOUT_HELP = ("expected THUDM's processed release (DATASET/val/<Category>/<subject>.jsonl) or the official "
               "ceval-exam release (DATASET/val/<subject>_val.csv)")

# C-Eval's subject_mapping.json (hkust-nlp/ceval): the 52 subjects and their categories. That file gives
# clinical_medicine no category; C-Eval's leaderboard counts it under Other, and so does this table.
SUBJECT_CATEGORY = {
    **dict.fromkeys([
        "computer_network", "operating_system", "computer_architecture", "college_programming", "college_physics",
        "college_chemistry", "advanced_mathematics", "probability_and_statistics", "discrete_mathematics",
        "electrical_engineer", "metrology_engineer", "high_school_mathematics", "high_school_physics",
        "high_school_chemistry", "high_school_biology", "middle_school_mathematics", "middle_school_biology",
        "middle_school_physics", "middle_school_chemistry", "veterinary_medicine"], "STEM"),
    **dict.fromkeys([
        "college_economics", "business_administration", "marxism", "mao_zedong_thought", "education_science",
        "teacher_qualification", "high_school_politics", "high_school_geography", "middle_school_politics",
        "middle_school_geography"], "Social Science"),
    **dict.fromkeys([
        "modern_chinese_history", "ideological_and_moral_cultivation", "logic", "law",
        "chinese_language_and_literature", "art_studies", "professional_tour_guide", "legal_professional",
        "high_school_chinese", "high_school_history", "middle_school_history"], "Humanities"),
    **dict.fromkeys([
        "civil_servant", "sports_science", "plant_protection", "basic_medicine", "clinical_medicine",
        "urban_and_rural_planner", "accountant", "fire_engineer", "environmental_impact_assessment_engineer",
        "tax_accountant", "physician"], "Other"),
}


@dataclass
class Subject:
    name: str
    category: str
    file: Path
    questions: list[str]  # prompt text: the question, then "A. ..." to "D. ..." each on its own line
    labels: list[int]     # 0..3 for A..D
    skipped_lines: int


def bad_line(file: Path, line: int, reason: str, skip_bad_lines: bool) -> None:
    """Stop on a bad line (a score over silently fewer questions would mislead), or report it and go on."""
    message = f"{file} line {line}: {reason}"
    if not skip_bad_lines:
        raise InputError(f"{message}; fix it, or pass --skip_bad_lines to skip such lines")
    if collectives.is_rank0():
        print(f"warning: skipped {message}", file=sys.stderr, flush=True)


def parse_jsonl_line(line: str) -> tuple[str, int]:
    record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    text, label = record.get("inputs_pretokenized"), record.get("label")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("inputs_pretokenized is missing or empty")
    if type(label) is not int or not 0 <= label < len(CHOICES):  # not bool, not 1.0
        raise ValueError(f"label {label!r} is not 0, 1, 2 or 3")
    return text, label


def parse_csv_row(row: dict) -> tuple[str, int]:
    # DictReader fills a short row with None, so None means a missing field
    if any(row.get(column) is None for column in CSV_COLUMNS):
        raise ValueError(f"the row has fewer fields than the header's {len(CSV_COLUMNS)}")
    if not row["question"].strip():
        raise ValueError("question is empty")
    answer = row["answer"].strip()
    if len(answer) != 1 or answer not in CHOICES:
        raise ValueError(f"answer {row['answer']!r} is not A, B, C or D")
    # The same text as THUDM's inputs_pretokenized: the question, then one option per line.
    text = "\n".join([row["question"]] + [f"{letter}. {row[letter]}" for letter in CHOICES])
    return text, CHOICES.index(answer)


def read_jsonl(file: Path, skip_bad_lines: bool) -> tuple[list[tuple[str, int]], int]:
    items, skipped = [], 0
    with open(file, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                items.append(parse_jsonl_line(line))
            except ValueError as error:  # json.JSONDecodeError is a ValueError
                bad_line(file, number, str(error), skip_bad_lines)
                skipped += 1
    return items, skipped


def read_csv(file: Path, skip_bad_lines: bool) -> tuple[list[tuple[str, int]], int]:
    items, skipped = [], 0
    with open(file, encoding="utf-8-sig", newline="") as text:
        reader = csv.DictReader(text)
        missing = [column for column in CSV_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{file} line 1: the header lacks column(s) {', '.join(missing)}; "
                             f"expected {','.join(CSV_COLUMNS)}")
        start = reader.line_num + 1
        for row in reader:  # a quoted field may span lines: report the line its record starts on
            try:
                items.append(parse_csv_row(row))
            except ValueError as error:
                bad_line(file, start, str(error), skip_bad_lines)
                skipped += 1
            start = reader.line_num + 1
    return items, skipped


def load_dataset(root: str | Path, skip_bad_lines: bool = False) -> tuple[str, list[Subject]]:
    """The val split's subjects in file-name order, and the layout found ("jsonl" or "csv")."""
    val = Path(root) / "val"
    if not val.is_dir():
        raise InputError(f"{val} does not exist; {LAYOUT_HELP}")
    jsonl_files, csv_files = sorted(val.rglob("*.jsonl")), sorted(val.glob("*_val.csv"))
    # Where both are present, the jsonl files win: they are what the reference reads.
    layout, files = ("jsonl", jsonl_files) if jsonl_files else ("csv", csv_files)
    if not files:
        raise InputError(f"{val} holds no *.jsonl or *_val.csv files; {LAYOUT_HELP}")
    subjects = {}
    for file in files:
        try:
            # Subjects outside the official 52 take their jsonl folder as category, else Other.
            if layout == "jsonl":
                name, folder = file.stem, (file.parent.name.replace("_", " ") if file.parent != val else "Other")
                items, skipped = read_jsonl(file, skip_bad_lines)
            else:
                name, folder = file.name.removesuffix("_val.csv"), "Other"
                items, skipped = read_csv(file, skip_bad_lines)
        except (UnicodeDecodeError, csv.Error) as error:
            raise InputError(f"{file} cannot be read as UTF-8 {layout}: {error}") from None
        if name in subjects:
            raise InputError(f"{file} and {subjects[name].file} are both subject {name}; keep one")
        if items:  # an empty file has nothing to score
            subjects[name] = Subject(name, SUBJECT_CATEGORY.get(name, folder), file, [q for q, _ in items],
                                     [label for _, label in items], skipped)
    if not subjects:
        raise InputError(f"the files under {val} hold no questions")
    return layout, list(subjects.values())


def choice_token_ids(tokenizer) -> list[int]:
    """As THUDM: the first token of each letter encoded on its own."""
    return [tokenizer.encode(letter, add_special_tokens=False)[0] for letter in CHOICES]


def question_ids(tokenizer, text: str) -> list[int]:
    """A C-Eval prompt in the model's chat format: THUDM's evaluate_ceval.py builds ChatGLM2's `[Round 1]` prompt.
    ChatGLM3 and GLM-4 get the text as the user's message and the assistant's header line (its empty metadata and
    newline, as their chat encodes an answer), so that the next token begins the answer as in ChatGLM2's prompt."""
    if tokenizer.chat_family == "chatglm2":
        return tokenizer.encode(tokenizer.build_prompt(text))
    return tokenizer.build_chat_input([{"role": "user", "content": text}]) + \
        tokenizer.encode("\n", add_special_tokens=False)


def suffix_len(tokenizer) -> int:
    """Tokens that stage 2 adds after the answer: MAX_SEQ_LEN must keep room for them."""
    return len(tokenizer.encode("\n" + EXTRACTION_PROMPT, add_special_tokens=False))


def stage1_budget(prompt_len: int, suffix: int, max_new_tokens: int, max_seq_len: int) -> int:
    """New tokens stage 1 may generate after a prompt of prompt_len tokens, keeping room for the stage-2 suffix;
    InputError when none is left."""
    budget = min(max_new_tokens, max_seq_len - prompt_len - suffix)
    if budget < 1:
        raise InputError(f"a question of {prompt_len} tokens leaves no room to answer under MAX_SEQ_LEN={max_seq_len}; "
                         f"export MAX_SEQ_LEN={prompt_len + suffix + max_new_tokens}")
    return budget


def answer_questions(engine: Engine, tokenizer, questions: list[str], max_new_tokens: int, batch: int,
                     progress: Callable[[int], None] = lambda done: None) -> tuple[list[int], int]:
    """The two-stage protocol on a subject's questions: predicted choice indices, and the smallest stage-1 budget.

    Stage 1 streams the questions through the engine's rows (a finished answer's row takes the next question, so
    nothing waits for the longest answer of a batch); progress(n) is told of each n answers finished. Stage 2 scores
    in batches of `batch`, left-padded.
    """
    model = engine.model
    suffix = suffix_len(tokenizer)
    requests, smallest = [], max_new_tokens
    for question in questions:
        prompt_ids = question_ids(tokenizer, question)
        budget = stage1_budget(len(prompt_ids), suffix, max_new_tokens, model.max_seq_len)
        smallest = min(smallest, budget)
        requests.append(engine.submit(prompt_ids, SamplingParams(max_new_tokens=budget,
                                                                 stop_token_ids=tokenizer.chat_stop_ids)))
    pending = list(requests)
    while pending:
        engine.step()
        still = [r for r in pending if not r.finished]
        progress(len(pending) - len(still))
        pending = still
    responses = [tokenizer.decode(r.tokens) for r in requests]
    predictions = []
    for start in range(0, len(questions), batch):
        # THUDM wraps question + response + extraction prompt in a fresh chat prompt (not the stage-1 prompt + response).
        inputs = pad_left([question_ids(tokenizer, f"{question}{response}\n{EXTRACTION_PROMPT}")
                           for question, response in zip(questions[start:start + batch], responses[start:start + batch])],
                          tokenizer.pad_token_id)
        logits = model(**inputs, last_logit_only=True)[:, -1, choice_token_ids(tokenizer)]
        predictions += logits.argmax(dim=-1).tolist()
    return predictions, smallest


def score(correct: int, total: int) -> dict:
    return {"correct": correct, "total": total, "accuracy": correct / total}


def summarize(record: dict) -> None:
    """Per-category and overall (micro average: every question counts once) scores from the subjects done."""
    categories = {}
    for result in record["subjects"].values():
        correct, total = categories.get(result["category"], (0, 0))
        categories[result["category"]] = (correct + result["correct"], total + result["total"])
    record["categories"] = {name: score(*counts) for name, counts in categories.items()}
    record["overall"] = score(sum(c for c, _ in categories.values()), sum(t for _, t in categories.values()))


def table_rows(record: dict) -> list[tuple[str, str, str, int, int, float]]:
    """(level, name, category, correct, total, accuracy) for each subject, category and the overall score."""
    rows = [("subject", name, r["category"], r["correct"], r["total"], r["accuracy"])
            for name, r in record["subjects"].items()]
    rows += [("category", name, name, r["correct"], r["total"], r["accuracy"])
             for name, r in record["categories"].items()]
    overall = record["overall"]
    return rows + [("overall", "all", "", overall["correct"], overall["total"], overall["accuracy"])]


def write_results(path: Path, records: list[dict]) -> None:
    """The JSON list of runs, and the latest run as CSV (same stem); both replaced atomically."""
    write_text_atomic(path, json.dumps(records, ensure_ascii=False, indent=1) + "\n")
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(TABLE_HEADER.split(","))
    writer.writerows(row[:5] + (f"{row[5]:.4f}",) for row in table_rows(records[-1]))
    write_text_atomic(path.with_suffix(".csv"), text.getvalue())


def print_table(record: dict) -> None:
    print(f"\n{'':9}{'name':42}{'category':16}{'correct':>8}{'total':>7}{'accuracy':>10}")
    for level, name, category, correct, total, accuracy in table_rows(record):
        print(f"{level:9}{name:42}{category:16}{correct:8}{total:7}{accuracy:10.2%}")
    print(flush=True)


def output_problem(path: Path) -> str | None:
    """Why the results or the table beside them must not be written, or None: the same file for both, a folder, or a
    table that this tool did not write (it would be replaced)."""
    table = path.with_suffix(".csv")
    if table == path:
        return (f"--precision_output_file {path} ends in .csv, the name of the table written beside it; "
                f"give a .json name")
    for file in (path, table):
        if file.exists() and not file.is_file():
            return f"{file} exists and is not a file; pass another --precision_output_file"
    if table.exists():
        with open(table, encoding="utf-8", errors="replace") as f:
            if f.readline().rstrip("\n") != TABLE_HEADER:
                return (f"{table} exists and is not a C-Eval table written by this tool, and the table of this run "
                        f"would replace it; move it away or pass another --precision_output_file")
    return None


_held_locks: dict[Path, int] = {}  # lock file -> descriptor, held until the process ends


def lock_output(path: Path) -> str | None:
    """Lock .{name}.lock beside the results (flock: released when the process ends, however it ends), so that a
    second run on the same file stops instead of overwriting the first one's records; None, or why not."""
    lock = path.parent / f".{path.name}.lock"
    if lock.resolve() in _held_locks:  # this process holds it already (a second run through the Python API)
        return None
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return (f"another run is writing {path} (it holds {lock}); wait for it to finish, or pass another "
                f"--precision_output_file")
    _held_locks[lock.resolve()] = fd
    return None


def claim_output(path: Path) -> None:
    """Rank 0 checks the output files and locks them; every rank learns the verdict, so that all stop together."""
    problem = (output_problem(path) or lock_output(path)) if collectives.is_rank0() else None
    problem = collectives.broadcast_object(problem)
    if problem:
        raise InputError(problem)


def load_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise InputError(f"{path} is not JSON ({error}); move it away or pass another --precision_output_file"
                         ) from None
    if not isinstance(records, list) or not all(isinstance(r, dict) and "setup" in r for r in records):
        raise InputError(f"{path} is not a list of C-Eval run records written by this tool; "
                         f"move it away or pass another --precision_output_file")
    return records


@dataclass
class Evaluation:
    """A C-Eval run's inputs, all checked before the model loads."""
    dataset: Path
    layout: str
    subjects: list[Subject]
    output: Path  # claimed: checked and locked
    records: list[dict]  # the runs already in it
    max_new_tokens: int


def prepare_evaluation(tokenizer, dataset: str | Path, output_file: str | Path, max_seq_len: int,
                       skip_bad_lines: bool = False, max_new_tokens: int = MAX_NEW_TOKENS) -> Evaluation:
    """Read the dataset, claim the output files, read their records and check that the longest question leaves room
    to answer under max_seq_len: each can be refused in seconds, before the model loads (minutes). max_new_tokens
    below the protocol's 512 is for quick checks only."""
    layout, subjects = load_dataset(dataset, skip_bad_lines)
    output = Path(output_file)
    claim_output(output)
    # Every rank reads the file, so all take the same resume decision; rank 0 rewrites it only after a subject's
    # collectives, which the other ranks join after this read.
    records = load_records(output)
    longest = max(len(question_ids(tokenizer, q)) for s in subjects for q in s.questions)
    stage1_budget(longest, suffix_len(tokenizer), max_new_tokens, max_seq_len)
    return Evaluation(Path(dataset), layout, subjects, output, records, max_new_tokens)


def run_precision_dataset(model, tokenizer, evaluation: Evaluation, batch: int, model_path: str,
                          tp_size: int = 1) -> dict:
    """Evaluate every val subject not already done, writing results to the output file after each; returns the run's
    record."""
    rank0 = collectives.is_rank0()
    dataset, layout, subjects, output = evaluation.dataset, evaluation.layout, evaluation.subjects, evaluation.output
    records, max_new_tokens = evaluation.records, evaluation.max_new_tokens
    setup = {"dataset": str(dataset.resolve()), "layout": layout,
             "model_path": str(Path(model_path).resolve()), "dtype": str(model.dtype).removeprefix("torch."),
             "max_new_tokens": max_new_tokens, "max_seq_len": model.max_seq_len}
    if records and records[-1]["setup"] == setup and not records[-1].get("complete"):
        record = records[-1]
    else:
        record = {"setup": setup, "complete": False, "subjects": {}}
        records.append(record)
    record.update(batch=batch, tp_size=tp_size)
    results = {s.name: record["subjects"][s.name] for s in subjects
               if record["subjects"].get(s.name, {}).get("total") == len(s.questions)}
    todo = [s for s in subjects if s.name not in results]
    if rank0:
        print(f"C-Eval val ({layout}): {len(subjects)} subjects, {sum(len(s.questions) for s in subjects)} questions"
              + (f"; resuming {output}: {len(results)} subject(s) already done" if results else ""), flush=True)

    def save() -> None:
        record["subjects"] = {s.name: results[s.name] for s in subjects if s.name in results}
        record["complete"] = len(results) == len(subjects)
        summarize(record)
        if rank0:
            write_results(output, records)

    correct_so_far = sum(r["correct"] for r in results.values())
    total_so_far = sum(r["total"] for r in results.values())
    bar = tqdm(total=sum(len(s.questions) for s in todo), desc="C-Eval", unit="q", disable=not rank0)
    engine = Engine(model, batch)
    capped = False
    for subject in todo:
        predictions, budget = answer_questions(engine, tokenizer, subject.questions, max_new_tokens, batch, bar.update)
        if budget < max_new_tokens and not capped and rank0:
            capped = True
            tqdm.write(f"warning: MAX_SEQ_LEN={model.max_seq_len} cuts generation to {budget} < {max_new_tokens} "
                       f"tokens for the longest questions; raise MAX_SEQ_LEN for the protocol")
        correct_so_far += sum(p == label for p, label in zip(predictions, subject.labels))
        total_so_far += len(predictions)
        bar.set_postfix(acc=f"{correct_so_far / total_so_far:.2%}")
        correct = sum(p == label for p, label in zip(predictions, subject.labels))
        results[subject.name] = {
            "category": subject.category, "file": str(subject.file.relative_to(dataset)),
            **score(correct, len(predictions)), "skipped_lines": subject.skipped_lines,
            "predictions": "".join(CHOICES[p] for p in predictions)}  # one letter per question, in file order
        if rank0:
            tqdm.write(f"{subject.name}: {correct}/{len(predictions)} = {correct / len(predictions):.2%}")
        save()  # after every subject, so that an interrupted run resumes from here
    bar.close()
    if not todo:  # an unfinished record whose subjects are all done: finish it
        save()
    if rank0:
        print_table(record)
        overall = record["overall"]
        print(f"C-Eval val accuracy: {overall['accuracy']:.2%} ({overall['correct']}/{overall['total']}); "
              f"results in {output} and {output.with_suffix('.csv')}", flush=True)
    return record
