"""TensorRT and TensorRT-RTX: one adapter, two libraries.

Both expose the same Python API (Builder, OnnxParser, optimization profiles, build_serialized_network,
set_input_shape / set_tensor_address / execute_async_v3), so every code path here is shared; the only
differences are the module imported and what each needs told:

- TensorRT (datacenter GPUs) builds on the GPU it targets; 10.x needs the STRONGLY_TYPED flag to
  take precision from the graph, 11 is strongly typed only (BuilderFlag.FP16 is gone in both
  cases for us: FP16 lives in the ONNX). Its timing cache persists per GPU model and version.
- TensorRT-RTX builds ahead of time for named compute capabilities, without a GPU; it has no SM90
  (H100/H200) and its timing cache is a no-op.

Execution uses torch tensors as I/O on a torch CUDA stream (no pycuda), as NVIDIA's demos do.
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from typing import Any, Mapping

from trtforge.backends.base import Backend, BuildJob, Engine, Target
from trtforge.devices import GpuInfo, distinct_models
from trtforge.errors import EnvironmentProblem

RTX_SM = {"sm75": "7.5", "sm80": "8.0", "sm86": "8.6", "sm89": "8.9", "sm120": "12.0", "sm121": "12.1"}
HARDWARE_COMPATIBILITY = {"none": "NONE", "ampere+": "AMPERE_PLUS",
                          "same-compute-capability": "SAME_COMPUTE_CAPABILITY"}


class TensorRTBackend(Backend):
    engine_file = "engine.plan"
    multiple_profiles = True

    def __init__(self, module: str) -> None:
        self.module = module
        self.rtx = module == "tensorrt_rtx"
        self.name = "tensorrt-rtx" if self.rtx else "tensorrt"
        self.distribution = "tensorrt-rtx-cu13" if self.rtx else "tensorrt-cu13"

    def trt(self) -> Any:
        return importlib.import_module(self.module)

    def library_version(self) -> str:
        return str(self.trt().__version__)

    # --- targets -------------------------------------------------------------------------------------
    def targets(self, *, gpus: list[GpuInfo], rtx_targets: tuple[str, ...]) -> list[Target]:
        if self.rtx:
            # One plan for every offline target: TensorRT-RTX builds a multi-architecture plan in the
            # time of one (its kernels are compiled on the target GPU at load), so N targets cost one build.
            offline = ([Target(name="-".join(rtx_targets), kind="aot",
                               compute_capabilities=tuple(RTX_SM[t] for t in rtx_targets))] if rtx_targets else [])
            # RTX GPUs present here are targeted too (and can be checked); SM90 is not supported.
            local = [Target(name=g.sm, kind="aot", compute_capabilities=(g.compute_capability,), gpu=g.as_dict())
                     for g in gpus if g.sm in RTX_SM and g.sm not in rtx_targets]
            return offline + local
        return [Target(name=key, kind="gpu", compute_capabilities=(group[0].compute_capability,),
                       gpu=group[0].as_dict()) for key, group in distinct_models(gpus).items()]

    # --- build ---------------------------------------------------------------------------------------
    def build(self, job: BuildJob, log: Any, candidate: str = "") -> dict[str, Any]:
        trt = self.trt()
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(self._network_flags(trt))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(job.fp16_onnx):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EnvironmentProblem(f"{self.name} could not parse {Path(job.fp16_onnx).name}: {errors}")

        config = builder.create_builder_config()
        profiles = job.profiles()
        for shapes in profiles:
            profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in shapes.items():
                profile.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(profile)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        config.builder_optimization_level = int(job.options.get("builder_optimization_level", 3))
        level = job.options.get("hardware_compatibility", "none")
        if level != "none":
            config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, HARDWARE_COMPATIBILITY[level])
        target = Target(**{**job.target, "compute_capabilities": tuple(job.target["compute_capabilities"])})
        if self.rtx:
            config.num_compute_capabilities = len(target.compute_capabilities)
            for i, cc in enumerate(target.compute_capabilities):
                config.set_compute_capability(getattr(trt.ComputeCapability, "SM" + cc.replace(".", "")), i)

        cache_path = self._timing_cache_path(job, target)
        if cache_path is not None:
            blob = cache_path.read_bytes() if cache_path.is_file() else b""
            config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=False)

        start = time.perf_counter()
        plan = builder.build_serialized_network(network, config)
        seconds = time.perf_counter() - start
        if plan is None:
            raise EnvironmentProblem(f"{self.name} failed to build an engine for {target.name}; see build.log")
        out = Path(job.out_dir)
        (out / self.engine_file).write_bytes(plan)
        meta: dict[str, Any] = {"build_seconds": round(seconds, 2), "plan_bytes": plan.nbytes,
                                "profiles": [{k: [list(s) for s in v] for k, v in p.items()} for p in profiles],
                                "strongly_typed": True}
        if cache_path is not None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
            (out / "timing.cache").write_bytes(cache_path.read_bytes())
            meta["timing_cache"] = f".trtforge/.timing-caches/{cache_path.name}"  # relative to the output directory
        if target.kind == "gpu" or target.gpu is not None:
            meta["layers"] = self._inspect(plan, out)
        return meta

    def _network_flags(self, trt: Any) -> int:
        if self.rtx or int(self.library_version().split(".")[0]) >= 11:
            return 0  # strongly typed is the only mode
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)

    def _timing_cache_path(self, job: BuildJob, target: Target) -> Path | None:
        if self.rtx or not job.cache_dir:  # the timing cache is a no-op in TensorRT-RTX
            return None
        return Path(job.cache_dir) / f"{self.name}-{self.library_version()}-{target.name}.cache"

    def _inspect(self, plan: Any, out: Path) -> int:
        """The engine inspector's per-layer summary (needs the GPU the engine is for)."""
        trt = self.trt()
        engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(plan)
        if engine is None:
            return 0
        info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
        (out / "layers.json").write_text(info)
        return len(json.loads(info).get("Layers", []))

    # --- load ----------------------------------------------------------------------------------------
    def load(self, engine_dir: Path, entry: dict[str, Any], device: str) -> Engine:
        return TensorRTEngine(self, engine_dir / self.engine_file, device)


