"""A batch job, declared once: what to read, which model, which methods with which options, which targets, where to
write, on which executor. `JobSpec.validate()` checks everything that can be checked without reading an image or
loading the model; `check_model` the rest, before any image is decoded. docs/batch.md §1.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

from vitx_fast.models.loading import file_digest
from vitx_fast.models.loading import model_identity as _model_identity

EXECUTORS = ("local", "ray")


class JobSpecError(ValueError):
    """A job that cannot run as declared; the message is one line naming the problem and the valid choices."""


@dataclass
class JobSpec:
    """inputs: files, folders, globs, list files (.txt/.lst: one path a line) or tables (.parquet/.csv with an image
    column of paths or bytes). methods: names, or ["all"] (every method that can explain the model). options:
    {method: {option: value}}. target: "top1", "topK" (e.g. "top5"), "all", "classes:3,5" (or "3,5")."""

    inputs: list[str]
    store: str
    methods: list[str] = field(default_factory=lambda: ["reciprocam"])
    options: dict[str, dict] = field(default_factory=dict)
    target: str = "top1"
    model: str = "demo"
    checkpoint: str | None = None
    random_weights: bool = False
    batch_size: int = 32
    device: str = "cpu"
    executor: str = "local"
    address: str | None = None  # ray: an existing cluster ("auto", "127.0.0.1:6379"); None starts a local Ray
    actors: int = 1  # ray: size of the actor pool (each loads the model once)
    cpus_per_actor: float | None = None  # ray: CPUs reserved per actor (default: fits the cluster, at most 1)
    ray_cpus: int | None = None  # ray: CPUs of the local Ray started for the job (default: all)
    image_column: str | None = None  # tables: the column with paths or bytes (default: "image", "path" or "bytes")
    id_column: str | None = None  # tables: the image key (default: an "id" column if there is one)
    heatmap: bool = False  # also store the map min-max normalised and upsampled to the input size, as uint8
    decode_workers: int = 2  # local: decoding threads, overlapped with the model
    shard_rows: int = 8192  # rows buffered before a result shard is committed
    flush_seconds: float = 30.0  # ... or seconds since the last commit

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> JobSpec:
        return cls(**d)

    @classmethod
    def from_cli(cls, args) -> JobSpec:
        """The spec of `vitx explain` arguments (see vitx_fast/cli/explain.py)."""
        options: dict[str, dict] = {}
        for text in args.option or []:
            method, key, value = parse_option(text)
            options.setdefault(method, {})[key] = value
        return cls(inputs=[str(p) for p in args.inputs], store=str(args.out), methods=list(args.method),
                   options=options, target=args.target, model=args.model, checkpoint=args.checkpoint,
                   random_weights=args.random_weights, batch_size=args.batch_size, device=args.device,
                   executor=args.executor, address=args.address, actors=args.actors,
                   cpus_per_actor=args.cpus_per_actor, ray_cpus=args.ray_cpus, image_column=args.image_column,
                   id_column=args.id_column, heatmap=args.heatmap, decode_workers=args.decode_workers,
                   shard_rows=args.shard_rows)

    @property
    def pretrained(self) -> bool | None:
        return False if self.random_weights else None

    def model_id(self) -> str:
        return model_identity(self.model, self.checkpoint, self.pretrained)

    def target_spec(self) -> str:
        return parse_target_spec(self.target)

    def validate(self) -> list[MethodPlan]:
        """Check the spec; return one MethodPlan per method (['all'] expands to every method). JobSpecError."""
        import vitx_fast as vx

        if not self.inputs:
            raise JobSpecError("no inputs: give image files, folders, globs, a list file or a table")
        if not self.store:
            raise JobSpecError("no output store: give --out STORE")
        if self.executor not in EXECUTORS:
            raise JobSpecError(f"executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        for name, lo in (("batch_size", 1), ("actors", 1), ("decode_workers", 1), ("shard_rows", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise JobSpecError(f"{name} must be an integer >= {lo}, got {v!r}")
        if self.cpus_per_actor is not None and not self.cpus_per_actor > 0:
            raise JobSpecError(f"cpus_per_actor must be > 0, got {self.cpus_per_actor!r}")
        check_device(self.device)
        if self.checkpoint and not os.path.isfile(self.checkpoint):
            raise JobSpecError(f"checkpoint not found: {self.checkpoint}")
        self.target_spec()
        available = vx.list_methods()
        names = available if list(self.methods) == ["all"] else list(self.methods)
        if not names:
            raise JobSpecError(f"no methods; available: {', '.join(available)}")
        unknown = [m for m in names if m not in available]
        if unknown:
            raise JobSpecError(f"unknown method {unknown[0]!r}; available: {', '.join(available)}")
        if len(set(names)) != len(names):
            raise JobSpecError(f"a method is given twice: {', '.join(names)}")
        stray = sorted(set(self.options) - set(names))
        if stray:
            raise JobSpecError(f"options given for {', '.join(stray)}, which is not among the methods "
                               f"({', '.join(names)})")
        return [method_plan(m, self.options.get(m, {})) for m in names]


@dataclass(frozen=True)
class MethodPlan:
    """One method of a job: its resolved options, their canonical JSON and the digest that keys the store."""

    name: str
    options: dict
    options_json: str
    digest: str


def method_plan(name: str, given: dict) -> MethodPlan:
    opts = method_options(name, given)
    return MethodPlan(name, opts, canonical_json(opts), options_digest(opts))


def method_options(name: str, given: dict) -> dict:
    """The method's full option set (defaults, presets, the given values), checked by the method itself."""
    import vitx_fast as vx

    try:
        return vx.get_method(name).resolve_options(dict(given))
    except (TypeError, ValueError) as exc:
        raise JobSpecError(str(exc)) from None


