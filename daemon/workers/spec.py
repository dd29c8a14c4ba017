"""What a worker is asked to run: plain data that crosses the process
boundary as JSON (never pickled), and that the front can build without
importing torch."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field

from ipc.tensors import DTYPES

from .lifeline import PARENT_ENV

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
    # The metadata file the front validated and its hash: the worker reads
    # it again at load and refuses a file that changed since (daemon/workers/metadata.py).
    metadata: str | None = None
    metadata_hash: str | None = None

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
        buckets=list(model_cfg.buckets), spin_us=model_cfg.spin_us,
        metadata=model_cfg.metadata.path if model_cfg.metadata is not None else None,
        metadata_hash=model_cfg.metadata.hash if model_cfg.metadata is not None else None)


# -- starting a worker: shared by the daemon's supervisor and the batch job --

def share_cores(cpu_workers: int, fronts: int = 1) -> int:
    """Torch threads per CPU worker when the config says 0: the cores this
    process may use, less one for each front (a worker that takes every core
    starves the event loop, or the batch job's reader), shared among the
    CPU workers."""
    from ..supervisor.cores import usable_cpus
    return max(1, (usable_cpus() - fronts) // max(1, cpu_workers))


def worker_env(config_source: str, workdir: str) -> dict:
    """Workers import model factories by module path: the working directory
    (as for `python -m daemon`) and the config file's own directory (a model
    module kept beside its config) are importable."""
    env = dict(os.environ)
    config_dir = (os.path.dirname(os.path.abspath(config_source))
                  if os.path.exists(config_source) else "")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (workdir, config_dir, os.environ.get("PYTHONPATH", "")) if p)
    return env


def spawn_worker(ctrl_fd: int, wake_fd: int, cwd: str, env: dict):
    """``python -m daemon.workers.child`` with its control channel and wake eventfd,
    in a session of its own: a terminal's Ctrl-C reaches only the parent,
    which drains first and then stops its workers. It dies with its parent
    (daemon/workers/lifeline.py)."""
    return subprocess.Popen(
        [sys.executable, "-m", "daemon.workers.child", "--ctrl-fd", str(ctrl_fd),
         "--wake-fd", str(wake_fd)],
        pass_fds=(ctrl_fd, wake_fd), stdin=subprocess.DEVNULL, cwd=cwd,
        env={**env, PARENT_ENV: str(os.getpid())}, start_new_session=True)