class TensorRTEngine(Engine):
    def __init__(self, backend: TensorRTBackend, plan: Path, device: str) -> None:
        import torch

        trt = backend.trt()
        self.backend, self.device = backend.name, device
        self.torch_device = torch.device(device)
        with torch.cuda.device(self.torch_device):
            self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
            if self.engine is None:
                raise EnvironmentProblem(f"{backend.name} could not deserialize {plan}; rebuild it for this GPU")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(device=self.torch_device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: _torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.active_profile = 0

    def _select_profile(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Switch to the first optimization profile whose ranges hold every input's shape."""
        for index in range(self.engine.num_optimization_profiles):
            ranges = {n: self.engine.get_tensor_profile_shape(n, index) for n in self.inputs}
            if all(all(lo <= s <= hi for s, lo, hi in zip(shape, ranges[n][0], ranges[n][2]))
                   for n, shape in shapes.items()):
                if index != self.active_profile:
                    self.context.set_optimization_profile_async(index, self.stream.cuda_stream)
                    self.active_profile = index
                return
        raise EnvironmentProblem(f"no optimization profile of this engine holds shapes {shapes}")

    def __call__(self, feed: Mapping[str, Any], *, real_tokens: int | None = None) -> dict[str, Any]:
        import torch

        results = {}
        with torch.cuda.device(self.torch_device):
            self._select_profile({n: tuple(feed[n].shape) for n in self.inputs})
            for name in self.inputs:
                tensor = feed[name].to(self.torch_device, self.dtypes[name]).contiguous()
                self.context.set_input_shape(name, tuple(tensor.shape))
                self.context.set_tensor_address(name, tensor.data_ptr())
                results[name] = tensor  # keep alive until the stream is done
            outputs = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.torch_device)
                self.context.set_tensor_address(name, outputs[name].data_ptr())
            self.stream.wait_stream(torch.cuda.current_stream())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise EnvironmentProblem(f"{self.backend} execution failed")
            torch.cuda.current_stream().wait_stream(self.stream)
        return outputs

    def close(self) -> None:
        self.context = self.engine = self.runtime = None


def _torch_dtype(trt_dtype: Any) -> Any:
    import torch

    return {"FLOAT": torch.float32, "HALF": torch.float16, "INT32": torch.int32, "INT64": torch.int64,
            "BOOL": torch.bool, "INT8": torch.int8, "BF16": torch.bfloat16}[trt_dtype.name]
