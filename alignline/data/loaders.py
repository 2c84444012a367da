"""Load real data (local files or hub datasets), map columns/roles, and validate before anything trains.

    from alignline.data.loaders import LoaderConfig, load_records
    recs = load_records(LoaderConfig(path="../shared/data/sft/alpaca_en_demo.json", kind="sft"))
    recs = load_records(LoaderConfig(path="c4_demo.jsonl", kind="pretrain"))
    recs = load_records(LoaderConfig(path="Anthropic/hh-rlhf", kind="preference", format="hh"))  # hub
    alignline data validate FILE --kind sft [--format alpaca]               # validate, print a summary

Inputs: `.txt` (one document per line / paragraph / file), `.jsonl`, `.json` (a top-level array),
`.parquet`, a directory of those, or a `datasets` hub id (streamed for pretraining if asked).
Formats: `alpaca` (instruction/input/output; user turn = instruction + "\\n" + input when input is
non-empty), `sharegpt` (`conversations` of from/value; `chosen`/`rejected` objects), `hh` (HH-RLHF
transcripts "\\n\\nHuman: ...\\n\\nAssistant: ..."), `messages` (TRL conversational), `text`, or `auto`
(decided from the first record's keys, then enforced for every record).
Outputs have the built-in suite's record shapes (alignline.data.tasks):
    pretrain   {"text"}                 sft      {"messages"}
    preference {"prompt", "chosen", "rejected"}  (lists of messages)
    prompts    {"prompt", "task"} plus {"answer", "match"} where a verifier exists
    kto        {"prompt", "completion", "label"}  (one answer marked good (true) or bad (false): KTO)

Validation collects EVERY problem (invalid JSON, non-UTF-8 bytes, missing/empty fields, unknown roles,
empty dataset, chosen == rejected, prompts over `max_prompt_length`) and raises one `DataValidationError`
listing them as `file:line: message`. Loading returns records in memory and writes nothing, so a failed
load leaves no partial output behind.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from alignline.config import StrictModel, UserError

Kind = Literal["pretrain", "sft", "preference", "prompts", "kto"]
Format = Literal["auto", "alpaca", "sharegpt", "hh", "messages", "text"]
FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
MAX_LISTED = 200  # problems shown in the exception message; all are kept on `.problems`


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}" if self.line else f"{self.file}: {self.message}"


class DataValidationError(UserError, ValueError):
    """Every problem found in a dataset, one `file:line: message` per line."""

    def __init__(self, problems: list[Problem], what: str = "dataset"):
        self.problems = list(problems)
        shown = "\n".join(f"  {p}" for p in self.problems[:MAX_LISTED])
        more = len(self.problems) - MAX_LISTED
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(
            f"{what} failed validation with {len(self.problems)} problem(s); fix them and re-run:\n{shown}{tail}"
        )


# --------------------------------------------------------------------------- config


class Columns(StrictModel):
    """Where each field lives in the source records (rename for datasets with other column names)."""

    text: str = Field("text", description="text column (format text; HH transcript when there is no chosen)")
    instruction: str = Field("instruction", description="Alpaca instruction column (the user turn)")
    input: str = Field(
        "input", description="Alpaca optional input column, appended to the instruction on a new line"
    )
    output: str = Field(
        "output", description="Alpaca response column (the assistant turn; the gold answer of prompts)"
    )
    system: str = Field("system", description="optional system prompt column (Alpaca, ShareGPT)")
    messages: str = Field("messages", description="TRL conversational messages column (format messages)")
    conversations: str = Field(
        "conversations", description="ShareGPT conversation column (list of role/content objects)"
    )
    prompt: str = Field(
        "prompt", description="prompt column (format messages: preference, prompts, or prompt/completion SFT)"
    )
    chosen: str = Field("chosen", description="preferred answer column (preference data; HH transcript)")
    rejected: str = Field(
        "rejected", description="dispreferred answer column (preference data; HH transcript)"
    )
    answer: str = Field("answer", description="gold answer column of prompts records")
    task: str = Field("task", description="task name column of prompts records (default: default_task)")
    match: str = Field(
        "match", description="gold scorer column of prompts records: exact | numeric | module:callable")
    role_key: str = Field("from", description="ShareGPT message role key")
    content_key: str = Field("value", description="ShareGPT message content key")


DEFAULT_ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}


class LoaderConfig(StrictModel):
    """One dataset source and how to read it."""

    path: str = Field(description="local file/dir, or a `datasets` hub id when no such local path exists")
    kind: Kind
    format: Format = "auto"
    columns: Columns = Field(default_factory=Columns)
    roles: dict[str, Literal["system", "user", "assistant"]] = Field(default_factory=lambda: dict(DEFAULT_ROLES))
    text_unit: Literal["line", "paragraph", "file"] = Field(
        "line", description=".txt documents: one per line, per blank-line-separated paragraph, or per file"
    )
    hub: bool | None = Field(None, description="None: hub id iff the path does not exist locally")
    hub_name: str | None = Field(None, description="dataset config name for load_dataset")
    split: str = "train"
    streaming: bool = False
    limit: int | None = Field(None, gt=0, description="keep at most this many valid records")
    max_prompt_length: int | None = Field(None, gt=0, description="prompt length cap (see length_unit)")
    length_unit: Literal["tokens", "chars"] = "tokens"
    on_too_long: Literal["drop", "error"] = "drop"
    default_task: str = "custom"
    default_match: str = Field(
        "exact", description="prompts records' scorer when the record has no `match`: exact | numeric | "
        "module:callable (a function (response, answer) -> float in [0, 1])")


# --------------------------------------------------------------------------- raw reading


@dataclass
class Raw:
    file: str
    line: int
    obj: Any  # dict for JSON-ish sources, str for .txt


def _decode_lines(path: Path, problems: list[Problem]) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line; a line with non-UTF-8 bytes is reported and skipped."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                problems.append(Problem(str(path), n, f"not valid UTF-8 (byte {raw[exc.start]:#04x} at column "
                                        f"{exc.start + 1}); re-encode the file as UTF-8"))


def _read_txt(path: Path, unit: str, problems: list[Problem]) -> Iterator[Raw]:
    lines = list(_decode_lines(path, problems))
    if unit == "line":
        for n, text in lines:
            text = text.rstrip("\r\n")
            if text.strip():
                yield Raw(str(path), n, text)
        return
    if unit == "file":
        text = "".join(t for _, t in lines)
        if text.strip():
            yield Raw(str(path), 1, text)
        return
    start, buf = None, []
    for n, text in [*lines, (len(lines) + 1, "\n")]:
        if text.strip():
            start = start or n
            buf.append(text)
        elif buf:
            yield Raw(str(path), start, "".join(buf).rstrip("\r\n"))
            start, buf = None, []


def _read_jsonl(path: Path, problems: list[Problem]) -> Iterator[Raw]:
    for n, text in _decode_lines(path, problems):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append(Problem(str(path), n, f"invalid JSON: {exc.msg} at column {exc.colno}"))
            continue
        yield Raw(str(path), n, obj)


def _read_json(path: Path, problems: list[Problem]) -> Iterator[Raw]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        # Keep reporting every bad line, like the line-based readers do.
        line = data.count(b"\n", 0, exc.start) + 1
        problems.append(Problem(str(path), line, "not valid UTF-8; re-encode the file as UTF-8"))
        for n, raw in enumerate(data.split(b"\n"), start=1):
            if n != line:
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    problems.append(Problem(str(path), n, "not valid UTF-8; re-encode the file as UTF-8"))
        return
    dec = json.JSONDecoder()
    i = len(text) - len(text.lstrip())
    if not text.startswith("[", i):
        # A single object or JSON lines saved as .json: fall back to reporting, not guessing.
        problems.append(Problem(str(path), text.count("\n", 0, i) + 1,
                                "expected a JSON array of records ([{...}, ...]); use .jsonl for one record per line"))
        return
    i += 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text):
            problems.append(Problem(str(path), text.count("\n") + 1, "invalid JSON: unterminated array (missing ']')"))
            return
        if text[i] == "]":
            return
        line = text.count("\n", 0, i) + 1
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            problems.append(Problem(str(path), exc.lineno, f"invalid JSON: {exc.msg} at column {exc.colno}"))
            return  # the rest of an array cannot be re-synchronised reliably
        yield Raw(str(path), line, obj)
        i = end


def _read_parquet(path: Path, problems: list[Problem]) -> Iterator[Raw]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types; all mean "not a readable parquet file"
        problems.append(Problem(str(path), None, f"cannot read parquet: {exc}"))
        return
    for n, row in enumerate(table.to_pylist(), start=1):
        yield Raw(str(path), n, row)  # "line" is the 1-based row number


def _local_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
        if not files:
            raise DataValidationError([Problem(str(path), None, f"no {'/'.join(FILE_SUFFIXES)} files in directory")])
        return files
    if path.suffix not in FILE_SUFFIXES:
        raise DataValidationError(
            [Problem(str(path), None, f"unsupported file type {path.suffix!r}; use one of {FILE_SUFFIXES}")]
        )
    return [path]


def local_source(cfg: LoaderConfig) -> Path | None:
    """The local file/dir `cfg` reads, or None for a hub dataset (its id and split are in the config)."""
    path = Path(cfg.path).expanduser()  # as read_raw reads it
    use_hub = cfg.hub if cfg.hub is not None else not path.exists()
    return None if use_hub else path


def looks_local(path: str) -> bool:
    """A path meant as a local file: ./ ../ / ~ prefix, a data file extension, or a first component
    that exists here. Hub ids (`owner/name`) have none of these; a typo in a local path must not be
    sent to the hub (that costs a minute of offline retries before the error)."""
    if path.startswith(("./", "../", "/", "~", ".\\")) or path in (".", ".."):
        return True
    if Path(path).suffix.lower() in FILE_SUFFIXES + (".csv", ".gz", ".zst", ".arrow"):
        return True
    first = Path(path).parts[0] if Path(path).parts else ""
    return bool(first) and Path(first).exists()


def read_raw(cfg: LoaderConfig, problems: list[Problem]) -> Iterator[Raw]:
    path = Path(cfg.path).expanduser()
    if cfg.hub is None and not path.exists() and looks_local(cfg.path):
        raise DataValidationError([Problem(cfg.path, None, "file does not exist (a local path; for a hub "
                                           "dataset id set `hub: true`); check the path")])
    use_hub = cfg.hub if cfg.hub is not None else not path.exists()
    if not use_hub:
        if not path.exists():
            raise DataValidationError([Problem(cfg.path, None, "file does not exist")])
        for f in _local_files(path):
            if f.suffix == ".txt":
                yield from _read_txt(f, cfg.text_unit, problems)
            elif f.suffix == ".jsonl":
                yield from _read_jsonl(f, problems)
            elif f.suffix == ".json":
                yield from _read_json(f, problems)
            else:
                yield from _read_parquet(f, problems)
        return
    from datasets import load_dataset  # heavy; only for hub ids

    name = f"hf:{cfg.path}[{cfg.split}]"
    try:
        ds = load_dataset(cfg.path, cfg.hub_name, split=cfg.split, streaming=cfg.streaming)
    except Exception as exc:  # network, missing dataset, bad config name: report as a data problem
        raise DataValidationError(
            [Problem(name, None, f"cannot load hub dataset ({type(exc).__name__}: {exc}); "
                     "check the id, or pass a local path that exists")]
        ) from exc
    for n, row in enumerate(ds, start=1):
        yield Raw(name, n, row)


# --------------------------------------------------------------------------- conversion


class _Bad(Exception):
    """One record-level problem (converted into a Problem with file and line)."""


def _field(obj: dict, key: str, *, required: bool = True, kind: type = str) -> Any:
    if key not in obj or obj[key] is None:
        if required:
            raise _Bad(f"missing field {key!r}")
        return None
    value = obj[key]
    if not isinstance(value, kind):
        raise _Bad(f"field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    if required and kind is str and not value.strip():
        raise _Bad(f"field {key!r} is empty")
    if required and kind is list and not value:
        raise _Bad(f"field {key!r} is an empty list")
    return value


def _msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


class Converter:
    def __init__(self, cfg: LoaderConfig):
        self.cfg, self.c = cfg, cfg.columns
        # KTO records are read as SFT chats, then split into prompt and labelled answer.
        self._as_sft = Converter(cfg.model_copy(update={"kind": "sft"})) if cfg.kind == "kto" else None

    def role(self, name: Any) -> str:
        if not isinstance(name, str) or name not in self.cfg.roles:
            raise _Bad(f"unknown role {name!r}; known roles: {sorted(self.cfg.roles)} (map it in `roles`)")
        return self.cfg.roles[name]

    def messages(self, value: Any, key: str, role_key: str = "role", content_key: str = "content") -> list[dict]:
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list) or not value:
            raise _Bad(f"field {key!r} must be a non-empty list of messages")
        out = []
        for i, m in enumerate(value):
            if not isinstance(m, dict):
                raise _Bad(f"{key}[{i}] must be an object with {role_key!r} and {content_key!r}")
            if role_key not in m:
                raise _Bad(f"{key}[{i}] has no {role_key!r}")
            content = m.get(content_key)
            if not isinstance(content, str) or not content.strip():
                raise _Bad(f"{key}[{i}] has a missing or empty {content_key!r}")
            out.append(_msg(self.role(m[role_key]), content))
        return out

    # ---- format detection
    def detect(self, obj: Any) -> str:
        c = self.c
        if isinstance(obj, str):
            return "text"
        if not isinstance(obj, dict):
            raise _Bad(f"record must be a JSON object, got {type(obj).__name__}")
        if c.conversations in obj:
            return "sharegpt"
        if c.instruction in obj:
            return "alpaca"
        if c.messages in obj or c.prompt in obj:
            return "messages"
        chosen = obj.get(c.chosen)
        if isinstance(chosen, str) and "\n\nHuman:" in chosen:
            return "hh"
        if c.text in obj:
            return "hh" if self.cfg.kind != "pretrain" and "\n\nHuman:" in str(obj[c.text]) else "text"
        raise _Bad(f"cannot tell the format from keys {sorted(obj)}; set `format` (alpaca, sharegpt, hh, messages, text)")

    # ---- per format
    def convert(self, fmt: str, obj: Any) -> dict:
        if isinstance(obj, str):
            if fmt != "text" or self.cfg.kind != "pretrain":
                raise _Bad(f"plain text lines can only be pretraining data (kind=pretrain, format=text), "
                           f"not kind={self.cfg.kind} format={fmt}")
            return {"text": obj}
        if not isinstance(obj, dict):
            raise _Bad(f"record must be a JSON object, got {type(obj).__name__}")
        tag = next((k for k in ("label", "kto_tag") if isinstance(obj.get(k), bool)), None)
        if self.cfg.kind == "kto":
            return self._kto(fmt, obj, tag)
        if tag and self.cfg.kind in ("sft", "preference"):
            # KTO-style data: one answer marked good or bad. Read as SFT it would train on the bad ones too.
            raise _Bad(f"`{tag}` marks this answer good or bad: unpaired labelled (KTO) data, which kind="
                       f"{self.cfg.kind} cannot use (it would ignore the label and learn the bad answers too). "
                       f"For SFT keep only the {tag}=true records and drop the field; for preference data pair "
                       "a good and a bad answer to the same prompt as chosen/rejected")
        return getattr(self, f"_{fmt}")(obj)

    def _kto(self, fmt: str, obj: dict, tag: str | None) -> dict:
        """Unpaired labelled data (TRL's prompt/completion/label, or a chat with LLaMA-Factory's
        kto_tag): read as one SFT chat whose last turn is the labelled answer."""
        if tag is None:
            raise _Bad("a KTO record needs a boolean `label` (TRL layout) or `kto_tag` (LLaMA-Factory): true for a "
                       "good answer, false for a bad one")
        messages = getattr(self._as_sft, f"_{fmt}")({k: v for k, v in obj.items() if k not in ("label", "kto_tag")})
        messages = messages["messages"]
        return {"prompt": messages[:-1], "completion": messages[-1:], "label": obj[tag]}

    def _text(self, obj: dict) -> dict:
        if self.cfg.kind != "pretrain":
            raise _Bad(f"format 'text' only makes pretraining data, not kind={self.cfg.kind}")
        return {"text": _field(obj, self.c.text)}

    def _alpaca(self, obj: dict) -> dict:
        c, kind = self.c, self.cfg.kind
        user = _field(obj, c.instruction)
        extra = _field(obj, c.input, required=False)
        if extra and extra.strip():
            user = user + "\n" + extra
        prompt = [_msg("user", user)]
        system = _field(obj, c.system, required=False)
        if system and system.strip():
            prompt.insert(0, _msg("system", system))
        if kind == "pretrain":
            return {"text": user + "\n" + _field(obj, c.output)}
        if kind == "sft":
            return {"messages": prompt + [_msg("assistant", _field(obj, c.output))]}
        if kind == "preference":
            return self._pair(prompt, [_msg("assistant", _field(obj, c.chosen))],
                              [_msg("assistant", _field(obj, c.rejected))])
        return self._prompt_record(prompt, obj, answer_key=c.output)

    def _sharegpt(self, obj: dict) -> dict:
        c, kind = self.c, self.cfg.kind
        conv = self.messages(_field(obj, c.conversations, kind=list), c.conversations, c.role_key, c.content_key)
        system = _field(obj, c.system, required=False)
        if system and system.strip():
            conv.insert(0, _msg("system", system))
        if kind == "pretrain":
            return {"text": "\n".join(m["content"] for m in conv)}
        if kind == "sft":
            if conv[-1]["role"] == "user" and obj.get(c.chosen) is not None:
                # A preference record used for SFT: train on the chosen answer.
                conv = conv + self.messages(obj[c.chosen], c.chosen, c.role_key, c.content_key)
            self._check_sft(conv)
            return {"messages": conv}
        if kind == "preference":
            chosen = self.messages(obj.get(c.chosen), c.chosen, c.role_key, c.content_key)
            rejected = self.messages(obj.get(c.rejected), c.rejected, c.role_key, c.content_key)
            return self._pair(conv, chosen, rejected)
        return self._prompt_record(conv, obj)

    def _messages(self, obj: dict) -> dict:
        c, kind = self.c, self.cfg.kind

        def conv(key: str, default_role: str) -> list[dict]:
            value = obj.get(key)
            if isinstance(value, str):  # TRL's standard (non-conversational) form
                if not value.strip():
                    raise _Bad(f"field {key!r} is empty")
                return [_msg(default_role, value)]
            if value is None:
                raise _Bad(f"missing field {key!r}")
            return self.messages(value, key)

        if kind in ("sft", "pretrain"):
            if c.messages in obj:
                msgs = conv(c.messages, "user")
            else:  # prompt/completion pairs
                msgs = conv(c.prompt, "user") + conv("completion", "assistant")
            if kind == "pretrain":
                return {"text": "\n".join(m["content"] for m in msgs)}
            self._check_sft(msgs)
            return {"messages": msgs}
        if kind == "preference":
            return self._pair(conv(c.prompt, "user"), conv(c.chosen, "assistant"), conv(c.rejected, "assistant"))
        return self._prompt_record(conv(c.prompt, "user"), obj)

    _HH = re.compile(r"\n\n(Human|Assistant): ?")

    def parse_hh(self, text: Any, key: str) -> list[dict]:
        if not isinstance(text, str) or not text.strip():
            raise _Bad(f"missing or empty HH transcript in {key!r}")
        if not self._HH.match(text):
            raise _Bad(f"{key!r} is not an HH transcript: it must start with '\\n\\nHuman: '")
        parts = self._HH.split(text)[1:]
        out = []
        for speaker, content in zip(parts[0::2], parts[1::2]):
            content = content.strip()
            if not content:
                raise _Bad(f"{key!r} has an empty {speaker} turn")
            out.append(_msg("user" if speaker == "Human" else "assistant", content))
        return out

    def _hh(self, obj: dict) -> dict:
        c, kind = self.c, self.cfg.kind
        if kind == "preference":
            chosen = self.parse_hh(obj.get(c.chosen), c.chosen)
            rejected = self.parse_hh(obj.get(c.rejected), c.rejected)
            for name, conv in ((c.chosen, chosen), (c.rejected, rejected)):
                if conv[-1]["role"] != "assistant":
                    raise _Bad(f"{name!r} transcript must end with an Assistant turn")
            if chosen[:-1] != rejected[:-1]:
                raise _Bad("chosen and rejected transcripts have different conversations before the last answer")
            return self._pair(chosen[:-1], chosen[-1:], rejected[-1:])
        key = c.chosen if c.chosen in obj else c.text
        conv = self.parse_hh(obj.get(key), key)
        if kind == "pretrain":
            return {"text": "\n".join(m["content"] for m in conv)}
        if kind == "sft":
            self._check_sft(conv)
            return {"messages": conv}
        return self._prompt_record(conv[:-1] if conv[-1]["role"] == "assistant" else conv, obj)

    # ---- shared checks
    @staticmethod
    def _check_sft(msgs: list[dict]) -> None:
        if msgs[-1]["role"] != "assistant":
            raise _Bad("conversation must end with an assistant turn")
        if not any(m["role"] == "user" for m in msgs):
            raise _Bad("conversation has no user turn")

    @staticmethod
    def _pair(prompt: list[dict], chosen: list[dict], rejected: list[dict]) -> dict:
        if not prompt or prompt[-1]["role"] != "user":
            raise _Bad("prompt must end with a user turn")
        for name, side in (("chosen", chosen), ("rejected", rejected)):
            if [m["role"] for m in side] != ["assistant"] * len(side):
                raise _Bad(f"{name} must contain only assistant turns")
        if chosen == rejected:
            raise _Bad("chosen is identical to rejected; the pair teaches nothing, drop it")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    def _prompt_record(self, prompt: list[dict], obj: dict, answer_key: str | None = None) -> dict:
        """A prompt, with its gold answer and scorer when the record has one. A prompt without an
        answer has no verifier: it is still an RL and evaluation prompt, but no gold accuracy is
        measured on it (the data stage refuses a file that mixes the two)."""
        from alignline.data.tasks import check_match

        if not prompt or prompt[-1]["role"] != "user":
            raise _Bad("prompt must end with a user turn")
        task = obj.get(self.c.task, self.cfg.default_task)
        if not isinstance(task, str) or not task:
            raise _Bad(f"task must be a non-empty string, got {task!r}")
        key = answer_key or self.c.answer
        if obj.get(key) is None:
            return {"prompt": prompt, "task": task}
        raw = obj[key]
        # A numeric answer in JSON (`"answer": 19`) is the text "19"; the numeric scorer compares values.
        answer = str(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else _field(obj, key)
        try:
            match = check_match(obj.get(self.c.match, self.cfg.default_match))
        except ValueError as exc:
            raise _Bad(str(exc)) from None
        return {"prompt": prompt, "answer": answer, "task": task, "match": match}


def prompt_of(record: dict) -> str | None:
    """The text a length cap applies to: the prompt turns (or the whole text for pretraining)."""
    if "text" in record:
        return record["text"]
    msgs = record.get("prompt") or [m for m in record["messages"][:-1]]
    return "\n".join(m["content"] for m in msgs)


# --------------------------------------------------------------------------- the loader


def load_records(
    source: LoaderConfig | str | Path,
    tokenizer: Any | None = None,
    progress: bool = False,
    **fields: Any,
) -> list[dict]:
    """Read, convert and validate a source; return records or raise DataValidationError listing all problems.

    `source` is a LoaderConfig, or a path/hub id with LoaderConfig fields as keywords:
    `load_records("alpaca.json", kind="sft")`.
    """
    if isinstance(source, LoaderConfig):
        if fields:
            source = source.model_copy(update=fields)
            source = LoaderConfig.model_validate(source.model_dump())
        cfg = source
    else:
        from alignline.config import config_from_dict

        cfg = config_from_dict(LoaderConfig, {"path": str(source), **fields}, source="load_records(...)")
    problems: list[Problem] = []
    conv = Converter(cfg)
    fmt = None if cfg.format == "auto" else cfg.format
    records: list[dict] = []
    too_long: list[Problem] = []
    length: Callable[[str], int] | None = None
    if cfg.max_prompt_length is not None:
        if cfg.length_unit == "tokens":
            if tokenizer is None:
                raise ValueError(
                    "max_prompt_length is in tokens but no tokenizer was given; pass `tokenizer=` or set "
                    "length_unit: chars"
                )
            length = lambda s: len(tokenizer.encode(s, add_special_tokens=False))  # noqa: E731
        else:
            length = len
    raws: Iterable[Raw] = read_raw(cfg, problems)
    if progress:
        from tqdm import tqdm

        raws = tqdm(raws, desc=f"reading {cfg.path}", unit=" rec")
    seen_any = False
    for raw in raws:
        seen_any = True
        try:
            if fmt is None:
                fmt = conv.detect(raw.obj)
            rec = conv.convert(fmt, raw.obj)
        except _Bad as exc:
            problems.append(Problem(raw.file, raw.line, str(exc)))
            continue
        if length is not None:
            text = prompt_of(rec)
            n = length(text) if text is not None else 0
            if n > cfg.max_prompt_length:
                too_long.append(Problem(raw.file, raw.line, f"prompt is {n} {cfg.length_unit} long, over "
                                        f"max_prompt_length={cfg.max_prompt_length}"))
                continue
        records.append(rec)
        if cfg.limit is not None and len(records) >= cfg.limit:
            break
    if too_long and cfg.on_too_long == "error":
        problems.extend(too_long)
    if not seen_any and not problems:
        problems.append(Problem(cfg.path, None, "dataset is empty (no records)"))
    elif not records and not problems:
        problems.append(Problem(cfg.path, None, f"dataset is empty: all {len(too_long)} records were over "
                                "max_prompt_length; raise it or use shorter data"))
    if problems:
        order = {f: i for i, f in enumerate(dict.fromkeys(p.file for p in problems))}
        problems.sort(key=lambda p: (order[p.file], p.line or 0))
        raise DataValidationError(problems, what=f"{cfg.kind} data {cfg.path}")
    if too_long:
        warnings.warn(
            f"{cfg.path}: dropped {len(too_long)} record(s) with prompts over max_prompt_length="
            f"{cfg.max_prompt_length} {cfg.length_unit} (first: {too_long[0]}); set on_too_long: error to refuse",
            stacklevel=2,
        )
    return records


def load_suite_split(data_dir: str | Path, kind: Kind, split: str, **kw: Any) -> list[dict]:
    """Read and validate `<data_dir>/<kind>/<split>.jsonl` of the built-in suite (or a prepared dataset)."""
    path = Path(data_dir) / kind / f"{split}.jsonl"
    return load_records(LoaderConfig(path=str(path), kind=kind, format="messages" if kind != "pretrain" else "text",
                                     hub=False, **kw))


def iter_pretrain_texts(paths: Iterable[str | Path], text_unit: str = "line") -> Iterator[str]:
    """Validated texts from local files/dirs (for tokenizer training); each source is validated in full first."""
    for p in paths:
        p = Path(p)
        unit = text_unit
        for rec in load_records(LoaderConfig(path=str(p), kind="pretrain", text_unit=unit, hub=False)):
            yield rec["text"]
