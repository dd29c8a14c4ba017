"""What a worker is asked to run: plain data that crosses the process
boundary as JSON (never pickled), and that the front can build without
importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from ipc.tensors import DTYPES

ITEMSIZE = {name: d.itemsize for name, d in DTYPES.items()}


@dataclass(frozen=True)
class TensorDecl:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict) -> "TensorDecl":
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass
class ModelSpec:
    """What a worker needs to know about its model: plain data, JSON-able, so
    it crosses the process boundary without pickling."""

    name: str
    version: str
    factory: str | None
    artifact: str | None
    checkpoint: str | None
    inputs: list[TensorDecl]
    single_input: bool
    outputs: list[TensorDecl] = field(default_factory=list)  # declared; may be empty
    single_output: bool | None = None
    device: str = "cpu"
    dtype: str = "float32"
    compile: str = "auto"
    threads: int = 1
    buckets: list[int] = field(default_factory=lambda: [1])
    spin_us: float = 0.0

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["inputs"] = [t.to_json() for t in self.inputs]
        d["outputs"] = [t.to_json() for t in self.outputs]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ModelSpec":
        d = dict(d)
        d["inputs"] = [TensorDecl.from_json(t) for t in d["inputs"]]
        d["outputs"] = [TensorDecl.from_json(t) for t in d.get("outputs", [])]
        return cls(**d)


def spec_for(model_cfg, device: str, threads: int) -> ModelSpec:
    """The ModelSpec of one worker of a configured model."""
    return ModelSpec(
        name=model_cfg.name, version=model_cfg.version, factory=model_cfg.factory,
        artifact=model_cfg.artifact, checkpoint=model_cfg.checkpoint,
        inputs=[TensorDecl(n, s.dtype, tuple(s.shape)) for n, s in model_cfg.inputs],
        single_input=model_cfg.single_input,
        outputs=[TensorDecl(n, s.dtype, tuple(s.shape)) for n, s in model_cfg.outputs],
        single_output=model_cfg.single_output,
        device=device, dtype=model_cfg.dtype, compile=model_cfg.compile, threads=threads,
        buckets=list(model_cfg.buckets), spin_us=model_cfg.spin_us)
