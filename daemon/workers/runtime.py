"""Loading and running one model on one device: the torch side of a worker.

Everything here is shared by the daemon's workers and the offline batch path,
so that both run the same model code with the same dtype, compile and
bucketing choices. The front process never imports this module (it does not
import torch at all).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .spec import ModelSpec, TensorDecl  # noqa: F401  (re-exported for the worker)

TORCH_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
WIRE_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}


class LoadError(Exception):
    """The model cannot be loaded or does not match its declared schema."""


def resolve_compile(mode: str, device: torch.device) -> str:
    """``auto``: off on the CPU (measured: torch.compile makes the small
    overhead-bound models served here slower on the CPU and costs ~20 s of
    start-up), ``default`` on CUDA, where fusing kernels pays."""
    if mode == "auto":
        return "default" if device.type == "cuda" else "off"
    return mode


def import_factory(path: str) -> Callable[[], Any]:
    module, _, attr = path.partition(":")
    try:
        mod = importlib.import_module(module)
    except Exception as e:
        raise LoadError(f"cannot import module {module!r} of factory {path!r}: {e}") from e
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise LoadError(f"module {module!r} has no attribute {attr!r} (factory {path!r})") from None


def weights_hash(module: torch.nn.Module) -> str:
    """Content hash of the weights: names, dtypes, shapes and bytes, in name
    order, so it identifies what runs whatever file it came from."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def _normalise_outputs(out: object) -> tuple[list[tuple[str, torch.Tensor]], bool]:
    if isinstance(out, torch.Tensor):
        return [("output", out)], True
    if isinstance(out, dict):
        return [(str(k), v) for k, v in out.items()], False
    if isinstance(out, (tuple, list)):
        return [(f"output{i}", v) for i, v in enumerate(out)], False
    raise LoadError(f"the model returned {type(out).__name__}; return a tensor, "
                    "a tuple of tensors or a dict of name to tensor")