def _canonical(value, files: bool):
    """A JSON-able form of an option value. files=True: an existing file path becomes its content digest, so that the
    digest follows the file's content rather than its name."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (str, os.PathLike)):
        s = os.fspath(value)
        return {"file_sha256": file_digest(s)} if files and os.path.isfile(s) else s
    if isinstance(value, (list, tuple)):
        return [_canonical(v, files) for v in value]
    source = getattr(value, "source", None)  # a loaded T-TAME explainer remembers its checkpoint
    if isinstance(source, (str, os.PathLike)) and os.path.isfile(source):
        return _canonical(source, files)
    tensors = [getattr(value, k, None) for k in ("features", "labels")]  # a DAAM MemoryBank
    if all(t is not None and hasattr(t, "numpy") for t in tensors):
        h = hashlib.sha256()
        for t in tensors:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return {"memory_bank_sha256": h.hexdigest()[:16]}
    raise JobSpecError(f"an option value of type {type(value).__name__} cannot be recorded in a job; pass a file path")


def canonical_json(opts: dict) -> str:
    """The options as they are stored: sorted keys, no spaces, paths as given."""
    return json.dumps({k: _canonical(v, files=False) for k, v in opts.items()}, sort_keys=True, separators=(",", ":"))


def options_digest(opts: dict) -> str:
    """sha256 of the canonical options with file contents in place of paths: the first 16 hex digits."""
    text = json.dumps({k: _canonical(v, files=True) for k, v in opts.items()}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_identity(name: str, checkpoint: str | None = None, pretrained: bool | None = None) -> str:
    """'demo@<weights sha256>', '<timm name>@<checkpoint sha256>', '<timm name>@pretrained' or '@random'."""
    return _model_identity(name, checkpoint, pretrained)


def parse_target_spec(t) -> str:
    """top1 / None -> "top1"; "top5" -> "top5"; "all"; "3", "3,5" or "classes:3,5" -> "classes:3,5"."""
    from vitx_fast.engine.targets import top_k

    if t is None or t == "top1":
        return "top1"
    s = str(t).strip()
    if s == "all":
        return "all"
    if top_k(s) is not None:
        return "top1" if top_k(s) == 1 else s
    body = s.removeprefix("classes:")
    try:
        vals = [int(v) for v in body.split(",")]
    except ValueError:
        raise JobSpecError(f"target must be top1, topK (e.g. top5), all, or class indices like 3 or 3,5; got {t!r}") \
            from None
    if any(v < 0 for v in vals) or len(set(vals)) != len(vals):
        raise JobSpecError(f"target class indices must be distinct and >= 0, got {t!r}")
    return "classes:" + ",".join(map(str, vals))


def target_argument(spec: str, batch: int):
    """The `vx.explain` target of a target spec for a batch of `batch` images."""
    import torch

    if spec == "top1":
        return None
    if spec.startswith("classes:"):
        return torch.tensor([[int(v) for v in spec[8:].split(",")]] * batch, dtype=torch.long)
    return spec  # "topK" / "all"


def check_device(device: str) -> None:
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise JobSpecError(f"device must be cpu or cuda[:i], got {device!r}") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise JobSpecError(f"device {device!r} asked for, but CUDA is not available on this machine")
    if d.type not in ("cpu", "cuda"):
        raise JobSpecError(f"device must be cpu or cuda[:i], got {device!r}")


def check_model(spec: JobSpec, plans: list[MethodPlan], model) -> tuple[list[MethodPlan], list[str]]:
    """Check target and methods against the loaded model. Returns (plans that run, notes on methods dropped from
    'all'). An explicitly named method that cannot explain the model or honour the target is a JobSpecError."""
    from vitx_fast.api import prepare

    target = spec.target_spec()
    n = getattr(model, "num_classes", 0) or 0
    if target != "top1" and not n:
        raise JobSpecError(f"target {target!r} needs a classification head; this model has none (use top1)")
    if target.startswith("classes:"):
        bad = [int(v) for v in target[8:].split(",") if int(v) >= n]
        if bad:
            raise JobSpecError(f"class index {bad[0]} out of range for a model with {n} classes (0..{n - 1})")
    elif target.startswith("top") and int(target[3:]) > n:
        raise JobSpecError(f"target {target} asks for {target[3:]} classes; the model has {n}")
    keep, notes = [], []
    for p in plans:
        try:
            m = prepare(model, p.name, p.options, target_argument(target, 1)).method
            if target == "all" and not (m.multi_target or m.class_agnostic):
                raise ValueError(f"{p.name}: target 'all' needs a method that yields every class in one pass")
        except (ValueError, TypeError, NotImplementedError) as exc:
            if list(spec.methods) != ["all"]:
                raise JobSpecError(f"{p.name} cannot run this job: {str(exc).splitlines()[0]}") from None
            notes.append(f"{p.name} skipped: {str(exc).splitlines()[0]}")
            continue
        keep.append(p)
    if not keep:
        raise JobSpecError("no method can explain this model with this target: " + "; ".join(notes))
    return keep, notes


def parse_option(text: str) -> tuple[str, str, object]:
    """'method.key=value' -> (method, key, value); the value read as JSON (3, 0.5, true, null, [1, 2]) or a string."""
    head, sep, raw = text.partition("=")
    method, dot, key = head.partition(".")
    if not sep or not dot or not method or not key:
        raise JobSpecError(f"--option must look like method.key=value, got {text!r}")
    aliases = {"True": True, "False": False, "None": None}
    if raw in aliases:
        return method, key, aliases[raw]
    try:
        return method, key, json.loads(raw)
    except json.JSONDecodeError:
        return method, key, raw