class Runner:
    """One model on one device, ready to run padded batches."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.device = torch.device(spec.device)
        self.compile_mode = "off"
        self.model: torch.nn.Module | None = None
        self.forward: Callable[..., object] | None = None
        self.weights_hash = ""
        self.outputs: list[TensorDecl] = []
        self.single_output = True
        self.stream: torch.cuda.Stream | None = None
        self._dev_inputs: list[torch.Tensor] = []
        self.h2d: H2DTimes | None = None  # CUDA only
        self._h2d_events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        self._autocast: Callable[[], contextlib.AbstractContextManager[object]] = \
            contextlib.nullcontext

    # -- loading --------------------------------------------------------
    def load(self) -> None:
        spec = self.spec
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise LoadError(f"device {spec.device!r} is configured but CUDA is not "
                                "available on this machine; use devices = [\"cpu\"]")
            if (self.device.index or 0) >= torch.cuda.device_count():
                raise LoadError(f"device {spec.device!r} does not exist: this machine has "
                                f"{torch.cuda.device_count()} CUDA device(s)")
            torch.cuda.set_device(self.device)
        elif self.device.type != "cpu":
            raise LoadError(f"unsupported device {spec.device!r}; use cpu or cuda:N")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, spec.threads))
        self._check_metadata()
        model: torch.nn.Module
        if spec.artifact:
            try:
                model = torch.export.load(spec.artifact).module()
            except Exception as e:
                raise LoadError(f"cannot load torch.export artifact {spec.artifact!r}: {e}") from e
        else:
            if spec.factory is None:
                raise LoadError(f"model {spec.name!r} has neither a factory nor an artifact; "
                                "set one of them in its [[models]] entry")
            fn = import_factory(spec.factory)
            try:
                model = fn()
            except Exception as e:
                raise LoadError(f"factory {spec.factory!r} raised {type(e).__name__}: {e}") from e
            if not isinstance(model, torch.nn.Module):
                raise LoadError(f"factory {spec.factory!r} returned {type(model).__name__}, "
                                "not a torch.nn.Module")
            if spec.checkpoint:
                try:
                    state = torch.load(spec.checkpoint, map_location="cpu", weights_only=True)
                    model.load_state_dict(state)
                except Exception as e:
                    raise LoadError(f"cannot load checkpoint {spec.checkpoint!r} into "
                                    f"{spec.factory!r}: {e}") from e
            model = model.eval()
        self.weights_hash = weights_hash(model)
        self.model = model.to(self.device)
        if spec.dtype != "float32":
            self._autocast = lambda: torch.autocast(self.device.type,
                                                    dtype=TORCH_DTYPES[spec.dtype])
        self.compile_mode = resolve_compile(spec.compile, self.device)
        if self.compile_mode != "off":
            from torch import _dynamo
            # one graph per bucket; the default cache of 8 would recompile forever
            _dynamo.config.cache_size_limit = max(16, 2 * len(spec.buckets))
            self.forward = torch.compile(self.model, mode=self.compile_mode, dynamic=False)
        else:
            self.forward = self.model
        if self.device.type == "cuda":
            self.stream = torch.cuda.Stream(self.device)
            top = max(spec.buckets)
            self._dev_inputs = [torch.zeros((top, *t.shape), dtype=TORCH_DTYPES[t.dtype],
                                            device=self.device) for t in spec.inputs]
            self.h2d = H2DTimes()
            self._h2d_events = (torch.cuda.Event(enable_timing=True),
                                torch.cuda.Event(enable_timing=True))
        self._discover_outputs(self.model)

    def _check_metadata(self) -> None:
        """The metadata file again, before the weights are read: the front
        validated it, but it may have changed since (a restart after a crash,
        a batch job started long after its config was read). Its feature
        schema must still match the inputs, and it must be the very file the
        front validated, whose data version the front puts in every answer."""
        spec = self.spec
        if not spec.metadata:
            return
        from .metadata import MetadataError, read_metadata, schema_mismatch
        try:
            meta = read_metadata(spec.metadata)
        except MetadataError as e:
            raise LoadError(f"model metadata: {e}") from None
        problem = schema_mismatch(meta, [(t.name, t.dtype, t.shape) for t in spec.inputs])
        if problem is not None:
            raise LoadError(f"model metadata does not match the config: {problem}")
        if meta.hash != spec.metadata_hash:
            raise LoadError(f"the metadata file {spec.metadata} changed since the config was "
                            f"validated ({spec.metadata_hash} then, {meta.hash} now, data_version "
                            f"{meta.data_version!r}); reload the config (SIGHUP) to validate "
                            "and serve it")

    def _call(self, xs: list[torch.Tensor]) -> object:
        forward = self.forward
        assert forward is not None  # set by load, which runs before any batch
        if self.spec.single_input:
            return forward(xs[0])
        return forward(**{t.name: x for t, x in zip(self.spec.inputs, xs, strict=True)})

    def infer(self, xs: list[torch.Tensor]) -> object:
        """The model alone on inputs already on its device, under
        inference_mode and the configured autocast: no copies, and on CUDA no
        synchronise (the caller times it; bench/forward_times.py)."""
        with torch.inference_mode(), self._autocast():
            return self._call(xs)

    def compile_counts(self) -> dict[str, int] | None:
        """What torch.compile has built in this process: ``graphs`` (dynamo
        graphs; one per bucket for a model without graph breaks) and
        ``cudagraph_skips`` (graphs that reduce-overhead ran without CUDA
        graphs). None when compile is off. Counters are per process: a
        worker runs one Runner."""
        if self.compile_mode == "off":
            return None
        from torch._dynamo.utils import counters
        return {"graphs": int(counters["stats"]["unique_graphs"]),
                "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"])}

    def _discover_outputs(self, model: torch.nn.Module) -> None:
        """Run one zero sample to learn (or check) the output schema."""
        xs = [torch.zeros((1, *t.shape), dtype=TORCH_DTYPES[t.dtype], device=self.device)
              for t in self.spec.inputs]
        try:
            with torch.inference_mode(), self._autocast():
                out = model(xs[0]) if self.spec.single_input else \
                    model(**{t.name: x for t, x in zip(self.spec.inputs, xs, strict=True)})
        except Exception as e:
            raise LoadError(
                "the model failed on a zero sample of its declared input ("
                f"{', '.join(f'{t.name}: {t.dtype}{list(t.shape)}' for t in self.spec.inputs)}"
                f"): {type(e).__name__}: {e}") from e
        named, single = _normalise_outputs(out)
        found = []
        for name, t in named:
            if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.shape[0] != 1:
                raise LoadError(f"output {name!r} must be a tensor with the batch dimension first")
            if t.dtype not in WIRE_DTYPES:
                raise LoadError(f"output {name!r} has dtype {t.dtype}, "
                                "which the protocol cannot carry")
            found.append(TensorDecl(name, WIRE_DTYPES[t.dtype], tuple(t.shape[1:])))
        declared = self.spec.outputs
        if declared:
            want = [(d.dtype, d.shape) for d in declared]
            got = [(d.dtype, d.shape) for d in found]
            if want != got or (self.spec.single_output is not None
                               and self.spec.single_output != single):
                raise LoadError(f"the model's outputs {_fmt(found)} do not match the declared "
                                f"outputs {_fmt(declared)}; fix `output`/`outputs` in the config")
            found = [TensorDecl(d.name, f.dtype, f.shape)
                     for d, f in zip(declared, found, strict=True)]
        self.outputs = found
        self.single_output = single

    # -- running ----------------------------------------------------------
    def run_batch(self, in_views: list[torch.Tensor], out_views: list[torch.Tensor],
                  n: int) -> None:
        """Run one padded batch. ``in_views`` are host tensors of shape
        ``[bucket, ...]`` (shared memory in a worker); the first ``n`` rows of
        each output are written into ``out_views`` (host tensors)."""
        if self.stream is not None:
            self._run_cuda(in_views, out_views, n)
            return
        named, _ = _normalise_outputs(self.infer(in_views))
        for (_, o), dst in zip(named, out_views, strict=False):
            dst[:n].copy_(o[:n])

    def _run_cuda(self, in_views: list[torch.Tensor], out_views: list[torch.Tensor],
                  n: int) -> None:
        bucket = in_views[0].shape[0]
        stream, events, h2d = self.stream, self._h2d_events, self.h2d
        assert stream is not None and events is not None and h2d is not None  # load sets all three
        h2d_start, h2d_end = events
        with torch.cuda.stream(stream), torch.inference_mode():
            # The host views are registered (pinned) shared memory, so these
            # copies are truly asynchronous on this worker's own stream.
            xs = [d[:bucket] for d in self._dev_inputs]
            h2d_start.record(stream)
            for d, h in zip(xs, in_views, strict=True):
                d.copy_(h, non_blocking=True)
            h2d_end.record(stream)
            with self._autocast():
                out = self._call(xs)
            named, _ = _normalise_outputs(out)
            for (_, o), dst in zip(named, out_views, strict=False):
                dst[:n].copy_(o[:n], non_blocking=True)
        stream.synchronize()  # once per batch
        # Both events are complete now: reading them costs no wait. The
        # batch's results are in place already; a figure must not fail it.
        try:
            h2d.add(bucket, h2d_start.elapsed_time(h2d_end))
        except RuntimeError:
            pass

    def warm_up(self, in_views_by_bucket: Callable[[int], list[torch.Tensor]],
                out_views: list[torch.Tensor]) -> float:
        """Run every bucket (twice: compile, then steady state) before the
        worker reports ready. Returns seconds spent."""
        t0 = time.perf_counter()
        for bucket in self.spec.buckets:
            ins = in_views_by_bucket(bucket)
            for _ in range(2):
                self.run_batch(ins, out_views, min(bucket, out_views[0].shape[0]))
        if self.h2d is not None:
            self.h2d.reset()  # count served batches only
        return time.perf_counter() - t0


def _fmt(decls: Iterable[TensorDecl]) -> str:
    return "[" + ", ".join(f"{d.name}: {d.dtype}{list(d.shape)}" for d in decls) + "]"


class H2DTimes:
    """Host-to-device copy time of each batch's inputs, by bucket: CUDA events
    recorded on the worker's stream just before and after the copies from
    the ring slot, read after the batch's one synchronise (two event records
    a batch; no extra wait)."""

    def __init__(self) -> None:
        self.by_bucket: dict[int, list[float]] = {}  # bucket -> [batches, total ms, max ms]

    def add(self, bucket: int, ms: float) -> None:
        e = self.by_bucket.get(bucket)
        if e is None:
            self.by_bucket[bucket] = [1, ms, ms]
        else:
            e[0] += 1
            e[1] += ms
            if ms > e[2]:
                e[2] = ms

    def reset(self) -> None:
        self.by_bucket.clear()

    def snapshot(self) -> dict[str, Any]:
        """{"batches", "mean_us", "max_us", "by_bucket": {bucket: {"batches",
        "mean_us", "max_us"}}}, over every batch since warm-up."""
        # list() first: the serving thread may add a bucket meanwhile
        rows = {b: e[:] for b, e in sorted(list(self.by_bucket.items()))}
        n = sum(e[0] for e in rows.values())
        total = sum(e[1] for e in rows.values())
        return {"batches": n, "mean_us": round(total * 1e3 / n, 2) if n else None,
                "max_us": round(max(e[2] for e in rows.values()) * 1e3, 2) if n else None,
                "by_bucket": {str(b): {"batches": e[0], "mean_us": round(e[1] * 1e3 / e[0], 2),
                                       "max_us": round(e[2] * 1e3, 2)} for b, e in rows.items()}}


def is_pinned(t: torch.Tensor) -> bool:
    """Whether CUDA sees ``t``'s host memory as page-locked (``Tensor.is_pinned``
    asks the driver, cudaPointerGetAttributes): a check of the registration
    made independently of cudaHostRegister's return code. False without CUDA."""
    if not torch.cuda.is_available():
        return False
    try:
        return bool(t.is_pinned())
    except RuntimeError:
        return False


def pin_host_memory(address: int, nbytes: int) -> bool:
    """Page-lock an existing host mapping for async H2D/D2H copies
    (cudaHostRegister). Returns False where CUDA is not in use."""
    if not torch.cuda.is_available():
        return False
    err = torch.cuda.cudart().cudaHostRegister(address, nbytes, 0)
    if int(err) != 0:
        raise LoadError(f"cudaHostRegister of {nbytes} bytes of shared memory failed "
                        f"(error {int(err)}); raise the locked-memory limit (ulimit -l)")
    return True


def unpin_host_memory(address: int) -> None:
    if torch.cuda.is_available():
        torch.cuda.cudart().cudaHostUnregister(address)
